"""The three places where `SAMMixin` reaches into the Trainer below its public hooks, kept together: each is the
first thing to check on a transformers (or trl) upgrade, and `tests/test_trainer_internals.py` names them all.

- `Trainer._prepare_inputs`: hidden by an instance attribute for the descent pass, which gets the batch the ascent
  pass was given, prepared once (`inputs_already_prepared`).
- `Trainer.current_gradient_accumulation_steps`: the divisor of a per-batch mean loss in the stock step, scaled
  for an m-sharpness chunk (`loss_weighted`); `hf_sam.loss_units` reads it too.
- What a parent's `compute_loss` records on the side (trl's `_metrics`, `_total_train_tokens`, `_stored_metrics`:
  `SAMMixin.sam_clean_pass_state`), deep-copied before a pass whose records must not count (`records_undone`).
"""

from __future__ import annotations

import contextlib
import copy


@contextlib.contextmanager
def inputs_already_prepared(trainer):
    """The stock step prepares its inputs (`_prepare_inputs`); the descent pass gets the batch the ascent pass was
    given, prepared once: a parent's preparation may not be idempotent (trl generates completions there)."""
    # An instance attribute hides the method for this pass only.
    trainer._prepare_inputs = lambda inputs: inputs
    try:
        yield
    finally:
        del trainer._prepare_inputs


@contextlib.contextmanager
def records_undone(trainer):
    """Undo what the parent's compute_loss records during a pass (`sam_clean_pass_state`): only one pass of each
    micro-batch may count its tokens and metrics."""
    saved = {
        name: copy.deepcopy(getattr(trainer, name))
        for name in trainer.sam_clean_pass_state
        if hasattr(trainer, name)
    }
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)


@contextlib.contextmanager
def loss_weighted(trainer, weight: float):
    """The stock step divides a per-batch mean loss by `current_gradient_accumulation_steps` (the number of
    micro-batches in the window); a chunk that is `weight` of a micro-batch counts as 1/weight times more of them.
    Works whatever `compute_loss` the user's subclass defines."""
    if weight == 1.0:
        yield
        return
    steps = trainer.current_gradient_accumulation_steps
    trainer.current_gradient_accumulation_steps = steps / weight
    try:
        yield
    finally:
        trainer.current_gradient_accumulation_steps = steps
