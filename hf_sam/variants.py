"""The variants' policy, testable without a Trainer: which optimizer step is which (interval, late-phase window,
LookSAM reuse), which examples each pass sees (m-sharpness chunks, the ascent subset), and the clean-gradient
window of GSAM and LookSAM. The math they apply lives in `hf_sam.gsam_looksam`."""

from __future__ import annotations

import math

import torch

from hf_sam.gsam_looksam import gsam_gradient_, looksam_orthogonal_component
from hf_sam.norms import all_reduce_mean_, global_norm

# What an optimizer step does.
PLAIN, SAM_STEP, LOOKSAM_REUSE = "plain", "sam", "looksam_reuse"


def step_kind(
    step: int, max_steps: int, start: float, end: float, interval: int, mode: str, has_stored_direction: bool
) -> str:
    """SAM step, LookSAM reuse step or plain step for optimizer step `step` (0-based) of `max_steps`.

    A function of the step alone, so every micro-batch of a step agrees and a resumed run takes the same decisions
    as an uninterrupted one. SAM runs on steps first, first + interval, ... inside [start, end) of training; LookSAM
    reuses its stored direction on the steps in between (a full SAM step while it has none, e.g. a checkpoint
    written by an older version)."""
    max_steps = max(max_steps or 1, 1)
    first = math.ceil(start * max_steps)
    if not (first <= step < end * max_steps):
        return PLAIN
    if (step - first) % interval == 0:
        return SAM_STEP
    if mode == "looksam":
        return LOOKSAM_REUSE if has_stored_direction else SAM_STEP
    return PLAIN


# ---------------------------------------------------------------------- which examples each pass sees
# Keys that mark a padding-free batch: several sequences concatenated in one row (trl's padding_free, packing).
PACKED_BATCH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def batch_size(inputs: dict, needed_by: str) -> int:
    """The micro-batch's example count: the row count every tensor of the batch agrees on. A setting that cuts the
    batch cannot go without one, and cannot guess it: a batch whose tensors disagree (packed sequences with their
    `cu_seq_lens`, paired rows next to per-pair values, images per example) has rows that are not examples."""
    setting = needed_by.split("=")[0]
    packed = [k for k in PACKED_BATCH_KEYS if k in inputs]
    if packed:
        raise ValueError(
            f"{needed_by} cuts each micro-batch by examples, but this batch is packed ({', '.join(packed)}: several "
            f"sequences in one row). Train without padding_free / packing, or drop {setting}."
        )
    sizes = {k: v.shape[0] for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.ndim}
    if not sizes:
        # Cutting nothing would silently take plain SAM steps under a setting that promises otherwise.
        raise ValueError(
            f"{needed_by} cuts each micro-batch by examples, but this batch holds no tensor with a batch dimension "
            f"(keys: {', '.join(inputs)}). Collate the inputs into tensors, or drop {setting}."
        )
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{k}: {n}" for k, n in sizes.items())
        raise ValueError(
            f"{needed_by} cuts each micro-batch by examples, but this batch's tensors disagree on the number of rows "
            f"({shown}), so its rows are not one example each. Drop {setting} for this model or trainer."
        )
    return next(iter(sizes.values()))


def examples(inputs: dict, start: int, stop: int, size: int) -> dict:
    """Examples start..stop of a batch of `size`: tensors and lists with one entry per example are cut (detection
    `labels` come as a list of dicts); other values are passed on as they are."""

    def per_example(v) -> bool:
        if isinstance(v, torch.Tensor):
            return v.ndim > 0 and v.shape[0] == size
        return isinstance(v, (list, tuple)) and len(v) == size

    return {k: v[start:stop] if per_example(v) else v for k, v in inputs.items()}


def chunks(inputs: dict, group_size: int | None) -> list[tuple[dict, float]]:
    """`sam_group_size` = m: the micro-batch cut into chunks of m examples, each with its share of the batch."""
    if group_size is None:
        return [(inputs, 1.0)]
    size = batch_size(inputs, needed_by=f"sam_group_size={group_size}")
    if group_size >= size:
        return [(inputs, 1.0)]
    return [
        (examples(inputs, start, start + group_size, size), min(group_size, size - start) / size)
        for start in range(0, size, group_size)
    ]


