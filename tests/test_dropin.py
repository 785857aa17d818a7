"""The confirmed drop-in defects of issue 11, each against an independent reference (a hand-computed SAM step, a
closed form or the stock Trainer). Every test here failed on the code before its fix."""

import copy
import io
import pickle

import pytest
import torch
from test_nonfinite import PoisonedNet
from test_trainer import LR, assert_params_close, make_args, params_of
from test_variants import assert_same_weights, batches, flat_dot, flat_norm, sgd_
from torch import nn
from toy import (
    CountingNet,
    TinyNet,
    loss_and_grads,
    make_model,
    make_rows,
    reference_sam_gradient,
    stack,
    tiny_efficientnet,
)
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_sam import SAM, SAMTrainer, SAMTrainingArguments
from hf_sam.batchnorm import freeze_batchnorm

RHO = 0.1


def hand_sam_step(model, batch, rho=RHO, lr=LR):
    """The weights after one SGD step with the SAM gradient, written out by hand."""
    g_sam, _ = reference_sam_gradient(model, batch, rho)
    return [p.detach() - lr * g for p, g in zip(model.parameters(), g_sam, strict=True)]


def sam_logs(trainer):
    return [
        {k: v for k, v in e.items() if k.startswith("sam/")} for e in trainer.state.log_history if "loss" in e
    ]


# ---------------------------------------------------------------- 1. model_init: every train() is SAM
def test_model_init_every_train_call_takes_the_hand_sam_step(tmp_path):
    rows = make_rows(8)
    expected = hand_sam_step(make_model(), stack(rows))
    trainer = SAMTrainer(
        model_init=lambda: make_model(), args=make_args(tmp_path, sam_rho=RHO), train_dataset=rows
    )
    for _ in range(2):
        trainer.train()
        assert_params_close(trainer.model, expected)
        assert sam_logs(trainer)[-1]["sam/grad_norm"] > 0


def test_model_init_batchnorm_statistics_move_once_per_micro_batch_in_every_train_call(tmp_path):
    rows = make_rows(8)
    trainer = SAMTrainer(
        model_init=lambda: make_model(batchnorm=True),
        args=make_args(tmp_path, sam_rho=RHO),
        train_dataset=rows,
    )
    for _ in range(2):
        trainer.train()
        assert int(trainer.model.norm.num_batches_tracked) == 1


