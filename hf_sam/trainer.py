"""The two-pass SAM step as a mixin for any `transformers.Trainer` subclass (`SAMMixin`), and `SAMTrainer` =
`SAMMixin` + `transformers.Trainer`. Overrides a few public hooks, never the loop."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import re

import torch
from accelerate.utils import DistributedType
from transformers import Trainer
from transformers.utils import logging

from hf_sam.configs import SAMArguments, SAMTrainingArguments
from hf_sam.sam import (
    NORM_EPS,
    SAM,
    PerturbationGroup,
    WeightBackup,
    compute_perturbation_,
    global_norm,
    gsam_gradient_,
    local_tensors,
    looksam_orthogonal_component,
    looksam_reuse_gradient_,
    project_to_ball_,
)
from hf_sam.telemetry import SAMTelemetry

logger = logging.get_logger(__name__)

# What an optimizer step does, decided once per step from `state.global_step`.
PLAIN, SAM_STEP, LOOKSAM_REUSE = "plain", "sam", "looksam_reuse"


class _Run:
    """What `SAMTrainer` keeps for one training loop.

    The Trainer builds a new `TrainerState` at the start of every loop (each `train()`, each `model_init` /
    hyperparameter trial, a resume, an `auto_find_batch_size` retry), so a run is recognised by its state object
    and nothing carries over from one loop into the next: a cached parameter list of the previous model would be
    perturbed instead of the new one (ε = 0 on the model being trained), a half-filled window would leak.
    """

    def __init__(self, state) -> None:
        self.state = state
        self.plan: tuple | None = None  # see SAMTrainer._perturbation_plan
        self.clean_grad_sum: list[torch.Tensor] | None = None  # GSAM / LookSAM: g summed over the window
        self.telemetry = SAMTelemetry()
        self.outcome_read_at_step = state.global_step  # see SAMTrainer._count_skipped_step


# Trainers whose training_step generates, or trains several models: the two-pass step cannot wrap them.
_REFUSED_PARENTS = {
    "GRPOTrainer": "generates completions inside its training step",
    "RLOOTrainer": "generates completions inside its training step",
    "PPOTrainer": "runs its own rollout loop with a policy and a value model",
    "OnlineDPOTrainer": "generates completions inside its training step",
    "NashMDTrainer": "generates completions inside its training step",
    "XPOTrainer": "generates completions inside its training step",
    "GKDTrainer": "generates with the student and trains against a teacher model",
}


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
    2. ε = ρ·g/‖g‖ over the trainable parameters (`hf_sam.sam.compute_perturbation_`), w ← w + ε in place;
    3. descent pass at w + ε through the stock `Trainer.training_step` (same dropout masks as the ascent pass,
       BatchNorm running statistics left as the clean pass set them), so loss scaling, gradient accumulation,
       `num_items_in_batch`, DDP synchronisation and mixed precision stay the Trainer's;
    4. w restored by copy before returning; the Trainer then clips, steps and schedules as usual.

    Under FSDP2 the ascent is a real backward into the sharded gradients (set aside and put back around it), so
    ε is one for all processes and ‖g‖ the full-model norm; under DeepSpeed ZeRO-1/2 the ascent runs on the
    unwrapped module (the engine's hooks stay out of it) and w is restored just before the engine's step, which
    DeepSpeed takes inside `accelerator.backward`. See the README's "Beyond DDP".

    The variants of `SAMTrainingArguments` (interval, late-phase window, LookSAM, GSAM, m-sharpness groups,
    multi-step ascent, ρ schedule, parameter filter) change which steps run SAM and how the final gradient is
    formed; the math lives in `hf_sam.sam`.

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

    def __init__(self, model=None, args: SAMArguments | None = None, *pargs, **kwargs):
        name = type(self).__name__
        if args is None:
            args = SAMTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, SAMArguments):
            raise TypeError(
                f"{name} needs SAMTrainingArguments or another arguments class with the sam_* fields, got "
                f"{type(args).__name__}. Replace "
                "`TrainingArguments(...)` by `hf_sam.SAMTrainingArguments(...)` (same fields plus sam_*), or mix "
                "`hf_sam.SAMArguments` into your arguments class: `class MyConfig(SAMArguments, SFTConfig)`."
            )
        refused = next((c.__name__ for c in type(self).__mro__ if c.__name__ in _REFUSED_PARENTS), None)
        if refused is not None and args.sam_rho > 0:
            raise ValueError(
                f"{name}: SAM cannot wrap {refused}, which {_REFUSED_PARENTS[refused]}. Supported: Trainer, "
                "Seq2SeqTrainer, trl's SFTTrainer and subclasses whose training_step is one forward+backward; or set "
                "sam_rho=0."
            )
        if args.sam_rho > 0 and args.sam_param_filter is not None and isinstance(model, torch.nn.Module):
            _check_param_filter(model, args.sam_param_filter)  # before Trainer.__init__ creates output_dir
        output_dir_existed = args.output_dir is None or os.path.exists(args.output_dir)
        super().__init__(model, args, *pargs, **kwargs)
        if self.args.sam_rho > 0:
            try:
                self._check_sam_compatible()  # needs the Accelerator: the engine may come from `accelerate launch`
            except ValueError:
                if (
                    not output_dir_existed and self.args.should_save
                ):  # the process whose Trainer.__init__ made it
                    with contextlib.suppress(OSError):  # only if still empty: leave no trace
                        os.rmdir(args.output_dir)
                raise
        if (
            self.args.sam_fix_loss_normalization
            and self.model_accepts_loss_kwargs
            and _loss_ignores_num_items_in_batch(self.model)
        ):
            # e.g. EfficientNet, ResNet, ConvNeXt: `forward(**kwargs)` makes the Trainer believe the model
            # normalises by `num_items_in_batch`, but their loss is a per-micro-batch mean, so the stock Trainer's
            # gradient comes out multiplied by the accumulation steps (and processes). Declare the truth.
            logger.warning_once(
                f"{type(self.model).__name__}'s loss ignores num_items_in_batch: SAMTrainer averages its micro-batch "
                "losses over the accumulation steps (sam_fix_loss_normalization=True; False keeps the stock "
                "Trainer's scaling, which multiplies this model's gradients by the accumulation steps)."
            )
            self.model_accepts_loss_kwargs = False
        # FSDP2: parameters and gradients are shards (DTensors); ε comes from the reduced gradient (global).
        self._sharded = bool(getattr(self.accelerator, "is_fsdp2", False))
        # DeepSpeed ZeRO-1/2: full weights on every process, the engine steps inside `accelerator.backward`.
        self._deepspeed = bool(self.is_deepspeed_enabled)
        self._sam_backup = WeightBackup()
        self._sam_run: _Run | None = None

    # ------------------------------------------------------------------ set-up checks
    def _check_sam_compatible(self) -> None:
        distributed_type = self.accelerator.distributed_type
        if distributed_type == DistributedType.DEEPSPEED or self.is_deepspeed_enabled:
            # Also reached when the DeepSpeed plugin comes from `accelerate launch` rather than `args.deepspeed`.
            self.args.check_deepspeed_compatible(self.accelerator.state.deepspeed_plugin.zero_stage)
        if distributed_type == DistributedType.FSDP or self.is_fsdp_enabled:
            # Also reached when the FSDP plugin comes from `accelerate launch` rather than from `args.fsdp`.
            self.args.check_fsdp_compatible(self.accelerator.state.fsdp_plugin.fsdp_version)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"SAMTrainer does not support torch.nn.DataParallel ({self.args.n_gpu} GPUs in one process): its "
                "replicas would share one ε. Launch one process per GPU with `accelerate launch --multi_gpu` "
                "(or torchrun), or expose a single GPU with CUDA_VISIBLE_DEVICES."
            )
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and (
            getattr(parallelism, "cp_enabled", False) or getattr(parallelism, "sp_enabled", False)
        ):
            raise ValueError(
                "SAMTrainer does not support context or sequence parallelism yet: the ascent pass would skip the "
                "input sharding the Trainer applies to each micro-batch. Train without parallelism_config's cp/sp "
                "sizes (DDP, FSDP2 or DeepSpeed ZeRO-1/2 work), or set sam_rho=0."
            )
        checkpointing_kwargs = self.args.gradient_checkpointing_kwargs or {}
        if self.args.gradient_checkpointing and checkpointing_kwargs.get("use_reentrant", False):
            raise ValueError(
                "gradient_checkpointing_kwargs={'use_reentrant': True} is incompatible with SAM's ascent pass "
                "(torch.autograd.grad). Use {'use_reentrant': False} (the transformers default)."
            )

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, *args, **kwargs):
        """Build the stock optimizer, then wrap it in `SAM` (it shares the base's param_groups and state)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.args.sam_rho > 0 and not self.is_deepspeed_enabled and not isinstance(optimizer, SAM):
            # (Under DeepSpeed the ZeRO optimizer owns the step and rewrites the groups into flat partitions: the
            # base optimizer stays unwrapped and the SAM settings come from the arguments.)
            self.optimizer = optimizer = SAM(
                optimizer,
                rho=self.args.sam_rho,
                adaptive=self.args.sam_adaptive,
                eta=self.args.sam_eta,
                norm=self.args.sam_norm,
            )
            # fp16's GradScaler already skips non-finite steps; in fp32/bf16 the wrapper does (and stops after N).
            optimizer.max_nonfinite_steps = (
                self.args.sam_max_nonfinite_steps if self.accelerator.scaler is None else 0
            )
            optimizer.on_guarded_step = self._report_skipped_step
            # w is restored by training_step before the Trainer steps, and Accelerate detects an fp16 overflow by
            # whether the GradScaler calls step(): let the scaler skip this optimizer as it skips any other.
            optimizer._step_supports_amp_scaling = False
        return optimizer

    def _report_skipped_step(self, skipped: bool) -> None:
        """Tell Accelerate whether the fp32/bf16 guard skipped the step, so that the Trainer leaves the LR schedule
        alone as it does for an fp16 overflow. Accelerate learns of skipped steps only from its GradScaler, through
        `AcceleratedOptimizer._is_overflow` (private; read by `accelerator.optimizer_step_was_skipped`): the one
        place SAMTrainer writes Accelerate's internals."""
        if hasattr(self.optimizer, "_is_overflow"):
            self.optimizer._is_overflow = skipped

    def _sam_optimizer(self) -> SAM:
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, SAM):
            optimizer = getattr(optimizer, "optimizer", None)  # AcceleratedOptimizer and friends
        if optimizer is None:
            raise RuntimeError(
                "SAMTrainer's optimizer is not wrapped in hf_sam.SAM; was create_optimizer() overridden?"
            )
        return optimizer

    def _perturbation_plan(self, model: torch.nn.Module) -> tuple[list, list[tuple[slice, dict]], list]:
        """The parameters to perturb in optimizer order (trainable, matching `sam_param_filter`), which slice of
        them each param group owns, and the BatchNorm layers the perturbed passes must leave alone.

        Cached per training loop (`_Run`), and rebuilt when the optimizer's groups change (a user's `add_param_group`).
        """
        if self._deepspeed:
            return self._deepspeed_plan(model)
        run = self._current_run()
        sam = self._sam_optimizer()
        key = tuple(len(group["params"]) for group in sam.param_groups)
        if run.plan is None or run.plan[0] != key:
            perturbed = self._perturbed_parameters(model)
            params, slices = [], []
            for group in sam.param_groups:
                chosen = [p for p in group["params"] if id(p) in perturbed]
                slices.append((slice(len(params), len(params) + len(chosen)), group))
                params.extend(chosen)
            if not params:
                raise ValueError(
                    "SAMTrainer found no parameter to perturb (trainable and matching sam_param_filter)."
                )
            run.plan = (key, params, slices, _tracking_batchnorms(model))
        return run.plan[1:]

    def _perturbed_parameters(self, model: torch.nn.Module) -> set[int]:
        """ids of the parameters SAM perturbs: trainable, and matching `sam_param_filter` when it is set."""
        pattern = re.compile(self.args.sam_param_filter) if self.args.sam_param_filter is not None else None
        return {
            id(p)
            for n, p in self.accelerator.unwrap_model(model).named_parameters()
            if p.requires_grad and (pattern is None or pattern.search(n))
        }

    def _deepspeed_plan(self, model: torch.nn.Module) -> tuple[list, list[tuple[slice, dict]], list]:
        """DeepSpeed: the module's own parameters (ZeRO has replaced the optimizer's by flat fp32 partitions,
        which no forward uses), one group with the SAM settings of the arguments and the current learning rate."""
        run = self._current_run()
        if run.plan is None:
            perturbed = self._perturbed_parameters(model)
            params = [p for p in self.accelerator.unwrap_model(model).parameters() if id(p) in perturbed]
            run.plan = (None, params, None, _tracking_batchnorms(model))
        args, lr_group = self.args, self.optimizer.param_groups[0]
        group = {
            "rho": args.sam_rho,
            "adaptive": args.sam_adaptive,
            "eta": args.sam_eta,
            "sam_norm": args.sam_norm,
            "lr": lr_group["lr"],
            "initial_lr": lr_group.get("initial_lr", args.learning_rate),
        }
        params = run.plan[1]
        return params, [(slice(0, len(params)), group)], run.plan[3]

    def _note_loss(self, loss: torch.Tensor) -> None:
        if not self._deepspeed:  # DeepSpeed's engine handles overflow itself (fp16); our wrapper is not there
            self._sam_optimizer().note_loss(loss)

    # ------------------------------------------------------------------ which step is which
    def _step_kind(self) -> str:
        """SAM step, LookSAM reuse step or plain step, for the optimizer step in progress.

        Decided from `state.global_step` alone, so every micro-batch of a step agrees and a resumed run takes
        the same decisions as an uninterrupted one.
        """
        args, step = self.args, self.state.global_step
        max_steps = max(self.state.max_steps or 1, 1)
        first = math.ceil(args.sam_start * max_steps)
        if not (first <= step and step < args.sam_end * max_steps):
            return PLAIN
        if (step - first) % args.sam_interval == 0:
            return SAM_STEP
        if args.sam_mode == "looksam":
            # Without a stored g_v (e.g. a checkpoint written by an older version) take a full SAM step instead.
            return LOOKSAM_REUSE if "looksam_gv" in self._sam_optimizer().sam_state else SAM_STEP
        return PLAIN

    def _scheduled_rho(self, group: dict) -> float:
        """ρ for this step: constant, or ρ_min + (ρ − ρ_min)·lr_t/lr_peak ("linear_with_lr", as GSAM)."""
        if self.args.sam_rho_schedule == "constant":
            return group["rho"]
        peak = group.get("initial_lr", self.args.learning_rate) or self.args.learning_rate
        ratio = min(max(group["lr"] / peak, 0.0), 1.0) if peak else 1.0
        return self.args.sam_rho_min + (group["rho"] - self.args.sam_rho_min) * ratio

    # ------------------------------------------------------------------ the step
    def _current_run(self) -> _Run:
        if self._sam_run is None or self._sam_run.state is not self.state:
            self._sam_run = _Run(self.state)
        return self._sam_run

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.sam_rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        run = self._current_run()
        self._count_skipped_step(run)
        kind = self._step_kind()
        last_micro_batch = self.accelerator.sync_gradients
        if last_micro_batch:
            run.telemetry.add(self.args.device, steps=1, sam_steps=float(kind == SAM_STEP))
        if kind != SAM_STEP:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._note_loss(loss)
            if kind == LOOKSAM_REUSE and last_micro_batch:
                # One forward+backward, then the stored SAM direction (the gradient is complete and synced now).
                params = self._perturbation_plan(model)[0]
                g_v = self._sam_optimizer().sam_state["looksam_gv"]
                looksam_reuse_gradient_(
                    [p.grad for p in params], _on(g_v, params), self.args.sam_looksam_alpha
                )
            self._count_passes(forwards=1, backwards=1)
            return loss

        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            # As the stock step does, before the ascent: a schedule-free optimizer moves the weights to the point
            # its gradients are taken at, which must not happen while they are perturbed.
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        params, slices, batchnorms = self._perturbation_plan(model)
        if self._sharded:
            # The Trainer defers FSDP2's reduce-scatter to the last micro-batch, keeping unsharded local gradients
            # in between; the ascent's own synced backward would fold those into its gradient. So a SAM step
            # reduce-scatters every pass: the accumulated gradient then lives in the sharded `.grad` alone
            # (less memory than the deferred path, one reduce-scatter per pass instead of per step).
            model.set_requires_gradient_sync(True)
        chunks = self._split_into_groups(inputs)
        # A per-batch mean loss needs each chunk weighted by its share of the micro-batch; a loss normalised by
        # num_items_in_batch already sums over chunks.
        weighted = not self._loss_is_normalised_by_num_items(num_items_in_batch)
        statistics = _ChunkStatistics(batchnorms) if len(chunks) > 1 else None
        clean_total, perturbed_total = 0.0, 0.0
        for index, (chunk, share) in enumerate(chunks):
            weight = share if weighted else 1.0
            clean, perturbed = self._sam_micro_step(
                model,
                chunk,
                num_items_in_batch,
                params,
                slices,
                batchnorms,
                is_last=index == len(chunks) - 1,
                loss_weight=weight,
            )
            clean_total, perturbed_total = clean_total + weight * clean, perturbed_total + perturbed
            if statistics is not None:
                statistics.add_chunk(share)
        if statistics is not None:
            statistics.finish()

        if self.args.sam_mode in ("gsam", "looksam") and last_micro_batch:
            self._finish_window_(params)
        clean_loss = self._loss_as_reported(clean_total, num_items_in_batch)
        self._note_loss(perturbed_total)  # the loss whose gradient the step applies
        run.telemetry.add(
            clean_loss.device, perturbed_loss=perturbed_total, sharpness=perturbed_total - clean_loss
        )
        return clean_loss

    def _sam_micro_step(
        self, model, inputs, num_items_in_batch, params, slices, batchnorms, is_last, loss_weight=1.0
    ):
        """Ascent(s) at w, descent at w + ε, exact restore, for one micro-batch (or one chunk of m examples).

        Returns the clean loss (as `compute_loss` gives it) and the perturbed loss (as `training_step` reports it,
        times `loss_weight`, the chunk's share of its micro-batch).
        """
        args = self.args
        rng_state = _rng_snapshot(args.device)

        # 1. Ascent pass at w. Forward *and* backward under no_sync: a forward outside it would arm DDP's reducer.
        # With sam_ascent_fraction < 1 it sees the first ⌈f·B⌉ examples only (their mean-loss gradient gives ε).
        subset, share = self._ascent_subset(inputs)
        clean_loss, grads = self._ascent_gradient(model, subset, num_items_in_batch, params, share)
        if args.sam_mode in ("gsam", "looksam"):
            self._accumulate_clean_gradient(grads, num_items_in_batch)

        # 2. ε from the ascent gradient.
        rhos = [self._scheduled_rho(group) for _, group in slices]
        plain_l2 = args.sam_norm == "2" and not args.sam_adaptive and args.sam_ascent_steps == 1
        if plain_l2 and len(set(rhos)) == 1:
            # The default case: ε = ρ·g/‖g‖ is applied as w += (ρ/‖g‖)·g, without first scaling g in place.
            grad_norm = global_norm(grads)
            ascent_is_finite = bool(torch.isfinite(grad_norm))
            alpha = rhos[0] / (float(grad_norm) + NORM_EPS) if ascent_is_finite else 0.0
        else:  # per-group ρ, ASAM, p = ∞, multi-step: the general form turns the gradients into ε in place
            grad_norm = compute_perturbation_(self._groups(params, grads, slices, rhos))
            ascent_is_finite, alpha = bool(torch.isfinite(grad_norm)), 1.0
        try:
            if ascent_is_finite:
                self._sam_backup.perturb_(params, grads, alpha=alpha)
                for _ in range(args.sam_ascent_steps - 1):  # projected gradient ascent (appendix C.6)
                    _rng_restore(rng_state, args.device)
                    with _running_stats_frozen(batchnorms):
                        _, step = self._ascent_gradient(model, subset, num_items_in_batch, params, share)
                    if not bool(
                        torch.isfinite(compute_perturbation_(self._groups(params, step, slices, rhos)))
                    ):
                        break  # keep the last finite ε
                    torch._foreach_add_(local_tensors(grads), local_tensors(step))
                    project_to_ball_(grads, max(rhos))
                    self._sam_backup.restore_()
                    self._sam_backup.perturb_(params, grads)
            # ε now lives in the weights only: free it before the descent pass, so SAM's memory overhead is
            # the backup copy of w alone.
            del grads

            # 3. Descent pass at w + ε: the stock step, with the ascent pass's random numbers (dropout masks).
            _rng_restore(rng_state, args.device)
            sync = contextlib.nullcontext() if is_last or self._sharded else self.accelerator.no_sync(model)
            with sync, _running_stats_frozen(batchnorms), self._restore_before_engine_step(model):
                with self._loss_weighted(loss_weight), self._records_of_the_clean_pass():
                    perturbed_loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            # 4. Back to w (exact copy) before the Trainer clips, steps, saves or evaluates.
            self._sam_backup.restore_()

        self._record_ascent(
            grad_norm * self._mean_loss_factor(subset, num_items_in_batch),
            ascent_is_finite,
            rhos[0] if rhos else 0.0,
        )
        if (
            share < 1.0
            and num_items_in_batch is not None
            and self._loss_is_normalised_by_num_items(num_items_in_batch)
        ):
            # The subset's loss is normalised by the items of the whole window: in the units of the full micro-batch.
            subset_items, items = _items_in(subset, self._shifts()), _items_in(inputs, self._shifts())
            if subset_items is not None and items is not None:
                clean_loss = clean_loss * items / subset_items.clamp(min=1)
        return clean_loss, perturbed_loss

    def _ascent_subset(self, inputs: dict) -> tuple[dict, float]:
        """The examples the ascent pass uses (`sam_ascent_fraction`): the first ⌈f·B⌉, and their share of B."""
        fraction = self.args.sam_ascent_fraction
        if fraction >= 1.0:
            return inputs, 1.0
        batch_size = _batch_size(inputs, needed_by=f"sam_ascent_fraction={fraction}")
        size = min(batch_size, math.ceil(fraction * batch_size))
        return _examples(inputs, 0, size, batch_size), size / batch_size

    @contextlib.contextmanager
    def _records_of_the_clean_pass(self):
        """Undo what the parent's compute_loss records during the perturbed pass (`sam_clean_pass_state`)."""
        saved = {
            name: copy.deepcopy(getattr(self, name))
            for name in self.sam_clean_pass_state
            if hasattr(self, name)
        }
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    @contextlib.contextmanager
    def _loss_weighted(self, weight: float):
        """The stock step divides a per-batch mean loss by `current_gradient_accumulation_steps` (the number of
        micro-batches in the window); a chunk that is `weight` of a micro-batch counts as 1/weight times more of
        them. Works whatever `compute_loss` the user's subclass defines."""
        if weight == 1.0:
            yield
            return
        steps = self.current_gradient_accumulation_steps
        self.current_gradient_accumulation_steps = steps / weight
        try:
            yield
        finally:
            self.current_gradient_accumulation_steps = steps

    def _ascent_gradient(self, model, inputs, num_items_in_batch, params, share: float = 1.0):
        """Forward + backward at the current weights without touching `.grad` or DDP's reducer. `share`: the
        fraction of the micro-batch `inputs` holds (the passes are counted example-weighted)."""
        if self._sharded:
            return self._sharded_ascent_gradient(model, inputs, num_items_in_batch, params)
        if self._deepspeed:
            # The engine's forward hooks its output so that any backward runs ZeRO's gradient reduction; the
            # module itself computes the same loss without them (and touches no engine state).
            model = self.accelerator.unwrap_model(model)
        with contextlib.nullcontext() if self._deepspeed else self.accelerator.no_sync(model):
            with self.compute_loss_context_manager():
                # compute_loss may pop "labels" (label smoothing): give it a shallow copy.
                loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            scaled = loss
            if self.accelerator.scaler is not None:
                # fp16: scale like the descent pass so small gradients do not underflow; the scale cancels in ε.
                scaled = self.accelerator.scaler.scale(loss)
            grads = list(torch.autograd.grad(scaled, params, allow_unused=True, materialize_grads=True))
        self._count_passes(forwards=share, backwards=share)
        if self.args.sam_sync_perturbation and self.accelerator.num_processes > 1:
            _all_reduce_mean_(grads)
        return loss.detach(), grads

    def _sharded_ascent_gradient(self, model, inputs, num_items_in_batch, params):
        """FSDP2: the ascent gradient as this process's shard of the gradient averaged over processes.

        The forward runs on all-gathered weights (the unsharded copies are not the leaves `autograd.grad` could
        reach), so this is a real backward: FSDP2 reduce-scatters into each parameter's sharded `.grad`. The
        gradients accumulated by earlier micro-batches are set aside for it and put back untouched.
        """
        trainable = [p for p in model.parameters() if p.requires_grad]
        accumulated = [p.grad for p in trainable]
        for p in trainable:
            p.grad = None
        try:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
            scaled = loss if self.accelerator.scaler is None else self.accelerator.scaler.scale(loss)
            scaled.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        finally:
            for p, grad in zip(trainable, accumulated, strict=True):
                p.grad = grad
        self._count_passes(forwards=1, backwards=1)
        return loss.detach(), grads

    @contextlib.contextmanager
    def _restore_before_engine_step(self, model):
        """DeepSpeed steps inside `accelerator.backward` (`engine.step()` at the accumulation boundary), i.e.
        inside the descent's `training_step`: w must be restored before that step, not after it."""
        if not self._deepspeed:
            yield
            return
        engine_step = model.step

        def step_from_w(*args, **kwargs):
            self._sam_backup.restore_()  # the SAM gradient is complete: back to w, then the engine's step
            return engine_step(*args, **kwargs)

        model.step = step_from_w
        try:
            yield
        finally:
            del model.step  # the engine's own method again

    @staticmethod
    def _groups(params, grads, slices, rhos) -> list[PerturbationGroup]:
        return [
            PerturbationGroup(params[s], grads[s], rho, group["adaptive"], group["eta"], group["sam_norm"])
            for (s, group), rho in zip(slices, rhos, strict=True)
        ]

    def _split_into_groups(self, inputs: dict) -> list[tuple[dict, float]]:
        """`sam_group_size` = m: the micro-batch cut into chunks of m examples, each with its share of the batch.

        Tensors and lists with one entry per example are cut (detection `labels` come as a list of dicts); other
        values are passed to every chunk as they are."""
        m = self.args.sam_group_size
        if m is None:
            return [(inputs, 1.0)]
        batch_size = _batch_size(inputs, needed_by=f"sam_group_size={m}")
        if m >= batch_size:
            return [(inputs, 1.0)]

        return [
            (_examples(inputs, start, start + m, batch_size), min(m, batch_size - start) / batch_size)
            for start in range(0, batch_size, m)
        ]

    # ------------------------------------------------------------------ GSAM and LookSAM, per optimizer step
    def _accumulate_clean_gradient(self, grads: list[torch.Tensor], num_items_in_batch) -> None:
        """Sum the clean gradients of the window in the units of `.grad` (same loss scaling as the descent)."""
        factor = (
            1.0
            if self._loss_is_normalised_by_num_items(num_items_in_batch)
            else 1.0 / self.current_gradient_accumulation_steps
        )
        run = self._current_run()
        if run.clean_grad_sum is None:
            run.clean_grad_sum = [torch.zeros_like(g) for g in grads]
        torch._foreach_add_(run.clean_grad_sum, grads, alpha=factor)

    def _finish_window_(self, params: list[torch.Tensor]) -> None:
        """At the last micro-batch of a SAM step `.grad` holds the (synced) SAM gradient g_s of the whole step.

        Parameters the forward did not use have no `.grad` and get none (as in the stock Trainer): an optimizer
        must not decay them or keep state for them."""
        clean = self._current_run().clean_grad_sum
        if self.accelerator.num_processes > 1:
            _all_reduce_mean_(clean)  # DDP averaged g_s over processes: average g the same way
        used = [i for i, p in enumerate(params) if p.grad is not None]
        sam_grads, clean_used = [params[i].grad for i in used], [clean[i] for i in used]
        if used and self.args.sam_mode == "gsam":
            gsam_gradient_(sam_grads, clean_used, self.args.sam_gsam_alpha)
        elif used:
            g_v = looksam_orthogonal_component(sam_grads, clean_used)
            # A non-finite SAM step (skipped by the guard or the GradScaler) must not become the direction every
            # reuse step adds: keep the last finite g_v (or none, and the next step is a full SAM step).
            if bool(torch.isfinite(global_norm(g_v))):
                stored: list[torch.Tensor | None] = [None] * len(params)
                for i, t in zip(used, g_v, strict=True):
                    stored[i] = t
                self._sam_optimizer().sam_state["looksam_gv"] = stored
        torch._foreach_zero_(clean)

    # ------------------------------------------------------------------ loss bookkeeping
    def _loss_is_normalised_by_num_items(self, num_items_in_batch) -> bool:
        """Mirror of `Trainer.training_step`: is the loss already normalised over the whole accumulated batch?"""
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:
            scaled_for_ga = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return scaled_for_ga

    def _loss_as_reported(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Scale the clean loss exactly as `Trainer.training_step` scales the loss it returns."""
        if not self._loss_is_normalised_by_num_items(num_items_in_batch):
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def _mean_loss_factor(self, inputs: dict, num_items_in_batch):
        """What turns ‖∇ of the ascent loss‖ into ‖∇ of the micro-batch's mean loss‖ (for `sam/grad_norm`).

        The ascent loss is `compute_loss`'s: a per-micro-batch mean, or (models and `compute_loss_func` that take
        `num_items_in_batch`) a sum over this micro-batch divided by the items of the whole accumulated batch,
        times the process count with `average_tokens_across_devices`; under fp16 the gradient also carries the
        GradScaler's scale.
        """
        factor = 1.0
        if self.accelerator.scaler is not None:
            factor = 1.0 / self.accelerator.scaler.get_scale()
        if num_items_in_batch is None or not self._loss_is_normalised_by_num_items(num_items_in_batch):
            return factor
        items = _items_in(inputs, self._shifts())
        if items is None:
            return factor
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            items = items * (self.accelerator.num_processes // self.get_tp_size())
        return factor * num_items_in_batch / items.clamp(min=1).to(torch.float64)

    def _shifts(self) -> bool:
        """Whether the Trainer counts items as shifted causal-LM labels (`labels[..., 1:]`)."""
        return getattr(self, "_loss_shifts_labels", False)

    # ------------------------------------------------------------------ telemetry
    def _count_passes(self, forwards: int, backwards: int) -> None:
        self._current_run().telemetry.add(
            self.args.device, forward_passes=forwards, backward_passes=backwards
        )

    def _record_ascent(self, grad_norm, ascent_is_finite, rho) -> None:
        telemetry = self._current_run().telemetry
        if ascent_is_finite:
            telemetry.add(grad_norm.device, grad_norm=grad_norm, finite_ascents=1)
        else:
            telemetry.add(grad_norm.device, skipped_ascents=1)
        telemetry.add(grad_norm.device, rho=rho, sam_micro_batches=1, forward_passes=1, backward_passes=1)

    def _count_skipped_step(self, run: _Run) -> None:
        """Count the last optimizer step if it was not applied (GradScaler overflow, our guard, DeepSpeed).

        Accelerate's flag describes the most recent optimizer step, so it is read once per step: at the next
        micro-batch, or in the log that follows the step, whichever comes first."""
        if self.state.global_step > run.outcome_read_at_step:
            run.outcome_read_at_step = self.state.global_step
            if self.accelerator.optimizer_step_was_skipped:
                run.telemetry.add(self.args.device, skipped_steps=1)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the `sam/*` metrics to each training log, averaged over the logging window like `loss`.

        Only the Trainer's own training log (`control.should_log`, on every process at once) reduces the
        telemetry over processes; a `trainer.log({...})` of the user's on one process starts no collective."""
        run = self._sam_run
        if "loss" in logs and self.control.should_log and run is not None and run.state is self.state:
            self._count_skipped_step(run)
            if not run.telemetry.empty:
                logs.update(
                    run.telemetry.metrics(
                        self.accelerator,
                        rho_is_scheduled=self.args.sam_rho_schedule != "constant",
                        # With an ascent subset the clean loss is over other examples than the perturbed one.
                        same_examples=self.args.sam_ascent_fraction == 1.0,
                    )
                )
        super().log(logs, *args, **kwargs)


