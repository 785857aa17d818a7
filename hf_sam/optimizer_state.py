"""What each base optimizer keeps that the one-pass modes look ahead along: one table keyed by optimizer class.

`sam_mode="momentum"` reads the optimizer's momentum v (SGD's `momentum_buffer`, Adam's first moment `exp_avg`, as
the Momentum-SAM authors' code does); `sam_mode="adam_update"` reads Adam's two moments and bias corrections as
torch's Adam and AdamW keep them. The same table answers "does it keep a momentum?" and "is it Adam?" for an
optimizer the Trainer will build (`SAMArguments`, from the class `Trainer.get_optimizer_cls_and_kwargs` resolves
and the settings it passes) and for one that exists (the `SAM` wrapper, `SAMMixin.create_optimizer`), so the two
cannot disagree. A class not in the table (or a subclass of one in it) keeps neither. Imports torch only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch


class OptimizerState(NamedTuple):
    """What an optimizer class keeps: the state entry of its momentum, whether a param group's settings (or the
    constructor's arguments, with its defaults) keep one, the reason when they do not, and whether its state is
    Adam's (first and second moments, bias corrections: what `sam_mode="adam_update"` reads)."""

    momentum_key: str
    keeps_momentum: Callable[[dict], bool]
    no_momentum: str  # "{name} ..." : why the settings keep none
    adam: bool = False


def _always(settings: dict) -> bool:
    return True


_ADAM = OptimizerState("exp_avg", _always, "", adam=True)
_FIRST_MOMENT = OptimizerState("exp_avg", _always, "")

# Keyed by class, or by "module.qualname" for a class outside torch (the math layer imports torch only).
OPTIMIZER_STATE: dict[type | str, OptimizerState] = {
    torch.optim.SGD: OptimizerState(
        "momentum_buffer",
        lambda settings: (settings.get("momentum") or 0) > 0,
        "SGD without momentum keeps no momentum buffer",
    ),
    torch.optim.Adam: _ADAM,
    torch.optim.AdamW: _ADAM,
    torch.optim.NAdam: _FIRST_MOMENT,
    torch.optim.RAdam: _FIRST_MOMENT,
    "transformers.optimization.Adafactor": OptimizerState(
        "exp_avg",
        lambda settings: settings.get("beta1") is not None,
        "Adafactor without beta1 keeps no momentum (first-moment) state",
    ),
}


def optimizer_state(cls: type) -> OptimizerState | None:
    """The table's entry for an optimizer class (or the nearest class it derives from), None if it has none."""
    for klass in cls.__mro__:
        entry = OPTIMIZER_STATE.get(klass) or OPTIMIZER_STATE.get(f"{klass.__module__}.{klass.__qualname__}")
        if entry is not None:
            return entry
    return None


def constructor_settings(cls: type, kwargs: dict) -> dict:
    """The settings an optimizer built as `cls(params, **kwargs)` puts in its param groups: its defaults, then
    `kwargs`."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        parameters = ()
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return {**defaults, **kwargs}


def missing_momentum(cls: type, groups: list[dict]) -> str | None:
    """Why an optimizer of class `cls` whose param groups (or constructor settings) are `groups` keeps no momentum
    for `sam_mode="momentum"`, or None when it keeps one."""
    entry = optimizer_state(cls)
    if entry is None:
        return f"{cls.__name__} keeps no momentum (first-moment) state"
    if all(entry.keeps_momentum(group) for group in groups):
        return None
    return entry.no_momentum


def is_adam(cls: type) -> bool:
    """Whether `cls` keeps Adam's state as torch's Adam and AdamW do (`sam_mode="adam_update"` reads it)."""
    entry = optimizer_state(cls)
    return entry is not None and entry.adam
