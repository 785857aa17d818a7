"""The one-pass variants' home (torch only): the direction they look ahead along, read from what the optimizer
keeps, and the look-ahead point itself.

`sam_mode="momentum"` (Momentum-SAM, Becker, Altrock & Risse 2024) looks ahead to w − ρ·v/‖v‖, v the base
optimizer's momentum (its own state tensors, no copy: `momentum_direction`); `sam_mode="adam_update"` to
w − ρ·u/‖u‖, u = m̂/(√v̂+ε) the update Adam(W) takes next (`AdamUpdate`, read one tensor at a time, never a buffer
the size of the model); `sam_mode="previous_gradient"` to w + ρ·g/‖g‖, g the gradient the previous optimizer step
applied, kept in the `SAM` wrapper's `sam_state` so checkpoints carry it. Which optimizer keeps what is
`hf_sam.optimizer_state`'s table. The point is `LookAhead`: fixed once per optimizer step, entered for each
micro-batch's forward+backward and left right after, without a copy of the weights. `SAMMixin` decides when
(`OnePass`, one training loop's state); the `SAM` wrapper's one-pass modes use the same math.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from hf_sam.norms import LOW_PRECISION, global_norm, is_dtensor, unsupported_layout
from hf_sam.optimizer_state import is_adam, missing_momentum, optimizer_state
from hf_sam.perturbation import NORM_EPS
from hf_sam.weight_backup import WeightBackup

if TYPE_CHECKING:
    from hf_sam.sam import SAM

# The modes that take one forward+backward per step, at a point fixed without an ascent gradient.
ONE_PASS_MODES = ("momentum", "adam_update", "previous_gradient")
# `AdamUpdate` reads u in pieces of at most this many elements (4 MiB in float32): its only memory beyond the
# optimizer's, and small enough to stay in a CPU's cache between the two passes that use it.
PIECE = 1 << 20


# ---------------------------------------------------------------------- the directions, read from the optimizer
def refuse_maximize(optimizer: torch.optim.Optimizer, mode: str) -> None:
    """The look-ahead modes point along −v (−u), the direction the optimizer steps when it minimises; with
    maximize=True it steps along +v, so the look-ahead would point away from the step. Refused, not flipped."""
    if any(group.get("maximize") for group in optimizer.param_groups):
        raise ValueError(
            f"sam_mode={mode!r} (mode={mode!r}) looks ahead along the step a minimising optimizer takes, but "
            f"{type(optimizer).__name__} has maximize=True. Minimise the negated objective instead, or use "
            "sam_mode='sam'."
        )


def momentum_state_key(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer-state entry that holds the momentum v Momentum-SAM perturbs along (Becker et al. 2024, whose
    code reads SGD's `momentum_buffer` and AdamW's first moment `exp_avg`; `hf_sam.optimizer_state`'s table), or a
    ValueError naming what works."""
    refuse_maximize(optimizer, "momentum")
    reason = missing_momentum(type(optimizer), optimizer.param_groups)
    if reason is None:
        return optimizer_state(type(optimizer)).momentum_key
    raise ValueError(
        f"sam_mode='momentum' perturbs the weights along the optimizer's momentum, but {reason}. Use SGD with "
        "momentum or an Adam-type optimizer (with the Trainer: optim='sgd', optim_args='momentum=0.9', or "
        "optim='adamw_torch'; by hand: torch.optim.SGD(params, lr=..., momentum=0.9) or torch.optim.AdamW), or "
        "another sam_mode."
    )


def momentum_direction(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], key: str):
    """v of each parameter (the optimizer's own state tensors, not copies), or None before the first step. A
    parameter the optimizer has not stepped yet (no gradient so far) gets v = 0."""
    state = optimizer.state
    found = [state[p].get(key) if p in state else None for p in params]
    if all(v is None for v in found):
        return None
    return [torch.zeros_like(p) if v is None else v for p, v in zip(params, found, strict=True)]


def check_adam_update(optimizer: torch.optim.Optimizer) -> None:
    """sam_mode='adam_update' reads Adam's two moments and its bias corrections, as torch's Adam and AdamW keep
    them; anything else is refused with the fix."""
    if not is_adam(type(optimizer)):
        raise ValueError(
            "sam_mode='adam_update' looks ahead along Adam's update m̂/(√v̂+ε), but the optimizer is "
            f"{type(optimizer).__name__}. Use optim='adamw_torch' (or torch.optim.AdamW / Adam by hand), or "
            "sam_mode='momentum' for other optimizers with a momentum."
        )
    refuse_maximize(optimizer, "adam_update")


