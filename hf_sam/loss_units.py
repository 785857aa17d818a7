"""The units of the Trainer's loss: how `Trainer.training_step` scales what `compute_loss` returns, so that SAM's
extra passes and its `sam/*` metrics are in the same units as the stock step and the logged `loss`.

The Trainer either divides a per-micro-batch mean loss by the accumulation steps, or (models and
`compute_loss_func` that take `num_items_in_batch`) uses a loss already normalised over the items of the whole
accumulated batch; these functions mirror that decision.
"""

from __future__ import annotations

import inspect
import re

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


def normalised_by_num_items(trainer, num_items_in_batch) -> bool:
    """Mirror of `Trainer.training_step`: is the loss already normalised over the whole accumulated batch?"""
    scaled_for_ga = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled_for_ga is None:
        scaled_for_ga = (
            trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or trainer.compute_loss_func is not None
    return scaled_for_ga


def as_reported(trainer, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """Scale a `compute_loss` loss exactly as `Trainer.training_step` scales the loss it returns."""
    if not normalised_by_num_items(trainer, num_items_in_batch):
        loss = loss / trainer.current_gradient_accumulation_steps
    return loss


def mean_loss_factor(trainer, inputs: dict, num_items_in_batch):
    """What turns ‖∇ of the ascent loss‖ into ‖∇ of the micro-batch's mean loss‖ (for `sam/grad_norm`).

    The ascent loss is `compute_loss`'s: a per-micro-batch mean, or (models and `compute_loss_func` that take
    `num_items_in_batch`) a sum over this micro-batch divided by the items of the whole accumulated batch, times
    the process count with `average_tokens_across_devices`; under fp16 the gradient also carries the GradScaler's
    scale.
    """
    factor = 1.0
    accelerator = trainer.accelerator
    if accelerator.scaler is not None:
        factor = 1.0 / accelerator.scaler.get_scale()
    if num_items_in_batch is None or not normalised_by_num_items(trainer, num_items_in_batch):
        return factor
    items = items_in(inputs, trainer)
    if items is None:
        return factor
    if trainer.args.average_tokens_across_devices and accelerator.num_processes > 1:
        items = items * (accelerator.num_processes // trainer.get_tp_size())
    return factor * num_items_in_batch / items.clamp(min=1).to(torch.float64)


def in_units_of_the_batch(trainer, loss, subset: dict, inputs: dict, num_items_in_batch):
    """The clean loss of an ascent subset in the units of its whole micro-batch: a loss normalised by the items of
    the whole window counts the subset's items only, so it is scaled by items(batch) / items(subset)."""
    if num_items_in_batch is None or not normalised_by_num_items(trainer, num_items_in_batch):
        return loss
    subset_items, items = items_in(subset, trainer), items_in(inputs, trainer)
    if subset_items is None or items is None:
        return loss
    return loss * items / subset_items.clamp(min=1)


def declare_per_batch_mean_loss(trainer) -> None:
    """`sam_fix_loss_normalization`: e.g. EfficientNet, ResNet, ConvNeXt: `forward(**kwargs)` makes the Trainer
    believe the model normalises by `num_items_in_batch`, but their loss is a per-micro-batch mean, so the stock
    Trainer's gradient comes out multiplied by the accumulation steps (and processes). Declare the truth."""
    if trainer.model_accepts_loss_kwargs and loss_ignores_num_items_in_batch(trainer.model):
        logger.warning_once(
            f"{type(trainer.model).__name__}'s loss ignores num_items_in_batch: SAMTrainer averages its micro-batch "
            "losses over the accumulation steps (sam_fix_loss_normalization=True; False keeps the stock "
            "Trainer's scaling, which multiplies this model's gradients by the accumulation steps)."
        )
        trainer.model_accepts_loss_kwargs = False


def items_in(inputs: dict, trainer) -> torch.Tensor | None:
    """The items of one micro-batch, counted as `Trainer._get_num_items_in_batch` counts a window's (causal-LM
    trainers count shifted labels, `labels[..., 1:]`)."""
    if "shift_labels" in inputs:
        labels = inputs["shift_labels"]
    elif "labels" in inputs:
        shifted = getattr(trainer, "_loss_shifts_labels", False)
        labels = inputs["labels"][..., 1:] if shifted else inputs["labels"]
    else:
        return None
    return labels.ne(-100).sum() if isinstance(labels, torch.Tensor) else None


def loss_ignores_num_items_in_batch(model: torch.nn.Module) -> bool:
    """True for transformers models whose `forward(**kwargs)` computes a loss without passing kwargs on.

    Read from the source of `forward`: it calls `self.loss_function(...)` and none of those calls forwards
    `**kwargs` or `num_items_in_batch` (EfficientNet, ResNet, ConvNeXt, MobileNet, RegNet...). Anything we cannot
    read is left to the Trainer's own judgement.
    """
    while hasattr(model, "module"):  # DDP / compile wrappers
        model = model.module
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
        model = model.get_base_model()
    if hasattr(model, "accepts_loss_kwargs"):
        return False
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False
    calls = re.findall(r"self\.loss_function\((.*?)\)\n", source, flags=re.S)
    return bool(calls) and not any("**kwargs" in c or "num_items_in_batch" in c for c in calls)
