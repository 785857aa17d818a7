"""Every refusal of a SAM set-up, in two places, each with one line that names the fix.

- Without a model or an Accelerator, from the arguments alone: `check_arguments` (the `sam_*` fields, their
  combinations, the optimizer `optim` builds), which `SAMArguments.__post_init__` calls before the parent's
  device set-up, and `check_engine_arguments`, after it, for an engine the arguments (or an `accelerate launch`
  DeepSpeed config) already name, so a refused set-up stops before any model loads.
- With what the trainer knows: `check_trainer_and_model` (the trainer class and the model, before
  `Trainer.__init__` creates output_dir), `check_accelerator` (the engine Accelerate runs, the launch, ways of
  spreading a model over devices), and `check_run`, all of them again before a run's first SAM step.

What each engine refuses is the engine's own (`hf_sam.engines`, their `check` classmethods); this module calls
them. The `SAM` wrapper checks its own constructor arguments (`hf_sam.perturbation.validate_sam_hparams`, reused here).
"""

from __future__ import annotations

import inspect
import math
import os
import re

import torch
from accelerate.utils import DistributedType
from transformers import Trainer
from transformers.utils import logging

from hf_sam.engines import FSDP2, check_deepspeed
from hf_sam.one_pass import ONE_PASS_MODES
from hf_sam.optimizer_state import constructor_settings, is_adam, missing_momentum
from hf_sam.perturbation import validate_sam_hparams

logger = logging.get_logger(__name__)

SAM_MODES = ("sam", "looksam", "gsam", "momentum", "adam_update", "previous_gradient")
SAM_RHO_SCHEDULES = ("constant", "linear_with_lr")

# Optimizers that step inside backward (per-parameter hooks) or fuse backward and step: SAM needs the gradient
# at w + ε to reach one optimizer step after w is restored, which these cannot give.
_INCOMPATIBLE_OPTIM_MARKERS = ("lomo", "layerwise")


def default_of(name: str):
    """The default of a `sam_*` field, as `SAMArguments` declares it (the one place the defaults are written)."""
    from hf_sam.configs import SAMArguments

    return SAMArguments.__dataclass_fields__[name].default


def _with_defaults(args, *names: str) -> list[tuple]:
    """(name, value, default) of each named `sam_*` field."""
    return [(name, getattr(args, name), default_of(name)) for name in names]


# ---------------------------------------------------------------------- from the arguments alone
def check_arguments(args) -> None:
    """The `sam_*` fields (types, ranges, combinations) and the optimizer they need: before any device set-up, so a
    typo in a SAM field does not wait behind it."""
    validate_sam_hparams(args.sam_rho, args.sam_adaptive, args.sam_eta, args.sam_norm, prefix="sam_")
    if not isinstance(args.sam_fix_loss_normalization, bool):
        raise ValueError(
            f"sam_fix_loss_normalization must be True or False, got {args.sam_fix_loss_normalization!r}."
        )
    if args.sam_sync_perturbation is not None and not isinstance(args.sam_sync_perturbation, bool):
        raise ValueError(
            f"sam_sync_perturbation must be True, False or None, got {args.sam_sync_perturbation!r}."
        )
    check_variants(args)
    if args.sam_rho > 0:
        check_optimizer_kind(args)


def check_engine_arguments(args) -> None:
    """The engines' refusals (`hf_sam.engines`), when the arguments or an `accelerate launch` DeepSpeed config
    (TrainingArguments builds its plugin from the environment) name the engine: after the parent's
    `__post_init__`, before any model loads. `check_accelerator` checks again once Accelerate knows the engine."""
    if args.sam_rho <= 0:
        return
    if args.fsdp:
        FSDP2.check(args, args.fsdp_plugin_args["fsdp_version"])
    plugin = getattr(args, "deepspeed_plugin", None)
    if not (args.deepspeed or plugin is not None):
        return
    try:
        if args.deepspeed:
            config = args.hf_deepspeed_config
            stage = int(config.get_value("zero_optimization.stage", 0))
            fp16, zero_config = config.is_true("fp16.enabled"), config.config.get("zero_optimization")
        else:
            # A launch config's fp16: the Trainer-time check sees it.
            stage, fp16 = plugin.zero_stage, False
            zero_config = plugin.deepspeed_config.get("zero_optimization")
        check_deepspeed(args, stage, fp16=bool(args.fp16 or fp16), zero_config=zero_config)
    except ValueError:
        # TrainingArguments registered this config globally: a refused one must not make every later
        # from_pretrained build under ZeRO-3's zero.Init.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        raise


