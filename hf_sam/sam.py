"""Sharpness-Aware Minimization: the perturbation math and an optimizer wrapper. Imports torch only.

SAM (Foret et al. 2021) minimises max_{||ε||_p <= ρ} L(w + ε). One step:

1. g = ∇L(w)                                    (the "ascent" gradient)
2. ε = ρ · g / ||g||₂            (p = 2, eq. 2)   or  ε = ρ · sign(g)   (p = ∞, appendix C.5)
   ASAM (Kwon et al. 2021) rescales by T = |w| + η:  ε = ρ · T² g / ||T g||₂  (p = ∞: ρ · T · sign(g))
3. g_SAM = ∇L(w + ε)                            (the "descent" gradient)
4. w ← base_optimizer_step(w, g_SAM)            (w itself, not w + ε: we restore before stepping)

The one path from an ascent gradient g to w + ε is `perturb_` (one ascent step, or projected multi-step ascent):
the `SAM` wrapper below, `hf_sam.SAMTrainer`'s two-pass step and `hf_sam.sharpness` all go through it, so they
cannot drift apart. The one-pass modes move to their look-ahead point along a direction the optimizer keeps, with
no ascent gradient: that is `LookAhead`'s. A perturbation
group's settings are the four keys of `perturbation_settings` (`rho`, `adaptive`, `eta`, `sam_norm`), stored in
the optimizer's param groups; `scheduled_rho` is ρ for a step of a ρ schedule.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hf_sam.optimizer_state import is_adam, missing_momentum, optimizer_state

__all__ = [
    "SAM",
    "AppliedPerturbation",
    "LowPrecisionPerturbationWarning",
    "NonFiniteTrainingError",
    "PerturbationGroup",
    "WeightBackup",
    "LookAhead",
    "all_reduce_mean_",
    "compute_perturbation_",
    "dot",
    "global_norm",
    "mark_partitioned",
    "gsam_gradient_",
    "looksam_orthogonal_component",
    "looksam_reuse_gradient_",
    "perturb_",
    "perturbation_group",
    "perturbation_settings",
    "project_to_ball_",
    "scheduled_rho",
    "validate_sam_hparams",
]

SAM_NORMS = ("2", "inf")

# Added to ||g|| so that a zero gradient gives ε = 0 instead of 0/0 (one of the public-implementation traps).
NORM_EPS = 1e-12

# Weights in these dtypes cannot hold w + ε exactly (8 or 11 significant bits): `WeightBackup` measures what is kept.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def validate_sam_hparams(rho: float, adaptive: bool, eta: float, norm: str, prefix: str = "") -> None:
    """Raise `ValueError` naming the field and what it accepts. `prefix` is "sam_" for the Trainer fields."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0 or rho == float("inf"):
        raise ValueError(f"{prefix}rho must be a finite number >= 0 (0 disables SAM), got {rho!r}.")
    if not isinstance(adaptive, bool):
        raise ValueError(f"{prefix}adaptive must be True or False, got {adaptive!r}.")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0 or eta == float("inf"):
        raise ValueError(f"{prefix}eta must be a finite number >= 0 (ASAM's T = |w| + eta), got {eta!r}.")
    if str(norm) not in SAM_NORMS:
        raise ValueError(
            f"{prefix}norm must be one of {', '.join(repr(n) for n in SAM_NORMS)} "
            f"('2': ε = ρ·g/‖g‖₂, 'inf': ε = ρ·sign(g)), got {norm!r}."
        )


def perturbation_settings(
    rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, norm: str = "2"
) -> dict:
    """The SAM settings of a param group: the schema `SAM` keeps in each of its base optimizer's param groups."""
    return {"rho": rho, "adaptive": adaptive, "eta": eta, "sam_norm": str(norm)}


def scheduled_rho(rho: float, schedule: str, rho_min: float, lr: float, peak_lr: float | None) -> float:
    """ρ for this step: `"constant"`, or `"linear_with_lr"`: ρ_min + (ρ − ρ_min)·lr_t/lr_peak (as GSAM)."""
    if schedule == "constant":
        return rho
    ratio = min(max(lr / peak_lr, 0.0), 1.0) if peak_lr else 1.0
    return rho_min + (rho - rho_min) * ratio


