"""The DeepSpeed engines: `DeepSpeedZeRO` (ZeRO-1/2: full weights on every process, the engine owns the optimizer
and steps inside `accelerator.backward`) and `DeepSpeedZeRO3` (the weights themselves partitioned, ε global), on
`hf_sam.engines.Engine`; `check_deepspeed`, the refusals of the engine a ZeRO stage selects. DeepSpeed itself is
imported only where a method needs it."""

from __future__ import annotations

import contextlib

import torch

from hf_sam.batchnorm import tracking_batchnorms
from hf_sam.engines import Engine, Plan, nothing_to_perturb, refuse_variants
from hf_sam.norms import mark_partitioned
from hf_sam.perturbation import perturbation_settings


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
        refuse_variants(args, cls.refused_variants)

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
                nothing_to_perturb(mid_run=cached is not None)
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
        refuse_variants(args, cls.refused_variants)

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
