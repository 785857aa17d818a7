"""Frozen BatchNorm for finetuning (SAM paper, appendix C.2).

"We freeze the batch norm statistics and use them for normalization, effectively using the batch norm as we
would at test time." The Trainer calls `model.train()` at every step, so putting BN layers in eval mode once
does not last. `freeze_batchnorm` replaces each BN layer's `train()` so that it always stays in eval mode:
normalisation uses the pretrained running statistics and never updates them (nor `num_batches_tracked`),
while γ/β keep `requires_grad` and are trained like every other weight.

(The other BatchNorm concern, the SAM perturbed pass updating the statistics a second time, is handled by
`SAMTrainer` itself and matters only when BN is *not* frozen.)
"""

from __future__ import annotations

import functools

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