@dataclass
class PerturbationGroup:
    """Parameters that share SAM hyper-parameters, with their ascent gradients (same order)."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    rho: float
    adaptive: bool = False
    eta: float = 0.01
    norm: str = "2"


def perturbation_group(
    settings: dict, params: list, grads: list, rho: float | None = None
) -> PerturbationGroup:
    """A `PerturbationGroup` from a param group's settings (`perturbation_settings`); `rho` overrides its ρ."""
    return PerturbationGroup(
        params, grads, settings["rho"] if rho is None else rho, settings["adaptive"], settings["eta"],
        settings["sam_norm"],
    )  # fmt: skip


@torch.no_grad()
def compute_perturbation_(groups: Sequence[PerturbationGroup]) -> torch.Tensor:
    """Turn each group's `grads` into ε **in place** and return the ascent gradient norm (a 0-dim tensor).

    The general form of ε (per-group ρ, ASAM, p = ∞), used by `perturb_`, which callers go through.

    The norm is ||T g||₂ taken jointly over every p = 2 group with ρ > 0 (T = 1 without ASAM), so a group with
    its own ρ changes the size of its ε but not the direction of the others. For p = ∞ groups the returned
    norm is still ||T g||₂ (telemetry only; it does not enter ε).

    Groups with ρ = 0 get ε = 0 (their gradient buffers are zeroed).
    The caller must check the returned norm is finite before applying ε: a non-finite gradient (fp16
    overflow, a NaN loss) gives a non-finite norm, and then ε must not be applied.
    Works on any scaled gradient (e.g. fp16's GradScaler): the scale cancels in g/||g|| and in sign(g).
    """
    for group in groups:
        if group.rho <= 0 and group.grads:
            torch._foreach_zero_(
                local_tensors(group.grads)
            )  # ε = 0 for an unperturbed group (e.g. a new head)
    active = [g for g in groups if g.rho > 0 and len(g.grads) > 0]
    device = next((g.grads[0].device for g in active), None)
    if device is None:
        return torch.zeros(())

    # T·g for ASAM groups (T = |w| + η); g itself otherwise. Written into the gradient buffers in place.
    for group in active:
        if group.adaptive:
            torch._foreach_mul_(local_tensors(group.grads), _adaptive_scale(group))

    grad_norm = global_norm([g for group in active for g in group.grads])
    l2_groups = [g for g in active if g.norm == "2"]
    if len(l2_groups) == len(active):
        l2_norm = grad_norm
    else:
        l2_norm = global_norm([g for group in l2_groups for g in group.grads]) if l2_groups else grad_norm

    for group in active:
        grads = local_tensors(group.grads)  # FSDP2 shards: ε is computed and applied shard by shard
        if group.norm == "2":
            # ε = ρ T (T g) / ||T g||: the second T (ASAM) is applied below, after the shared scale.
            torch._foreach_mul_(grads, group.rho / (l2_norm + NORM_EPS))
        else:
            # ε = ρ · sign(T g) (T > 0 so sign(T g) = sign(g)), then times T for ASAM.
            torch._foreach_sign_(grads)
            torch._foreach_mul_(grads, group.rho)
        if group.adaptive:
            torch._foreach_mul_(grads, _adaptive_scale(group))
    return grad_norm


