"""How SAM's two passes run under each distributed engine: one small class per engine.

`SAMMixin` picks one in `__init__` (`select_engine`) and calls it; everything that differs between engines is
here and nowhere else (what each perturbs, how it takes the ascent gradient and syncs the descent, whether it
wraps the optimizer, its ε scope, which SAM settings it refuses: its `check`, which `hf_sam.checks` calls with
the other refusals). `Engine` is what they share:

| engine                   | parameters perturbed         | ascent gradient                          | ε scope      |
|--------------------------|------------------------------|------------------------------------------|--------------|
| `ProcessLocal` (1 / DDP) | the `SAM` wrapper's groups   | `autograd.grad` under `no_sync`          | per process  |
| `FSDP2`                  | the wrapper's groups (shards)| a real backward into the sharded `.grad` | global       |
| `DeepSpeedZeRO` (1 / 2)  | the module's parameters      | `autograd.grad` on the unwrapped module  | per process  |
| `DeepSpeedZeRO3`         | the weights' partitions      | `engine.backward` into the grad partitions | global     |

(`sam_sync_perturbation=True` makes the ε of every engine global: the ascent gradients are averaged first.)
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch

from hf_sam.batchnorm import tracking_batchnorms
from hf_sam.norms import all_reduce_mean_, mark_partitioned
from hf_sam.perturbation import perturbation_settings


@dataclass
class Plan:
    """What one SAM micro-batch perturbs: `params` in optimizer order, which slice of them each param group owns
    (with the group, for its ρ / ASAM / norm settings), and the BatchNorm layers the perturbed passes leave alone.
    `key` tells when the plan must be rebuilt: the optimizer's groups changed (a user's `add_param_group`), or a
    parameter was frozen or unfrozen mid-run (`requires_grad`, which the stock Trainer follows at every step).
    `watched`: the parameters whose `requires_grad` flags make the key, where they are not the optimizer's."""

    key: tuple | None
    params: list[torch.Tensor]
    slices: list[tuple[slice, dict]]
    batchnorms: list[torch.nn.Module]
    watched: list[torch.Tensor] = field(default_factory=list)

    def carry(self, previous: Plan, state: list, fill) -> list:
        """Per-parameter `state` kept in `previous`'s order (GSAM's clean gradient, LookSAM's g_v), in this plan's
        order: a parameter no longer perturbed (frozen mid-run) drops its entry, a new one gets `fill(p)`."""
        by_id = {id(p): entry for p, entry in zip(previous.params, state, strict=True)}
        return [by_id[id(p)] if id(p) in by_id else fill(p) for p in self.params]


def _nothing_to_perturb(mid_run: bool) -> None:
    if mid_run:
        raise ValueError(
            "SAMTrainer has no parameter left to perturb: every parameter it perturbed (trainable and matching "
            "sam_param_filter) was frozen (requires_grad=False) during training. Keep one of them trainable, or widen "
            "sam_param_filter."
        )
    raise ValueError("SAMTrainer found no parameter to perturb (trainable and matching sam_param_filter).")


def _refuse_variants(args, refused: dict[str, str]) -> None:
    """An engine's `refused_variants` (one line each, {value} the setting's value): a variant set off its default."""
    from hf_sam.checks import default_of

    for name, message in refused.items():
        value = getattr(args, name)
        if value != default_of(name):
            raise ValueError(message.format(value=value))


