"""How SAM's two passes run under each distributed engine: one small class per engine, and the set-ups refused.

`SAMMixin` picks one in `__init__` (`select_engine`) and calls it; everything that differs between engines is
here and nowhere else (what each perturbs, how it takes the ascent gradient and syncs the descent, whether it
wraps the optimizer, its ε scope, which SAM settings it refuses):

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
import inspect
import math
import os
import re
from dataclasses import dataclass, field

import torch
from accelerate.utils import DistributedType
from transformers.utils import logging

from hf_sam.batchnorm import tracking_batchnorms
from hf_sam.sam import all_reduce_mean_, mark_partitioned, perturbation_settings

logger = logging.get_logger(__name__)


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


# The variants an engine may refuse (its `refused_variants`: one line each, {value} the setting's value).
_VARIANT_DEFAULTS = {
    "sam_group_size": None,
    "sam_ascent_fraction": 1.0,
    "sam_mode": "sam",
    "sam_ascent_steps": 1,
}


def _refuse_variants(args, refused: dict[str, str]) -> None:
    for name, message in refused.items():
        value = getattr(args, name)
        if value != _VARIANT_DEFAULTS[name]:
            raise ValueError(message.format(value=value))


class ProcessLocal:
    """One process, or DDP: full weights on every process, ε from this process's micro-batch gradient."""

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
    def begin_sam_micro_batch(self, model) -> None:
        """Called before the first pass of a SAM micro-batch."""

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


class FSDP2(ProcessLocal):
    """FSDP2 (`fully_shard`): parameters and gradients are shards (DTensors). Every process forwards through the
    same all-gathered w + ε, so ε comes from the gradient reduced over all processes, and ‖g‖ is the full-model
    norm (`hf_sam.sam.global_norm` all-reduces the shards' squares)."""

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

    def begin_sam_micro_batch(self, model) -> None:
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


