"""The refusals a SAM set-up gets from its arguments alone, without a model or an Accelerator, each with one line
that names the fix: `check_arguments` (the `sam_*` fields, their combinations, the optimizer `optim` builds), which
`SAMArguments.__post_init__` calls before the parent's device set-up, and `check_engine_arguments`, after it, for
an engine the arguments (or an `accelerate launch` DeepSpeed config) already name, so a refused set-up stops
before any model loads. What the trainer, the model and the Accelerator add is `hf_sam.setup_checks`.

What each engine refuses is the engine's own (`hf_sam.engines`, `hf_sam.engines_deepspeed`: their `check`
classmethods); this module calls them. The `SAM` wrapper checks its own constructor arguments
(`hf_sam.perturbation.validate_sam_hparams`, reused here).
"""

from __future__ import annotations

import math
import re

from transformers import Trainer

from hf_sam.engines import FSDP2
from hf_sam.engines_deepspeed import check_deepspeed
from hf_sam.one_pass import ONE_PASS_MODES
from hf_sam.optimizer_state import constructor_settings, is_adam, missing_momentum
from hf_sam.perturbation import validate_sam_hparams

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
    """The engines' refusals (`hf_sam.engines`, `hf_sam.engines_deepspeed`), when the arguments or an `accelerate launch` DeepSpeed config
    (TrainingArguments builds its plugin from the environment) name the engine: after the parent's
    `__post_init__`, before any model loads. `hf_sam.setup_checks.check_accelerator` checks again once Accelerate
    knows the engine."""
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


# The variant fields (also run again by `hf_sam.setup_checks.check_run`).
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