class Engine:
    """What every engine does unless it says otherwise, written for full weights on every process: ε from this
    process's micro-batch gradient (global with `sam_sync_perturbation=True`). `ProcessLocal` is this as it is; the
    sharded engines (FSDP2, ZeRO-3) override what makes their ε global."""

    wraps_optimizer = True  # the optimizer the Trainer builds is wrapped in `hf_sam.SAM`

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    # Read through the trainer: a hyperparameter trial replaces `trainer.args`.
    @property
    def args(self):
        return self.trainer.args

    @property
    def accelerator(self):
        return self.trainer.accelerator

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    # ------------------------------------------------------------------ description (model card, logs)
    @property
    def name(self) -> str:
        return "DDP" if self.num_processes > 1 else "single process"

    @property
    def global_epsilon(self) -> bool:
        """One ε for all processes (the ascent gradient averaged over them) rather than one per process."""
        return bool(self.args.sam_sync_perturbation) and self.num_processes > 1

    @classmethod
    def check(cls, args) -> None:
        """Refuse the SAM settings this engine cannot honour, with one line that names the fix."""

    # ------------------------------------------------------------------ the plan
    def plan(self, model: torch.nn.Module, optimizer, cached: Plan | None) -> Plan:
        # Looked up every micro-batch, so the key is cheap: each optimizer parameter's requires_grad, group by group
        # (one bool per parameter tensor, a few hundred even for an LLM: microseconds next to a forward pass). It
        # changes with the groups (`add_param_group`) and when a callback freezes or unfreezes parameters mid-run:
        # the stock Trainer then trains what still requires grad, and a stale plan would ask autograd for the
        # gradient of a frozen parameter ("does not require grad") or leave an unfrozen one unperturbed.
        key = tuple(tuple(p.requires_grad for p in group["params"]) for group in optimizer.param_groups)
        if cached is not None and cached.key == key:
            return cached
        perturbed = self.perturbed_parameters(model)
        params, slices = [], []
        for group in optimizer.param_groups:
            chosen = [p for p in group["params"] if id(p) in perturbed]
            slices.append((slice(len(params), len(params) + len(chosen)), group))
            params.extend(chosen)
        if not params:
            _nothing_to_perturb(mid_run=cached is not None)
        return Plan(key, params, slices, tracking_batchnorms(model))

    def perturbed_parameters(self, model: torch.nn.Module) -> set[int]:
        """ids of the parameters SAM perturbs: trainable, and matching `sam_param_filter` when it is set."""
        pattern = re.compile(self.args.sam_param_filter) if self.args.sam_param_filter is not None else None
        return {
            id(p)
            for n, p in self.accelerator.unwrap_model(model).named_parameters()
            if p.requires_grad and (pattern is None or pattern.search(n))
        }

    # ------------------------------------------------------------------ the passes
    def begin_sam_micro_batch(self, model, first_in_window: bool) -> None:
        """Called before the first pass of a SAM micro-batch (`first_in_window`: the first micro-batch of its
        accumulation window, so no gradient has been accumulated yet)."""

    def ascent_gradient(self, model, inputs: dict, num_items_in_batch, params) -> tuple[torch.Tensor, list]:
        """(loss at the current weights, its gradient for `params`) without touching `.grad` or DDP's reducer.
        Forward *and* backward under `no_sync`: a forward outside it would arm DDP's reducer."""
        with self._ascent_sync(model):
            loss = self._loss(model, inputs, num_items_in_batch)
            grads = list(
                torch.autograd.grad(self._scaled(loss), params, allow_unused=True, materialize_grads=True)
            )
        if self.args.sam_sync_perturbation and self.num_processes > 1:
            all_reduce_mean_(grads)
        return loss.detach(), grads

    def _ascent_sync(self, model):
        return self.accelerator.no_sync(model)

    def _loss(self, model, inputs: dict, num_items_in_batch) -> torch.Tensor:
        trainer = self.trainer
        with trainer.compute_loss_context_manager():
            # compute_loss may pop "labels" (label smoothing): give it a shallow copy.
            return trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        # fp16: scale like the descent pass so small gradients do not underflow; the scale cancels in ε.
        scaler = self.accelerator.scaler
        return loss if scaler is None else scaler.scale(loss)

    def descent_context(self, model, is_last: bool, backup):
        """Around the stock `training_step` at w + ε: DDP synchronises the gradient at the last pass of the
        micro-batch only (the others are chunks of one micro-batch, or earlier ascent steps)."""
        return contextlib.nullcontext() if is_last else self.accelerator.no_sync(model)

    def guards_steps(self) -> bool:
        """Whether the `SAM` wrapper's non-finite guard sees this engine's steps."""
        return True

    def random_state(self):
        """The CPU and device random states, so the descent pass draws the ascent pass's dropout masks."""
        module = _device_module(self.args.device)
        return torch.get_rng_state(), (module.get_rng_state() if module is not None else None)

    def restore_random_state(self, state) -> None:
        cpu_state, device_state = state
        torch.set_rng_state(cpu_state)
        if device_state is not None:
            _device_module(self.args.device).set_rng_state(device_state)


