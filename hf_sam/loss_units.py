"""The units of the Trainer's loss: how `Trainer.training_step` scales what `compute_loss` returns, so that SAM's
extra passes and its `sam/*` metrics are in the same units as the stock step and the logged `loss`.

The Trainer either divides a per-micro-batch mean loss by the accumulation steps, or (models and
`compute_loss_func` that take `num_items_in_batch`) uses a loss already normalised over the items of the whole
accumulated batch; these functions mirror that decision.
"""

from __future__ import annotations

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


def probe_loss_units(loss_at, num_items) -> bool | None:
    """Does a loss ignore `num_items_in_batch`? Asked of its behaviour, not its source: `loss_at(n)` is the loss of
    one fixed batch given the count n. A loss normalised by the count halves when the count doubles; one that
    ignores it (BERT-style classifiers, T5, BART, EfficientNet: a per-batch mean) does not change. None when a
    zero or non-finite loss cannot tell."""
    with torch.no_grad():
        once, twice = loss_at(num_items), loss_at(num_items * 2)
    once, twice = once.detach().double(), twice.detach().double()
    if not (torch.isfinite(once) and torch.isfinite(twice)) or once == 0:
        return None
    return bool(torch.allclose(once, twice, rtol=1e-4, atol=0.0))


def declare_per_batch_mean_loss(trainer, model, loss_at, num_items_in_batch) -> None:
    """`sam_fix_loss_normalization`: a model whose `forward` takes `**kwargs` makes the Trainer believe that its loss
    is normalised by `num_items_in_batch`; when the loss ignores it (a per-micro-batch mean: BERT, RoBERTa,
    DeBERTa, ModernBERT, ELECTRA, T5, BART, EfficientNet, ResNet...), the stock Trainer's gradient comes out
    multiplied by the accumulation steps (and by the processes with `average_tokens_across_devices`), and SAM's
    chunks and telemetry would be in the wrong units. Asked once per run, at its first micro-batch, of the loss the
    step itself computes (`compute_loss`, so a subclass's own loss is asked too): two forwards without gradients,
    every module in eval mode, the random state and the parent's records put back. The processes agree on one
    answer. A loss found to ignore the count is declared a per-batch mean (`model_accepts_loss_kwargs = False`).

    `loss_at(count)`: the first micro-batch's `compute_loss` without gradients, leaving no trace (the trainer's)."""
    if (
        not trainer.model_accepts_loss_kwargs
        or num_items_in_batch is None
        or trainer.compute_loss_func is not None
        or getattr(trainer, "loss_is_scaled_for_ga", None) is not None  # the user declared it
    ):
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        ignores = probe_loss_units(loss_at, num_items_in_batch)
    finally:
        for module, training in modes:
            module.training = training
    votes = torch.tensor([float(ignores is False), float(ignores is True)], device=trainer.args.device)
    if trainer.accelerator.num_processes > 1:
        votes = trainer.accelerator.reduce(votes, reduction="sum")
    depends, ignored = votes.tolist()
    if depends > 0:
        return
    name = type(trainer.accelerator.unwrap_model(model)).__name__
    if ignored == 0:
        logger.warning_once(
            f"SAMTrainer could not tell whether {name}'s loss uses num_items_in_batch (a zero or non-finite loss at "
            "the first micro-batch): the stock Trainer's scaling is kept. Set `model.accepts_loss_kwargs` to say."
        )
        return
    logger.warning_once(
        f"{name}'s loss ignores num_items_in_batch: SAMTrainer averages its micro-batch losses over the "
        "accumulation steps (sam_fix_loss_normalization=True; False keeps the stock Trainer's scaling, which "
        "multiplies this model's gradients by the accumulation steps)."
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
