"""`SAMTrainer`: `transformers.Trainer` with the two-pass SAM step. Overrides a few public hooks, never the loop."""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager

import torch
from accelerate.utils import DistributedType
from transformers import Trainer
from transformers.utils import logging

from hf_sam.configs import SAMTrainingArguments
from hf_sam.sam import SAM, PerturbationGroup, WeightBackup, compute_perturbation_

logger = logging.get_logger(__name__)

# Column order of the per-process telemetry accumulator (summed over micro-batches between two logs).
_GRAD_NORM, _FINITE_ASCENTS, _PERTURBED_LOSS, _SHARPNESS, _SKIPPED = range(5)


class SAMTrainer(Trainer):
    """A drop-in `Trainer` that takes every optimizer step with the Sharpness-Aware Minimization gradient.

    Per micro-batch (`training_step`):

    1. ascent pass at w under `accelerator.no_sync`: forward + `torch.autograd.grad`, so gradients accumulated
       from earlier micro-batches stay untouched and ε is this process's own (m = per-device micro-batch);
    2. ε = ρ·g/‖g‖ over the trainable parameters (see `hf_sam.sam.compute_perturbation_`), w ← w + ε in place;
    3. descent pass at w + ε through the stock `Trainer.training_step` (same dropout masks as the ascent pass,
       BatchNorm running statistics left as the clean pass set them), so loss scaling, gradient accumulation,
       `num_items_in_batch`, DDP synchronisation and mixed precision stay the Trainer's;
    4. w restored by copy before returning; the Trainer then clips, steps and schedules as usual.

    The optimizer the Trainer builds (`optim`, `optim_args`, weight-decay groups) is wrapped in `hf_sam.SAM`,
    whose `state_dict` is the base optimizer's, so checkpoints keep momentum and Adam moments. The logged `loss`
    is the loss at w (comparable with a plain run); the SAM metrics are logged as `sam/*`.
    """

    def __init__(self, model=None, args: SAMTrainingArguments | None = None, *pargs, **kwargs):
        if args is None:
            args = SAMTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, SAMTrainingArguments):
            raise TypeError(
                f"SAMTrainer needs SAMTrainingArguments, got {type(args).__name__}. Replace "
                "`TrainingArguments(...)` by `hf_sam.SAMTrainingArguments(...)`: it takes the same fields plus sam_*."
            )
        super().__init__(model, args, *pargs, **kwargs)
        if self.args.sam_rho > 0:
            self._check_sam_compatible()
        if self.model_accepts_loss_kwargs and _loss_ignores_num_items_in_batch(self.model):
            # e.g. EfficientNet, ResNet, ConvNeXt: `forward(**kwargs)` makes the Trainer believe the model
            # normalises by `num_items_in_batch`, but their loss is a per-micro-batch mean, so the stock Trainer's
            # gradient comes out multiplied by the accumulation steps (and processes). Declare the truth.
            logger.info(
                f"{type(self.model).__name__}'s loss ignores num_items_in_batch: averaging micro-batch losses instead."
            )
            self.model_accepts_loss_kwargs = False
        self._sam_backup = WeightBackup()
        self._sam_telemetry: torch.Tensor | None = None
        self._sam_last_logged_step = 0
        self._sam_plan: tuple | None = None

    # ------------------------------------------------------------------ set-up checks
    def _check_sam_compatible(self) -> None:
        distributed_type = self.accelerator.distributed_type
        if distributed_type == DistributedType.DEEPSPEED or self.is_deepspeed_enabled:
            raise ValueError(
                "SAMTrainer does not support DeepSpeed yet (ZeRO shards the gradients, so the ascent norm would be "
                "a shard's norm). Launch with DDP (`accelerate launch --multi_gpu`) or set sam_rho=0."
            )
        if distributed_type == DistributedType.FSDP or self.is_fsdp_enabled:
            raise ValueError(
                "SAMTrainer does not support FSDP yet (the ascent gradient norm must be taken over all shards). "
                "Launch with DDP (`accelerate launch --multi_gpu`) or set sam_rho=0."
            )
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
        if self.args.sam_rho > 0 and not isinstance(optimizer, SAM):
            self.optimizer = optimizer = SAM(
                optimizer,
                rho=self.args.sam_rho,
                adaptive=self.args.sam_adaptive,
                eta=self.args.sam_eta,
                norm=self.args.sam_norm,
            )
        return optimizer

    def _sam_optimizer(self) -> SAM | None:
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, SAM):
            optimizer = getattr(optimizer, "optimizer", None)  # AcceleratedOptimizer and friends
        return optimizer

    def _perturbation_plan(self, model: torch.nn.Module) -> tuple[list, list[tuple[slice, dict]], list]:
        """The trainable parameters in optimizer order, which slice of them each param group owns, and the
        BatchNorm layers whose running statistics the perturbed pass must leave alone.

        Cached: rebuilt only when the optimizer's groups change (e.g. a user's `add_param_group`).
        """
        sam = self._sam_optimizer()
        if sam is None:
            raise RuntimeError(
                "SAMTrainer's optimizer is not wrapped in hf_sam.SAM; was create_optimizer() overridden?"
            )
        key = tuple(len(group["params"]) for group in sam.param_groups)
        if self._sam_plan is None or self._sam_plan[0] != key:
            params, slices = [], []
            for group in sam.param_groups:
                trainable = [p for p in group["params"] if p.requires_grad]
                slices.append((slice(len(params), len(params) + len(trainable)), group))
                params.extend(trainable)
            if not params:
                raise ValueError(
                    "SAMTrainer found no trainable parameter (requires_grad=True) in the optimizer."
                )
            self._sam_plan = (key, params, slices, _tracking_batchnorms(model))
        return self._sam_plan[1:]

    # ------------------------------------------------------------------ the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.sam_rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)

        model.train()
        inputs = self._prepare_inputs(inputs)
        params, slices, batchnorms = self._perturbation_plan(model)
        rng_state = _rng_snapshot(self.args.device)

        # 1. Ascent pass at w. Forward *and* backward under no_sync: a forward outside it would arm DDP's reducer.
        with self.accelerator.no_sync(model):
            with self.compute_loss_context_manager():
                # compute_loss may pop "labels" (label smoothing): give it a shallow copy.
                clean_loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
            ascent_loss = clean_loss
            if self.accelerator.scaler is not None:
                # fp16: scale like the descent pass so small gradients do not underflow; the scale cancels in ε.
                ascent_loss = self.accelerator.scaler.scale(clean_loss)
            grads = list(torch.autograd.grad(ascent_loss, params, allow_unused=True, materialize_grads=True))
        clean_loss = clean_loss.detach()
        del ascent_loss
        if self.args.sam_sync_perturbation and self.accelerator.num_processes > 1:
            _all_reduce_mean_(grads)

        # 2. ε from the ascent gradient, written into the gradient buffers in place.
        groups = [
            PerturbationGroup(
                params[s], grads[s], group["rho"], group["adaptive"], group["eta"], group["sam_norm"]
            )
            for s, group in slices
        ]
        grad_norm = compute_perturbation_(groups)
        ascent_is_finite = bool(torch.isfinite(grad_norm))
        try:
            if ascent_is_finite:
                self._sam_backup.perturb_(params, grads)
            # ε now lives in the weights only: free it before the descent pass, so SAM's memory overhead is
            # the backup copy of w alone.
            del grads, groups

            # 3. Descent pass at w + ε: the stock step, with the ascent pass's random numbers (dropout masks).
            _rng_restore(rng_state, self.args.device)
            with _running_stats_frozen(batchnorms):
                perturbed_loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            # 4. Back to w (exact copy) before the Trainer clips, steps, saves or evaluates.
            self._sam_backup.restore_()

        clean_loss = self._loss_as_reported(clean_loss, num_items_in_batch)
        self._record_sam_metrics(grad_norm, ascent_is_finite, clean_loss, perturbed_loss)
        return clean_loss

    def _loss_as_reported(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Scale the clean loss exactly as `Trainer.training_step` scales the loss it returns."""
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:
            scaled_for_ga = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if not scaled_for_ga:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    # ------------------------------------------------------------------ telemetry
    def _record_sam_metrics(self, grad_norm, ascent_is_finite, clean_loss, perturbed_loss) -> None:
        if self._sam_telemetry is None:
            self._sam_telemetry = torch.zeros(5, device=clean_loss.device, dtype=torch.float64)
        t = self._sam_telemetry
        if ascent_is_finite:
            t[_GRAD_NORM] += grad_norm.to(t.device, t.dtype)
            t[_FINITE_ASCENTS] += 1
        else:
            t[_SKIPPED] += 1
        t[_PERTURBED_LOSS] += perturbed_loss.to(t.device, t.dtype)
        t[_SHARPNESS] += (perturbed_loss - clean_loss).to(t.device, t.dtype)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the `sam/*` metrics to each training log, averaged over the logging window like `loss`."""
        if "loss" in logs and self._sam_telemetry is not None:
            steps = max(self.state.global_step - self._sam_last_logged_step, 1)
            # One collective on every rank (log() runs on all of them): sums over processes.
            totals = self.accelerator.reduce(self._sam_telemetry.clone(), reduction="sum")
            processes = self.accelerator.num_processes
            if totals[_FINITE_ASCENTS] > 0:
                logs["sam/grad_norm"] = (totals[_GRAD_NORM] / totals[_FINITE_ASCENTS]).item()
            logs["sam/perturbed_loss"] = (totals[_PERTURBED_LOSS] / (steps * processes)).item()
            logs["sam/sharpness"] = (totals[_SHARPNESS] / (steps * processes)).item()
            logs["sam/skipped_ascents"] = int(totals[_SKIPPED].item())
            self._sam_telemetry.zero_()
            self._sam_last_logged_step = self.state.global_step
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------- helpers
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


def _tracking_batchnorms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


@contextmanager
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
    """Average gradients over processes in one collective (sam_sync_perturbation=True)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    chunks = flat.split([t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(chunks, tensors, strict=True)])