# The variant fields (also run again by check_run).
def check_variants(args) -> None:
    """Types, ranges and combinations of the variant fields: one clear error, before any work."""
    if args.sam_mode not in SAM_MODES:
        raise ValueError(f"sam_mode must be one of {', '.join(map(repr, SAM_MODES))}, got {args.sam_mode!r}.")
    if not _is_int(args.sam_interval) or args.sam_interval < 1:
        raise ValueError(
            f"sam_interval must be an integer >= 1 (1: SAM on every step), got {args.sam_interval!r}."
        )
    for name in ("sam_start", "sam_end"):
        value = getattr(args, name)
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a fraction of training in [0, 1], got {value!r}.")
    if args.sam_start >= args.sam_end:
        raise ValueError(
            f"sam_start ({args.sam_start}) must be smaller than sam_end ({args.sam_end}): SAM runs in between."
        )
    if args.sam_group_size is not None and (not _is_int(args.sam_group_size) or args.sam_group_size < 1):
        raise ValueError(
            f"sam_group_size must be a positive integer (examples per ε) or None, got {args.sam_group_size!r}."
        )
    if not _is_int(args.sam_ascent_steps) or args.sam_ascent_steps < 1:
        raise ValueError(f"sam_ascent_steps must be an integer >= 1, got {args.sam_ascent_steps!r}.")
    if not _is_number(args.sam_ascent_fraction) or not 0.0 < args.sam_ascent_fraction <= 1.0:
        raise ValueError(
            f"sam_ascent_fraction must be a fraction of the micro-batch in (0, 1] (1.0: plain SAM), got "
            f"{args.sam_ascent_fraction!r}."
        )
    if args.sam_rho_schedule not in SAM_RHO_SCHEDULES:
        raise ValueError(
            f"sam_rho_schedule must be one of {', '.join(map(repr, SAM_RHO_SCHEDULES))}, got {args.sam_rho_schedule!r}."
        )
    if not _is_number(args.sam_rho_min) or not 0 <= args.sam_rho_min <= args.sam_rho:
        raise ValueError(
            f"sam_rho_min must be a number in [0, sam_rho={args.sam_rho}], got {args.sam_rho_min!r}."
        )
    if not _is_int(args.sam_max_nonfinite_steps) or args.sam_max_nonfinite_steps < 0:
        raise ValueError(
            f"sam_max_nonfinite_steps must be an integer >= 0 (0 disables the check), got {args.sam_max_nonfinite_steps!r}."
        )
    for name in ("sam_looksam_alpha", "sam_gsam_alpha"):
        if not _is_number(getattr(args, name)) or getattr(args, name) < 0:
            raise ValueError(f"{name} must be a number >= 0, got {getattr(args, name)!r}.")
    if args.sam_param_filter is not None:
        try:
            re.compile(args.sam_param_filter)
        except (re.error, TypeError) as error:
            raise ValueError(
                f"sam_param_filter must be a regular expression over parameter names, got {args.sam_param_filter!r} ({error})."
            ) from None

    # Combinations that have no sound meaning (or no implementation yet): refuse rather than guess.
    if args.sam_mode in ("looksam", "gsam"):
        for name, value, default in _with_defaults(
            args, "sam_group_size", "sam_ascent_steps", "sam_param_filter"
        ):
            if value != default:
                raise ValueError(
                    f"sam_mode={args.sam_mode!r} cannot be combined with {name}={value!r}: it needs the full clean "
                    f"and SAM gradients of one ε per micro-batch. Use sam_mode='sam' or leave {name} at {default!r}."
                )
    if args.sam_mode in ONE_PASS_MODES:
        _check_one_pass_mode(args)
    if args.sam_ascent_fraction < 1.0:
        reasons = {
            "sam_mode": "LookSAM and GSAM combine the whole micro-batch's clean gradient",
            "sam_group_size": "m-sharpness groups cut the micro-batch themselves",
        }
        for name, value, default in _with_defaults(args, *reasons):
            if value != default:
                reason = reasons[name]
                raise ValueError(
                    f"sam_ascent_fraction={args.sam_ascent_fraction} cannot be combined with {name}={value!r}: "
                    f"{reason}. Use sam_ascent_fraction=1.0, or leave {name} at {default!r}."
                )
    if args.sam_mode == "looksam" and args.sam_interval < 2:
        raise ValueError("sam_mode='looksam' needs sam_interval >= 2 (its k: a SAM step every k steps).")
    if args.sam_group_size is not None and args.sam_sync_perturbation:
        raise ValueError(
            "sam_group_size (one ε per chunk of m examples) contradicts sam_sync_perturbation=True (one ε for "
            "all processes): choose one."
        )
    if args.sam_ascent_steps > 1 and (args.sam_adaptive or args.sam_norm != "2"):
        raise ValueError(
            "sam_ascent_steps > 1 projects onto the Euclidean ρ-ball: use it with sam_norm='2' and sam_adaptive=False."
        )