def ascent_subset(
    inputs: dict, fraction: float, generator: torch.Generator | None = None, min_examples: int = 1
) -> tuple[dict, float]:
    """The examples the ascent pass uses (`sam_ascent_fraction`): ⌈f·B⌉ of the B drawn uniformly without
    replacement (at least `min_examples`), kept in batch order, and their share of B.

    Uniform, not the first ⌈f·B⌉: a sampler or collator that sorts (group_by_length) would otherwise always give
    the ascent the longest examples. The caller seeds `generator` from the run's seed, the step, the micro-batch
    and the process, so a resumed run draws what the uninterrupted one drew and the processes draw differently."""
    if fraction >= 1.0:
        return inputs, 1.0
    size = batch_size(inputs, needed_by=f"sam_ascent_fraction={fraction}")
    kept = min(size, max(min_examples, math.ceil(fraction * size)))
    if kept == size:
        return inputs, 1.0
    chosen = torch.randperm(size, generator=generator)[:kept].sort().values
    return select(inputs, chosen.tolist(), size), kept / size


def select(inputs: dict, rows: list[int], size: int) -> dict:
    """The given rows of a batch of `size`: tensors and lists with one entry per example are indexed; other values
    are passed on as they are."""

    def pick(v):
        if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == size:
            return v[torch.tensor(rows, device=v.device)]
        if isinstance(v, (list, tuple)) and len(v) == size:
            return type(v)(v[i] for i in rows)
        return v

    return {k: pick(v) for k, v in inputs.items()}


def subset_generator(seed: int, step: int, micro_batch: int, process: int) -> torch.Generator:
    """The ascent subset's random numbers: a function of where the draw is, not of what ran before it."""
    return torch.Generator().manual_seed(hash((seed, step, micro_batch, process)) & (2**63 - 1))


# ---------------------------------------------------------------------- GSAM and LookSAM
class CleanGradientWindow:
    """GSAM and LookSAM combine the SAM gradient g_s of an optimizer step with the clean gradient g of the same
    step: g is summed over the step's micro-batches (in the units of `.grad`), then used once at its end."""

    def __init__(self) -> None:
        self.clean: list[torch.Tensor] | None = None

    def add(self, grads: list[torch.Tensor], factor: float) -> None:
        if self.clean is None:
            self.clean = [torch.zeros_like(g) for g in grads]
        torch._foreach_add_(self.clean, grads, alpha=factor)

    @torch.no_grad()
    def finish_(self, params: list[torch.Tensor], mode: str, alpha: float, average_over_processes: bool):
        """At the last micro-batch of a SAM step, when `.grad` holds the (synced) SAM gradient of the whole step:
        GSAM rewrites `.grad` in place and returns None; LookSAM returns its new stored direction g_v (one entry
        per parameter, None where the parameter had no gradient), or None when g_v is not finite.

        Parameters the forward did not use have no `.grad` and get none (as in the stock Trainer): an optimizer
        must not decay them or keep state for them."""
        clean = self.clean
        if average_over_processes:
            all_reduce_mean_(clean)  # DDP averaged g_s over processes: average g the same way
        used = [i for i, p in enumerate(params) if p.grad is not None]
        sam_grads, clean_used = [params[i].grad for i in used], [clean[i] for i in used]
        stored = None
        if used and mode == "gsam":
            gsam_gradient_(sam_grads, clean_used, alpha)
        elif used:
            g_v = looksam_orthogonal_component(sam_grads, clean_used)
            # A non-finite SAM step (skipped by the guard or the GradScaler) must not become the direction every
            # reuse step adds: keep the last finite g_v (or none, and the next step is a full SAM step).
            if bool(torch.isfinite(global_norm(g_v))):
                stored = [None] * len(params)
                for i, t in zip(used, g_v, strict=True):
                    stored[i] = t
        torch._foreach_zero_(clean)
        return stored
