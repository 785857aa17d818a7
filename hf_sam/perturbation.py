"""The perturbation: ε from an ascent gradient, and w moved to w + ε (torch only).

SAM (Foret et al. 2021) minimises max_{||ε||_p <= ρ} L(w + ε). One step:

1. g = ∇L(w)                                    (the "ascent" gradient)
2. ε = ρ · g / ||g||₂            (p = 2, eq. 2)   or  ε = ρ · sign(g)   (p = ∞, appendix C.5)
   ASAM (Kwon et al. 2021) rescales by T = |w| + η:  ε = ρ · T² g / ||T g||₂  (p = ∞: ρ · T · sign(g))
3. g_SAM = ∇L(w + ε)                            (the "descent" gradient)
4. w ← base_optimizer_step(w, g_SAM)            (w itself, not w + ε: we restore before stepping)

The one path from an ascent gradient g to w + ε is `perturb_` (one ascent step, or projected multi-step ascent):
the `SAM` wrapper, `hf_sam.SAMTrainer`'s two-pass step and `hf_sam.sharpness` all go through it, so they cannot
drift apart; it moves the weights through a `hf_sam.weight_backup.WeightBackup`. A perturbation group's settings are
the four keys of `perturbation_settings` (`rho`, `adaptive`, `eta`, `sam_norm`), stored in the optimizer's param
groups and checked by `validate_sam_hparams`; `scheduled_rho` is ρ for a step of a ρ schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hf_sam.norms import global_norm, local_tensors

if TYPE_CHECKING:
    from hf_sam.weight_backup import WeightBackup


SAM_NORMS = ("2", "inf")


# Added to ||g|| so that a zero gradient gives ε = 0 instead of 0/0 (one of the public-implementation traps).
NORM_EPS = 1e-12


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


def _adaptive_scale(group: PerturbationGroup) -> list[torch.Tensor]:
    """T = |w| + η, ASAM's elementwise parameter scale."""
    scale = torch._foreach_abs(local_tensors(group.params))
    torch._foreach_add_(scale, group.eta)
    return scale


@torch.no_grad()
def project_to_ball_(eps: list[torch.Tensor], rho: float) -> None:
    """ε ← ε · min(1, ρ/‖ε‖₂): the projection onto the ρ-ball for multi-step ascent (paper, appendix C.6)."""
    scale = torch.clamp(rho / (global_norm(eps) + NORM_EPS), max=1.0)
    torch._foreach_mul_(local_tensors(eps), scale)
