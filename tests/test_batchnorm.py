"""freeze_batchnorm: BN statistics stay frozen over Trainer steps (model.train() every step); γ/β still train."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from hf_sam import SAMTrainer, SAMTrainingArguments
from hf_sam.batchnorm import freeze_batchnorm, is_frozen_batchnorm


class TimmClassifier(nn.Module):
    """timm's test_efficientnet (BatchNormAct2d) + a dropout, with the Trainer's input/output conventions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
        self.drop = nn.Dropout(0.1)
        with torch.no_grad():
            for m in self.net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)

    def forward(self, pixel_values, labels=None):
        logits = self.net(self.drop(pixel_values))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _rows(n=16):
    g = torch.Generator().manual_seed(0)
    return [
        {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": torch.tensor(i % 3)} for i in range(n)
    ]


def _bn_state(model):
    return {
        k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches_tracked" in k
    }


def _bn_affine(model):
    return {
        n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("bn1.weight", "bn1.bias"))
    }


def _train(model, tmp_path, rho, steps=4):
    args = SAMTrainingArguments(output_dir=str(tmp_path), sam_rho=rho, max_steps=steps, per_device_train_batch_size=4,
                                learning_rate=0.1, optim="sgd", use_cpu=True, report_to="none", save_strategy="no",
                                disable_tqdm=True)  # fmt: skip
    SAMTrainer(model=model, args=args, train_dataset=_rows()).train()


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_statistics_stay_frozen_over_trainer_steps(tmp_path, rho):
    model = TimmClassifier()
    frozen = freeze_batchnorm(model)
    bn_act = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert bn_act and frozen == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    stats, affine = _bn_state(model), _bn_affine(model)
    _train(model, tmp_path, rho)
    for key, value in _bn_state(model).items():
        assert torch.equal(value, stats[key]), key  # running stats and num_batches_tracked untouched
    assert all(not torch.equal(p, affine[n]) for n, p in _bn_affine(model).items())  # γ/β trained
    model.train()  # what the Trainer does every step
    assert all(not m.training for m in bn_act)
    assert model.net.training and model.drop.training  # everything else follows model.train()
    assert all(m.act.training for m in bn_act)  # BatchNormAct2d's own children too


def test_without_freezing_the_statistics_move(tmp_path):
    """The control: the same training updates the statistics when BN is not frozen (so the test above can fail)."""
    model = TimmClassifier()
    stats = _bn_state(model)
    _train(model, tmp_path, 0.05, steps=1)
    assert any(not torch.equal(v, stats[k]) for k, v in _bn_state(model).items())


def test_frozen_bn_normalises_with_running_stats_in_train_mode():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
    freeze_batchnorm(bn)
    bn.train()
    x = torch.randn(8, 4, 3, 3)
    torch.testing.assert_close(bn(x), (x - 1.0) / torch.sqrt(torch.tensor(4.0) + bn.eps))


def test_idempotent_and_survives_deepcopy():
    model = TimmClassifier()
    n = freeze_batchnorm(model)
    assert freeze_batchnorm(model) == n
    clone = copy.deepcopy(model).train()
    bns = [m for m in clone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(is_frozen_batchnorm(m) and not m.training for m in bns)
    assert set(model.state_dict()) == set(TimmClassifier().state_dict())  # nothing added to the checkpoint
