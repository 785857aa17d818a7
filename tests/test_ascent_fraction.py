"""`sam_ascent_fraction`: ε from ⌈f·B⌉ examples of each micro-batch drawn uniformly (seeded by the run's seed, the
step, the micro-batch and the process), the descent over all B, against hand computations on a tiny model."""

import copy
import math

import pytest
import torch
from test_trainer import LR, assert_params_close, make_args
from test_variants import batches
from torch import nn
from toy import CountingNet, TinyNet, loss_and_grads, make_model, make_rows, stack

from hf_sam import SAMTrainer, SAMTrainingArguments
from hf_sam.variants import ascent_subset, subset_generator

RHO = 0.1


def drawn(fraction, size, step, micro_batch=0, seed=0, process=0):
    """The rows the trainer's ascent pass draws at this step and micro-batch (the draw's distribution is tested in
    test_the_subset_is_uniform_over_positions)."""
    rows = {"row": torch.arange(size)}
    return ascent_subset(rows, fraction, subset_generator(seed, step, micro_batch, process))[0]["row"]


def fraction_sam_gradient(model, batch, fraction, rho=RHO, descent_loss=None, rows=None):
    """The gradient at w + ε over the whole batch, ε from the mean loss of the given rows (default: the first
    ⌈f·B⌉ examples)."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    if rows is None:
        rows = torch.arange(math.ceil(fraction * len(batch["target"])))
    _, g = loss_and_grads(model, {k: v[rows] for k, v in batch.items()}, params)
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
    subset = drawn(0.25, 8, step=0)
    g = fraction_sam_gradient(model, stack(rows), 0.25, rows=subset)
    expected = [p.detach() - LR * x for p, x in zip(model.parameters(), g, strict=True)]
    trainer = train(tmp_path, model, rows, sam_ascent_fraction=0.25)
    assert_params_close(model, expected)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["sam/forward_passes"] == 1.25 and log["sam/backward_passes"] == 1.25  # example-weighted
    assert "sam/sharpness" not in log  # clean and perturbed losses would be over different examples
    with torch.no_grad():
        clean = float(make_model()(**{k: v[subset] for k, v in stack(rows).items()})["loss"])
    assert log["loss"] == pytest.approx(clean, rel=1e-6)  # the loss at w, measured on the subset


def test_quarter_fraction_with_gradient_accumulation(tmp_path):
    rows, model = make_rows(16), make_model()
    halves = batches(rows, 8)
    g = [fraction_sam_gradient(model, h, 0.25, rows=drawn(0.25, 8, 0, i)) for i, h in enumerate(halves)]
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
    subsets = [drawn(0.25, 8, 0, i) for i in range(2)]
    g = [
        fraction_sam_gradient(reference, h, 0.25, descent_loss=window_sum, rows=r)
        for h, r in zip(halves, subsets, strict=True)
    ]
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
        subset_means = [
            float(reference(**{k: v[r] for k, v in h.items()})["loss"])
            for h, r in zip(halves, subsets, strict=True)
        ]
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["loss"] == pytest.approx(sum(m * 8 / 16 for m in subset_means), rel=1e-5)


def test_batchnorm_statistics_come_from_the_subsets_clean_pass(tmp_path):
    rows, model = make_rows(8), make_model(batchnorm=True)
    with torch.no_grad():
        hidden = model.fc1(stack(rows)["features"][drawn(0.25, 8, step=0)])
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
            fraction_sam_gradient(reference, batch, 0.25, rows=drawn(0.25, 4, step))
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


# ---------------------------------------------------------------- how the subset is drawn
def test_the_subset_is_uniform_over_positions():
    """Measured before: the first ⌈f·B⌉, i.e. always the longest examples under group_by_length."""
    size, fraction, draws = 8, 0.25, 4000
    counts = torch.zeros(size)
    for step in range(draws):
        counts[drawn(fraction, size, step)] += 1
    frequency = counts / draws
    # binomial std at f = 0.25 over 4000 draws: 0.007; six of them
    torch.testing.assert_close(frequency, torch.full((size,), fraction), atol=0.04, rtol=0)
    pairs = {tuple(drawn(fraction, size, step).tolist()) for step in range(draws)}
    assert len(pairs) == math.comb(size, 2)  # every pair of rows is drawn, not a fixed few


def test_the_draw_depends_on_step_micro_batch_process_and_seed_only():
    base = drawn(0.5, 16, step=3, micro_batch=1, seed=7, process=0)
    assert torch.equal(base, drawn(0.5, 16, step=3, micro_batch=1, seed=7, process=0))  # resume redraws it
    for other in ({"process": 1}, {"micro_batch": 0}, {"seed": 8}):
        settings = {"step": 3, "micro_batch": 1, "seed": 7, "process": 0, **other}
        assert not torch.equal(base, drawn(0.5, 16, **settings)), other


def test_resume_with_a_drawn_subset_is_exact(tmp_path):
    rows = make_rows(24)
    common = dict(
        sam_ascent_fraction=0.5,
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        train_sampling_strategy="random",
        save_strategy="steps",
        save_steps=2,
    )
    whole = train(tmp_path / "whole", make_model(dropout=0.2), rows, **common)
    resumed_model = make_model(dropout=0.2)
    args = make_args(tmp_path / "whole", **{"sam_rho": RHO, **common})
    resumed = SAMTrainer(model=resumed_model, args=args, train_dataset=rows)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / "checkpoint-2"))
    for p, q in zip(whole.model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_a_batchnorm_model_whose_subset_would_be_one_example_is_refused(tmp_path):
    """Measured before: "Expected more than 1 value per channel when training" in the middle of training."""
    args = make_args(tmp_path / "out", sam_rho=RHO, sam_ascent_fraction=0.25, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match="gives the ascent pass 1 example, which BatchNorm in train mode"):
        SAMTrainer(model=make_model(batchnorm=True), args=args, train_dataset=make_rows(8))
    assert not (tmp_path / "out").exists()


def test_a_short_last_batch_gives_batchnorm_two_examples(tmp_path):
    """10 rows in batches of 4: the last batch has 2, of which f = 0.5 would leave BatchNorm one. The stock Trainer
    trains it; so must SAM, with the ascent over both (the passes show it: 1 + 1 instead of 0.5 + 1)."""
    trainer = train(
        tmp_path,
        make_model(batchnorm=True),
        make_rows(10),
        sam_ascent_fraction=0.5,
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
    )
    passes = [e["sam/forward_passes"] for e in trainer.state.log_history if "loss" in e]
    assert passes == [1.5, 1.5, 2.0]
