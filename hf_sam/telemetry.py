"""What `SAMTrainer` logs as `sam/*`: per-process sums over a logging window, one collective per log.

Every value means the same thing whatever the gradient accumulation, loss normalisation, loss scale (fp16),
process count or resume: the trainer adds quantities already in those units (see `SAMTrainer`'s docstring).
"""

from __future__ import annotations

import math

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The look-ahead guard: the loss at w + ε against the loss at w, on optimizer steps 1, 2, 8, 16, ... (a cost of
# log₂(steps) comparisons, one extra forward each for the one-pass modes), warned once per run past this ratio
# while the loss at w has not come down below LEARNING_FRACTION of its value at step 1. A far look-ahead alone is
# no stall: the tuned ρ of the benefit benchmarks puts the loss where the gradient is taken at 1.5-5x the loss at
# w, and those runs learn best (experiments/README.md). Steps 1 and 2 only record the loss at w: a stall shows once
# a run has had FIRST_VERDICT_STEP steps to learn.
LOOK_AHEAD_LOSS_RATIO = 1.5
LEARNING_FRACTION = 0.9
FIRST_VERDICT_STEP = 8

# The sums kept between two logs, on this process.
FIELDS = (
    "grad_norm",  # ‖∇L(w)‖ of each micro-batch's mean loss, summed over the finite ascents
    "finite_ascents",
    "skipped_ascents",  # micro-batches whose ascent gradient was not finite (no perturbation applied)
    "perturbed_loss",  # loss at w + ε as the Trainer reports `loss`, summed over SAM micro-batches
    "sharpness",  # perturbed minus clean loss, same units
    "sam_steps",  # optimizer steps that ran SAM
    "steps",  # optimizer steps taken (SAM or not)
    "skipped_steps",  # optimizer steps not applied (GradScaler overflow, non-finite guard, DeepSpeed overflow)
    "forward_passes",
    "backward_passes",
    "rho",  # ρ of each SAM micro-batch, summed (for the mean when ρ is scheduled)
    "sam_micro_batches",
)
_INDEX = {name: i for i, name in enumerate(FIELDS)}


class SAMTelemetry:
    """Sums of `FIELDS` over the micro-batches of one logging window, kept on the device (no host sync per step).

    One per training loop (`start_step`: the loop's first global step, e.g. a resume's)."""

    def __init__(self, start_step: int = 0) -> None:
        self._sums: torch.Tensor | None = None
        self.outcome_read_at_step = start_step

    def record_ascent(self, grad_norm: torch.Tensor, finite: bool, rho: float) -> None:
        """One SAM micro-batch's ascent: ‖∇L(w)‖ in units of the micro-batch's mean loss, and its ρ."""
        if finite:
            self.add(grad_norm.device, grad_norm=grad_norm, finite_ascents=1)
        else:
            self.add(grad_norm.device, skipped_ascents=1)
        self.add(grad_norm.device, rho=rho, sam_micro_batches=1)

    def count_step_outcome(self, accelerator, global_step: int, device) -> None:
        """Count the last optimizer step if it was not applied (GradScaler overflow, our guard, DeepSpeed).

        Accelerate's flag describes the most recent optimizer step, so it is read once per step: at the next
        micro-batch, or in the log that follows the step, whichever comes first."""
        if global_step > self.outcome_read_at_step:
            self.outcome_read_at_step = global_step
            if accelerator.optimizer_step_was_skipped:
                self.add(device, skipped_steps=1)

    def add(self, device: torch.device | str, **values: float | torch.Tensor) -> None:
        if self._sums is None:
            self._sums = torch.zeros(len(FIELDS), device=device, dtype=torch.float64)
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(self._sums.device, self._sums.dtype)
            self._sums[_INDEX[name]] += value

    @property
    def empty(self) -> bool:
        return self._sums is None

    def metrics(
        self, accelerator, rho_is_scheduled: bool, same_examples: bool = True, two_passes: bool = True
    ) -> dict[str, float]:
        """The `sam/*` values of the window, summed over processes (one all-reduce), then reset for the next.

        `same_examples`: the clean and perturbed losses are over the same examples (not with an ascent subset),
        so their difference is the sharpness. `two_passes`: False for the one-pass modes (`hf_sam.one_pass.ONE_PASS_MODES`:
        momentum, adam_update, previous_gradient), whose one loss is the logged `loss` (no perturbed loss or
        sharpness of its own)."""
        processes = accelerator.num_processes
        totals = dict(
            zip(FIELDS, accelerator.reduce(self._sums.clone(), reduction="sum").tolist(), strict=True)
        )
        self._sums.zero_()
        logs: dict[str, float] = {}
        if totals["finite_ascents"] > 0:
            logs["sam/grad_norm"] = totals["grad_norm"] / totals["finite_ascents"]
        if totals["sam_steps"] > 0 and two_passes:
            logs["sam/perturbed_loss"] = totals["perturbed_loss"] / totals["sam_steps"]
            if same_examples:
                logs["sam/sharpness"] = totals["sharpness"] / totals["sam_steps"]
        if rho_is_scheduled and totals["sam_micro_batches"] > 0:
            logs["sam/rho"] = totals["rho"] / totals["sam_micro_batches"]
        logs["sam/skipped_ascents"] = int(totals["skipped_ascents"])
        logs["sam/skipped_steps"] = int(totals["skipped_steps"] / processes)
        if totals["steps"] > 0:
            logs["sam/fraction_sam_steps"] = totals["sam_steps"] / totals["steps"]
        # Example-weighted: an ascent pass over a fraction f of the micro-batch counts f.
        logs["sam/forward_passes"] = _whole_if_integral(totals["forward_passes"] / processes)
        logs["sam/backward_passes"] = _whole_if_integral(totals["backward_passes"] / processes)
        return logs


def is_look_ahead_check_step(global_step: int) -> bool:
    """The optimizer steps whose first micro-batch compares the losses at w and w + ε: 1 and 2 (the loss at w to
    compare with later: the one-pass modes' first look-ahead is at step 2), then 8, 16, 32, ..."""
    power_of_two = global_step > 0 and global_step & (global_step - 1) == 0
    return power_of_two and (global_step <= 2 or global_step >= FIRST_VERDICT_STEP)


def warn_if_look_ahead_too_far(
    clean: float, rho: float, mode: str, step: int, initial: float, worst_ratio: float
) -> bool:
    """Warn (and return True) when the loss where the gradient is taken has been far above the loss at w at a check
    of this run (`worst_ratio`, the largest ratio so far) *and* the loss at w (`clean`) has not come down from its
    value at the first check (`initial`): ρ keeps the model from learning, with nothing else to say why (ρ = 3, the
    digits MLP's Momentum-SAM value, keeps a BERT trained with AdamW at the majority class)."""
    if step < FIRST_VERDICT_STEP or not worst_ratio > LOOK_AHEAD_LOSS_RATIO:
        return False
    if not (
        clean > 0 and clean >= LEARNING_FRACTION * initial
    ):  # learning (a NaN initial: nothing to compare)
        return False
    where = {"momentum": "look-ahead point w − ρ·v/‖v‖", "adam_update": "look-ahead point w − ρ·u/‖u‖"}.get(
        mode, "perturbed point w + ε"
    )
    logger.warning(
        f"By step {step} the loss at the {where} has been up to {worst_ratio:.1f}x the loss at w, and the loss at w "
        f"has not come down ({initial:.4g} at the first check, {clean:.4g} now): sam_rho={rho:g} is too large for "
        "this model. Lower sam_rho (see docs/variants.md, 'Choosing ρ', for the values tuned on each model family)."
    )
    return True


class LookAheadGuard:
    """The look-ahead guard's state for one run: the loss at w at its first check, the largest (loss where the
    gradient is taken) / (loss at w) so far, and whether it has warned (once per run). The trainer asks it on the
    check steps (`is_look_ahead_check_step`), at their first micro-batch, on one process."""

    def __init__(self) -> None:
        self.warned = False
        self.first_clean_loss = math.nan
        self.worst_ratio = 0.0

    def check(self, clean, perturbed, step: int, rho: float, mode: str) -> None:
        """Record the losses at w (`clean`) and where the gradient is taken (`perturbed`) of optimizer step `step`
        (1-based), and warn if ρ keeps the model from learning (`warn_if_look_ahead_too_far`)."""
        if step <= 2 and math.isnan(self.first_clean_loss):
            # What "has come down" is measured against: the first check (step 2 for the one-pass modes, whose
            # first step is plain); a run resumed later has none, and gets no verdict.
            self.first_clean_loss = float(clean)
        clean, perturbed = float(clean), float(perturbed)
        if clean > 0:
            self.worst_ratio = max(self.worst_ratio, perturbed / clean)
        self.warned = warn_if_look_ahead_too_far(
            clean, rho, mode, step, self.first_clean_loss, self.worst_ratio
        )


def _whole_if_integral(value: float) -> int | float:
    return int(round(value)) if abs(value - round(value)) < 1e-9 else round(value, 6)


def report_skipped_step(optimizer, skipped: bool) -> None:
    """Tell Accelerate whether our fp32/bf16 guard skipped the step, so that the Trainer leaves the LR schedule
    alone as it does for an fp16 overflow. Accelerate learns of skipped steps only from its GradScaler, through
    `AcceleratedOptimizer._is_overflow` (private; read by `accelerator.optimizer_step_was_skipped`): the one place
    hf-sam writes Accelerate's internals."""
    if hasattr(optimizer, "_is_overflow"):
        optimizer._is_overflow = skipped