def _check_one_pass_mode(args) -> None:
    """The one-pass variants take no ascent gradient: the settings that shape an ascent do not apply, and
    Momentum-SAM's optimizer must keep a momentum (the one built from `optim` is checked again once it exists)."""
    ascent_settings = (
        "sam_group_size",
        "sam_ascent_steps",
        "sam_ascent_fraction",
        "sam_adaptive",
        "sam_norm",
    )
    for name, value, default in _with_defaults(args, *ascent_settings):
        if value != default:
            raise ValueError(
                f"sam_mode={args.sam_mode!r} cannot be combined with {name}={value!r}: it takes no ascent "
                f"gradient (one pass per step). Leave {name} at {default!r}, or use sam_mode='sam'."
            )
    _check_optimizer_state(args)


def _check_optimizer_state(args) -> None:
    """`sam_mode="adam_update"` needs Adam's state, `"momentum"` a momentum: asked of `hf_sam.optimizer_state`'s
    table about the class and settings the Trainer will build (`Trainer.get_optimizer_cls_and_kwargs`). An
    optimizer that cannot be resolved here (its package missing) is checked once it is built."""
    if args.sam_mode not in ("momentum", "adam_update"):
        return
    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError):
        return
    optim = str(getattr(args.optim, "value", args.optim)).lower()
    if args.sam_mode == "adam_update" and not is_adam(cls):
        raise ValueError(
            f"sam_mode='adam_update' looks ahead along Adam's update m̂/(√v̂+ε), which optim={optim!r} does not "
            "take. Use optim='adamw_torch' (the default) or 'adamw_torch_fused', or sam_mode='momentum'."
        )
    if args.sam_mode == "momentum" and missing_momentum(cls, [constructor_settings(cls, kwargs)]):
        raise ValueError(
            f"sam_mode='momentum' perturbs the weights along the optimizer's momentum, but optim={optim!r} "
            f"(optim_args={args.optim_args!r}) keeps none. Use optim='sgd' with optim_args='momentum=0.9', or "
            "optim='adamw_torch'."
        )


def check_optimizer_kind(args) -> None:
    """Reject the set-ups the two-pass step cannot run under, before any model or data is touched."""
    optim = str(getattr(args.optim, "value", args.optim)).lower()
    if any(marker in optim for marker in _INCOMPATIBLE_OPTIM_MARKERS):
        raise ValueError(
            f"optim={optim!r} updates the weights during backward, so SAM cannot take the second gradient at "
            "w + eps and step from w. Use a regular optimizer (e.g. optim='sgd' or 'adamw_torch'), "
            "or set sam_rho=0."
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------- with the trainer, the model, the Accelerator
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