class ProcessLocal(Engine):
    """One process, or DDP: full weights on every process, ε from this process's micro-batch gradient."""


class FSDP2(Engine):
    """FSDP2 (`fully_shard`): parameters and gradients are shards (DTensors). Every process forwards through the
    same all-gathered w + ε, so ε comes from the gradient reduced over all processes, and ‖g‖ is the full-model
    norm (`hf_sam.norms.global_norm` all-reduces the shards' squares)."""

    name = "FSDP2"
    global_epsilon = True
    refused_variants = {
        "sam_group_size": "sam_group_size={value} (one ε per chunk of examples) is impossible under FSDP, where ε is one "
        "for all processes (sharded weights). Train with DDP for m-sharpness, or drop sam_group_size.",
        "sam_ascent_fraction": "sam_ascent_fraction={value} is not supported under FSDP yet (untested there). Train with "
        "DDP for it, or use sam_interval for a cheaper SAM under FSDP.",
        "sam_mode": "sam_mode={value!r} is not supported under FSDP yet (its stored gradients or momentum are not "
        "written for sharded weights). Use sam_mode='sam' (with sam_interval for a cheaper SAM), or train with DDP.",
    }

    @classmethod
    def check(cls, args, fsdp_version: int = 2) -> None:
        if fsdp_version != 2:
            raise ValueError(
                f"SAMTrainer supports FSDP2 only, got FSDP version {fsdp_version}: FSDP1's flat parameters have no "
                "shard-aware norm. Set fsdp_config={'version': 2} (Accelerate: fsdp_version: 2), or train with DDP."
            )
        if args.sam_sync_perturbation is False:
            raise ValueError(
                "sam_sync_perturbation=False (one ε per process) is impossible under FSDP: each process holds one "
                "shard of the weights and every process forwards through the same all-gathered w + ε, so ε comes from "
                "the gradient reduced over all processes. A per-process ε needs a full copy of the weights on every "
                "process: train with DDP for it, or drop sam_sync_perturbation (FSDP's default is the global ε)."
            )
        _refuse_variants(args, cls.refused_variants)

    def begin_sam_micro_batch(self, model, first_in_window: bool) -> None:
        # The Trainer defers FSDP2's reduce-scatter to the last micro-batch, keeping unsharded local gradients in
        # between; the ascent's own synced backward would fold those into its gradient. So a SAM step
        # reduce-scatters every pass: the accumulated gradient then lives in the sharded `.grad` alone (less
        # memory than the deferred path, one reduce-scatter per pass instead of per step).
        model.set_requires_gradient_sync(True)

    def ascent_gradient(self, model, inputs: dict, num_items_in_batch, params) -> tuple[torch.Tensor, list]:
        """This process's shard of the gradient averaged over processes. The forward runs on all-gathered weights
        (the unsharded copies are not the leaves `autograd.grad` could reach), so this is a real backward: FSDP2
        reduce-scatters into each parameter's sharded `.grad`. The gradients accumulated by earlier micro-batches
        are set aside for it and put back untouched."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        accumulated = [p.grad for p in trainable]
        for p in trainable:
            p.grad = None
        try:
            loss = self._loss(model, inputs, num_items_in_batch)
            self._scaled(loss).backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        finally:
            for p, grad in zip(trainable, accumulated, strict=True):
                p.grad = grad
        return loss.detach(), grads

    def descent_context(self, model, is_last: bool, backup):
        return contextlib.nullcontext()  # every pass reduce-scatters (see begin_sam_micro_batch)


class DeepSpeedZeRO(Engine):
    """DeepSpeed ZeRO-1/2: full weights on every process; the engine owns the optimizer (flat fp32 partitions,
    which no forward uses) and steps inside `accelerator.backward`."""

    wraps_optimizer = False  # ZeRO rewrites the groups: SAM's settings come from the arguments
    refused_variants = {
        "sam_group_size": "sam_group_size={value} is not supported under DeepSpeed (each chunk's backward would count as "
        "a micro-batch of the engine's accumulation). Train with DDP for m-sharpness.",
        "sam_ascent_fraction": "sam_ascent_fraction={value} is not supported under DeepSpeed yet (untested there). Train "
        "with DDP for it, or use sam_interval for a cheaper SAM under DeepSpeed.",
        "sam_mode": "sam_mode={value!r} is not supported under DeepSpeed (ZeRO keeps the gradients and the optimizer's "
        "momentum in its own partitioned buffers, which the variant would have to read or rewrite). Use sam_mode='sam' "
        "(with sam_interval for a cheaper SAM), or train with DDP.",
    }

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        self.zero_stage = self.accelerator.state.deepspeed_plugin.zero_stage

    @property
    def name(self) -> str:
        return f"DeepSpeed ZeRO-{self.zero_stage}"

    @classmethod
    def check(cls, args) -> None:
        _refuse_variants(args, cls.refused_variants)

    def plan(self, model: torch.nn.Module, optimizer, cached: Plan | None) -> Plan:
        """The module's own parameters, one group with the SAM settings of the arguments and the current LR.

        Rebuilt, as `Engine.plan`, when a parameter's requires_grad changes (the key is the module's flags:
        ZeRO's groups hold flat partitions, not the parameters; the module's list is kept to read them cheaply)."""
        watched = (
            cached.watched if cached is not None else list(self.accelerator.unwrap_model(model).parameters())
        )
        key = tuple(p.requires_grad for p in watched)
        if cached is None or cached.key != key:
            perturbed = self.perturbed_parameters(model)
            params = [p for p in watched if id(p) in perturbed]
            if not params:
                _nothing_to_perturb(mid_run=cached is not None)
            cached = Plan(
                key, self._bind_perturbed_tensors(params, watched), [], tracking_batchnorms(model), watched
            )
        args, lr_group = self.args, optimizer.param_groups[0]
        group = {
            **perturbation_settings(args.sam_rho, args.sam_adaptive, args.sam_eta, args.sam_norm),
            "lr": lr_group["lr"],
            "initial_lr": lr_group.get("initial_lr", args.learning_rate),
        }
        cached.slices = [(slice(0, len(cached.params)), group)]
        return cached

    def _bind_perturbed_tensors(
        self, params: list[torch.Tensor], watched: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The tensors a new plan perturbs for `params` (and what the engine must remember of them)."""
        return params  # full weights on every process

    def ascent_gradient(self, model, inputs: dict, num_items_in_batch, params) -> tuple[torch.Tensor, list]:
        # The engine's forward hooks its output so that any backward runs ZeRO's gradient reduction; the module
        # itself computes the same loss without them (and touches no engine state).
        return super().ascent_gradient(
            self.accelerator.unwrap_model(model), inputs, num_items_in_batch, params
        )

    def _ascent_sync(self, model):
        return contextlib.nullcontext()  # the unwrapped module has no reducer to keep out

    @contextlib.contextmanager
    def descent_context(self, model, is_last: bool, backup):
        """DeepSpeed steps inside `accelerator.backward` (`engine.step()` at the accumulation boundary), i.e.
        inside the descent's `training_step`: w must be restored before that step, not after it."""
        engine_step = model.step

        def step_from_w(*args, **kwargs):
            self._restore_weights(
                model, backup
            )  # the SAM gradient is complete: back to w, then the engine's step
            return engine_step(*args, **kwargs)

        model.step = step_from_w
        try:
            yield
        finally:
            del model.step  # the engine's own method again
            if backup.perturbed:  # the descent failed before the engine's step
                self._restore_weights(model, backup)

    def _restore_weights(self, model, backup) -> None:
        backup.restore_()

    def guards_steps(self) -> bool:
        return False  # the engine handles overflow itself (fp16); our wrapper is not there