class SAMTrainer(SAMMixin, Trainer):
    """A drop-in `transformers.Trainer` that takes its optimizer steps with the SAM gradient (see `SAMMixin`)."""


# ---------------------------------------------------------------------- helpers
def _check_param_filter(model: torch.nn.Module, regex: str) -> None:
    pattern = re.compile(regex)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not any(pattern.search(n) for n in names):
        raise ValueError(
            f"sam_param_filter={regex!r} matches no trainable parameter. Some parameter names: {', '.join(names[:8])}."
        )


def _loss_ignores_num_items_in_batch(model: torch.nn.Module) -> bool:
    """True for transformers models whose `forward(**kwargs)` computes a loss without passing kwargs on.

    Read from the source of `forward`: it calls `self.loss_function(...)` and none of those calls forwards
    `**kwargs` or `num_items_in_batch` (EfficientNet, ResNet, ConvNeXt, MobileNet, RegNet...). Anything we cannot
    read is left to the Trainer's own judgement.
    """
    while hasattr(model, "module"):  # DDP / compile wrappers
        model = model.module
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
        model = model.get_base_model()
    if hasattr(model, "accepts_loss_kwargs"):
        return False
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False
    calls = re.findall(r"self\.loss_function\((.*?)\)\n", source, flags=re.S)
    return bool(calls) and not any("**kwargs" in c or "num_items_in_batch" in c for c in calls)


