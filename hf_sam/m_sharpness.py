"""m-sharpness: the mean over disjoint chunks of m examples of max_{‖ε‖₂≤ρ} L(w+ε) − L(w) (the SAM paper's section
4.1), with SAM's own ascent (`hf_sam.perturbation.perturb_`). Imports torch only; the public names are also
`hf_sam.sharpness`'s."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from hf_sam.measurement import (
    LossFn,
    batch_size,
    collect_batches,
    measurement_mode,
    model_loss,
    scalar_loss,
    split_batch,
    to_device,
    trainable_parameters,
    with_progress,
)
from hf_sam.perturbation import PerturbationGroup, perturb_
from hf_sam.weight_backup import WeightBackup


@dataclass
class MSharpness:
    """max_{‖ε‖₂≤ρ} L(w+ε) − L(w), averaged over the chunks of m examples (paper, section 4.1)."""

    value: float  # mean over chunks
    std: float  # standard deviation over chunks (0 for a single chunk)
    loss: float  # mean L(w) over the chunks
    m: int
    rho: float
    ascent_steps: int
    num_chunks: int
    dropped_examples: int  # examples in incomplete last chunks, left out
    per_chunk: list[float] = field(repr=False, default_factory=list)


def m_sharpness(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    m: int,
    rho: float = 0.05,
    ascent_steps: int = 1,
    step_size: float | None = None,
    loss_fn: LossFn = model_loss,
    num_batches: int | None = None,
    progress: bool = False,
) -> MSharpness:
    """m-sharpness: the mean over disjoint chunks of `m` examples of max_{‖ε‖₂ ≤ ρ} L_chunk(w + ε) − L_chunk(w).

    Each batch is cut into consecutive chunks of `m` examples (an incomplete last chunk is dropped and counted in
    `dropped_examples`); `m` = the batch size gives SAM's per-batch sharpness. The inner maximum is estimated by
    `ascent_steps` steps of projected, normalised gradient ascent on the p = 2 ball:
    ε ← Π_ρ(ε + α ∇L(w+ε)/‖∇L(w+ε)‖₂), with α = `step_size` (default ρ, so that one step is exactly SAM's
    ε = ρ g/‖g‖₂, computed by the same `hf_sam.perturbation.perturb_` the optimizer uses). The estimate is the largest
    loss over the visited points (ε = 0 included): every one of them lies in the ball, so it is a lower bound on
    the true maximum that can only grow with more steps (the paper's appendix C.6 finds 1 step underestimates it
    near convergence). Each chunk costs `ascent_steps` forward+backward passes and one forward.

    Every module is in eval mode while measuring (BatchNorm on running statistics, so its buffers stay as they
    are; no dropout); the weights are copied back exactly after each chunk, `.grad` is untouched, modes are
    restored. Deterministic (no random numbers are drawn).
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive integer (examples per chunk), got {m!r}.")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < math.inf:
        raise ValueError(f"rho must be a finite number > 0 (radius of the ball), got {rho!r}.")
    if isinstance(ascent_steps, bool) or not isinstance(ascent_steps, int) or ascent_steps < 1:
        raise ValueError(f"ascent_steps must be a positive integer, got {ascent_steps!r}.")
    step_size = rho if step_size is None else step_size
    if not 0 < step_size < math.inf:
        raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}.")
    batches = collect_batches(batches, num_batches)
    params = trainable_parameters(model)
    device = params[0].device

    chunks, dropped = [], 0
    for batch in batches:
        pieces = split_batch(batch, m)
        chunks.extend(pieces)
        dropped += batch_size(batch) - m * len(pieces)
    if not chunks:
        raise ValueError(
            f"No chunk of m={m} examples: every batch is smaller than m. Use larger batches or a smaller m."
        )

    backup = WeightBackup()
    per_chunk, losses = [], []
    with measurement_mode(model):
        try:
            for chunk in with_progress(chunks, progress, desc=f"m-sharpness (m={m})", leave=False):
                chunk = to_device(chunk, device)
                clean, best = _chunk_sharpness(
                    model, chunk, loss_fn, params, rho, ascent_steps, step_size, backup
                )
                per_chunk.append(best - clean)
                losses.append(clean)
        finally:
            backup.restore_()
    values = torch.tensor(per_chunk, dtype=torch.float64)
    return MSharpness(
        value=values.mean().item(),
        std=values.std().item() if len(per_chunk) > 1 else 0.0,
        loss=sum(losses) / len(losses),
        m=m,
        rho=float(rho),
        ascent_steps=ascent_steps,
        num_chunks=len(per_chunk),
        dropped_examples=dropped,
        per_chunk=per_chunk,
    )


def _chunk_sharpness(model, chunk, loss_fn, params, rho, steps, step_size, backup) -> tuple[float, float]:
    """(L(w), max over the ascent iterates of L(w + ε)) for one chunk; leaves the weights at w."""
    loss = scalar_loss(loss_fn, model, chunk)
    grads = list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))
    clean = best = loss.item()

    def gradient_at_perturbed_weights():
        nonlocal best
        loss = scalar_loss(loss_fn, model, chunk)
        best = max(best, loss.item())
        return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))

    # SAM's own ascent with step α = step_size, projected onto the ρ-ball.
    perturb_(backup, [PerturbationGroup(params, grads, step_size)], steps, rho, gradient_at_perturbed_weights)
    with torch.no_grad():
        best = max(best, scalar_loss(loss_fn, model, chunk).item())
    backup.restore_()
    return clean, best
