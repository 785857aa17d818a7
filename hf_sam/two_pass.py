"""One micro-batch (or one m-sharpness chunk) of two-pass SAM under the Trainer (`sam_micro_step`): the ascent
pass at w, w ← w + ε, the descent pass through the stock `Trainer.training_step` at w + ε, and the exact restore.
`SAMMixin._two_pass_sam_step` cuts the micro-batch into chunks and calls it for each.

Each pass leaves what the stock step would: the descent draws the ascent's random numbers (dropout masks),
BatchNorm statistics come from the clean pass only, the parent's side records (trl's metrics) count once, and w is
copied back before the Trainer clips, steps, saves or evaluates, however the descent ends."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from hf_sam import loss_units, variants
from hf_sam.batchnorm import running_stats_frozen
from hf_sam.engines import Plan
from hf_sam.perturbation import perturb_, perturbation_group
from hf_sam.run_state import RunState
from hf_sam.trainer_internals import inputs_already_prepared, loss_weighted, records_undone
from hf_sam.weight_backup import WeightBackup


def sam_micro_step(
    trainer,
    run: RunState,
    backup: WeightBackup,
    stock_step: Callable,
    model,
    inputs: dict,
    num_items_in_batch,
    *,
    plan: Plan,
    rhos: list[float],
    is_last: bool,
    loss_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ascent(s) at w, descent at w + ε (`stock_step`, the parent's `training_step`), exact restore (`backup`), for
    one micro-batch or chunk; `rhos`: each param group's ρ at this step.

    Returns the clean loss (as `compute_loss` gives it), the perturbed loss (as `training_step` reports it, times
    `loss_weight`, the chunk's share of its micro-batch), and the passes taken over the chunk, example-weighted:
    the ascent(s) over the ascent subset, then the descent.
    """
    args, engine = trainer.args, trainer.sam_engine
    random_state = engine.random_state()

    # 1. Ascent pass at w, on ⌈f·B⌉ examples drawn uniformly with sam_ascent_fraction < 1. The parent's metrics
    # describe the micro-batch trained on: a subset's records give way to the descent pass's.
    subset, share = variants.ascent_subset(
        inputs,
        args.sam_ascent_fraction,
        variants.subset_generator(
            args.seed, trainer.state.global_step, run.micro_batch, trainer.accelerator.process_index
        ),
        # BatchNorm in train mode cannot normalise one example (a short last batch, a small f·B).
        min_examples=2 if any(m.training for m in plan.batchnorms) else 1,
    )
    with records_undone(trainer) if share < 1.0 else contextlib.nullcontext():
        clean_loss, grads = engine.ascent_gradient(model, subset, num_items_in_batch, plan.params)
    if args.sam_mode in ("gsam", "looksam"):
        run.window.add(grads, loss_units.as_reported(trainer, 1.0, num_items_in_batch))  # `.grad`'s units

    # 2. w ← w + ε (projected multi-step ascent with sam_ascent_steps > 1).
    groups = [
        perturbation_group(group, plan.params[s], grads[s], rho)
        for (s, group), rho in zip(plan.slices, rhos, strict=True)
    ]
    further_ascent = _FurtherAscent(trainer, model, subset, num_items_in_batch, plan, random_state)
    try:
        grad_norm = perturb_(
            backup,
            groups,
            args.sam_ascent_steps,
            max(rhos),
            further_ascent,
            params=plan.params,  # the cached list: the backup recognises it without a per-tensor check
        )
        # ε now lives in the weights only: free it before the descent pass, so SAM's memory overhead is the
        # backup copy of w alone.
        del grads, groups

        # 3. Descent pass at w + ε: the stock step, with the ascent pass's random numbers (dropout masks).
        engine.restore_random_state(random_state)
        whole_batch_ascent = share == 1.0
        with descent_pass(trainer, model, plan, backup, is_last, loss_weight, whole_batch_ascent):
            perturbed_loss = stock_step(model, inputs, num_items_in_batch)
    finally:
        # 4. Back to w (exact copy) before the Trainer clips, steps, saves or evaluates.
        backup.restore_()

    finite = bool(torch.isfinite(grad_norm))
    run.telemetry.record_ascent(
        grad_norm * loss_units.mean_loss_factor(trainer, subset, num_items_in_batch),
        finite,
        rhos[0] if rhos else 0.0,
    )
    passes = share * (1 + further_ascent.taken) + 1  # the ascent(s) over the subset, then the descent
    if share < 1.0:
        clean_loss = loss_units.in_units_of_the_batch(trainer, clean_loss, subset, inputs, num_items_in_batch)
    return clean_loss, perturbed_loss, passes


@contextlib.contextmanager
def descent_pass(trainer, model, plan: Plan, backup: WeightBackup, is_last: bool, loss_weight: float,
                 whole_batch_ascent: bool):  # fmt: skip
    """Around the stock `training_step` at w + ε, so that it counts as the micro-batch's one pass: the engine's
    gradient synchronisation (and under DeepSpeed, w restored from `backup` before the engine's own step),
    BatchNorm statistics left as the clean pass set them, the loss weighted by the chunk's share, the parent's
    records undone when the ascent pass already recorded the whole micro-batch, and the batch the ascent pass was
    given, prepared once."""
    with (
        trainer.sam_engine.descent_context(model, is_last, backup),
        running_stats_frozen(plan.batchnorms),
        loss_weighted(trainer, loss_weight),
        records_undone(trainer) if whole_batch_ascent else contextlib.nullcontext(),
        inputs_already_prepared(trainer),
    ):
        yield


class _FurtherAscent:
    """sam_ascent_steps > 1: `perturb_`'s `gradient_at`, the ascent gradient at the current perturbed weights, with
    the first ascent's random numbers, BatchNorm statistics untouched and the parent's records undone; `taken`
    counts them (the passes they cost)."""

    def __init__(self, trainer, model, subset: dict, num_items_in_batch, plan: Plan, random_state) -> None:
        self.trainer, self.plan, self.random_state = trainer, plan, random_state
        self.pass_inputs = (model, subset, num_items_in_batch, plan.params)
        self.taken = 0

    def __call__(self) -> list[torch.Tensor]:
        self.taken += 1
        engine = self.trainer.sam_engine
        engine.restore_random_state(self.random_state)
        with running_stats_frozen(self.plan.batchnorms), records_undone(self.trainer):
            return engine.ascent_gradient(*self.pass_inputs)[1]
