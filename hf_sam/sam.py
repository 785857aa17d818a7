"""`SAM`, the optimizer wrapper for custom training loops (plain PyTorch or Accelerate), torch only; and, for the
code that imports them from here, the math's names (their homes: `hf_sam.perturbation` the settings and ε,
`hf_sam.weight_backup` and `hf_sam.low_precision` moving the weights and what low precision keeps, `hf_sam.norms`
norms over sharded tensors, `hf_sam.one_pass` the look-ahead modes, `hf_sam.gsam_looksam` GSAM and LookSAM).
`SAMTrainer` does not call the wrapper's `ascent_step` / `descent_step`: it takes its steps with the same math
(`perturb_`, `LookAhead`) and uses the wrapper for what checkpoints and the optimizer step need (the param
groups' SAM settings, `state_dict`, the non-finite guard, the fp16 protocol).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from hf_sam.gsam_looksam import gsam_gradient_, looksam_orthogonal_component, looksam_reuse_gradient_
from hf_sam.low_precision import (
    AppliedPerturbation,
    LowPrecisionPerturbationWarning,
    measure_applied_perturbation,
)
from hf_sam.norms import LOW_PRECISION, all_reduce_mean_, dot, global_norm, local_tensors, mark_partitioned
from hf_sam.one_pass import (
    AdamUpdate,
    LookAhead,
    adam_update_direction,
    check_adam_update,
    direction_norm,
    momentum_direction,
    momentum_state_key,
)
from hf_sam.perturbation import (
    NORM_EPS,
    SAM_NORMS,
    PerturbationGroup,
    compute_perturbation_,
    perturb_,
    perturbation_group,
    perturbation_settings,
    project_to_ball_,
    scheduled_rho,
    validate_sam_hparams,
)
from hf_sam.weight_backup import WeightBackup

__all__ = [
    # this module
    "SAM",
    "NonFiniteTrainingError",
    # re-exported from their homes
    "LOW_PRECISION",
    "NORM_EPS",
    "SAM_NORMS",
    "AdamUpdate",
    "AppliedPerturbation",
    "LookAhead",
    "LowPrecisionPerturbationWarning",
    "PerturbationGroup",
    "WeightBackup",
    "adam_update_direction",
    "all_reduce_mean_",
    "check_adam_update",
    "compute_perturbation_",
    "direction_norm",
    "dot",
    "global_norm",
    "gsam_gradient_",
    "local_tensors",
    "looksam_orthogonal_component",
    "looksam_reuse_gradient_",
    "mark_partitioned",
    "measure_applied_perturbation",
    "momentum_direction",
    "momentum_state_key",
    "perturb_",
    "perturbation_group",
    "perturbation_settings",
    "project_to_ball_",
    "scheduled_rho",
    "validate_sam_hparams",
]


class NonFiniteTrainingError(RuntimeError):
    """Raised after too many consecutive optimizer steps with a non-finite loss or gradient."""


class SAM(torch.optim.Optimizer):
    """SAM around an already-built optimizer, for custom training loops (plain PyTorch or Accelerate).

    Usage::

        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5)
        sam = SAM(base, rho=0.05)
        for batch in loader:
            sam.ascent_step(loss_fn(model, batch))  # gradient at w (autograd.grad), w -> w + ε
            loss_fn(model, batch).backward()        # gradient at w + ε
            sam.descent_step()                      # w + ε -> w, then the base optimizer steps
            sam.zero_grad()

    `ascent_step(loss)` leaves `.grad` alone, so the same loop works with gradient accumulation
    (`accelerator.accumulate`): per micro-batch ascent, backward at w + ε, `sam.restore()`; the prepared
    optimizer's `step()` then runs at the accumulation boundary only. `ascent_step()` without a loss reads (and
    consumes) the gradients already in `.grad` instead. With a `torch.amp.GradScaler`, `scaler.step(sam)` leaves
    w restored whether or not the scaler skips the step (the wrapper follows the scaler's protocol for optimizers
    that handle scaling themselves: it unscales, or skips on inf/NaN, after restoring w).

    The wrapper shares the base optimizer's `param_groups` (LR schedulers built on either keep working) and
    keeps its hyper-parameters in each group (`rho`, `adaptive`, `eta`, `sam_norm`): set `rho=0` in a group
    to leave it unperturbed (e.g. a freshly initialised head); ||g|| runs over the perturbed groups only.
    Weight decay stays the base optimizer's business; it never enters ε. With Accelerate, call `ascent_step`
    under `accelerator.no_sync(model)` for the first pass to keep ε per process (the paper's setting).
    Schedule-free base optimizers work: `train()` / `eval()` reach the base optimizer.
    """

    # GradScaler.step(sam) calls step() even on inf/NaN and sets `grad_scale` / `found_inf` on the optimizer, so
    # that step() can restore w first and then skip or unscale (see GradScaler.step's contract for such optimizers).
    # SAMTrainer turns this off on its instance: it restores w itself, and Accelerate detects a skipped step by
    # whether the scaler called step().
    _step_supports_amp_scaling = True

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        norm: str = "2",
        mode: str = "sam",
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "SAM wraps an optimizer instance, e.g. SAM(torch.optim.SGD(model.parameters(), lr=0.1)); "
                f"got {type(base_optimizer).__name__}."
            )
        validate_sam_hparams(rho, adaptive, eta, norm)
        if mode not in ("sam", "momentum", "adam_update"):
            raise ValueError(
                "mode must be 'sam', 'momentum' (Momentum-SAM, one pass) or 'adam_update' (one pass along Adam's "
                f"update), got {mode!r}."
            )
        if mode != "sam" and (adaptive or norm != "2"):
            raise ValueError(
                f"mode={mode!r} perturbs by -rho*d/||d||_2: use it with adaptive=False and norm='2'."
            )
        if mode == "adam_update":
            check_adam_update(base_optimizer)
        # Momentum-SAM: which state entry holds v (checked now: an optimizer without momentum is refused here).
        self.mode = mode
        self.momentum_key = momentum_state_key(base_optimizer) if mode == "momentum" else None
        self.base_optimizer = base_optimizer
        self.defaults = base_optimizer.defaults
        for group in base_optimizer.param_groups:
            _with_settings(group, perturbation_settings(rho, adaptive, eta, norm))
        # torch.optim.Optimizer.__init__ is not called (param_groups and state are the base's); the hook tables
        # that torch's step/state_dict machinery looks up still have to exist.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        # This wrapper's backup of w, for custom loops (`ascent_step` / `restore`). SAMTrainer keeps its own
        # (`SAMMixin._sam_backup`), which does not depend on a wrapper (under DeepSpeed there is none, and a wrapper
        # may be the user's or rebuilt for each new model); under the Trainer this one stays empty, so the
        # `restore()` in `step()` finds nothing to restore.
        self._backup = WeightBackup()
        self._look_ahead = LookAhead()  # the one-pass modes
        self.sam_state: dict = {}  # variant state that must survive a checkpoint (saved by state_dict)
        # Non-finite guard (off by default; SAMTrainer turns it on in fp32/bf16): skip, count, stop after N.
        self.max_nonfinite_steps = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite_steps = 0
        self._loss_is_finite: torch.Tensor | None = None
        # Told after every guarded step whether it was skipped (SAMTrainer reports it to Accelerate).
        self.on_guarded_step: Callable[[bool], None] | None = None
        self.skipped_ascents = 0

    # The wrapper *is* the base optimizer as far as schedulers and checkpoints are concerned.
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.base_optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.base_optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.base_optimizer.state = value

    @property
    def applied_perturbation(self) -> AppliedPerturbation | None:
        """For weights held in bf16/fp16: what their rounding kept of ε at the first `ascent_step` (also warned once,
        `LowPrecisionPerturbationWarning`); None for float32 weights, which hold w + ε exactly."""
        return self._backup.applied_perturbation

    def ascent_step(self, loss: torch.Tensor | None = None) -> torch.Tensor:
        """Move the perturbed parameters from w to w + ε. Returns ||g|| (0-dim tensor).

        With `loss` (the loss at w, not yet backpropagated): g = ∇loss by `torch.autograd.grad`; `.grad` is left
        untouched, so gradients accumulated from earlier micro-batches stay as they are. Without: g is read from
        `.grad` and consumed (set to None once ε is applied), so the next backward gives the gradient
        at w + ε alone. Parameters without a gradient (unused by the forward) are not perturbed. If g is not
        finite the weights stay at w (counted in `skipped_ascents`) and the descent step is a plain step.
        """
        perturbed = [(group, [p for p in group["params"] if p.requires_grad]) for group in self.param_groups]
        perturbed = [(group, params) for group, params in perturbed if group["rho"] > 0 and params]
        if self.mode != "sam":
            return self._look_ahead_step(perturbed, loss)
        if loss is not None:
            flat = [p for _, params in perturbed for p in params]
            found = iter(torch.autograd.grad(loss, flat, allow_unused=True) if flat else ())
            grads_of = [[next(found) for _ in params] for _, params in perturbed]
        else:
            grads_of = [[p.grad for p in params] for _, params in perturbed]
        groups = []
        for (group, params), grads in zip(perturbed, grads_of, strict=True):
            used = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
            if used:
                groups.append(perturbation_group(group, [p for p, _ in used], [g for _, g in used]))
        grad_norm = perturb_(self._backup, groups) if groups else torch.zeros(())
        if groups and not torch.isfinite(grad_norm):
            self.skipped_ascents += 1
        if loss is None:
            # ε lives on in the weights only; dropping the gradients means the next backward is ∇L(w + ε) alone,
            # whether or not the caller remembers zero_grad().
            self.zero_grad()
        return grad_norm

    def _look_ahead_step(self, perturbed: list, loss) -> torch.Tensor:
        """The one-pass modes: w -> w − ρ·d/‖d‖ before the step's one forward+backward (no pass, no gradient), d the
        base optimizer's momentum v (mode='momentum') or Adam's update u = m̂/(√v̂ + ε) (mode='adam_update'). Each
        group at its own ρ, one norm ‖d‖ over all. Before the base optimizer's first step there is no d: w stays (a
        plain step). Returns ‖d‖. No copy of the weights: `restore()` subtracts the same ε (`LookAhead`)."""
        if loss is not None:
            raise ValueError(
                f"mode={self.mode!r} takes no ascent gradient: call sam.ascent_step() before the forward, then "
                "backpropagate the loss (taken at the look-ahead point) and call sam.descent_step()."
            )
        params = [p for _, group_params in perturbed for p in group_params]
        if not params:
            direction = None
        elif self.mode == "adam_update":
            direction = adam_update_direction(self.base_optimizer, params)
        else:
            direction = momentum_direction(self.base_optimizer, params, self.momentum_key)
        if direction is None:
            return torch.zeros(())
        groups, start = [], 0
        for group, group_params in perturbed:
            groups.append((group_params, direction[start : start + len(group_params)], -group["rho"]))
            start += len(group_params)
        self._look_ahead.leave_()
        norm = self._look_ahead.set_(groups)
        self._look_ahead.enter_()
        if not torch.isfinite(norm):
            self.skipped_ascents += 1
        return norm

    @torch.no_grad()
    def restore(self) -> None:
        """Back to w (a copy back; mode='momentum' subtracts ε). `descent_step` does this itself; call it to abandon
        a step."""
        self._backup.restore_()
        self._look_ahead.leave_()

    def descent_step(self):
        """Restore w exactly, then step the base optimizer with the gradient taken at w + ε."""
        # Through self.step so that LR schedulers' step counters (they patch optimizer.step) see it.
        return self.step()

    def step(self, closure=None):
        """Without a closure: restore w (if perturbed) and take the base optimizer's step, i.e.
        `descent_step()`; this is what `transformers.Trainer`, Accelerate and LR schedulers call.

        With a closure that zeroes the grads, runs forward + backward and returns the loss: a whole SAM step
        from the gradients already in `.grad` (ascent, closure at w + ε, descent). Prefer the explicit
        `ascent_step()`/`descent_step()` pair under fp16: a closure routed through a GradScaler-aware `step`
        sees still-scaled gradients.
        """
        if closure is None:
            self.restore()
            if not self._unscale_for_grad_scaler():
                return None  # a GradScaler found inf/NaN: skipped, w restored
            if self.max_nonfinite_steps:
                finite = self._gradients_are_finite()
                if self.on_guarded_step is not None:
                    self.on_guarded_step(not finite)
                if not finite:
                    return None  # skipped: the weights keep their last finite values
            return self.base_optimizer.step()
        closure = torch.enable_grad()(closure)
        self.ascent_step()
        loss = closure()
        self.step()
        return loss

    @torch.no_grad()
    def _unscale_for_grad_scaler(self) -> bool:
        """Under `GradScaler.step(sam)`: False if the scaler found inf/NaN, else unscale `.grad` if still scaled."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return True  # not called by a GradScaler
        if bool(found_inf):
            return False
        grad_scale = getattr(
            self, "grad_scale", None
        )  # None when the user already called scaler.unscale_(sam)
        if grad_scale is not None:
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch._foreach_mul_(grads, grad_scale.double().reciprocal().float())
        return True

    def train(self) -> None:
        """Train mode for schedule-free base optimizers (no-op for the others)."""
        if callable(getattr(self.base_optimizer, "train", None)):
            self.base_optimizer.train()

    def eval(self) -> None:
        """Eval mode for schedule-free base optimizers (no-op for the others)."""
        if callable(getattr(self.base_optimizer, "eval", None)):
            self.base_optimizer.eval()

    @torch.no_grad()
    def _gradients_are_finite(self) -> bool:
        """Guard for fp32/bf16 (fp16 has the GradScaler): a non-finite gradient (or a non-finite loss recorded
        with `note_loss`) skips the step; too many in a row stop the run with a clear error."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.isfinite(global_norm(grads)) if grads else torch.tensor(True)
        if self._loss_is_finite is not None:
            finite = finite & self._loss_is_finite.to(finite.device)
            self._loss_is_finite = None
        finite = bool(finite)  # the one host sync of the guard
        if finite:
            self.consecutive_nonfinite_steps = 0
            return True
        self.skipped_steps += 1
        self.consecutive_nonfinite_steps += 1
        if self.consecutive_nonfinite_steps >= self.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"{self.consecutive_nonfinite_steps} consecutive optimizer steps had a non-finite loss or gradient, "
                "so training stops. None of them was applied: the weights (and any checkpoint saved before) hold the "
                "last finite values. Lower the learning rate or sam_rho, check the data for corrupt examples, and "
                "resume from the last checkpoint (raise sam_max_nonfinite_steps to tolerate more)."
            )
        return False

    def note_loss(self, loss: torch.Tensor) -> None:
        """Record a loss of the step in progress; a NaN/inf one makes `step()` skip (checked there, no sync here)."""
        if not self.max_nonfinite_steps:
            return  # guard off (fp16 uses the GradScaler): nothing would ever read or reset the flag
        finite = torch.isfinite(loss.detach()).all()
        self._loss_is_finite = finite if self._loss_is_finite is None else self._loss_is_finite & finite

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        # The base optimizer's full state (momentum, Adam moments) plus the SAM hyper-parameters stored in its
        # param_groups, plus `sam_state` (what a variant keeps between steps, e.g. LookSAM's g_v) when not empty.
        # The backup buffers are transient: never holding anything between two steps.
        state = self.base_optimizer.state_dict()
        if self.sam_state:
            state["sam_state"] = {
                k: [None if t is None else t.clone() for t in v] if isinstance(v, list) else v
                for k, v in self.sam_state.items()
            }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.sam_state = dict(state_dict.pop("sam_state", {}))
        self.base_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        reference = self.param_groups[0] if self.param_groups else perturbation_settings()
        self.base_optimizer.add_param_group(
            _with_settings(dict(param_group), {key: reference[key] for key in perturbation_settings()})
        )

    def __repr__(self) -> str:
        return f"SAM({self.base_optimizer!r})"


def _with_settings(group: dict, defaults: dict) -> dict:
    """Fill a param group's missing SAM settings from `defaults` and check them."""
    for key, value in defaults.items():
        group.setdefault(key, value)
    validate_sam_hparams(group["rho"], group["adaptive"], group["eta"], group["sam_norm"])
    return group