def perturb_(
    backup: WeightBackup,
    groups: Sequence[PerturbationGroup],
    steps: int = 1,
    radius: float | None = None,
    gradient_at: Callable[[], list[torch.Tensor]] | None = None,
    *,
    params: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """w ← w + ε for the groups' parameters (saved in `backup` first); returns ‖g‖ of the ascent gradient.

    The one path from an ascent gradient to w + ε. One step: ε = ρ·g/‖g‖ (or the group's norm / ASAM form); if ‖g‖ is not finite
    the weights stay at w (the caller reads the returned norm). In the commonest setting (every group p = 2, no
    ASAM, one ρ) ε is applied as w += (ρ/‖g‖)·g, without first scaling g in place (one read and write of the
    gradients less); otherwise the groups' `grads` are turned into ε in place.

    `steps` > 1: projected gradient ascent (paper, appendix C.6): ε_{k+1} = Π(ε_k + ρ·ĝ(w + ε_k)) onto the
    `radius` ball, with `gradient_at()` giving the gradient at the current weights (same order as the groups'
    parameters; it runs with autograd on). A step whose gradient is not finite ends the ascent at the last finite ε.

    `params`: the groups' parameters as one list, in group order. A caller that passes the same list object every
    step (the Trainer's cached plan) spares the backup its per-tensor check that the parameters are still the same.
    """
    params = [p for group in groups for p in group.params] if params is None else params
    grads = [t for group in groups for t in group.grads]
    rhos = {g.rho for g in groups if g.grads}
    if steps == 1 and len(rhos) == 1 and all(g.norm == "2" and not g.adaptive for g in groups):
        grad_norm = global_norm(grads)
        if torch.isfinite(grad_norm):
            backup.perturb_(params, grads, alpha=rhos.pop() / (float(grad_norm) + NORM_EPS))
        return grad_norm
    grad_norm = compute_perturbation_(groups)
    if not torch.isfinite(grad_norm):
        return grad_norm
    eps = grads  # turned into ε in place
    if radius is not None and radius < max(g.rho for g in groups):
        project_to_ball_(eps, radius)  # a first step longer than the ball (a sharpness estimate's step size)
    backup.perturb_(params, eps)
    for _ in range(steps - 1):
        step, cut, step_groups = gradient_at(), 0, []
        for group in groups:
            n = len(group.params)
            step_groups.append(dataclasses.replace(group, grads=step[cut : cut + n]))
            cut += n
        if not torch.isfinite(compute_perturbation_(step_groups)):
            break  # keep the last finite ε
        with torch.no_grad():
            torch._foreach_add_(local_tensors(eps), local_tensors(step))
        project_to_ball_(eps, radius)
        backup.restore_()
        backup.perturb_(params, eps)
    return grad_norm


# ---------------------------------------------------------------------- Momentum-SAM (one pass)
def momentum_state_key(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer-state entry that holds the momentum v Momentum-SAM perturbs along (Becker et al. 2024, whose
    code reads SGD's `momentum_buffer` and AdamW's first moment `exp_avg`; `hf_sam.optimizer_state`'s table), or a
    ValueError naming what works."""
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
    `LookAhead` reads it twice per micro-batch (enter, leave) and once for its norm; the moments do not change in
    between (the optimizer steps after the last leave), so every read gives the same tensor, bit for bit. A
    parameter the optimizer has not stepped yet reads as zeros.

    Why not the raw first moment m, as sam_mode='momentum' does: Adam steps along m scaled per coordinate by
    1/(√v̂ + ε), so a look-ahead along m points elsewhere than the step it anticipates (Functional-SAM, Singh et
    al. 2025, preconditions SAM's perturbation by Adam's second moment for that reason)."""

    def __init__(self, params: list[torch.Tensor], terms: list) -> None:
        self.params, self.terms = params, terms

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return AdamUpdate(self.params[index], self.terms[index])
        term = self.terms[index]
        if term is None:
            return torch.zeros_like(self.params[index])
        first, second, bias1, bias2_sqrt, eps = term
        u = second.sqrt().div_(bias2_sqrt).add_(eps)  # the one temporary: √v̂ + ε, then m̂ over it in place
        return torch.div(first, u, out=u).div_(bias1)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def local_squares(self) -> tuple[torch.Tensor, object]:
        """(Σ‖u_i‖² over this process's elements in float32, the process group of sharded parameters or None), as
        `global_norm` counts them, one tensor at a time."""
        squares, group = None, None
        for u in self:
            if _is_dtensor(u):
                if u.device_mesh.ndim != 1 or not all(p.is_shard() for p in u.placements):
                    _unsupported_layout()
                group, u = u.device_mesh.get_group(), u.to_local()
            square = torch.linalg.vector_norm(u, dtype=torch.float32) ** 2
            squares = square if squares is None else squares + square.to(squares.device)
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


def _adaptive_scale(group: PerturbationGroup) -> list[torch.Tensor]:
    """T = |w| + η, ASAM's elementwise parameter scale."""
    scale = torch._foreach_abs(local_tensors(group.params))
    torch._foreach_add_(scale, group.eta)
    return scale


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """<a, b> over lists of tensors, accumulated in float32 at least (no elementwise product is materialised)."""

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1) if x.dtype in (torch.float32, torch.float64) else x.reshape(-1).float()

    return sum(
        (torch.dot(flat(x), flat(y)) for x, y in zip(a, b, strict=True)), torch.zeros((), device=a[0].device)
    )


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """FSDP2 parameters and gradients are DTensors: their local shards (views sharing storage), for in-place ops."""
    return [t.to_local() if _is_dtensor(t) else t for t in tensors]


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


# The attribute that marks a tensor as this process's flat partition of a larger one (DeepSpeed ZeRO-3's working
# weights and gradient partitions): its value is the process group the partitions are spread over.
PARTITION_GROUP = "_sam_partition_group"


def mark_partitioned(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Mark `tensors` as this process's partitions of tensors spread over `group` (ZeRO-3), so that `global_norm`
    counts each element once over the group (its squares are all-reduced) instead of taking the local norm."""
    for t in tensors:
        setattr(t, PARTITION_GROUP, group)
    return tensors


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖x‖₂ over a list of tensors (one fused norm per tensor, then the norm of the norms), in float32 at least.

    Sharded tensors (FSDP2's DTensors on a 1-D mesh) and partitions (`mark_partitioned`, ZeRO-3) count once: the
    squared norms of the local parts are all-reduced over their process group, so every rank gets the full-model
    norm, not its own part's.
    """
    split, group, replicated = [], None, []
    for t in tensors:
        if _is_dtensor(t):
            mesh = t.device_mesh
            if mesh.ndim != 1 or not all(p.is_shard() for p in t.placements):
                _unsupported_layout()
            part_group, local = mesh.get_group(), t.to_local()
        elif (part_group := getattr(t, PARTITION_GROUP, None)) is not None:
            local = t
        else:
            replicated.append(t)
            continue
        if group is None:
            group = part_group
        elif part_group is not group:
            _unsupported_layout()
        split.append(local)
    if not split:
        norms = _norms(tensors)
        device = norms[0].device  # a model spread over devices (device_map): gather the norms on one
        return torch.linalg.vector_norm(
            torch.stack([n.to(device, torch.promote_types(n.dtype, torch.float32)) for n in norms])
        )

    def squares(group: list[torch.Tensor]) -> torch.Tensor:
        norms = _norms(group) if group else []
        return torch.stack([n.float() ** 2 for n in norms]).sum() if norms else torch.zeros(())

    split_squares = squares(split)
    torch.distributed.all_reduce(split_squares, group=group)  # the all-reduce of squared local norms
    total = split_squares + (squares(replicated).to(split_squares.device) if replicated else 0.0)
    return total.sqrt()


def _unsupported_layout():
    raise NotImplementedError(
        "SAM supports sharded parameters on one 1-D device mesh (FSDP2 `fully_shard`) or one ZeRO-3 partition group; "
        "HSDP and tensor parallel layouts are not supported yet."
    )


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """‖t‖₂ of each tensor, fused (grouped by device and dtype internally), in float32 at least: torch's fused norm
    returns a bf16/fp16 tensor's norm rounded to its own dtype (0.2% off in bf16), so those get dtype=float32."""
    if {t.dtype for t in tensors}.isdisjoint(LOW_PRECISION):
        return torch._foreach_norm(tensors)  # float32: one set of dtypes more (~3% of the norm's host time)
    low = [t for t in tensors if t.dtype in LOW_PRECISION]
    rest = [t for t in tensors if t.dtype not in LOW_PRECISION]
    return [*torch._foreach_norm(low, 2, dtype=torch.float32), *(torch._foreach_norm(rest) if rest else ())]


@torch.no_grad()
def project_to_ball_(eps: list[torch.Tensor], rho: float) -> None:
    """ε ← ε · min(1, ρ/‖ε‖₂): the projection onto the ρ-ball for multi-step ascent (paper, appendix C.6)."""
    scale = torch.clamp(rho / (global_norm(eps) + NORM_EPS), max=1.0)
    torch._foreach_mul_(local_tensors(eps), scale)


@torch.no_grad()
def looksam_orthogonal_component(
    sam_grad: list[torch.Tensor], clean_grad: list[torch.Tensor]
) -> list[torch.Tensor]:
    """LookSAM's g_v (Liu et al. 2022, eq. 5): the part of the SAM gradient g_s orthogonal to the clean gradient g,
    g_v = g_s − (<g_s, g>/‖g‖²) g. Returned as new tensors (they are kept between SAM steps)."""
    coefficient = float(dot(sam_grad, clean_grad) / (dot(clean_grad, clean_grad) + NORM_EPS))
    g_v = [t.clone() for t in sam_grad]
    torch._foreach_add_(g_v, clean_grad, alpha=-coefficient)
    return g_v


@torch.no_grad()
def looksam_reuse_gradient_(
    grads: list[torch.Tensor | None], g_v: list[torch.Tensor | None], alpha: float
) -> None:
    """LookSAM between two SAM steps (eq. 6): g ← g + α·(‖g‖/‖g_v‖)·g_v, in place, from one clean gradient.

    `None` entries are parameters without a gradient in this step (unused by the forward: they stay without one)
    or without a stored component (unused at the SAM step): they get no reuse term."""
    # The stored direction may come from a checkpoint loaded on another device (CPU): on the gradients' devices.
    pairs = [(g, v.to(g.device)) for g, v in zip(grads, g_v, strict=True) if g is not None and v is not None]
    if not pairs:
        return
    present = [g for g in grads if g is not None]
    scale = float(alpha * global_norm(present) / (global_norm([v for _, v in pairs]) + NORM_EPS))
    torch._foreach_add_([g for g, _ in pairs], [v for _, v in pairs], alpha=scale)


@torch.no_grad()
def gsam_gradient_(sam_grad: list[torch.Tensor], clean_grad: list[torch.Tensor], alpha: float) -> None:
    """GSAM (Zhuang et al. 2022), as the authors' JAX version: decompose the clean gradient g into its parts
    parallel and orthogonal to the SAM gradient g_s and descend on the surrogate gap with the orthogonal part,
    g_s ← g_s − α·(g − <g, ĝ_s> ĝ_s) with ĝ_s = g_s/‖g_s‖, in place. Written as
    g_s·(1 + α<g, g_s>/‖g_s‖²) − α·g, two passes and no temporary copy of the gradients."""
    projection = float(dot(clean_grad, sam_grad) / (dot(sam_grad, sam_grad) + NORM_EPS))
    torch._foreach_mul_(sam_grad, 1.0 + alpha * projection)
    torch._foreach_add_(sam_grad, clean_grad, alpha=-alpha)


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over the processes of the default group, in place, in one collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    chunks = flat.split([t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(chunks, tensors, strict=True)])


class NonFiniteTrainingError(RuntimeError):
    """Raised after too many consecutive optimizer steps with a non-finite loss or gradient."""


class LowPrecisionPerturbationWarning(UserWarning):
    """SAM perturbs weights held in bf16/fp16, whose rounding of w + ε drops part of ε (warned once, with numbers)."""


@dataclass(frozen=True)
class AppliedPerturbation:
    """What weights held in low precision kept of ε at their first perturbation (`WeightBackup` measures it).

    applied ε = (w + ε, as stored in the weights' dtype) − w, against the intended ε (as computed from the gradient),
    both in float32, over every perturbed entry (under FSDP2: this process's shards)."""

    dtypes: tuple[str, ...]  # the low-precision dtypes among the perturbed parameters, e.g. ("bfloat16",)
    cosine: float  # <applied, intended> / (‖applied‖ ‖intended‖)
    fraction_moved: float  # entries that moved / entries the intended ε moves (non-zero)
    norm_ratio: float  # ‖applied‖ / ‖intended‖
    numel: int  # perturbed entries

    def message(self) -> str:
        return (
            f"SAM perturbs weights held in {' and '.join(self.dtypes)}, which cannot hold w + ε exactly: at the first "
            f"SAM step the applied ε moved {self.fraction_moved:.0%} of the entries ε should move ({self.numel} "
            f"perturbed), its cosine with the intended ε is {self.cosine:.3f} and ‖applied‖/‖intended‖ = "
            f"{self.norm_ratio:.3f}. To keep w + ε exact, load the model in float32 and train with bf16=True "
            "(autocast: bf16 compute, float32 weights)."
        )


@torch.no_grad()
def measure_applied_perturbation(
    weights: list[torch.Tensor],
    perturbed: list[torch.Tensor],
    eps: list[torch.Tensor],
    alpha: float = 1.0,
    chunk: int = 1 << 22,
) -> AppliedPerturbation | None:
    """Compare perturbed − weights (the applied ε) with alpha·eps (the intended ε), in float32, a chunk of at most
    `chunk` entries at a time (no float32 copy of a whole bf16 model). None when the intended ε is zero."""
    device = weights[0].device
    sums = torch.zeros(3, device=device)  # <a, i>, ‖a‖², ‖i‖²
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # entries moved, entries ε moves
    for w, p, e in zip(weights, perturbed, eps, strict=True):
        for w_c, p_c, e_c in zip(*(t.reshape(-1).split(chunk) for t in (w, p, e)), strict=True):
            applied = p_c.float() - w_c.float()  # exact: two neighbouring low-precision values
            intended = e_c.float() * alpha
            part = torch.stack([applied @ intended, applied @ applied, intended @ intended])
            moved = torch.stack([torch.count_nonzero(applied), torch.count_nonzero(intended)])
            sums += part.to(device)
            counts += moved.to(device)
    (dot, applied_sq, intended_sq), (moved, should_move) = sums.tolist(), counts.tolist()
    if should_move == 0 or intended_sq == 0.0:
        return None
    applied_norm, intended_norm = applied_sq**0.5, intended_sq**0.5
    return AppliedPerturbation(
        dtypes=tuple(
            sorted({str(t.dtype).removeprefix("torch.") for t in weights if t.dtype in LOW_PRECISION})
        ),
        cosine=dot / (applied_norm * intended_norm) if applied_norm > 0 else 0.0,
        fraction_moved=moved / should_move,
        norm_ratio=applied_norm / intended_norm,
        numel=sum(t.numel() for t in weights),
    )


class WeightBackup:
    """Save w, move to w + ε in place, and copy w back exactly.

    Restoring by subtracting ε is not exact in floating point (DDP replicas drift apart by ~1e-9 after a few
    steps) and swapping `p.data` breaks tied weights, FSDP views and CUDA graphs; copying into the same
    storage does neither. The backup buffers are allocated on first use and reused every step.

    Weights held in bf16/fp16 cannot hold w + ε exactly (the forward must run on them, so it cannot be avoided
    there; restore stays exact). The first perturbation of such a set of parameters is measured against the intended ε
    (`applied_perturbation`, an `AppliedPerturbation`) and reported once per backup in a
    `LowPrecisionPerturbationWarning`. Float32 weights are never measured: one flag read per step.
    """

    def __init__(self) -> None:
        self._params: list[torch.Tensor] = []
        self._params_list: list[torch.Tensor] | None = None
        self._local: list[torch.Tensor] = []
        self._backup: list[torch.Tensor] = []
        self.perturbed = False
        self.applied_perturbation: AppliedPerturbation | None = None
        # Measure the next perturbation: set when the buffers of low-precision weights are allocated.
        self._measure = False
        self._warned = False

    @torch.no_grad()
    def perturb_(self, params: list[torch.Tensor], eps: list[torch.Tensor], alpha: float = 1.0) -> None:
        """w ← w + alpha·eps in place, after saving w. `alpha` lets a caller pass the unscaled gradient and
        the scalar ρ/‖g‖, which saves a full read and write of the gradients compared with scaling them first."""
        if self.perturbed:
            raise RuntimeError("The weights are already perturbed: call restore_() before perturbing again.")
        if not self._matches(params):
            self._params, self._params_list = list(params), params
            self._local = local_tensors(self._params)  # FSDP2: perturb and restore each rank's shard in place
            self._backup = [torch.empty_like(p) for p in self._local]
            self._measure = any(t.dtype in LOW_PRECISION for t in self._local)
        torch._foreach_copy_(self._backup, self._local)
        torch._foreach_add_(self._local, local_tensors(eps), alpha=alpha)
        self.perturbed = True
        if self._measure:
            self._measure_applied(local_tensors(eps), alpha)

    def _measure_applied(self, eps: list[torch.Tensor], alpha: float) -> None:
        measured = measure_applied_perturbation(self._backup, self._local, eps, alpha)
        if measured is None:
            return  # ε = 0 (a zero gradient): nothing to compare yet, measure the next perturbation
        self._measure, self.applied_perturbation = False, measured
        if not self._warned:
            self._warned = True
            warnings.warn(measured.message(), LowPrecisionPerturbationWarning, stacklevel=2)

    @torch.no_grad()
    def restore_(self) -> None:
        if self.perturbed:
            torch._foreach_copy_(self._local, self._backup)
            self.perturbed = False

    def _matches(self, params: list[torch.Tensor]) -> bool:
        if (
            params is self._params_list
        ):  # the trainer passes the same cached list every step: no per-tensor loop
            return True
        matches = len(params) == len(self._params) and all(
            a is b and loc.shape == buf.shape and loc.dtype == buf.dtype and loc.device == buf.device
            for a, b, loc, buf in zip(params, self._params, self._local, self._backup, strict=True)
        )
        if matches:
            self._params_list = params
        return matches


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
        for p, d in zip(params, directions, strict=True):
            p.add_(d, alpha=alpha)
    else:
        torch._foreach_add_(params, directions, alpha=alpha)


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
