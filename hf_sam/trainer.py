"""The SAM step as a mixin for any `transformers.Trainer` subclass (`SAMMixin`), and `SAMTrainer` = `SAMMixin` +
`transformers.Trainer`. Overrides a few public hooks (`__init__`, `create_optimizer`, `training_step`,
`floating_point_ops`, `log`), never the loop, and picks the step kind of each micro-batch (`_plain_step`,
`_two_pass_sam_step`, `_one_pass_sam_step`). One micro-batch of two-pass SAM is `hf_sam.two_pass`, what a run
keeps `hf_sam.run_state`, what the constructor needs `hf_sam.trainer_setup`; the engines, checks, variants, math
and telemetry live in their own modules."""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from hf_sam import loss_units, two_pass, variants
from hf_sam.batchnorm import ChunkStatistics, running_stats_frozen
from hf_sam.configs import SAMArguments, SAMTrainingArguments
from hf_sam.engines import Plan, select_engine
from hf_sam.gsam_looksam import looksam_reuse_gradient_
from hf_sam.one_pass import ONE_PASS_MODES, check_adam_update
from hf_sam.perturbation import scheduled_rho
from hf_sam.run_state import RunState
from hf_sam.sam import SAM
from hf_sam.setup_checks import check_accelerator, check_run, check_sam_wrapper, check_trainer_and_model
from hf_sam.telemetry import is_look_ahead_check_step, report_skipped_step
from hf_sam.trainer_internals import records_undone
from hf_sam.trainer_setup import (
    parent_signature,
    remove_if_created_empty,
    sam_in,
    wrap_in_sam,
)
from hf_sam.weight_backup import WeightBackup


