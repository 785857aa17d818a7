"""What both sharpness measurements (`hf_sam.hessian`, `hf_sam.m_sharpness`) share: the loss of a batch
(`model_loss`, the default `loss_fn`), batches counted, cut into chunks and moved, and the mode they measure in
(`measurement_mode`: eval mode, a double-differentiable attention kernel). Imports torch only."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def model_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The default `loss_fn`: the model's own loss, or cross-entropy for `(inputs, targets)` batches.

    - a mapping (Hugging Face style, labels included): `model(**batch)["loss"]` (works for `ModelOutput` and
      for modules returning a dict with a `"loss"` key);
    - a pair `(inputs, targets)`: `cross_entropy(model(inputs), targets)`, the plain-PyTorch convention.
    """
    if isinstance(batch, Mapping):
        outputs = model(**batch)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError(
                f"{type(model).__name__} returned no loss for this batch: include the labels in the batch "
                "(e.g. `labels`) or pass loss_fn=lambda model, batch: <scalar mean loss>."
            )
        return loss
    if isinstance(batch, Sequence) and len(batch) == 2:
        inputs, targets = batch
        logits = model(inputs)
        logits = getattr(logits, "logits", logits)
        return F.cross_entropy(logits, targets)
    raise ValueError(
        f"Cannot compute a loss for a batch of type {type(batch).__name__}: pass a dict with labels, an "
        "(inputs, targets) pair, or loss_fn=lambda model, batch: <scalar mean loss>."
    )


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the length of dimension 0 of its first tensor."""
    for value in _tensors(batch):
        if value.dim() > 0:
            return value.shape[0]
    raise ValueError(f"Found no tensor with a batch dimension in a batch of type {type(batch).__name__}.")


def split_batch(batch: Any, m: int) -> list[Any]:
    """Split a batch into consecutive chunks of `m` examples along dimension 0; a last chunk with fewer than
    `m` examples is dropped (m-sharpness is defined on disjoint subsets of exactly m examples).

    Works on tensors and on (nested) dicts / tuples / lists of tensors; non-tensor values are shared by all
    chunks.
    """
    n = batch_size(batch)
    return [_slice(batch, start, start + m) for start in range(0, n - m + 1, m)]


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, start, stop) for v in batch)
    return batch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _tensors(v)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def collect_batches(batches: Iterable, num_batches: int | None) -> list:
    """Materialise the batches once: Lanczos passes over them many times and must see the same data each time
    (a shuffling DataLoader would give a different operator per pass)."""
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(
            f"num_batches must be a positive integer or None (all batches), got {num_batches!r}."
        )
    collected = list(itertools.islice(batches, num_batches))
    if not collected:
        raise ValueError("No batch to measure on: `batches` is empty.")
    return collected


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter (requires_grad=True) to measure."
        )
    return params


def scalar_loss(loss_fn: LossFn, model: torch.nn.Module, batch: Any) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor (the mean loss over the batch), got {loss!r}.")
    return loss.reshape(())


# Attention kernels without a double backward (Hessian-vector products need one); PyTorch's SDPA is measured
# through its math backend, which has one.
_NO_DOUBLE_BACKWARD = ("flash_attention_2", "flash_attention_3", "flex_attention")


def check_attention(model: torch.nn.Module) -> None:
    """Refuse, in one line, a model whose attention kernel cannot be differentiated twice."""
    config = getattr(model, "config", None)
    kernel = getattr(config, "_attn_implementation", None)
    if kernel in _NO_DOUBLE_BACKWARD or (isinstance(kernel, str) and "flash" in kernel):
        raise ValueError(
            f"The sharpness measurements need a second derivative, which attn_implementation={kernel!r} does not "
            "have. Load the model with attn_implementation='sdpa' (measured through PyTorch's math kernel) or "
            "'eager'."
        )


@contextmanager
def measurement_mode(model: torch.nn.Module):
    """Every module in eval mode (BatchNorm on running statistics, no dropout), gradients enabled, and
    `scaled_dot_product_attention` on its math backend (the only one with a double backward: the fused CPU and
    GPU kernels raise in a Hessian-vector product); each module's own `training` flag is restored afterwards (not
    a blanket `model.train()`: frozen-BN recipes keep some BatchNorm layers in eval mode on purpose)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    check_attention(model)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for module, training in modes:
            module.training = training


def with_progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # optional, and only imported for long runs that ask for it

    return tqdm(iterable, **kwargs)