def _batch_size(inputs: dict, needed_by: str) -> int:
    """The micro-batch's example count, read from its tensors; a setting that cuts the batch cannot go without."""
    sizes = [v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.ndim]
    if not sizes:
        # Cutting nothing would silently take plain SAM steps under a setting that promises otherwise.
        raise ValueError(
            f"{needed_by} cuts each micro-batch by examples, but this batch holds no tensor with a batch dimension "
            f"(keys: {', '.join(inputs)}). Collate the inputs into tensors, or drop {needed_by.split('=')[0]}."
        )
    return max(sizes)


def _examples(inputs: dict, start: int, stop: int, batch_size: int) -> dict:
    """Examples start..stop of a batch: tensors and lists with one entry per example are cut (detection `labels`
    come as a list of dicts); other values are passed on as they are."""

    def per_example(v) -> bool:
        if isinstance(v, torch.Tensor):
            return v.ndim > 0 and v.shape[0] == batch_size
        return isinstance(v, (list, tuple)) and len(v) == batch_size

    return {k: v[start:stop] if per_example(v) else v for k, v in inputs.items()}


def _items_in(inputs: dict, labels_are_shifted: bool) -> torch.Tensor | None:
    """The items of one micro-batch, counted as `Trainer._get_num_items_in_batch` counts a window's."""
    if "shift_labels" in inputs:
        labels = inputs["shift_labels"]
    elif "labels" in inputs:
        labels = inputs["labels"][..., 1:] if labels_are_shifted else inputs["labels"]
    else:
        return None
    return labels.ne(-100).sum() if isinstance(labels, torch.Tensor) else None


