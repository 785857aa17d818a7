"""How SAM's two passes run under each distributed engine: one small class per engine.

`SAMMixin` picks one in `__init__` (`select_engine`) and calls it; everything that differs between engines is
here and in `hf_sam.engines_deepspeed` and nowhere else (what each perturbs, how it takes the ascent gradient and
syncs the descent, whether it wraps the optimizer, its ε scope, which SAM settings it refuses: its `check`, which
`hf_sam.argument_checks` and `hf_sam.setup_checks` call with the other refusals). `Engine` is what they share:

| engine                   | parameters perturbed         | ascent gradient                          | ε scope      |
|--------------------------|------------------------------|------------------------------------------|--------------|
| `ProcessLocal` (1 / DDP) | the `SAM` wrapper's groups   | `autograd.grad` under `no_sync`          | per process  |
| `FSDP2`                  | the wrapper's groups (shards)| a real backward into the sharded `.grad` | global       |
| `DeepSpeedZeRO` (1 / 2)  | the module's parameters      | `autograd.grad` on the unwrapped module  | per process  |
| `DeepSpeedZeRO3`         | the weights' partitions      | `engine.backward` into the grad partitions | global     |

(`sam_sync_perturbation=True` makes the ε of every engine global: the ascent gradients are averaged first.) The
two DeepSpeed engines live in `hf_sam.engines_deepspeed`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch

from hf_sam.batchnorm import tracking_batchnorms
from hf_sam.norms import all_reduce_mean_


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


def nothing_to_perturb(mid_run: bool) -> None:
    if mid_run:
        raise ValueError(
            "SAMTrainer has no parameter left to perturb: every parameter it perturbed (trainable and matching "
            "sam_param_filter) was frozen (requires_grad=False) during training. Keep one of them trainable, or widen "
            "sam_param_filter."
        )
    raise ValueError("SAMTrainer found no parameter to perturb (trainable and matching sam_param_filter).")


def refuse_variants(args, refused: dict[str, str]) -> None:
    """An engine's `refused_variants` (one line each, {value} the setting's value): a variant set off its default."""
    from hf_sam.argument_checks import default_of

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
            nothing_to_perturb(mid_run=cached is not None)
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
        refuse_variants(args, cls.refused_variants)

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


def select_engine(trainer) -> Engine:
    """The engine of a built Trainer (Accelerate knows it, whether from the arguments or `accelerate launch`)."""
    if getattr(trainer.accelerator, "is_fsdp2", False):
        return FSDP2(trainer)
    if trainer.is_deepspeed_enabled:
        from hf_sam.engines_deepspeed import DeepSpeedZeRO, DeepSpeedZeRO3

        zero3 = trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
        return DeepSpeedZeRO3(trainer) if zero3 else DeepSpeedZeRO(trainer)
    return ProcessLocal(trainer)


def _device_module(device):
    device = torch.device(device)
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    return module if module is not None and hasattr(module, "get_rng_state") else None