class DeepSpeedZeRO(ProcessLocal):
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

        Rebuilt, as `ProcessLocal.plan`, when a parameter's requires_grad changes (the key is the module's flags:
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
                key, self._perturbed_tensors(params, watched), [], tracking_batchnorms(model), watched
            )
        args, lr_group = self.args, optimizer.param_groups[0]
        group = {
            **perturbation_settings(args.sam_rho, args.sam_adaptive, args.sam_eta, args.sam_norm),
            "lr": lr_group["lr"],
            "initial_lr": lr_group.get("initial_lr", args.learning_rate),
        }
        cached.slices = [(slice(0, len(cached.params)), group)]
        return cached

    def _perturbed_tensors(
        self, params: list[torch.Tensor], watched: list[torch.Tensor]
    ) -> list[torch.Tensor]:
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
        self._zeros: torch.Tensor | None = None
        # Set with each plan (`_perturbed_tensors`): the perturbed parameters, every trainable one, their group.
        self.module_params: list[torch.Tensor] = []
        self.trainable: list[torch.Tensor] = []
        self.partition_group = None

    def _perturbed_tensors(
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

        first = self.trainer._current_run().micro_batch == 0
        self._accumulated = None if first else [safe_get_local_grad(p).clone() for p in self.trainable]
        self._zero_gradient_partitions()
        loss = self._loss(model, inputs, num_items_in_batch)
        # Not divided by the accumulation steps: the mean loss's gradient, in the units of the other engines.
        model.backward(loss, scale_wrt_gas=False)
        grads = [safe_get_local_grad(p) for p in self.module_params]
        return loss.detach(), mark_partitioned(grads, self.partition_group)

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


# Trainer classes whose training_step generates, or trains several models: the two-pass step cannot wrap them.
_REFUSED_PARENTS = {
    "GRPOTrainer": "generates completions inside its training step",
    "RLOOTrainer": "generates completions inside its training step",
    "PPOTrainer": "runs its own rollout loop with a policy and a value model",
    "OnlineDPOTrainer": "generates completions inside its training step",
    "NashMDTrainer": "generates completions inside its training step",
    "XPOTrainer": "generates completions inside its training step",
    "GKDTrainer": "generates with the student and trains against a teacher model",
}


# Parents whose batch rows are not independent examples: cutting them (m-sharpness chunks, the ascent subset)
# would separate what their loss compares.
_ROWS_ARE_NOT_EXAMPLES = {
    "DPOTrainer": "stacks every pair's chosen rows, then its rejected rows, in one batch",
    "RewardTrainer": "stacks every pair's chosen rows, then its rejected rows, in one batch",
    "KTOTrainer": "estimates its KL term over the whole batch",
}
_CUTTING_SETTINGS = ("sam_group_size", "sam_ascent_fraction")


def _passes_the_batch_through(training_step) -> bool:
    """Whether an override of `training_step` only wraps the stock step in a context (trl's activation-offloading
    wrapper): read from its source, so a future override that does more is refused rather than trusted."""
    try:
        lines = inspect.getsource(training_step).splitlines()
    except (OSError, TypeError):
        return False
    body = [line.strip() for line in lines if line.strip() and not line.strip().startswith(("#", "@"))][1:]
    forwards = "return super().training_step(*args, **kwargs)"
    return body == [forwards] or (
        len(body) == 2 and body[0].startswith("with self.") and body[0].endswith(":") and body[1] == forwards
    )


def _overrides_below_the_mixin(trainer_class: type, name: str) -> list[type]:
    """The classes between `SAMMixin` and `transformers.Trainer` in the MRO that define `name`."""
    from transformers import Trainer

    mro = trainer_class.__mro__
    below = next(i for i, c in enumerate(mro) if c.__name__ == "SAMMixin")
    stop = mro.index(Trainer) if Trainer in mro else len(mro)
    return [c for c in mro[below + 1 : stop] if name in c.__dict__]


def check_trainer_class(trainer_class: type, args) -> None:
    """A parent whose training step SAM cannot wrap exactly is refused before any work: one that generates or
    trains several models, one whose own `training_step` changes the batch, and one whose rows are not examples
    under a setting that cuts the batch."""
    if args.sam_rho <= 0:
        return
    refused = next((c.__name__ for c in trainer_class.__mro__ if c.__name__ in _REFUSED_PARENTS), None)
    if refused is not None:
        raise ValueError(
            f"{trainer_class.__name__}: SAM cannot wrap {refused}, which {_REFUSED_PARENTS[refused]}. Supported: "
            "Trainer, Seq2SeqTrainer, trl's SFT, DPO, KTO, Reward, ORPO and CPO trainers, and subclasses whose "
            "training_step is one forward+backward; or set sam_rho=0."
        )
    for parent in _overrides_below_the_mixin(trainer_class, "training_step"):
        if not _passes_the_batch_through(parent.__dict__["training_step"]):
            raise ValueError(
                f"{trainer_class.__name__}: {parent.__name__}.training_step overrides the stock step below SAMMixin, "
                "so SAM would take ε from the batch before the override and the descent from the batch after it. "
                f"Put SAM below the override instead: `class {parent.__name__}(SAMTrainer)` (or SAMMixin first in "
                "its bases) with its training_step calling super().training_step(...); or set sam_rho=0."
            )
    cutting = [
        f"{n}={getattr(args, n)}" for n in _CUTTING_SETTINGS if getattr(args, n) != _VARIANT_DEFAULTS[n]
    ]
    if not cutting:
        return
    paired = next((c.__name__ for c in trainer_class.__mro__ if c.__name__ in _ROWS_ARE_NOT_EXAMPLES), None)
    if paired is not None:
        raise ValueError(
            f"{trainer_class.__name__}: {', '.join(cutting)} cuts each micro-batch by rows, but {paired} "
            f"{_ROWS_ARE_NOT_EXAMPLES[paired]}. Drop {' and '.join(c.split('=')[0] for c in cutting)} (plain SAM, "
            "sam_interval and the other variants work with it)."
        )
    # trl packs padding-free with packing_strategy "bfd"; "wrapped" packing keeps rows of their own.
    packed = getattr(args, "packing", False) and str(getattr(args, "packing_strategy", "bfd")).startswith(
        "bfd"
    )
    if getattr(args, "padding_free", False) or packed:
        raise ValueError(
            f"{', '.join(cutting)} cuts each micro-batch by rows, but padding_free (or packing with a 'bfd' "
            "strategy) concatenates the batch's sequences into one row. Set padding_free=False (and "
            "packing_strategy='wrapped' or packing=False), or drop "
            f"{' and '.join(c.split('=')[0] for c in cutting)}."
        )


def select_engine(trainer) -> ProcessLocal:
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


def check_engine(trainer) -> None:
    """The engines' refusals, also when the plugin came from `accelerate launch` rather than the arguments, and the
    ways of spreading a model over devices that SAM cannot run under."""
    args = trainer.args
    distributed_type = trainer.accelerator.distributed_type
    if distributed_type == DistributedType.DEEPSPEED or trainer.is_deepspeed_enabled:
        plugin = trainer.accelerator.state.deepspeed_plugin
        check_deepspeed(
            args,
            plugin.zero_stage,
            fp16=trainer.accelerator.mixed_precision == "fp16",
            zero_config=plugin.deepspeed_config.get("zero_optimization"),
        )
    if distributed_type == DistributedType.FSDP or trainer.is_fsdp_enabled:
        FSDP2.check(args, trainer.accelerator.state.fsdp_plugin.fsdp_version)
    check_launch(trainer)
    if args.n_gpu > 1:
        raise ValueError(
            f"SAMTrainer does not support torch.nn.DataParallel ({args.n_gpu} GPUs in one process): its "
            "replicas would share one ε. Launch one process per GPU with `accelerate launch --multi_gpu` "
            "(or torchrun), or expose a single GPU with CUDA_VISIBLE_DEVICES."
        )
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    if parallelism is not None and (
        getattr(parallelism, "cp_enabled", False) or getattr(parallelism, "sp_enabled", False)
    ):
        raise ValueError(
            "SAMTrainer does not support context or sequence parallelism yet: the ascent pass would skip the "
            "input sharding the Trainer applies to each micro-batch. Train without parallelism_config's cp/sp "
            "sizes (DDP, FSDP2 or DeepSpeed ZeRO-1/2 work), or set sam_rho=0."
        )


def check_launch(trainer) -> None:
    """A launch that runs something other than what it asked for. `accelerate launch` (or torchrun) started several
    processes, but Accelerate runs each alone (on a machine without GPUs, a MULTI_GPU config without
    `use_cpu=True`): they would train independently into one output_dir, and ε's scope would mean nothing. And a
    FSDP launch that Accelerate did not turn into FSDP (no GPUs) trains with DDP's per-process ε instead of the
    global one the FSDP engine takes: said in one line."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    accelerator = trainer.accelerator
    if world_size > 1 and accelerator.num_processes == 1:
        fix = (
            "set use_cpu=True in the training arguments (the recipes do)"
            if not torch.cuda.is_available()
            else "check that each process sees its GPU (CUDA_VISIBLE_DEVICES)"
        )
        raise ValueError(
            f"The launch started {world_size} processes (WORLD_SIZE={world_size}), but each runs alone "
            "(Accelerate runs one process here): they would train independently into the "
            f"same output_dir. To train on {world_size} processes, {fix}."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        logger.warning_once(
            f"The launch asked for FSDP, but Accelerate runs {accelerator.distributed_type} here (FSDP needs "
            "GPUs): SAMTrainer takes DDP's ε (per process unless sam_sync_perturbation=True), not the FSDP "
            "engine's global one."
        )


def check_param_filter(model: torch.nn.Module, regex: str) -> None:
    """`sam_param_filter` must match a trainable parameter (checked before any work)."""
    pattern = re.compile(regex)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not any(pattern.search(n) for n in names):
        raise ValueError(
            f"sam_param_filter={regex!r} matches no trainable parameter. Some parameter names: {', '.join(names[:8])}."
        )


def check_ascent_subset(model: torch.nn.Module, args) -> None:
    """`sam_ascent_fraction` must leave BatchNorm (in train mode during training) two examples to normalise."""
    if args.sam_ascent_fraction >= 1.0:
        return
    from hf_sam.batchnorm import is_frozen_batchnorm

    batch = args.per_device_train_batch_size
    kept = math.ceil(args.sam_ascent_fraction * batch)
    normalising = [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not is_frozen_batchnorm(m)
    ]
    if kept < 2 <= batch and normalising:
        raise ValueError(
            f"sam_ascent_fraction={args.sam_ascent_fraction} of per_device_train_batch_size={batch} gives the ascent "
            f"pass {kept} example, which BatchNorm in train mode ({normalising[0]}) cannot normalise. Use "
            f"sam_ascent_fraction >= {2 / batch:g}, a larger batch, or freeze BatchNorm (hf_sam.batchnorm."
            "freeze_batchnorm)."
        )


def check_one_pass_batchnorm(model: torch.nn.Module, args) -> None:
    """The one-pass variants take their only forward at the look-ahead point, so BatchNorm in train mode would keep
    running statistics of that point, not of w (the weights evaluated and saved). Refused, with the fix."""
    from hf_sam.batchnorm import is_frozen_batchnorm
    from hf_sam.one_pass import ONE_PASS_MODES

    if args.sam_mode not in ONE_PASS_MODES:
        return

    tracking = [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._NormBase)
        and m.track_running_stats
        and not is_frozen_batchnorm(m)
    ]
    if tracking:
        raise ValueError(
            f"sam_mode={args.sam_mode!r} takes its only forward pass at the look-ahead point, so BatchNorm in train "
            f"mode ({tracking[0]}{f' and {len(tracking) - 1} more' if len(tracking) > 1 else ''}) would keep "
            "running statistics of that point, not of the weights evaluated and saved. Freeze BatchNorm "
            "(hf_sam.batchnorm.freeze_batchnorm(model), as the recipes do), or use two-pass SAM (sam_mode='sam')."
        )


def _device_module(device):
    device = torch.device(device)
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    return module if module is not None and hasattr(module, "get_rng_state") else None
