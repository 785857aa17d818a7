"""`sam_ascent_fraction`: ε from the first ⌈f·B⌉ examples of each micro-batch, the descent over all B, against
hand computations on a tiny model."""

import copy
import math

import pytest
import torch
from test_trainer import LR, assert_params_close, make_args
from test_variants import batches
from torch import nn
from toy import CountingNet, TinyNet, loss_and_grads, make_model, make_rows, stack

from hf_sam import SAMTrainer, SAMTrainingArguments

RHO = 0.1


def fraction_sam_gradient(model, batch, fraction, rho=RHO, descent_loss=None):
    """The gradient at w + ε over the whole batch, ε from the mean loss of its first ⌈f·B⌉ examples."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    size = math.ceil(fraction * len(batch["target"]))
    _, g = loss_and_grads(model, {k: v[:size] for k, v in batch.items()}, params)
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    with torch.no_grad():
        for p, x in zip(params, g, strict=True):
            p += rho * x / norm
    loss = model(**batch)["loss"] if descent_loss is None else descent_loss(model, batch)
    return torch.autograd.grad(loss, params)


def train(tmp_path, model, rows, **overrides):
    args = make_args(tmp_path, **{"sam_rho": RHO, **overrides})
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return trainer


def test_fraction_one_is_plain_sam_bit_for_bit(tmp_path):
    rows = make_rows(16)
    plain, full = make_model(dropout=0.2), make_model(dropout=0.2)
    common = dict(max_steps=3, per_device_train_batch_size=4, train_sampling_strategy="random")
    a = train(tmp_path / "a", plain, rows, **common)
    b = train(tmp_path / "b", full, rows, sam_ascent_fraction=1.0, **common)
    assert all(torch.equal(p, q) for p, q in zip(plain.state_dict().values(), full.state_dict().values()))
    assert a.state.log_history[:-1] == b.state.log_history[:-1]  # all but the final summary (wall-clock time)


def test_quarter_fraction_step_equals_the_hand_computation(tmp_path):
    rows, model = make_rows(8), make_model()
    g = fraction_sam_gradient(model, stack(rows), 0.25)
    expected = [p.detach() - LR * x for p, x in zip(model.parameters(), g, strict=True)]
    trainer = train(tmp_path, model, rows, sam_ascent_fraction=0.25)
    assert_params_close(model, expected)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["sam/forward_passes"] == 1.25 and log["sam/backward_passes"] == 1.25  # example-weighted
    assert "sam/sharpness" not in log  # clean and perturbed losses would be over different examples
    with torch.no_grad():
        clean = float(make_model()(**{k: v[:2] for k, v in stack(rows).items()})["loss"])
    assert log["loss"] == pytest.approx(clean, rel=1e-6)  # the loss at w, measured on the subset


def test_quarter_fraction_with_gradient_accumulation(tmp_path):
    rows, model = make_rows(16), make_model()
    halves = batches(rows, 8)
    g = [fraction_sam_gradient(model, h, 0.25) for h in halves]
    expected = [p.detach() - LR * (a + b) / 2 for p, a, b in zip(model.parameters(), *g, strict=True)]
    train(tmp_path, model, rows, sam_ascent_fraction=0.25, gradient_accumulation_steps=2)
    assert_params_close(model, expected)


def test_quarter_fraction_with_a_num_items_in_batch_model(tmp_path):
    torch.manual_seed(0)
    model = CountingNet()
    rows = [{"features": r["features"], "labels": r["target"]} for r in make_rows(16)]
    halves = [{"features": h["features"], "target": h["labels"]} for h in batches(rows, 8)]

    def window_sum(m, batch):  # the stock descent loss: summed, normalised by the window's 16 items
        return nn.functional.cross_entropy(m(**batch)["logits"], batch["target"], reduction="sum") / 16

    reference = make_model()
    g = [fraction_sam_gradient(reference, h, 0.25, descent_loss=window_sum) for h in halves]
    expected = [p.detach() - LR * (a + b) for p, a, b in zip(reference.parameters(), *g, strict=True)]
    trainer = train(
        tmp_path,
        model,
        rows,
        sam_ascent_fraction=0.25,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=8,
    )
    assert trainer.model_accepts_loss_kwargs
    assert_params_close(model, expected)
    # The logged loss: each micro-batch's subset mean, in the units of the window (8 of 16 items each).
    with torch.no_grad():
        subset_means = [float(reference(**{k: v[:2] for k, v in h.items()})["loss"]) for h in halves]
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["loss"] == pytest.approx(sum(m * 8 / 16 for m in subset_means), rel=1e-5)


def test_batchnorm_statistics_come_from_the_subsets_clean_pass(tmp_path):
    rows, model = make_rows(8), make_model(batchnorm=True)
    with torch.no_grad():
        hidden = model.fc1(stack(rows)["features"][:2])
    momentum = model.norm.momentum
    train(tmp_path, model, rows, sam_ascent_fraction=0.25)
    assert int(model.norm.num_batches_tracked) == 1
    torch.testing.assert_close(model.norm.running_mean, momentum * hidden.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        model.norm.running_var, (1 - momentum) + momentum * hidden.var(0, unbiased=True), atol=1e-6, rtol=0
    )


def test_composes_with_interval(tmp_path):
    rows, model = make_rows(16), make_model()
    reference = copy.deepcopy(model)
    for step, batch in enumerate(batches(rows, 4)):
        grads = (
            fraction_sam_gradient(reference, batch, 0.25)
            if step % 2 == 0
            else loss_and_grads(reference, batch)[1]
        )
        with torch.no_grad():
            for p, x in zip(reference.parameters(), grads, strict=True):
                p -= LR * x
    trainer = train(
        tmp_path,
        model,
        rows,
        sam_ascent_fraction=0.25,
        sam_interval=2,
        max_steps=4,
        logging_steps=4,
        per_device_train_batch_size=4,
    )
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["sam/forward_passes"] == 4 + 2 * 0.25 and log["sam/fraction_sam_steps"] == 0.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sam_ascent_fraction": 0.0}, "sam_ascent_fraction must be a fraction"),
        ({"sam_ascent_fraction": 1.5}, "sam_ascent_fraction must be a fraction"),
        ({"sam_ascent_fraction": True}, "sam_ascent_fraction must be a fraction"),
        ({"sam_ascent_fraction": 0.5, "sam_mode": "gsam"}, "cannot be combined with sam_mode='gsam'"),
        (
            {"sam_ascent_fraction": 0.5, "sam_mode": "looksam", "sam_interval": 2},
            "cannot be combined with sam_mode",
        ),
        ({"sam_ascent_fraction": 0.5, "sam_group_size": 2}, "cannot be combined with sam_group_size=2"),
        (
            {"sam_ascent_fraction": 0.5, "fsdp": True, "fsdp_config": {"version": 2}},
            "not supported under FSDP",
        ),
    ],
)
def test_unsupported_combinations_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        SAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **overrides)


def test_wrapper_loop_with_a_sliced_batch():
    """The documented custom loop: the user slices their own batch for the ascent."""
    from hf_sam import SAM

    torch.manual_seed(0)
    model, batch = TinyNet(), stack(make_rows(8))
    g = fraction_sam_gradient(model, batch, 0.25)
    expected = [p.detach() - LR * x for p, x in zip(model.parameters(), g, strict=True)]
    sam = SAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO)
    subset = {k: v[: math.ceil(0.25 * len(v))] for k, v in batch.items()}
    sam.ascent_step(model(**subset)["loss"])
    model(**batch)["loss"].backward()
    sam.descent_step()
    assert_params_close(model, expected)


def test_a_batch_without_tensors_is_refused_rather_than_trained_as_plain_sam(tmp_path):
    class ListNet(TinyNet):
        def forward(self, features, target=None):
            return super().forward(torch.stack(features), torch.stack(target))

    rows = make_rows(8)

    def collate(items):  # lists only: nothing to cut by
        return {"features": [r["features"] for r in items], "target": [r["target"] for r in items]}

    torch.manual_seed(0)
    args = make_args(tmp_path, sam_rho=RHO, sam_ascent_fraction=0.25, remove_unused_columns=False)
    trainer = SAMTrainer(model=ListNet(), args=args, train_dataset=rows, data_collator=collate)
    with pytest.raises(ValueError, match="holds no tensor with a batch dimension"):
        trainer.train()
