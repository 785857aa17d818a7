"""The refusals of a SAM set-up that need what the trainer knows, each with one line that names the fix:
`check_trainer_and_model` (the trainer class and the model, before `Trainer.__init__` creates output_dir),
`check_accelerator` (the engine Accelerate runs, the launch, ways of spreading a model over devices),
`check_sam_wrapper` (a `SAM` optimizer the user passed), and `check_run`, all of them again before a run's first
SAM step. The refusals from the arguments alone come first, in `hf_sam.argument_checks`.
"""

from __future__ import annotations

import inspect
import math
import os
import re

import torch
from accelerate.utils import DistributedType
from transformers.utils import logging

from hf_sam.argument_checks import check_optimizer_kind, check_variants, default_of
from hf_sam.engines import FSDP2
from hf_sam.engines_deepspeed import check_deepspeed
from hf_sam.trainer_setup import wrapper_mode

logger = logging.get_logger(__name__)


def check_trainer_and_model(trainer_class: type, model, args) -> None:
    """The refusals that need the trainer class and the model (not yet the Accelerator)."""
    check_trainer_class(trainer_class, args)
    if args.sam_rho > 0 and isinstance(model, torch.nn.Module):
        if args.sam_param_filter is not None:
            check_param_filter(model, args.sam_param_filter)
        check_ascent_subset(model, args)
        check_one_pass_batchnorm(model, args)


def check_accelerator(trainer) -> None:
    """The refusals that need the Accelerator: the engine (also when its plugin comes from `accelerate launch`),
    DataParallel, context/sequence parallelism, the launch, and reentrant gradient checkpointing."""
    check_engine(trainer)
    checkpointing_kwargs = trainer.args.gradient_checkpointing_kwargs or {}
    if trainer.args.gradient_checkpointing and checkpointing_kwargs.get("use_reentrant", False):
        raise ValueError(
            "gradient_checkpointing_kwargs={'use_reentrant': True} is incompatible with SAM's ascent pass "
            "(torch.autograd.grad). Use {'use_reentrant': False} (the transformers default)."
        )


def check_sam_wrapper(wrapper, args, trainer_name: str) -> None:
    """A `SAM` optimizer the user passed (or the one a first `train()` built) must take the step `sam_mode` needs."""
    wanted = wrapper_mode(args.sam_mode)
    if wrapper.mode != wanted:
        raise ValueError(
            f"The optimizer passed to {trainer_name} is hf_sam.SAM(mode={wrapper.mode!r}), but "
            f"sam_mode={args.sam_mode!r} needs mode={wanted!r}: build it as SAM(base, rho, "
            f"mode={wanted!r}), or pass the base optimizer and let {trainer_name} wrap it."
        )


def check_run(trainer) -> None:
    """The construction checks again, before a run's first SAM step: a hyperparameter trial (or a user) may have set
    sam_rho > 0, or another variant, on a trainer that was built and checked with other settings."""
    args = trainer.args
    if args.sam_rho <= 0:
        return
    check_variants(args)
    check_optimizer_kind(args)
    check_trainer_and_model(type(trainer), trainer.model, args)
    check_accelerator(trainer)


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
    cutting = [f"{n}={getattr(args, n)}" for n in _CUTTING_SETTINGS if getattr(args, n) != default_of(n)]
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
