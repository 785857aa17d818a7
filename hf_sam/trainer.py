"""`SAMTrainer`: `transformers.Trainer` with the two-pass SAM step. Overrides a few public hooks, never the loop."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import re

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from hf_sam.configs import SAMTrainingArguments
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

logger = logging.get_logger(__name__)

# Columns of the per-process telemetry accumulator (summed over micro-batches between two logs).
(
    _GRAD_NORM,
    _FINITE_ASCENTS,
    _PERTURBED_LOSS,
    _SHARPNESS,
    _SKIPPED,
    _SAM_STEPS,
    _FORWARDS,
    _BACKWARDS,
    _RHO,
    _SAM_MICRO_BATCHES,
    _SKIPPED_STEPS,
    _N_COLUMNS,
) = range(12)

# What an optimizer step does, decided once per step from `state.global_step`.
PLAIN, SAM_STEP, LOOKSAM_REUSE = "plain", "sam", "looksam_reuse"


class SAMTrainer(Trainer):
    """A drop-in `Trainer` that takes its optimizer steps with the Sharpness-Aware Minimization gradient.

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
    `loss` is the loss at w (comparable with a plain run); the SAM metrics are logged as `sam/*`.
    """

    def __init__(self, model=None, args: SAMTrainingArguments | None = None, *pargs, **kwargs):
        if args is None:
            args = SAMTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, SAMTrainingArguments):
            raise TypeError(
                f"SAMTrainer needs SAMTrainingArguments, got {type(args).__name__}. Replace "
                "`TrainingArguments(...)` by `hf_sam.SAMTrainingArguments(...)`: it takes the same fields plus sam_*."
            )
        if args.sam_rho > 0 and args.sam_param_filter is not None and model is not None:
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
        if self.model_accepts_loss_kwargs and _loss_ignores_num_items_in_batch(self.model):
            # e.g. EfficientNet, ResNet, ConvNeXt: `forward(**kwargs)` makes the Trainer believe the model
            # normalises by `num_items_in_batch`, but their loss is a per-micro-batch mean, so the stock Trainer's
            # gradient comes out multiplied by the accumulation steps (and processes). Declare the truth.
            logger.info(
                f"{type(self.model).__name__}'s loss ignores num_items_in_batch: averaging micro-batch losses instead."
            )
            self.model_accepts_loss_kwargs = False
        # FSDP2: parameters and gradients are shards (DTensors); ε comes from the reduced gradient (global).
        self._sharded = bool(getattr(self.accelerator, "is_fsdp2", False))
        # DeepSpeed ZeRO-1/2: full weights on every process, the engine steps inside `accelerator.backward`.
        self._deepspeed = bool(self.is_deepspeed_enabled)
        self._sam_backup = WeightBackup()
        self._sam_telemetry: torch.Tensor | None = None
        self._sam_last_logged_step = 0
        self._sam_plan: tuple | None = None
        self._sam_loss_weight: float | None = None  # a chunk's share of its micro-batch (sam_group_size)
        # GSAM / LookSAM: the clean gradient summed over the micro-batches of the step in progress.
        self._sam_clean_grad_sum: list[torch.Tensor] | None = None
        self._sam_skipped_seen = 0
        if self.args.sam_rho > 0:
            self.add_callback(_SkippedStepCounter(self))

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
        return optimizer

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

        Cached: rebuilt only when the optimizer's groups change (e.g. a user's `add_param_group`).
        """
        if self._deepspeed:
            return self._deepspeed_plan(model)
        sam = self._sam_optimizer()
        key = tuple(len(group["params"]) for group in sam.param_groups)
        if self._sam_plan is None or self._sam_plan[0] != key:
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
            self._sam_plan = (key, params, slices, _tracking_batchnorms(model))
        return self._sam_plan[1:]

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
        if self._sam_plan is None:
            perturbed = self._perturbed_parameters(model)
            params = [p for p in self.accelerator.unwrap_model(model).parameters() if id(p) in perturbed]
            self._sam_plan = (None, params, None, _tracking_batchnorms(model))
        args, lr_group = self.args, self.optimizer.param_groups[0]
        group = {
            "rho": args.sam_rho,
            "adaptive": args.sam_adaptive,
            "eta": args.sam_eta,
            "sam_norm": args.sam_norm,
            "lr": lr_group["lr"],
            "initial_lr": lr_group.get("initial_lr", args.learning_rate),
        }
        params = self._sam_plan[1]
        return params, [(slice(0, len(params)), group)], self._sam_plan[3]

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
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self._sam_loss_weight is None:
            return result
        # m-sharpness chunk: its share of the micro-batch, so the chunks' gradients average (not sum).
        if return_outputs:
            return result[0] * self._sam_loss_weight, result[1]
        return result * self._sam_loss_weight

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.sam_rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        kind = self._step_kind()
        last_micro_batch = self.accelerator.sync_gradients
        if kind != SAM_STEP:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._note_loss(loss)
            if kind == LOOKSAM_REUSE and last_micro_batch:
                # One forward+backward, then the stored SAM direction (the gradient is complete and synced now).
                params = self._perturbation_plan(model)[0]
                g_v = self._sam_optimizer().sam_state["looksam_gv"]
                looksam_reuse_gradient_(_grads_of(params), _on(g_v, params), self.args.sam_looksam_alpha)
            self._count_passes(forwards=1, backwards=1)
            return loss

        model.train()
        inputs = self._prepare_inputs(inputs)
        params, slices, batchnorms = self._perturbation_plan(model)
        if self._sharded:
            # The Trainer defers FSDP2's reduce-scatter to the last micro-batch, keeping unsharded local gradients
            # in between; the ascent's own synced backward would fold those into its gradient. So a SAM step
            # reduce-scatters every pass: the accumulated gradient then lives in the sharded `.grad` alone
            # (less memory than the deferred path, one reduce-scatter per pass instead of per step).
            model.set_requires_gradient_sync(True)
        chunks = self._split_into_groups(inputs, num_items_in_batch)
        clean_total, perturbed_total = 0.0, 0.0
        for index, (chunk, weight) in enumerate(chunks):
            self._sam_loss_weight = weight
            try:
                clean, perturbed = self._sam_micro_step(
                    model,
                    chunk,
                    num_items_in_batch,
                    params,
                    slices,
                    batchnorms,
                    is_last=index == len(chunks) - 1,
                )
            finally:
                self._sam_loss_weight = None
            clean_total, perturbed_total = clean_total + clean, perturbed_total + perturbed

        if self.args.sam_mode in ("gsam", "looksam") and last_micro_batch:
            self._finish_window_(params)
        clean_loss = self._loss_as_reported(clean_total, num_items_in_batch)
        self._note_loss(perturbed_total)  # the loss whose gradient the step applies
        self._record_sam_micro_batch(clean_loss, perturbed_total, last_micro_batch)
        return clean_loss

    def _sam_micro_step(self, model, inputs, num_items_in_batch, params, slices, batchnorms, is_last):
        """Ascent(s) at w, descent at w + ε, exact restore, for one micro-batch (or one chunk of m examples).

        Returns the clean loss (as `compute_loss` gives it) and the perturbed loss (as `training_step` reports it).
        """
        args = self.args
        rng_state = _rng_snapshot(args.device)

        # 1. Ascent pass at w. Forward *and* backward under no_sync: a forward outside it would arm DDP's reducer.
        clean_loss, grads = self._ascent_gradient(model, inputs, num_items_in_batch, params)
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
                        _, step = self._ascent_gradient(model, inputs, num_items_in_batch, params)
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
                perturbed_loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            # 4. Back to w (exact copy) before the Trainer clips, steps, saves or evaluates.
            self._sam_backup.restore_()

        self._record_ascent(grad_norm, ascent_is_finite, rhos[0] if rhos else 0.0)
        return clean_loss, perturbed_loss

    def _ascent_gradient(self, model, inputs, num_items_in_batch, params):
        """Forward + backward at the current weights without touching `.grad` or DDP's reducer."""
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
        self._count_passes(forwards=1, backwards=1)
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

    def _split_into_groups(self, inputs: dict, num_items_in_batch) -> list[tuple[dict, float | None]]:
        """`sam_group_size` = m: the micro-batch cut into chunks of m examples, each with its weight."""
        m = self.args.sam_group_size
        batch_size = _batch_size(inputs)
        if m is None or batch_size is None or m >= batch_size:
            return [(inputs, None)]
        # A loss normalised by num_items_in_batch already sums over chunks; a per-batch mean needs the weights.
        weighted = not self._loss_is_normalised_by_num_items(num_items_in_batch)
        chunks = []
        for start in range(0, batch_size, m):
            chunk = {
                k: v[start : start + m]
                if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch_size
                else v
                for k, v in inputs.items()
            }
            size = min(m, batch_size - start)
            chunks.append((chunk, size / batch_size if weighted else None))
        return chunks

    # ------------------------------------------------------------------ GSAM and LookSAM, per optimizer step
    def _accumulate_clean_gradient(self, grads: list[torch.Tensor], num_items_in_batch) -> None:
        """Sum the clean gradients of the window in the units of `.grad` (same loss scaling as the descent)."""
        factor = (
            1.0
            if self._loss_is_normalised_by_num_items(num_items_in_batch)
            else 1.0 / self.current_gradient_accumulation_steps
        )
        if self._sam_clean_grad_sum is None:
            self._sam_clean_grad_sum = [torch.zeros_like(g) for g in grads]
        torch._foreach_add_(self._sam_clean_grad_sum, grads, alpha=factor)

    def _finish_window_(self, params: list[torch.Tensor]) -> None:
        """At the last micro-batch of a SAM step `.grad` holds the (synced) SAM gradient g_s of the whole step."""
        clean = self._sam_clean_grad_sum
        if self.accelerator.num_processes > 1:
            _all_reduce_mean_(clean)  # DDP averaged g_s over processes: average g the same way
        sam_grads = _grads_of(params)
        if self.args.sam_mode == "gsam":
            gsam_gradient_(sam_grads, clean, self.args.sam_gsam_alpha)
        else:
            self._sam_optimizer().sam_state["looksam_gv"] = looksam_orthogonal_component(sam_grads, clean)
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

    # ------------------------------------------------------------------ telemetry
    def _telemetry(self, device) -> torch.Tensor:
        if self._sam_telemetry is None:
            self._sam_telemetry = torch.zeros(_N_COLUMNS, device=device, dtype=torch.float64)
        return self._sam_telemetry

    def _count_passes(self, forwards: int, backwards: int) -> None:
        t = self._telemetry(self.args.device)
        t[_FORWARDS] += forwards
        t[_BACKWARDS] += backwards

    def _record_ascent(self, grad_norm, ascent_is_finite, rho) -> None:
        t = self._telemetry(grad_norm.device)
        if ascent_is_finite:
            t[_GRAD_NORM] += grad_norm.to(t.device, t.dtype)
            t[_FINITE_ASCENTS] += 1
        else:
            t[_SKIPPED] += 1
        t[_RHO] += rho
        t[_SAM_MICRO_BATCHES] += 1
        self._count_passes(forwards=1, backwards=1)  # the descent pass

    def _record_sam_micro_batch(self, clean_loss, perturbed_loss, last_micro_batch) -> None:
        t = self._telemetry(clean_loss.device)
        t[_PERTURBED_LOSS] += perturbed_loss.to(t.device, t.dtype)
        t[_SHARPNESS] += (perturbed_loss - clean_loss).to(t.device, t.dtype)
        t[_SAM_STEPS] += float(last_micro_batch)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the `sam/*` metrics to each training log, averaged over the logging window like `loss`."""
        if "loss" in logs and self._sam_telemetry is not None:
            steps = max(self.state.global_step - self._sam_last_logged_step, 1)
            processes = self.accelerator.num_processes
            # One collective on every rank (log() runs on all of them): sums over processes.
            totals = self.accelerator.reduce(self._sam_telemetry.clone(), reduction="sum").tolist()
            if totals[_FINITE_ASCENTS] > 0:
                logs["sam/grad_norm"] = totals[_GRAD_NORM] / totals[_FINITE_ASCENTS]
            if totals[_SAM_STEPS] > 0:
                logs["sam/perturbed_loss"] = totals[_PERTURBED_LOSS] / totals[_SAM_STEPS]
                logs["sam/sharpness"] = totals[_SHARPNESS] / totals[_SAM_STEPS]
            if self.args.sam_rho_schedule != "constant" and totals[_SAM_MICRO_BATCHES] > 0:
                logs["sam/rho"] = totals[_RHO] / totals[_SAM_MICRO_BATCHES]
            logs["sam/skipped_ascents"] = int(totals[_SKIPPED])
            logs["sam/skipped_steps"] = int(totals[_SKIPPED_STEPS] / processes)
            logs["sam/fraction_sam_steps"] = totals[_SAM_STEPS] / (steps * processes)
            logs["sam/forward_passes"] = int(totals[_FORWARDS] / processes)
            logs["sam/backward_passes"] = int(totals[_BACKWARDS] / processes)
            self._sam_telemetry.zero_()
            self._sam_last_logged_step = self.state.global_step
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------- helpers
def _check_param_filter(model: torch.nn.Module, regex: str) -> None:
    pattern = re.compile(regex)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not any(pattern.search(n) for n in names):
        raise ValueError(
            f"sam_param_filter={regex!r} matches no trainable parameter. Some parameter names: {', '.join(names[:8])}."
        )


class _SkippedStepCounter(TrainerCallback):
    """Counts optimizer steps that were not applied: fp16 overflow (GradScaler) or the fp32/bf16 guard of `SAM`."""

    def __init__(self, trainer: SAMTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Report a step skipped by the fp32/bf16 guard the way a GradScaler reports an fp16 overflow (through
        Accelerate's `step_was_skipped`), so that the Trainer does not advance the learning-rate schedule either."""
        trainer = self.trainer
        if trainer._deepspeed or trainer.accelerator.scaler is not None:
            return  # the engine / the GradScaler report their own skips
        guard_skips = trainer._sam_optimizer().skipped_steps
        for optimizer in trainer.accelerator._optimizers:
            optimizer._is_overflow = guard_skips > trainer._sam_skipped_seen
        trainer._sam_skipped_seen = guard_skips

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.accelerator.optimizer_step_was_skipped:  # GradScaler, DeepSpeed or our guard
            self.trainer._telemetry(args.device)[_SKIPPED_STEPS] += 1


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


def _batch_size(inputs: dict) -> int | None:
    sizes = [v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.ndim]
    return max(sizes) if sizes else None


def _grads_of(params: list[torch.Tensor]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:  # a parameter unused in this step: its gradient is zero
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _on(tensors: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Stored state (e.g. loaded from a checkpoint on CPU) on the parameters' devices."""
    return [t if t.device == p.device else t.to(p.device) for t, p in zip(tensors, like, strict=True)]


def _tracking_batchnorms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


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