def adam_update_direction(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> AdamUpdate | None:
    """u = m̂/(√v̂ + ε) of each parameter, the direction of the step Adam(W) takes next, or None before its first
    step (see `AdamUpdate`)."""
    state, settings, terms = optimizer.state, {}, []
    for group in optimizer.param_groups:
        settings.update({id(p): group for p in group["params"]})
    for p in params:
        entry = state[p] if p in state else {}
        if "exp_avg" not in entry:
            terms.append(None)
            continue
        group = settings[id(p)]
        beta1, beta2 = group["betas"]
        step = entry["step"]
        # As torch's Adam: the bias corrections in float64 from a CPU step count; from one on the device (fused,
        # capturable) as tensors, with no host sync.
        step = float(step) if not torch.is_tensor(step) or step.device.type == "cpu" else step
        second = entry["max_exp_avg_sq"] if group.get("amsgrad") else entry["exp_avg_sq"]
        terms.append((entry["exp_avg"], second, 1 - beta1**step, (1 - beta2**step) ** 0.5, group["eps"]))
    if all(t is None for t in terms):
        return None
    return AdamUpdate(params, terms)


class AdamUpdate:
    """Adam's update direction u = m̂/(√v̂ + ε) (Kingma & Ba 2015, algorithm 1; before the learning rate and the
    weight decay), as a sequence of tensors computed one at a time when read: never a buffer the size of the model.
    `LookAhead` reads it twice per micro-batch (enter, leave: `add_to_`) and once for its norm; the moments do not
    change in between (the optimizer steps after the last leave), so every read gives the same tensor, bit for bit.
    A parameter the optimizer has not stepped yet reads as zeros.

    Why not the raw first moment m, as sam_mode='momentum' does: Adam steps along m scaled per coordinate by
    1/(√v̂ + ε), so a look-ahead along m points elsewhere than the step it anticipates (Functional-SAM, Singh et
    al. 2025, preconditions SAM's perturbation by Adam's second moment for that reason)."""

    def __init__(self, params: list[torch.Tensor], terms: list) -> None:
        self.params, self.terms = params, terms
        # (device, dtype) -> one flat buffer of ≤ PIECE elements, reused for every D of one pass, freed after it.
        self._scratch: dict = {}

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return AdamUpdate(self.params[index], self.terms[index])
        term = self.terms[index]
        if term is None:
            return torch.zeros_like(self.params[index])
        first, second, bias1, bias2_sqrt, eps = term
        denominator = second.sqrt().add_(eps * bias2_sqrt)
        return torch.div(first, denominator, out=denominator).mul_(bias2_sqrt / bias1)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    # u = c·m/D with D = √v + ε·√(1−β2^t) and c = √(1−β2^t)/(1−β1^t): the same u as m̂/(√v̂ + ε) (both sides times
    # √(1−β2^t)), in the fewest passes over memory. The passes below walk each tensor in pieces of ≤ PIECE elements
    # with one reused scratch buffer for D: a fresh temporary per tensor costs more than the arithmetic on a CPU
    # (each large allocation is new memory, page-faulted in), and a piece of D is still in cache when it is read.
    def _pieces(self, p: torch.Tensor, term) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(p, m, v) in matching flat pieces; whole where a flat view is not possible (DTensors, strided)."""
        first, second = term[0], term[1]
        tensors = (p, first, second)
        if p.numel() <= PIECE or is_dtensor(p) or not all(t.is_contiguous() for t in tensors):
            yield tensors
            return
        flat = [t.view(-1) for t in tensors]
        for start in range(0, p.numel(), PIECE):
            yield tuple(t[start : start + PIECE] for t in flat)

    def _denominator(self, second: torch.Tensor, term) -> torch.Tensor:
        """D = √v + ε·√(1−β2^t) for a piece of v, in the scratch buffer when it fits (a new tensor otherwise)."""
        if is_dtensor(second) or second.numel() > PIECE:
            denominator = second.sqrt()
        else:
            key = (second.device, second.dtype)
            if key not in self._scratch:
                size = min(PIECE, max(t[1].numel() for t in self.terms if t is not None))
                self._scratch[key] = torch.empty(size, device=second.device, dtype=second.dtype)
            denominator = torch.sqrt(second, out=self._scratch[key][: second.numel()].view(second.shape))
        return denominator.add_(term[4] * term[3])

    def add_to_(self, params: list[torch.Tensor], alpha: float) -> None:
        """params += alpha·u, a piece at a time: D, then a fused m/D multiply-add into the weights (`addcdiv_`), so
        entering or leaving the look-ahead point costs three passes over memory and no copy of u."""
        for p, term in zip(params, self.terms, strict=True):
            if term is None:
                continue
            scale = term[3] / term[2]
            for p_piece, first, second in self._pieces(p, term):
                denominator = self._denominator(second, term)
                if torch.is_tensor(scale):  # a device step count (fused, capturable): no host sync
                    p_piece.addcdiv_(first, denominator.div_(scale), value=alpha)
                else:
                    p_piece.addcdiv_(first, denominator, value=alpha * scale)
        self._scratch.clear()  # held for one pass only: nothing stays allocated through the forward and backward

    def local_squares(self) -> tuple[torch.Tensor, object]:
        """(Σ‖u_i‖² over this process's elements in float32, the process group of sharded parameters or None), as
        `global_norm` counts them, a piece at a time."""
        squares, group = None, None
        for p, term in zip(self.params, self.terms, strict=True):
            if term is None:
                continue
            for _, first, second in self._pieces(p, term):
                denominator = self._denominator(second, term)
                ratio = torch.div(first, denominator, out=denominator)  # u / c: c scales the norm below
                if is_dtensor(ratio):
                    if ratio.device_mesh.ndim != 1 or not all(q.is_shard() for q in ratio.placements):
                        unsupported_layout()
                    group, ratio = ratio.device_mesh.get_group(), ratio.to_local()
                square = (torch.linalg.vector_norm(ratio, dtype=torch.float32) * (term[3] / term[2])) ** 2
                squares = square if squares is None else squares + square.to(squares.device)
        self._scratch.clear()
        return (squares if squares is not None else torch.zeros(())), group


def direction_norm(directions: list) -> torch.Tensor:
    """‖d‖ over lists of tensors and `AdamUpdate`s (read one tensor at a time), with `global_norm`'s semantics."""
    plain = [d for part in directions if not isinstance(part, AdamUpdate) for d in part]
    lazy = [part for part in directions if isinstance(part, AdamUpdate)]
    if not lazy:
        return global_norm(plain)
    squares, group = None, None
    for part in lazy:
        part_squares, part_group = part.local_squares()
        squares = part_squares if squares is None else squares + part_squares.to(squares.device)
        group = group or part_group
    if group is not None:
        torch.distributed.all_reduce(squares, group=group)
    if plain:
        squares = squares + global_norm(plain).to(squares.device) ** 2
    return squares.sqrt()


class LookAhead:
    """The one-pass variants' look-ahead point w + ε, entered for each micro-batch's forward+backward and left right
    after it, without a copy of the weights.

    ε = signed_rho·d/‖d‖ along a direction d the optimizer already keeps: Momentum-SAM's momentum v (signed_rho
    = −ρ: v is the descent direction the optimizer accumulated, w moves by −lr·v, so w − ρ·v/‖v‖ looks ahead along
    it), Adam's update u (an `AdamUpdate`, read a tensor at a time; −ρ) or the stored previous gradient (+ρ, an
    ascent direction). d does not change until the optimizer steps, so `leave_` undoes `enter_` by
    adding −ε to the same storage: w comes back within float32 rounding (one add and one subtract per micro-batch;
    docs/variants.md measures the drift), no copy is allocated, and nothing outside the pass ever sees w + ε: not an
    evaluation, a checkpoint, a callback, an exception or a stop between micro-batches. Weights held in bf16/fp16
    would lose ε's low bits on every round trip, so for them a `WeightBackup` copy is kept and w comes back exactly.

    `set_(groups)` fixes the point of one optimizer step: `groups` is a list of (params, direction, signed_rho), one per
    parameter group (per-group ρ, e.g. ρ = 0 for a new head), with one norm ‖d‖ over all of them.
    """

    def __init__(self, copy: bool = False) -> None:
        self._groups: list[tuple[list[torch.Tensor], list[torch.Tensor], float]] = []
        self._backup = WeightBackup()
        self.copy = copy  # keep an exact copy of w whatever the dtype (benchmarks/one_pass_drift.py compares)
        self.entered = False

    @torch.no_grad()
    def set_(self, groups: list[tuple[list[torch.Tensor], list[torch.Tensor], float]]) -> torch.Tensor:
        """The point for the coming passes: w + signed_rho·d/‖d‖ per group. Returns ‖d‖; a zero or non-finite ‖d‖ (no
        momentum yet, a NaN) sets no point: the passes run at w."""
        if self.entered:
            raise RuntimeError(
                "LookAhead.set_ while the weights are at the look-ahead point: leave_() first."
            )
        norm = direction_norm([directions for _, directions, _ in groups])
        self._groups = []
        value = float(norm)  # the one host sync of an optimizer step
        if math.isfinite(value) and value > 0:
            scale = 1.0 / (value + NORM_EPS)
            self._groups = [(p, d, rho * scale) for p, d, rho in groups if rho != 0 and p]
        return norm

    @torch.no_grad()
    def enter_(self) -> None:
        if self.entered or not self._groups:
            return
        params = [p for group_params, _, _ in self._groups for p in group_params]
        if self.copy or any(p.dtype in LOW_PRECISION for p in params):
            eps = [d * alpha for _, directions, alpha in self._groups for d in directions]
            self._backup.perturb_(params, eps)
        else:
            for group_params, directions, alpha in self._groups:
                _add_(group_params, directions, alpha)
        self.entered = True

    @torch.no_grad()
    def leave_(self) -> None:
        if not self.entered:
            return
        if self._backup.perturbed:
            self._backup.restore_()
        else:
            for group_params, directions, alpha in self._groups:
                _add_(group_params, directions, -alpha)
        self.entered = False


def _add_(params: list[torch.Tensor], directions, alpha: float) -> None:
    """params += alpha·directions: one fused op for a list, one tensor at a time for an `AdamUpdate`."""
    if isinstance(directions, AdamUpdate):
        directions.add_to_(params, alpha)
    else:
        torch._foreach_add_(params, directions, alpha=alpha)


# ---------------------------------------------------------------------- one training loop's state
class OnePass:
    """One training loop's one-pass state: the mode, and the look-ahead point of the current optimizer step."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        # v and u are descent directions (w moves by −lr·v, −lr·u): look ahead along −v, −u. The previous gradient
        # is an ascent direction: along +g.
        self.sign = 1.0 if mode == "previous_gradient" else -1.0
        self.point = LookAhead()

    def direction(self, wrapper: SAM, params: list[torch.Tensor], state: dict) -> list[torch.Tensor] | None:
        """The direction for `params`, None before the first optimizer step (no momentum, no previous gradient)."""
        if self.mode == "momentum":
            return momentum_direction(wrapper.base_optimizer, params, wrapper.momentum_key)
        if self.mode == "adam_update":
            return adam_update_direction(wrapper.base_optimizer, params)
        # Kept in the plan's order: `SAMMixin._perturbation_plan` carries it to each parameter when the plan is rebuilt
        # (parameters frozen or unfrozen mid-run). A length that differs all the same (a checkpoint of another set-up)
        # gives no direction.
        stored = state.get("previous_gradient")
        if stored is None or len(stored) != len(params):
            return None
        # A checkpoint may have loaded it onto another device.
        return [g.to(p.device) for g, p in zip(stored, params, strict=True)]

    def set_point(self, groups: list[tuple[list[torch.Tensor], list[torch.Tensor], float]]) -> torch.Tensor:
        """The point of this optimizer step: `groups` of (params, direction, ρ), one per parameter group. Returns
        ‖direction‖ (one norm over all groups); a zero or non-finite one sets no point."""
        return self.point.set_([(params, d, self.sign * rho) for params, d, rho in groups])

    @contextlib.contextmanager
    def at_point(self):
        """The weights at the look-ahead point for the block, and back at w after it, however it ends."""
        self.point.enter_()
        try:
            yield
        finally:
            self.point.leave_()

    @staticmethod
    @torch.no_grad()
    def remember_gradient(params: list[torch.Tensor], state: dict) -> None:
        """sam_mode='previous_gradient', after a window's last backward: `.grad` holds the step's whole gradient
        (synced under DDP, before clipping); keep it for the next step's direction (a non-finite one is not kept)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if not torch.isfinite(global_norm(grads)):
            return
        stored = state.get("previous_gradient")
        if stored is None or len(stored) != len(params):
            state["previous_gradient"] = [g.detach().clone() for g in grads]
        else:
            torch._foreach_copy_(stored, grads)