class SAMMixin:
    """The Sharpness-Aware Minimization step for any `transformers.Trainer` subclass: put it first.

        class SAMTrainer(SAMMixin, Trainer): ...            # hf_sam.SAMTrainer
        class SAMSFTTrainer(SAMMixin, trl.SFTTrainer): ...   # with SAMSFTConfig(SAMArguments, trl.SFTConfig)

    The arguments must carry the `sam_*` fields (`hf_sam.SAMArguments` mixed into the parent's arguments class).
    What the parent's `compute_loss` records on the side (trl's `_metrics`, `_total_train_tokens`,
    `_stored_metrics`; extend `sam_clean_pass_state` for your own) is kept from the clean pass at w only: the
    perturbed pass's records are undone, so such metrics are logged once per micro-batch, like `loss`.

    Per micro-batch (`training_step`):

    1. ascent pass at w under `accelerator.no_sync`: forward + `torch.autograd.grad`, so gradients accumulated
       from earlier micro-batches stay untouched and ε is this process's own (m = per-device micro-batch);
    2. ε = ρ·g/‖g‖ over the trainable parameters (LoRA: the adapters), w ← w + ε in place with `torch._foreach_*`
       (`hf_sam.perturbation.perturb_`); a zero gradient gives ε = 0, a non-finite one no perturbation (counted);
    3. descent pass at w + ε through the stock `Trainer.training_step` (same dropout masks as the ascent pass,
       BatchNorm running statistics left as the clean pass set them, so `num_batches_tracked` advances once per
       micro-batch), so loss scaling, gradient accumulation, `num_items_in_batch`, DDP synchronisation and mixed
       precision stay the Trainer's;
    4. w restored by copy before returning; the Trainer then clips, steps, schedules, saves and evaluates at w.

    Steps 1-4 are `hf_sam.two_pass.sam_micro_step`. How each pass runs under DDP, FSDP2 and DeepSpeed ZeRO-1/2/3
    is the engine's (`hf_sam.engines`, chosen in `__init__` as `self.sam_engine`); ε itself is
    `hf_sam.perturbation.perturb_`, the one path from an ascent gradient to w + ε (the one-pass modes' look-ahead
    point is `hf_sam.one_pass`'s).

    The variants of `SAMTrainingArguments` (interval, late-phase window, LookSAM, GSAM, m-sharpness groups,
    multi-step ascent, ascent subset, ρ schedule, parameter filter) change which steps run SAM and how the final
    gradient is formed: the policy is `hf_sam.variants`, the math `hf_sam.perturbation` and `hf_sam.gsam_looksam`.

    The optimizer the Trainer builds (`optim`, `optim_args`, weight-decay groups) is wrapped in `hf_sam.SAM`,
    whose `state_dict` is the base optimizer's plus any variant state, so checkpoints resume exactly. The logged
    `loss` is the loss at w (comparable with a plain run); the SAM metrics are logged as `sam/*`
    (`hf_sam.telemetry`), in units that do not depend on accumulation, loss normalisation, fp16 loss scale,
    process count or resume: `sam/grad_norm` is ‖∇L(w)‖ of each micro-batch's mean loss; `sam/perturbed_loss`
    and `sam/sharpness` are in the units of the logged `loss`.
    """

    # Attributes a parent's compute_loss updates as a side effect (trl's convention): restored after the perturbed
    # pass, so they hold the clean pass's records only.
    sam_clean_pass_state: tuple[str, ...] = ("_metrics", "_total_train_tokens", "_stored_metrics")

    def __init__(self, *pargs, **kwargs):
        name = type(self).__name__
        bound = parent_signature(type(self), SAMMixin).bind_partial(*pargs, **kwargs)
        model, args = bound.arguments.get("model"), bound.arguments.get("args")
        if args is None:
            args = bound.arguments["args"] = SAMTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, SAMArguments):
            raise TypeError(
                f"{name} needs SAMTrainingArguments or another arguments class with the sam_* fields, got "
                f"{type(args).__name__}. Replace "
                "`TrainingArguments(...)` by `hf_sam.SAMTrainingArguments(...)` (same fields plus sam_*), or mix "
                "`hf_sam.SAMArguments` into your arguments class: `class MyConfig(SAMArguments, SFTConfig)`."
            )
        check_trainer_and_model(type(self), model, args)  # before Trainer.__init__ creates output_dir
        output_dir_existed = args.output_dir is None or os.path.exists(args.output_dir)
        super().__init__(*bound.args, **bound.kwargs)
        if self.args.sam_rho > 0:
            try:
                check_accelerator(self)  # the engine may come from `accelerate launch`
            except ValueError:
                if self.args.should_save:  # the process whose Trainer.__init__ made it: leave no trace
                    remove_if_created_empty(args.output_dir, output_dir_existed)
                raise
        self.sam_engine = select_engine(self)
        # The one backup of w on the Trainer path. The `SAM` wrapper keeps its own (`SAM._backup`) for custom loops,
        # and it stays empty here (its `ascent_step` never runs under the Trainer, so the `restore()` in its `step()`
        # finds nothing to restore). Kept apart because this one must not depend on the wrapper: under DeepSpeed no
        # wrapper exists (`Engine.wraps_optimizer`), and a wrapper may be the user's or be rebuilt for each new
        # model (model_init, hyperparameter trials), while this backup, with its once-per-trainer warning about
        # what low-precision weights keep of ε, lives as long as the trainer.
        self._sam_backup = WeightBackup()
        self._sam_run: RunState | None = None
        self._loss_units_checked_for = None  # the TrainerState of the run whose loss units were asked

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, *args, **kwargs):
        """Build the stock optimizer, then wrap it in `SAM` (it shares the base's param_groups and state)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        wrapper = sam_in(optimizer)  # a user's own SAM, or the one a first train() built (now Accelerate's)
        if self.args.sam_rho > 0 and self.args.sam_mode == "adam_update":
            check_adam_update(getattr(wrapper, "base_optimizer", optimizer))
        if wrapper is not None and self.args.sam_rho > 0:
            check_sam_wrapper(wrapper, self.args, type(self).__name__)
        if self.args.sam_rho > 0 and self.sam_engine.wraps_optimizer and wrapper is None:
            self.optimizer = optimizer = wrap_in_sam(optimizer, self.args, self.accelerator.scaler)
            optimizer.on_guarded_step = lambda skipped: report_skipped_step(self.optimizer, skipped)
        return optimizer

    def _sam_optimizer(self) -> SAM:
        optimizer = sam_in(self.optimizer)
        if optimizer is None:
            raise RuntimeError(
                "SAMTrainer's optimizer is not wrapped in hf_sam.SAM; was create_optimizer() overridden?"
            )
        return optimizer

    def _sam_state(self) -> dict:
        """Variant state that lives in checkpoints (LookSAM's g_v): the wrapper's, or none without a wrapper."""
        return self._sam_optimizer().sam_state if self.sam_engine.wraps_optimizer else {}

    def _current_run(self) -> RunState:
        if self._sam_run is None or self._sam_run.state is not self.state:
            check_run(self)
            self._sam_run = RunState(self.state, self.args.sam_mode)
        return self._sam_run

    def _perturbation_plan(self, model) -> Plan:
        """The engine's plan, cached per training loop (rebuilt when the optimizer's groups or a parameter's
        requires_grad change; the variants' per-parameter state then follows its parameter: `RunState.follow`)."""
        run, wraps = self._current_run(), self.sam_engine.wraps_optimizer
        optimizer = self._sam_optimizer() if wraps else self.optimizer
        plan = self.sam_engine.plan(model, optimizer, run.plan)
        return run.follow(plan, optimizer.sam_state if wraps else {})

    def _note_loss(self, loss: torch.Tensor) -> None:
        if self.sam_engine.guards_steps():
            self._sam_optimizer().note_loss(loss)

    # ------------------------------------------------------------------ the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.sam_fix_loss_normalization and self._loss_units_checked_for is not self.state:
            self._loss_units_checked_for = self.state
            loss_at = lambda count: self._forward_only(model, inputs, count)  # noqa: E731
            loss_units.declare_per_batch_mean_loss(self, model, loss_at, num_items_in_batch)
        if self.args.sam_rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        args, run = self.args, self._current_run()
        run.telemetry.count_step_outcome(self.accelerator, self.state.global_step, args.device)
        kind = variants.step_kind(
            self.state.global_step, self.state.max_steps, args.sam_start, args.sam_end, args.sam_interval,
            args.sam_mode, has_stored_direction="looksam_gv" in self._sam_state(),
        )  # fmt: skip
        direction = None
        if kind == variants.SAM_STEP and args.sam_mode in ONE_PASS_MODES:
            params = self._perturbation_plan(model).params
            direction = run.one_pass.direction(self._sam_optimizer(), params, self._sam_state())
            if direction is None:  # before the first optimizer step: no momentum, no previous gradient yet
                kind = variants.PLAIN
        last_micro_batch = self.accelerator.sync_gradients
        if last_micro_batch:
            run.telemetry.add(args.device, steps=1, sam_steps=float(kind == variants.SAM_STEP))
        try:
            if direction is not None:
                return self._one_pass_sam_step(model, inputs, num_items_in_batch, direction, last_micro_batch)
            if kind != variants.SAM_STEP:
                return self._plain_step(model, inputs, num_items_in_batch, kind, last_micro_batch)
            return self._two_pass_sam_step(model, inputs, num_items_in_batch, last_micro_batch)
        finally:
            run.micro_batch = 0 if last_micro_batch else run.micro_batch + 1

    def _plain_step(self, model, inputs, num_items_in_batch, kind: str, last_micro_batch: bool):
        """A step without SAM (outside the SAM window, between SAM steps, a one-pass mode's first step): the stock
        step, plus what a variant keeps from it (the previous gradient; LookSAM's reuse of its stored direction)."""
        args, run = self.args, self._current_run()
        run.passes = 1.0
        loss = super().training_step(model, inputs, num_items_in_batch)
        if args.sam_mode == "previous_gradient" and last_micro_batch:
            run.one_pass.remember_gradient(self._perturbation_plan(model).params, self._sam_state())
        self._note_loss(loss)
        if kind == variants.LOOKSAM_REUSE and last_micro_batch:
            # One forward+backward, then the stored SAM direction (the gradient is complete and synced now).
            params = self._perturbation_plan(model).params
            g_v = self._sam_state()["looksam_gv"]
            looksam_reuse_gradient_([p.grad for p in params], g_v, args.sam_looksam_alpha)
        run.telemetry.add(args.device, forward_passes=1, backward_passes=1)
        return loss

    def _two_pass_sam_step(self, model, inputs, num_items_in_batch, last_micro_batch: bool):
        """Two-pass SAM (and GSAM, LookSAM's SAM steps) for one micro-batch, cut into m-sharpness chunks when
        sam_group_size is set: each chunk's ascent, descent and restore is `hf_sam.two_pass.sam_micro_step`."""
        args, run = self.args, self._current_run()
        run.passes = 1.0
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            # As the stock step does, before the ascent: a schedule-free optimizer moves the weights to the point
            # its gradients are taken at, which must not happen while they are perturbed.
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        plan = self._perturbation_plan(model)
        self.sam_engine.begin_sam_micro_batch(model, first_in_window=run.micro_batch == 0)
        chunks = variants.chunks(inputs, args.sam_group_size)
        # A per-batch mean loss needs each chunk weighted by its share of the micro-batch; a loss normalised by
        # num_items_in_batch already sums over chunks.
        weighted = not loss_units.normalised_by_num_items(self, num_items_in_batch)
        statistics = ChunkStatistics(plan.batchnorms) if len(chunks) > 1 else None
        rhos = self._scheduled_rhos(plan)
        clean_total, perturbed_total, run.passes = 0.0, 0.0, 0.0
        for index, (chunk, share) in enumerate(chunks):
            weight = share if weighted else 1.0
            clean, perturbed, passes = two_pass.sam_micro_step(
                self, run, self._sam_backup, super().training_step, model, chunk, num_items_in_batch,
                plan=plan, rhos=rhos, is_last=index == len(chunks) - 1, loss_weight=weight,
            )  # fmt: skip
            run.passes += share * passes
            clean_total, perturbed_total = clean_total + weight * clean, perturbed_total + perturbed
            if statistics is not None:
                statistics.add_chunk(share)
        if statistics is not None:
            statistics.finish()
        # Example-weighted, as total_flos: a chunk of m examples counts m/B of a pass over the micro-batch.
        run.telemetry.add(args.device, forward_passes=run.passes, backward_passes=run.passes)

        if args.sam_mode in ("gsam", "looksam") and last_micro_batch:
            alpha = args.sam_gsam_alpha if args.sam_mode == "gsam" else args.sam_looksam_alpha
            g_v = run.window.finish_(plan.params, args.sam_mode, alpha, self.accelerator.num_processes > 1)
            if g_v is not None:
                self._sam_state()["looksam_gv"] = g_v
        clean_loss = loss_units.as_reported(self, clean_total, num_items_in_batch)
        if self._look_ahead_check_due():
            self._check_look_ahead(clean_loss, perturbed_total)
        self._note_loss(perturbed_total)  # the loss whose gradient the step applies
        run.telemetry.add(
            clean_loss.device, perturbed_loss=perturbed_total, sharpness=perturbed_total - clean_loss
        )
        return clean_loss

    def _one_pass_sam_step(self, model, inputs, num_items_in_batch, direction, last_micro_batch: bool):
        """The one-pass variants: one forward+backward per micro-batch at w + ε with ε taken without an ascent pass:
        sam_mode='momentum' (Momentum-SAM, Becker et al. 2024) ε = −ρ·v/‖v‖, v the optimizer's momentum;
        sam_mode='adam_update' ε = −ρ·u/‖u‖, u Adam's update m̂/(√v̂+ε);
        sam_mode='previous_gradient' ε = ρ·g_prev/‖g_prev‖, g_prev the gradient the previous step applied. Each
        parameter group at its own ρ (the wrapper's), one norm over all of them.

        The point is fixed at the window's first micro-batch (the direction changes only when the optimizer steps),
        so every micro-batch of an optimizer step takes its gradient at the same point. Each micro-batch enters it
        for its own pass and leaves it right after (`hf_sam.one_pass`: no copy of the weights), so anything
        that reads the weights between passes, whatever ends a window, reads w. The direction is replicated under
        DDP (the same synced gradients went into it), so ε is the same on every process, at no communication."""
        args, run = self.args, self._current_run()
        plan = self._perturbation_plan(model)
        clean = None
        if run.micro_batch == 0:
            rhos = self._scheduled_rhos(plan)
            norm = run.one_pass.set_point(
                [(plan.params[s], direction[s], rho) for (s, _), rho in zip(plan.slices, rhos, strict=True)]
            )
            run.telemetry.add(args.device, sam_micro_batches=1.0, rho=rhos[0] if rhos else 0.0)
            if not torch.isfinite(norm):
                run.telemetry.add(args.device, skipped_ascents=1.0)
            if self._look_ahead_check_due():  # the loss at w, for the look-ahead guard
                model.train()  # as the step's own pass (after an evaluation the model is in eval mode)
                clean = self._forward_only(model, inputs, num_items_in_batch, plan.batchnorms)
        with run.one_pass.at_point():  # back to w before anything else can read the weights
            loss = super().training_step(model, inputs, num_items_in_batch)
        if args.sam_mode == "previous_gradient" and last_micro_batch:
            run.one_pass.remember_gradient(plan.params, self._sam_state())
        if clean is not None:
            self._check_look_ahead(loss_units.as_reported(self, clean, num_items_in_batch), loss)
        self._note_loss(loss)
        run.passes = 1.0
        run.telemetry.add(args.device, forward_passes=1, backward_passes=1)
        return loss

    def _scheduled_rhos(self, plan: Plan) -> list[float]:
        """Each param group's ρ (the wrapper's, per group), following the learning rate with sam_rho_schedule."""
        args = self.args
        return [
            scheduled_rho(
                group["rho"], args.sam_rho_schedule, args.sam_rho_min, group["lr"],
                group.get("initial_lr", args.learning_rate) or args.learning_rate,
            )
            for _, group in plan.slices
        ]  # fmt: skip

    def _look_ahead_check_due(self) -> bool:
        """The look-ahead guard's steps (1, 8, 16, 32, ...: `hf_sam.telemetry`), at their first micro-batch, until it
        has warned once in this run. (`is_look_ahead_check_step` is looked up in this module: the overhead
        benchmarks turn the guard off here.)"""
        run = self._current_run()
        return (
            run.micro_batch == 0
            and not run.look_ahead.warned
            and is_look_ahead_check_step(self.state.global_step + 1)
        )

    def _check_look_ahead(self, clean: torch.Tensor, perturbed: torch.Tensor) -> None:
        if self.is_world_process_zero():  # one process's losses (one host sync): one warning per launch
            step, args = self.state.global_step + 1, self.args
            self._current_run().look_ahead.check(clean, perturbed, step, args.sam_rho, args.sam_mode)

    def _forward_only(self, model, inputs, num_items_in_batch, batchnorms=()) -> torch.Tensor:
        """`compute_loss` without gradients, leaving no trace: the random state put back (so the step's own pass
        draws the same dropout masks), BatchNorm statistics untouched, the parent's records undone."""
        random_state = self.sam_engine.random_state()
        try:
            with (
                torch.no_grad(),
                running_stats_frozen(batchnorms),
                records_undone(self),
                self.compute_loss_context_manager(),
            ):
                batch = dict(self._prepare_input(inputs))  # a copy: compute_loss may pop the labels
                return self.compute_loss(model, batch, num_items_in_batch=num_items_in_batch).detach()
        finally:
            self.sam_engine.restore_random_state(random_state)

    # ------------------------------------------------------------------ telemetry
    def floating_point_ops(self, inputs) -> int:
        """The stock count (6 · parameters · tokens: one forward+backward) times the passes the micro-batch just
        took, so `total_flos` counts SAM's second pass (the Trainer calls this right after `training_step`)."""
        flos = super().floating_point_ops(inputs)
        run = self._sam_run
        if self.args.sam_rho == 0 or run is None or run.state is not self.state:
            return flos
        return flos * run.passes

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the `sam/*` metrics to each training log, averaged over the logging window like `loss`.

        Only the Trainer's own training log (`control.should_log`, on every process at once) reduces the
        telemetry over processes; a `trainer.log({...})` of the user's on one process starts no collective."""
        run = self._sam_run
        if "loss" in logs and self.control.should_log and run is not None and run.state is self.state:
            run.telemetry.count_step_outcome(self.accelerator, self.state.global_step, self.args.device)
            if not run.telemetry.empty:
                logs.update(
                    run.telemetry.metrics(
                        self.accelerator,
                        rho_is_scheduled=self.args.sam_rho_schedule != "constant",
                        # With an ascent subset the clean loss is over other examples than the perturbed one.
                        same_examples=self.args.sam_ascent_fraction == 1.0,
                        # The one-pass variants compute one loss, at the perturbed point: the logged `loss` itself.
                        two_passes=self.args.sam_mode not in ONE_PASS_MODES,
                    )
                )
        super().log(logs, *args, **kwargs)


class SAMTrainer(SAMMixin, Trainer):
    """A drop-in `transformers.Trainer` that takes its optimizer steps with the SAM gradient (see `SAMMixin`)."""
