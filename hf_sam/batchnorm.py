"""Frozen BatchNorm for finetuning (SAM paper, appendix C.2).

"We freeze the batch norm statistics and use them for normalization, effectively using the batch norm as we
would at test time." The Trainer calls `model.train()` at every step, so putting BN layers in eval mode once
does not last. `freeze_batchnorm` replaces each BN layer's `train()` so that it always stays in eval mode:
normalisation uses the pretrained running statistics and never updates them (nor `num_batches_tracked`),
while γ/β keep `requires_grad` and are trained like every other weight.

The other BatchNorm concern, the SAM perturbed pass updating the statistics a second time, matters only when
BN is *not* frozen: `running_stats_frozen` keeps those passes off the statistics, and `ChunkStatistics` makes
m-sharpness chunks move them once per micro-batch.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

_FROZEN_FLAG = "_hf_sam_frozen_bn"


def _train_frozen(self: nn.Module, mode: bool = True) -> nn.Module:
    """`nn.Module.train` for a frozen BN layer: the layer stays in eval mode, its children follow `mode`.

    (timm's `BatchNormAct2d` holds its activation and drop layers as children: those keep obeying `mode`.)
    """
    if not isinstance(mode, bool):
        raise ValueError("training mode is expected to be boolean")
    self.training = False
    for child in self.children():
        child.train(mode)
    return self


def is_frozen_batchnorm(module: nn.Module) -> bool:
    return getattr(module, _FROZEN_FLAG, False)


def freeze_batchnorm(model: nn.Module) -> int:
    """Keep every BatchNorm layer of `model` in eval mode for good; return how many layers were frozen.

    Covers every `torch.nn` BatchNorm flavour (1d/2d/3d, SyncBatchNorm, lazy) and subclasses such as timm's
    `BatchNormAct2d`. Idempotent. The override is an instance attribute, so it follows the module through
    `copy.deepcopy`, pickling (`torch.save(model)`) and DDP wrapping, and is not part of `state_dict` (a saved
    state dict loads as a normal one).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not is_frozen_batchnorm(module):
                # A partial of a module-level function pickles by reference (a bound method of a function that
                # is not the class's own attribute does not: it would be looked up by name on load and fail).
                module.train = functools.partial(_train_frozen, module)
                setattr(module, _FROZEN_FLAG, True)
            module.train(model.training)  # put it in eval mode now, whatever mode the model is in
            count += 1
    return count


def tracking_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The normalisation layers that keep running statistics (BatchNorm flavours, InstanceNorm with tracking)."""
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


@contextlib.contextmanager
def running_stats_frozen(modules: list[nn.Module]):
    """BatchNorm in train mode (batch statistics) without touching running stats or `num_batches_tracked`.

    SAM's perturbed pass must not update the statistics a second time (EfficientNet is full of BN). With
    `track_running_stats=False` a training-mode BN normalises with batch statistics and leaves its buffers alone.
    """
    modules = [m for m in modules if m.track_running_stats]  # a frozen-BN recipe may have turned some off
    for m in modules:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in modules:
            m.track_running_stats = True


class ChunkStatistics:
    """m-sharpness chunks and BatchNorm: the running statistics move once per micro-batch, by the mean of the
    chunks' updates (weighted by their shares), as the released code averages the per-device statistics of its
    m-sized device batches. Each chunk's clean pass updates from the same starting statistics; frozen (eval-mode)
    BatchNorm layers are left alone."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = [m for m in modules if m.training and m.track_running_stats]
        self.start = [(m.running_mean.clone(), m.running_var.clone()) for m in self.modules]
        self.sums = [(torch.zeros_like(mean), torch.zeros_like(var)) for mean, var in self.start]

    @torch.no_grad()
    def add_chunk(self, share: float) -> None:
        for m, (mean, var), (sum_mean, sum_var) in zip(self.modules, self.start, self.sums, strict=True):
            sum_mean.add_(m.running_mean, alpha=share)
            sum_var.add_(m.running_var, alpha=share)
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.sub_(1)  # the chunk's pass counted one batch: the micro-batch counts once

    @torch.no_grad()
    def finish(self) -> None:
        for m, (sum_mean, sum_var) in zip(self.modules, self.sums, strict=True):
            m.running_mean.copy_(sum_mean)
            m.running_var.copy_(sum_var)
            m.num_batches_tracked.add_(1)
