"""Tiny models and data shared by the tests (importable by the subprocess scripts too)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class TinyNet(nn.Module):
    """A plain nn.Module the way users write them: odd input names, a dict with `loss` and `logits`."""

    def __init__(
        self,
        in_features: int = 6,
        hidden: int = 8,
        classes: int = 3,
        batchnorm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, features, target=None):
        logits = self.fc2(self.drop(torch.tanh(self.norm(self.fc1(features)))))
        out = {"logits": logits}
        if target is not None:
            out["loss"] = nn.functional.cross_entropy(logits, target)
        return out


class CountingNet(TinyNet):
    """A model that normalises its loss by `num_items_in_batch`, as transformers' language models do (labels of
    -100 are not counted)."""

    def forward(self, features, labels=None, **kwargs):
        logits = super().forward(features)["logits"]
        out = {"logits": logits}
        if labels is not None:
            num_items = kwargs.get("num_items_in_batch")
            reduction = "mean" if num_items is None else "sum"
            out["loss"] = nn.functional.cross_entropy(logits, labels, reduction=reduction)
            if num_items is not None:
                out["loss"] = out["loss"] / num_items
        return out


def tiny_efficientnet(seed: int = 0):
    """transformers' EfficientNet at 32 px, 3 classes: a model whose loss ignores `num_items_in_batch`."""
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    config = EfficientNetConfig(
        image_size=32,
        width_coefficient=0.1,
        depth_coefficient=0.1,
        hidden_dim=128,
        num_labels=3,
        depthwise_padding=[],
        dropout_rate=0.0,
        drop_connect_rate=0.0,
    )
    torch.manual_seed(seed)
    return EfficientNetForImageClassification(config)


def tiny_bert(seed: int = 0):
    """A 1-layer BERT sequence classifier, no dropout: `forward(**kwargs)` with a loss that ignores
    `num_items_in_batch` (a per-batch mean), as every BERT-style classifier's."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def text_rows(n: int = 8, length: int = 4, seed: int = 1) -> list[dict]:
    """Token rows for `tiny_bert`: `input_ids`, `attention_mask`, a class label each."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(3, 50, (length,), generator=g),
            "attention_mask": torch.ones(length, dtype=torch.long),
            "labels": torch.tensor(i % 3),
        }
        for i in range(n)
    ]


def make_rows(n: int = 8, in_features: int = 6, classes: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [{"features": x[i], "target": y[i]} for i in range(n)]


def make_model(seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


def stack(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def loss_and_grads(model: nn.Module, batch: dict, params: list[torch.Tensor] | None = None):
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    loss = model(**batch)["loss"]
    return loss.detach(), torch.autograd.grad(loss, params)


def reference_sam_gradient(
    model: nn.Module, batch: dict, rho: float, norm: str = "2", adaptive: bool = False, eta: float = 0.01
):
    """The SAM gradient written out by hand, on a deep copy (BatchNorm stats of the copy are irrelevant)."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    _, g = loss_and_grads(model, batch, params)
    with torch.no_grad():
        if adaptive:
            t = [p.abs() + eta for p in params]
            if norm == "2":
                tg_norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
                eps = [rho * ti * ti * gi / tg_norm for ti, gi in zip(t, g)]
            else:
                eps = [rho * ti * torch.sign(gi) for ti, gi in zip(t, g)]
        elif norm == "2":
            g_norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            eps = [rho * gi / g_norm for gi in g]
        else:
            eps = [rho * torch.sign(gi) for gi in g]
        for p, e in zip(params, eps):
            p.add_(e)
    _, g_sam = loss_and_grads(model, batch, params)
    return g_sam, eps