def _on(tensors: list[torch.Tensor | None], like: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Stored state (e.g. loaded from a checkpoint on CPU) on the parameters' devices."""
    return [
        t if t is None or t.device == p.device else t.to(p.device) for t, p in zip(tensors, like, strict=True)
    ]


def _tracking_batchnorms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


class _ChunkStatistics:
    """m-sharpness chunks and BatchNorm: the running statistics move once per micro-batch, by the mean of the
    chunks' updates (weighted by their shares), as the released code averages the per-device statistics of its
    m-sized device batches. Each chunk's clean pass updates from the same starting statistics; frozen (eval-mode)
    BatchNorm layers are left alone."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.modules = [m for m in modules if m.training and m.track_running_stats]
        self.start = [(m.running_mean.clone(), m.running_var.clone()) for m in self.modules]
        self.sums = [(torch.zeros_like(mean), torch.zeros_like(var)) for mean, var in self.start]

    @torch.no_grad()
    def add_chunk(self, share: float) -> None:
        for m, (mean, var), (sum_mean, sum_var) in zip(self.modules, self.start, self.sums, strict=True):
            sum_mean.add_(m.running_mean, alpha=share)
            sum_var.add_(m.running_var, alpha=share)
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.sub_(1)  # the chunk's pass counted one batch: the micro-batch counts once

    @torch.no_grad()
    def finish(self) -> None:
        for m, (sum_mean, sum_var) in zip(self.modules, self.sums, strict=True):
            m.running_mean.copy_(sum_mean)
            m.running_var.copy_(sum_var)
            m.num_batches_tracked.add_(1)


@contextlib.contextmanager
def _running_stats_frozen(modules: list[torch.nn.Module]):
    """BatchNorm in train mode (batch statistics) without touching running stats or `num_batches_tracked`.

    The perturbed pass must not update the statistics a second time (EfficientNet is full of BN). With
    `track_running_stats=False` a training-mode BN normalises with batch statistics and leaves its buffers alone.
    """
    modules = [m for m in modules if m.track_running_stats]  # a frozen-BN recipe may have turned some off
    for m in modules:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in modules:
            m.track_running_stats = True


def _device_module(device: torch.device):
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    return module if module is not None and hasattr(module, "get_rng_state") else None


def _rng_snapshot(device: torch.device):
    module = _device_module(torch.device(device))
    return torch.get_rng_state(), (module.get_rng_state() if module is not None else None)


def _rng_restore(state, device: torch.device) -> None:
    cpu_state, device_state = state
    torch.set_rng_state(cpu_state)
    if device_state is not None:
        _device_module(torch.device(device)).set_rng_state(device_state)


def _all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over processes in one collective (sam_sync_perturbation, GSAM/LookSAM clean gradient)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    chunks = flat.split([t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(chunks, tensors, strict=True)])
