"""What weights held in bf16/fp16 keep of ε: the measurement `WeightBackup` takes at the first perturbation, and
the warning it gives once (torch only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_sam.norms import LOW_PRECISION


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
