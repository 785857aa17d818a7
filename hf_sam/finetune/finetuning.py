"""What `recipes/finetune.py` trains with: `RecipeTrainer` (the `SAMTrainer` with the released code's
weight-decay scope as an option) and its `compute_metrics`, `top_k_accuracy`."""

from __future__ import annotations

import numpy as np

from hf_sam.trainer import SAMTrainer


class RecipeTrainer(SAMTrainer):
    """`SAMTrainer` with the released code's weight-decay scope as an option (`weight_decay_all_parameters`)."""

    def __init__(self, *args, weight_decay_all_parameters: bool = False, **kwargs):
        self.weight_decay_all_parameters = weight_decay_all_parameters
        super().__init__(*args, **kwargs)

    def get_decay_parameter_names(self, model) -> list[str]:
        if self.weight_decay_all_parameters:
            # The released code adds 0.5 * wd * ||w||^2 over *all* parameters (biases and BatchNorm included).
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)


def top_k_accuracy(eval_pred) -> dict[str, float]:
    """Top-1 and top-5 accuracy computed locally (`evaluate.load` needs the Hub)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    k = min(5, logits.shape[-1])
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return {
        "top1": float(np.mean(top[:, 0] == labels)),
        "top5": float(np.mean((top == labels[:, None]).any(axis=-1))),
    }