def test_hyperparameter_search_every_trial_is_sam(tmp_path):
    pytest.importorskip("optuna")
    rows = make_rows(8)
    initial = make_model()

    class FirstStep(TrainerCallback):
        seen = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                self.seen.append((args.learning_rate, params_of(model)))

    trainer = SAMTrainer(
        model_init=lambda: copy.deepcopy(initial),
        args=make_args(tmp_path, sam_rho=RHO),
        train_dataset=rows,
        eval_dataset=rows,
        callbacks=[FirstStep()],
    )
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 0.05, 0.5)},
        backend="optuna",
        n_trials=2,
        compute_objective=lambda metrics: 0.0,
    )
    assert len(FirstStep.seen) == 2
    for lr, weights in FirstStep.seen:
        for p, q in zip(weights, hand_sam_step(initial, stack(rows), lr=lr), strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- 2. LookSAM: a non-finite SAM step stores nothing
def _looksam_reference(model, batch_list, skip_first, alpha=0.7):
    """LookSAM by hand: steps in `skip_first` are not applied and store no g_v; then SAM until a g_v exists."""
    reference, g_v = copy.deepcopy(model), None
    for step, batch in enumerate(batch_list):
        if step == 0 and skip_first:
            continue
        _, g = loss_and_grads(reference, batch)
        if g_v is None:
            g_s, _ = reference_sam_gradient(reference, batch, RHO)
            c = flat_dot(g_s, g) / flat_dot(g, g)
            g_v = [a - c * b for a, b in zip(g_s, g, strict=True)]
            update = g_s
        else:
            update = [a + alpha * flat_norm(g) / flat_norm(g_v) * v for a, v in zip(g, g_v, strict=True)]
        sgd_(reference, update)
    return reference


def test_looksam_a_nan_sam_step_does_not_poison_the_stored_direction(tmp_path):
    rows = make_rows(12)
    model = PoisonedNet(bad_calls={1})  # step 0's descent pass: its SAM gradient is NaN
    reference = _looksam_reference(PoisonedNet(bad_calls=()), batches(rows, 4), skip_first=True)
    args = make_args(
        tmp_path, sam_rho=RHO, sam_mode="looksam", sam_interval=5, per_device_train_batch_size=4, max_steps=3
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()  # used to stop with NonFiniteTrainingError: every reuse step added NaN
    assert_same_weights(model, reference)
    assert sum(e["sam/skipped_steps"] for e in sam_logs(trainer)) == 1


def test_looksam_one_fp16_overflow_backs_the_loss_scale_off_once(tmp_path):
    rows = make_rows(20)
    model = PoisonedNet(bad_calls={1}, poison=float("inf"))
    args = make_args(
        tmp_path, sam_rho=RHO, sam_mode="looksam", sam_interval=5, per_device_train_batch_size=4, max_steps=5
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    trainer.train()
    assert (
        trainer.accelerator.scaler.get_scale() == 512.0
    )  # was 32: the inf direction overflowed 4 more steps


# ---------------------------------------------------------------- 3. schedule-free optimizers
def test_schedule_free_sgd_takes_the_sam_step_in_train_mode(tmp_path):
    pytest.importorskip("schedulefree")
    rows, model = make_rows(8), make_model()
    args = make_args(
        tmp_path, sam_rho=RHO, optim="schedule_free_sgd", max_steps=2, per_device_train_batch_size=4
    )
    reference = copy.deepcopy(model)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, reference)
    optimizer = cls(reference.parameters(), **kwargs)
    optimizer.train()
    for batch in batches(rows, 4):
        g_sam, _ = reference_sam_gradient(reference, batch, RHO)
        for p, g in zip(reference.parameters(), g_sam, strict=True):
            p.grad = g.clone()
        optimizer.step()
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()  # used to fail: "Optimizer was not in train mode when step is called"
    trainer.optimizer.train()  # compare the iterates the gradients are taken at (train mode) on both sides
    assert_same_weights(model, reference)


# ---------------------------------------------------------------- 4. m-sharpness with a compute_loss override
class OwnLoss(SAMTrainer):
    """The documented extension point: a compute_loss that does not call super()."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]


def test_group_size_with_a_compute_loss_override_averages_the_chunks(tmp_path):
    rows, model = make_rows(8), make_model()
    chunks = batches(rows, 2)
    g = [reference_sam_gradient(model, c, RHO)[0] for c in chunks]
    expected = [p.detach() - LR * sum(gs) / len(gs) for p, *gs in zip(model.parameters(), *g, strict=True)]
    OwnLoss(model=model, args=make_args(tmp_path, sam_rho=RHO, sam_group_size=2), train_dataset=rows).train()
    assert_params_close(model, expected)


# ---------------------------------------------------------------- 5. parameters the forward never uses
class WithSpare(TinyNet):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__()
        self.spare = nn.Linear(3, 3)  # an expert no example is routed to, a head of another task


@pytest.mark.parametrize(
    "overrides",
    [{}, {"sam_mode": "gsam"}, {"sam_mode": "looksam", "sam_interval": 2}],
    ids=["sam", "gsam", "looksam"],
)
def test_parameters_the_forward_never_used_are_not_stepped(tmp_path, overrides):
    rows, model = make_rows(12), WithSpare()
    spare = params_of(model.spare)
    args = make_args(
        tmp_path,
        sam_rho=RHO,
        optim="adamw_torch",
        weight_decay=0.1,
        per_device_train_batch_size=4,
        max_steps=3,
        **overrides,
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    for p, q in zip(model.spare.parameters(), spare, strict=True):
        assert torch.equal(p.detach(), q)
        assert p not in trainer.optimizer.state or not trainer.optimizer.state[p]


# ---------------------------------------------------------------- 6./7. the SAM wrapper in custom loops
def test_wrapper_with_grad_scaler_restores_w_when_the_scaler_skips_the_step():
    torch.manual_seed(0)
    model, rows = TinyNet(), make_rows(8)
    batch = stack(rows)
    w = params_of(model)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)

    scaler.scale(model(**batch)["loss"]).backward()
    sam.ascent_step()
    scaler.scale(model(**batch)["loss"] * float("inf")).backward()  # the descent pass overflows
    scaler.step(sam)
    scaler.update()
    sam.zero_grad()
    assert scaler.get_scale() == 512.0
    for p, q in zip(model.parameters(), w, strict=True):
        assert torch.equal(p.detach(), q)  # w, not w + ε

    expected = hand_sam_step(model, batch)
    scaler.scale(model(**batch)["loss"]).backward()
    sam.ascent_step()  # used to raise "already perturbed"
    scaler.scale(model(**batch)["loss"]).backward()
    scaler.step(sam)
    scaler.update()
    assert_params_close(model, expected, atol=1e-6)


def test_wrapper_ascent_step_from_the_loss_works_under_accelerator_accumulate():
    from accelerate import Accelerator

    torch.manual_seed(0)
    model, rows = TinyNet(), make_rows(8)
    halves = batches(rows, 4)
    g = [reference_sam_gradient(model, h, RHO)[0] for h in halves]
    expected = [p.detach() - LR * (a + b) / 2 for p, a, b in zip(model.parameters(), *g, strict=True)]

    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO)
    loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=stack)
    model, optimizer, loader = accelerator.prepare(model, sam, loader)
    for batch in loader:
        with accelerator.accumulate(model):
            sam.ascent_step(model(**batch)["loss"])  # ε from this micro-batch alone; .grad untouched
            accelerator.backward(model(**batch)["loss"])  # gradient at w + ε, accumulated
            sam.restore()
            optimizer.step()
            optimizer.zero_grad()
    assert_params_close(model, expected, atol=1e-6)


# ---------------------------------------------------------------- 8. sam/grad_norm in one unit
def _mean_loss_grad_norm(model, batch):
    return float(flat_norm(loss_and_grads(model, batch)[1]))


def test_logged_grad_norm_is_that_of_the_micro_batch_mean_loss_under_accumulation(tmp_path):
    torch.manual_seed(0)
    model = CountingNet()
    rows = [{"features": r["features"], "labels": r["target"]} for r in make_rows(8)]
    halves = batches(rows, 4)
    plain = make_model()
    expected = sum(
        _mean_loss_grad_norm(plain, {"features": h["features"], "target": h["labels"]}) for h in halves
    )
    args = make_args(tmp_path, sam_rho=RHO, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    assert sam_logs(trainer)[0]["sam/grad_norm"] == pytest.approx(expected / 2, rel=1e-5)  # was half of it


def test_logged_grad_norm_does_not_carry_the_fp16_loss_scale(tmp_path):
    rows, model = make_rows(8), make_model()
    expected = _mean_loss_grad_norm(model, stack(rows))
    trainer = SAMTrainer(model=model, args=make_args(tmp_path, sam_rho=RHO), train_dataset=rows)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    trainer.train()
    assert sam_logs(trainer)[0]["sam/grad_norm"] == pytest.approx(expected, rel=1e-5)  # was 1024x


# ---------------------------------------------------------------- 9. telemetry after resume and a second train()
def _resume_args(path, **overrides):
    return make_args(
        path,
        sam_rho=RHO,
        per_device_train_batch_size=4,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        train_sampling_strategy="random",
        **overrides,
    )


@pytest.mark.parametrize("overrides", [{}, {"sam_interval": 2}], ids=["sam", "interval"])
def test_resumed_run_logs_exactly_what_the_uninterrupted_run_logs(tmp_path, overrides):
    rows, initial = make_rows(16), make_model(dropout=0.2)
    straight = SAMTrainer(
        model=copy.deepcopy(initial), args=_resume_args(tmp_path / "a", **overrides), train_dataset=rows
    )
    straight.train()
    resumed = SAMTrainer(
        model=copy.deepcopy(initial), args=_resume_args(tmp_path / "a", **overrides), train_dataset=rows
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    # (The resumed history starts with the checkpoint's entries for steps 1-2, then logs steps 3-4 itself.)
    assert sam_logs(resumed) == sam_logs(straight)
    assert [e["loss"] for e in resumed.state.log_history if "loss" in e] == [
        e["loss"] for e in straight.state.log_history if "loss" in e
    ]


def test_a_second_train_call_logs_the_fraction_of_its_own_steps(tmp_path):
    rows = make_rows(8)
    args = make_args(tmp_path, sam_rho=RHO, max_steps=4, logging_steps=2)
    trainer = SAMTrainer(model=make_model(), args=args, train_dataset=rows)
    fractions = []
    for _ in range(2):
        trainer.train()
        fractions += [e["sam/fraction_sam_steps"] for e in sam_logs(trainer)]
    assert fractions == [1.0] * 4  # the second run's first window used to divide by steps of the first run


# ---------------------------------------------------------------- 10. m-sharpness and BatchNorm statistics
def test_group_size_moves_batchnorm_statistics_once_per_micro_batch(tmp_path):
    rows, model = make_rows(8), make_model(batchnorm=True)
    chunks = batches(rows, 2)
    with torch.no_grad():
        hidden = [model.fc1(c["features"]) for c in chunks]
    momentum = model.norm.momentum
    # One update with the chunks' statistics averaged, as the released code averages per-device statistics.
    expected_mean = momentum * torch.stack([h.mean(0) for h in hidden]).mean(0)
    expected_var = (1 - momentum) + momentum * torch.stack([h.var(0, unbiased=True) for h in hidden]).mean(0)
    SAMTrainer(
        model=model, args=make_args(tmp_path, sam_rho=RHO, sam_group_size=2), train_dataset=rows
    ).train()
    assert int(model.norm.num_batches_tracked) == 1  # was 4: one update per chunk
    torch.testing.assert_close(model.norm.running_mean, expected_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.norm.running_var, expected_var, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- 11. frozen BatchNorm survives pickling
def test_frozen_batchnorm_model_round_trips_through_torch_save():
    model = make_model(batchnorm=True)
    freeze_batchnorm(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).train()
    assert not loaded.norm.training and loaded.fc1.training
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model))).train()
    assert not clone.norm.training


# ---------------------------------------------------------------- 12. rho = 0 is the stock Trainer when asked
def test_rho_zero_without_the_loss_fix_is_the_stock_trainer_for_efficientnet(tmp_path):
    stock = tiny_efficientnet()
    ours = copy.deepcopy(stock)
    g = torch.Generator().manual_seed(0)
    rows = [
        {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": torch.tensor(i % 3)} for i in range(8)
    ]
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    Trainer(
        model=stock, args=make_args(tmp_path / "s", cls=TrainingArguments, **common), train_dataset=rows
    ).train()
    SAMTrainer(
        model=ours,
        args=make_args(tmp_path / "o", sam_rho=0.0, sam_fix_loss_normalization=False, **common),
        train_dataset=rows,
    ).train()
    for p, q in zip(stock.state_dict().values(), ours.state_dict().values(), strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- 13. the callback list is the stock one
def test_callback_list_is_the_stock_trainers(tmp_path):
    rows = make_rows(8)
    stock = Trainer(
        model=make_model(), args=make_args(tmp_path / "s", cls=TrainingArguments), train_dataset=rows
    )
    ours = SAMTrainer(model=make_model(), args=make_args(tmp_path / "o", sam_rho=RHO), train_dataset=rows)
    assert [type(c) for c in ours.callback_handler.callbacks] == [
        type(c) for c in stock.callback_handler.callbacks
    ]


def test_sam_training_arguments_accept_the_loss_fix_field(tmp_path):
    assert make_args(tmp_path).sam_fix_loss_normalization is True
    assert isinstance(make_args(tmp_path, sam_fix_loss_normalization=False), SAMTrainingArguments)


# ---------------------------------------------------------------- suspected items, found out
class OutOfMemoryOnce(TinyNet):
    """Raises the allocator's out-of-memory error on one forward call (1-based), as a too-large batch would."""

    def __init__(self, at_call: int):
        torch.manual_seed(0)
        super().__init__()
        self.calls, self.at_call = 0, at_call

    def forward(self, features, target=None):
        self.calls += 1
        if self.calls == self.at_call:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (simulated)")
        return super().forward(features, target)


def test_auto_find_batch_size_retry_starts_the_window_afresh(tmp_path):
    """GSAM keeps the clean gradient of the window; an out-of-memory error in the first micro-batch's descent pass
    (weights perturbed, clean gradient already added) is retried at a smaller batch from a clean slate."""
    rows, alpha = make_rows(8), 0.3
    model = OutOfMemoryOnce(at_call=2)
    args = make_args(
        tmp_path,
        sam_rho=RHO,
        sam_mode="gsam",
        sam_gsam_alpha=alpha,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        auto_find_batch_size=True,
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    size = trainer.state.train_batch_size  # the retry's batch (accelerate shrinks it by its own rule)
    assert size < 4
    halves = batches(rows[: 2 * size], size)  # the step: two micro-batches of the retry's size
    reference = make_model()
    g = [(a + b) / 2 for a, b in zip(*(loss_and_grads(reference, h)[1] for h in halves), strict=True)]
    g_s = [
        (a + b) / 2
        for a, b in zip(*(reference_sam_gradient(reference, h, RHO)[0] for h in halves), strict=True)
    ]
    unit = [x / flat_norm(g_s) for x in g_s]
    residual = [a - flat_dot(g, unit) * u for a, u in zip(g, unit, strict=True)]
    expected = [
        p.detach() - LR * (s - alpha * r)
        for p, s, r in zip(reference.parameters(), g_s, residual, strict=True)
    ]
    assert_params_close(model, expected)
    assert sam_logs(trainer)[0]["sam/forward_passes"] == 4  # the failed attempt's passes are not counted


class WithMetadata(TinyNet):
    """A batch field that is a list with one entry per example (detection targets are lists of dicts)."""

    def forward(self, features, target=None, meta=None):
        if meta is not None and len(meta) != features.shape[0]:
            raise ValueError(f"{len(meta)} metadata entries for {features.shape[0]} examples")
        return super().forward(features, target)


def test_group_size_cuts_list_fields_with_the_tensors(tmp_path):
    rows = make_rows(8)
    torch.manual_seed(0)
    model = WithMetadata()
    g = [reference_sam_gradient(make_model(), c, RHO)[0] for c in batches(rows, 2)]
    expected = [p.detach() - LR * sum(gs) / len(gs) for p, *gs in zip(model.parameters(), *g, strict=True)]
    data = [{**r, "meta": {"id": i}} for i, r in enumerate(rows)]

    def collate(items):
        return {
            **stack([{k: v for k, v in r.items() if k != "meta"} for r in items]),
            "meta": [r["meta"] for r in items],
        }

    args = make_args(tmp_path, sam_rho=RHO, sam_group_size=2, remove_unused_columns=False)
    SAMTrainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
    assert_params_close(model, expected)


def test_a_users_log_call_starts_no_collective(tmp_path, monkeypatch):
    trainer = SAMTrainer(
        model=make_model(), args=make_args(tmp_path, sam_rho=RHO), train_dataset=make_rows(8)
    )
    trainer.train()

    def no_collective(*args, **kwargs):
        raise AssertionError("log() ran a collective outside the Trainer's training log")

    monkeypatch.setattr(trainer.accelerator, "reduce", no_collective)
    trainer.log({"loss": 1.0})  # e.g. from one rank's callback: would hang the others under DDP
    assert not any(k.startswith("sam/") for k in trainer.state.log_history[-1])


def test_context_parallelism_is_refused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hf_sam.setup_checks import check_accelerator

    trainer = SAMTrainer(
        model=make_model(), args=make_args(tmp_path, sam_rho=RHO), train_dataset=make_rows(8)
    )
    context_parallel = SimpleNamespace(cp_enabled=True, sp_enabled=False)
    monkeypatch.setattr(
        type(trainer.accelerator), "parallelism_config", property(lambda self: context_parallel)
    )
    with pytest.raises(ValueError, match="context or sequence parallelism"):
        check_accelerator(trainer)
