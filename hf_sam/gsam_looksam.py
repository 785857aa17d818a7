"""The math of the variants that combine a step's clean and SAM gradients (torch only): LookSAM's orthogonal
component and its reuse between SAM steps (Liu et al. 2022), GSAM's surrogate-gap gradient (Zhuang et al. 2022).
Which step applies which is `hf_sam.variants`'."""

from __future__ import annotations

import torch

from hf_sam.norms import dot, global_norm
from hf_sam.perturbation import NORM_EPS


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