class DeepSpeedZeRO3(DeepSpeedZeRO):
    """DeepSpeed ZeRO-3: the parameters themselves are partitioned. Each process holds one flat slice of every
    parameter's working weights (`param.ds_tensor`) and of its gradient (the engine's partitioned buffer, read
    with `deepspeed.utils.safe_get_local_grad`); the engine all-gathers the full weights inside its forward. So,
    as under FSDP2, both passes are real backwards through the engine, ε is one for all processes (from the
    gradient reduce-scattered over them), ‖g‖ is the all-reduce of the squared partition norms, and ε is added to
    each process's own partition of the working weights, so the next all-gather gathers w + ε."""

    global_epsilon = True
    refused_variants = {
        "sam_group_size": "sam_group_size={value} (one ε per chunk of examples) is impossible under DeepSpeed ZeRO-3, "
        "where ε is one for all processes (partitioned weights). Train with DDP for m-sharpness, or drop "
        "sam_group_size.",
        "sam_ascent_fraction": "sam_ascent_fraction={value} is not supported under DeepSpeed ZeRO-3 yet (untested "
        "there). Train with DDP for it, or use sam_interval for a cheaper SAM under ZeRO-3.",
        "sam_mode": "sam_mode={value!r} is not supported under DeepSpeed ZeRO-3 (its stored gradients or momentum live "
        "in the engine's partitioned buffers). Use sam_mode='sam' (with sam_interval for a cheaper SAM), or train "
        "with DDP.",
        "sam_ascent_steps": "sam_ascent_steps={value} is not supported under DeepSpeed ZeRO-3 yet: each further ascent "
        "backward would accumulate into the gradient partition that holds the current ε. Use sam_ascent_steps=1, or "
        "train with DDP or FSDP2 for a multi-step ascent.",
    }

    @classmethod
    def check(cls, args, fp16: bool = False, offload: str | None = None) -> None:
        if args.sam_sync_perturbation is False:
            raise ValueError(
                "sam_sync_perturbation=False (one ε per process) is impossible under DeepSpeed ZeRO-3: each process "
                "holds one partition of the weights and every process forwards through the same all-gathered w + ε, "
                "so ε comes from the gradient reduced over all processes. Train with DDP or ZeRO-1/2 for a "
                "per-process ε, or drop sam_sync_perturbation (ZeRO-3's default is the global ε)."
            )
        if fp16:
            raise ValueError(
                "SAMTrainer does not support fp16 under DeepSpeed ZeRO-3 yet (its loss scale and overflow skip are "
                "untested with the ascent pass). Use bf16 (bf16=True), or fp16 with DDP or ZeRO-1/2."
            )
        if offload:
            raise ValueError(
                f"SAMTrainer does not support ZeRO-3 offload yet ({offload}: the offloaded gradient partitions are "
                "copied at the accumulation boundary, which the ascent pass would have to follow; untested). Set the "
                "offload device to 'none', or use ZeRO-2 with offload_optimizer."
            )
        _refuse_variants(args, cls.refused_variants)

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        self._accumulated: list[torch.Tensor] | None = None  # the window's gradient partitions, set aside
        # Whether earlier micro-batches of the window left a gradient in the partitions (told by the trainer).
        self._window_has_gradient = False
        self._zeros: torch.Tensor | None = None
        # Set with each plan (`_bind_perturbed_tensors`): the perturbed parameters, every trainable one, their group.
        self.module_params: list[torch.Tensor] = []
        self.trainable: list[torch.Tensor] = []
        self.partition_group = None

    def _bind_perturbed_tensors(
        self, params: list[torch.Tensor], watched: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The partitions of the working weights (`ds_tensor`: what `WeightBackup` copies and moves); the parameters
        they belong to are kept to read their gradient partitions."""
        self.module_params = params
        # Every gradient partition the engine accumulates (the window's gradient is set aside for all of them).
        self.trainable = [p for p in watched if p.requires_grad]
        self.partition_group = params[0].ds_process_group
        return mark_partitioned([p.ds_tensor for p in params], self.partition_group)

    def ascent_gradient(self, model, inputs: dict, num_items_in_batch, params) -> tuple[torch.Tensor, list]:
        """This process's partition of the gradient averaged over processes, from a real backward through the
        engine (`engine.backward`, which reduce-scatters into the partitioned buffer, without `engine.step`, so the
        engine does not count it as a micro-batch). The gradient the window has accumulated so far is copied aside
        first and the buffer zeroed, so the buffer then holds the ascent gradient alone; `descent_context` puts
        the accumulated gradient back, untouched, before the descent backward adds to it."""
        from deepspeed.utils import safe_get_local_grad

        self._accumulated = (
            [safe_get_local_grad(p).clone() for p in self.trainable] if self._window_has_gradient else None
        )
        self._zero_gradient_partitions()
        loss = self._loss(model, inputs, num_items_in_batch)
        # Not divided by the accumulation steps: the mean loss's gradient, in the units of the other engines.
        model.backward(loss, scale_wrt_gas=False)
        grads = [safe_get_local_grad(p) for p in self.module_params]
        return loss.detach(), mark_partitioned(grads, self.partition_group)

    def begin_sam_micro_batch(self, model, first_in_window: bool) -> None:
        """The trainer says where the micro-batch stands in its window: its ascent sets aside what is accumulated."""
        self._window_has_gradient = not first_in_window

    def _zero_gradient_partitions(self) -> None:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        for p in self.trainable:
            grad = safe_get_local_grad(p)
            if self._zeros is None or self._zeros.numel() < grad.numel() or self._zeros.dtype != grad.dtype:
                self._zeros = torch.zeros(max(grad.numel(), 1), dtype=grad.dtype, device=grad.device)
            safe_set_local_grad(p, self._zeros[: grad.numel()])

    def _release_gathered(self, model) -> None:
        """Drop every gathered full copy of a parameter (ZeRO-3 keeps small "persistent" parameters gathered between
        forwards), without writing it back: the next forward gathers the partitions as they are now (w + ε after
        the perturbation, w after the restore). DeepSpeed's own step releases them the same way."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = [
            p
            for p in self.accelerator.unwrap_model(model).parameters()
            if p.ds_status == ZeroParamStatus.AVAILABLE
        ]
        if gathered:
            gathered[0].partition(gathered, has_been_updated=False)

    @contextlib.contextmanager
    def descent_context(self, model, is_last: bool, backup):
        """Around the stock `training_step` at w + ε: the accumulated gradient partitions back in the buffer (or zeros
        at the window's first micro-batch), the gathered weights dropped so the descent gathers w + ε, and, as
        under ZeRO-1/2, w restored from the backup before `engine.step()` (and the gathered copies dropped again)."""
        from deepspeed.utils import safe_set_local_grad

        if self._accumulated is None:
            self._zero_gradient_partitions()
        else:
            for p, grad in zip(self.trainable, self._accumulated, strict=True):
                safe_set_local_grad(p, grad)
            self._accumulated = None
        self._release_gathered(model)
        with super().descent_context(model, is_last, backup):
            yield

    def _restore_weights(self, model, backup) -> None:
        backup.restore_()
        self._release_gathered(model)  # the gathered copies still hold w + ε


def select_engine(trainer) -> Engine:
    """The engine of a built Trainer (Accelerate knows it, whether from the arguments or `accelerate launch`)."""
    if getattr(trainer.accelerator, "is_fsdp2", False):
        return FSDP2(trainer)
    if trainer.is_deepspeed_enabled:
        zero3 = trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
        return DeepSpeedZeRO3(trainer) if zero3 else DeepSpeedZeRO(trainer)
    return ProcessLocal(trainer)


def check_deepspeed(args, zero_stage: int, fp16: bool = False, zero_config: dict | None = None) -> None:
    """The refusals of the DeepSpeed engine the ZeRO stage selects (`zero_config`: the `zero_optimization` section)."""
    if zero_stage == 3:
        offloaded = [
            f"{key}.device={section.get('device')!r}"
            for key in ("offload_optimizer", "offload_param")
            if isinstance(section := (zero_config or {}).get(key), dict)
            and section.get("device") not in (None, "none")
        ]
        DeepSpeedZeRO3.check(args, fp16=fp16, offload=", ".join(offloaded) or None)
    else:
        DeepSpeedZeRO.check(args)


def _device_module(device):
    device = torch.device(device)
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    return module if module is not None and hasattr(module, "get_rng_state") else None
