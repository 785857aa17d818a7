"""What `SAMMixin.__init__` and `create_optimizer` need besides the hooks themselves: which of the parent's
positional arguments is `args` (`parent_signature`), no trace left by a set-up refused after `Trainer.__init__`
(`remove_if_created_empty`), and the `SAM` wrapper around the optimizer the Trainer builds (`sam_in`,
`wrapper_mode`, `wrap_in_sam`)."""

from __future__ import annotations

import contextlib
import inspect
import os

from hf_sam.sam import SAM


def parent_signature(trainer_class: type, mixin: type) -> inspect.Signature:
    """The signature of the first `__init__` below `mixin` that names an `args` parameter: it decides which
    positional argument is `args` (trl's DPOTrainer takes (model, ref_model, args, ...), DistillationTrainer
    (model, teacher_model, args, ...)). Pass-through `__init__(self, *args, **kwargs)` are looked through."""
    mro = trainer_class.__mro__
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for cls in mro[mro.index(mixin) + 1 :]:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        signature = inspect.signature(init)
        args = signature.parameters.get("args")
        if args is not None and args.kind in named:
            return signature.replace(parameters=list(signature.parameters.values())[1:])  # without self
    raise TypeError(
        f"{trainer_class.__name__}: SAMMixin needs a Trainer subclass whose __init__ takes `args`."
    )


def remove_if_created_empty(path: str | None, existed: bool) -> None:
    """Remove the folder `path` if it did not exist before (`existed` False) and is empty now: made by
    `Trainer.__init__` before a set-up check failed, it should leave no trace. Anything else is left alone."""
    if path is None or existed:
        return
    with contextlib.suppress(OSError):  # not empty, not a folder, already gone: not ours to remove
        os.rmdir(path)


def sam_in(optimizer) -> SAM | None:
    """The `hf_sam.SAM` inside an optimizer (itself, or under AcceleratedOptimizer and friends), if any."""
    while optimizer is not None and not isinstance(optimizer, SAM):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def wrapper_mode(sam_mode: str) -> str:
    """The `SAM` wrapper's mode for a `sam_mode`: the trainer takes every other mode's look-ahead itself."""
    return "momentum" if sam_mode == "momentum" else "sam"


def wrap_in_sam(optimizer, args, scaler) -> SAM:
    """The optimizer the Trainer built, wrapped in `SAM` with the arguments' settings (it shares the base's
    param_groups and state, so schedulers and checkpoints see the base optimizer)."""
    wrapper = SAM(
        optimizer, args.sam_rho, args.sam_adaptive, args.sam_eta, args.sam_norm, wrapper_mode(args.sam_mode)
    )
    # fp16's GradScaler already skips non-finite steps; in fp32/bf16 the wrapper does (and stops after N).
    wrapper.max_nonfinite_steps = args.sam_max_nonfinite_steps if scaler is None else 0
    # w is restored by training_step before the Trainer steps, and Accelerate detects an fp16 overflow by
    # whether the GradScaler calls step(): let the scaler skip this optimizer as it skips any other.
    wrapper._step_supports_amp_scaling = False
    return wrapper
