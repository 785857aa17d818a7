"""The one-pass variants (`sam_mode="momentum"`, `"previous_gradient"`): nobody reads the weights at the look-ahead
point, whatever ends an accumulation window; no copy of the weights; BatchNorm; a user's own wrapper.

The reference for "the weights anyone reads" is independent of the look-ahead: the weights a callback records at
the last optimizer step's end (the optimizer's w), or the initial weights before the first step. The look-ahead is
left by subtracting ε, so w comes back within float32 rounding: a few ulps, against ρ-sized distances (0.1-3)
when the weights are read at the look-ahead point."""

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import make_args
from toy import TinyNet, make_model, make_rows
from transformers import TrainerCallback

from hf_sam import SAM, SAMTrainer
from hf_sam.batchnorm import freeze_batchnorm

RHO, MU = 0.5, 0.9
ATOL = 1e-6  # float32 rounding of the add-then-subtract round trip, over a few micro-batches
MODES = ["momentum", "previous_gradient"]


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _distance(model, weights):
    return max(float((p.detach() - q).abs().max()) for p, q in zip(model.parameters(), weights, strict=True))


class ReadsAtW(TrainerCallback):
    """Every place a callback, an evaluation or a checkpoint reads the model: how far it is from w."""

    def __init__(self, initial):
        self.w, self.readings, self.history = initial, [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.w = _weights(model)
        self.history.append(self.w)

    def _read(self, event, model):
        self.readings.append((event, _distance(model, self.w)))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._read("evaluate", model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._read("epoch_end", model)

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._read("substep_end", model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._read("save", model)
        saved = load_file(f"{args.output_dir}/checkpoint-{state.global_step}/model.safetensors")
        names = [n for n, _ in model.named_parameters()]
        self.readings.append(("checkpoint", _distance_of([saved[n] for n in names], self.w)))


def _distance_of(tensors, weights):
    return max(float((a - b).abs().max()) for a, b in zip(tensors, weights, strict=True))


def _settings(mode, **overrides):
    return {"sam_rho": RHO, "sam_mode": mode, "optim_args": f"momentum={MU}", **overrides}


class Rows(torch.utils.data.IterableDataset):
    """12 rows an epoch: 3 micro-batches of 4, so at gradient_accumulation_steps=2 every odd epoch ends mid-window."""

    def __init__(self):
        self.rows = make_rows(12)

    def __iter__(self):
        return iter(self.rows)


@pytest.mark.parametrize("mode", MODES)
def test_an_iterable_epoch_that_ends_mid_window_is_evaluated_and_saved_at_w(tmp_path, mode):
    model = make_model()
    reads = ReadsAtW(_weights(model))
    args = make_args(
        tmp_path, max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        eval_strategy="epoch", save_strategy="epoch", **_settings(mode),
    )  # fmt: skip
    trainer = SAMTrainer(
        model=model, args=args, train_dataset=Rows(), eval_dataset=make_rows(4), callbacks=[reads]
    )
    trainer.train()
    events = {event for event, _ in reads.readings}
    assert {"evaluate", "epoch_end", "save", "checkpoint", "substep_end"} <= events
    assert all(distance < ATOL for _, distance in reads.readings), reads.readings
    assert _distance(model, reads.w) < ATOL  # after train() returns


class StopMidWindow(TrainerCallback):
    def on_substep_end(self, args, state, control, **kwargs):
        if state.global_step >= 2:  # a wall-clock or preemption callback
            control.should_training_stop = True


@pytest.mark.parametrize("mode", MODES)
def test_a_stop_mid_window_leaves_the_model_and_save_model_at_w(tmp_path, mode):
    model = make_model()
    reads = ReadsAtW(_weights(model))
    args = make_args(tmp_path, max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                     **_settings(mode))  # fmt: skip
    trainer = SAMTrainer(
        model=model, args=args, train_dataset=make_rows(64), callbacks=[reads, StopMidWindow()]
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert _distance(model, reads.w) < ATOL
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert _distance_of([saved[n] for n, _ in model.named_parameters()], reads.w) < ATOL


class RaiseAt:
    """A collator that raises (e.g. a KeyboardInterrupt) at its `at`-th call: between two micro-batches."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, rows):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("mode", MODES)
def test_an_exception_mid_window_leaves_w_and_a_second_train_starts_from_it(tmp_path, mode):
    model = make_model()
    reads = ReadsAtW(_weights(model))
    # The Trainer fetches a window's micro-batches before running them: raise while fetching window 3.
    collator = RaiseAt(at=6)
    args = make_args(tmp_path, max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                     dataloader_prefetch_factor=None, **_settings(mode))  # fmt: skip
    trainer = SAMTrainer(model=model, args=args, train_dataset=make_rows(64), data_collator=collator,
                         callbacks=[reads])  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.state.global_step == 2 and _distance(model, reads.w) < ATOL
    collator.at = 0  # never again
    trainer.train()
    assert trainer.state.global_step == 4 and _distance(model, reads.w) < ATOL
    assert all(distance < ATOL for _, distance in reads.readings)


@pytest.mark.parametrize("mode", MODES)
def test_load_best_model_at_end_and_model_init_trials_read_w(tmp_path, mode):
    reads = ReadsAtW(None)

    def model_init():
        model = make_model()
        reads.w = _weights(model)
        return model

    args = make_args(
        tmp_path, max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=4, eval_strategy="steps",
        eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True, label_names=["target"],
        **_settings(mode),
    )  # fmt: skip
    trainer = SAMTrainer(model_init=model_init, args=args, train_dataset=make_rows(32), eval_dataset=make_rows(8),
                         callbacks=[reads])  # fmt: skip
    for _ in range(2):  # a second trial builds a new model
        trainer.train()
        assert all(distance < ATOL for _, distance in reads.readings), reads.readings
    best = load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    names = [n for n, _ in trainer.model.named_parameters()]
    assert _distance(trainer.model, [best[n] for n in names]) == 0


# ---------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("mode", MODES)
def test_train_mode_batchnorm_is_refused_with_the_fix_and_frozen_batchnorm_trains(tmp_path, mode):
    """The step's only forward is at the look-ahead point: train-mode BatchNorm would keep its statistics there."""
    model = make_model(batchnorm=True)
    with pytest.raises(ValueError, match="freeze_batchnorm.*sam_mode='sam'"):
        SAMTrainer(model=model, args=make_args(tmp_path, **_settings(mode)), train_dataset=make_rows(16))
    freeze_batchnorm(model)
    statistics = model.norm.running_mean.clone()
    SAMTrainer(
        model=model, args=make_args(tmp_path, max_steps=3, **_settings(mode)), train_dataset=make_rows(32)
    ).train()
    assert torch.equal(model.norm.running_mean, statistics)


# ---------------------------------------------------------------- a user's own wrapper
def test_a_users_wrapper_whose_mode_does_not_match_is_refused(tmp_path):
    model = make_model()
    optimizer = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=MU), rho=RHO)  # mode="sam"
    args = make_args(tmp_path, max_steps=2, **_settings("momentum"))
    trainer = SAMTrainer(model=model, args=args, train_dataset=make_rows(16), optimizers=(optimizer, None))
    before = _weights(model)
    with pytest.raises(ValueError, match="SAM\\(mode='sam'\\).*needs mode='momentum'"):
        trainer.train()
    assert _distance(model, before) == 0


class Recording(TinyNet):
    """Records its weights at every training forward: the point the gradient is taken at."""

    def forward(self, features, target=None):
        if self.training and torch.is_grad_enabled():
            self.seen.append(_weights(self))
        return super().forward(features, target)


@pytest.mark.parametrize("mode", MODES)
def test_a_users_wrapper_with_per_group_rho_perturbs_each_group_by_its_own(tmp_path, mode):
    """ρ = 0 for the head (fc2): its weights are w in every pass; fc1 moves by ρ along its share of the direction."""
    torch.manual_seed(0)
    model = Recording()
    model.seen = []
    groups = [{"params": list(model.fc1.parameters())}, {"params": list(model.fc2.parameters()), "rho": 0.0}]
    wrapper_mode = "momentum" if mode == "momentum" else "sam"
    optimizer = SAM(torch.optim.SGD(groups, lr=0.1, momentum=MU), rho=RHO, mode=wrapper_mode)
    reads = ReadsAtW(_weights(model))
    args = make_args(tmp_path, max_steps=3, **_settings(mode))
    SAMTrainer(model=model, args=args, train_dataset=make_rows(32), optimizers=(optimizer, None),
               callbacks=[reads]).train()  # fmt: skip
    assert len(model.seen) == 3
    last, w = model.seen[-1], reads.history[1]  # step 3's pass looks ahead from the weights at step 2's end
    head = slice(2, 4)
    assert all(torch.equal(a, b) for a, b in zip(last[head], w[head], strict=True))
    body_move = sum(float(((a - b) ** 2).sum()) for a, b in zip(last[:2], w[:2], strict=True)) ** 0.5
    assert 0 < body_move <= RHO + 1e-6


# ---------------------------------------------------------------- one wrapper, however often the optimizer is made
@pytest.mark.parametrize("mode", MODES)
def test_a_second_train_wraps_the_optimizer_once(tmp_path, mode):
    """The stock create_optimizer hands a second train() (or an auto_find_batch_size retry) the optimizer the first
    built, Accelerate's wrapper around SAM: it is not wrapped again."""
    args = make_args(tmp_path, max_steps=2, **_settings(mode))
    trainer = SAMTrainer(model=make_model(), args=args, train_dataset=make_rows(32))
    trainer.train()
    trainer.train()
    wrappers, optimizer = [], trainer.optimizer
    while optimizer is not None:
        wrappers += [optimizer] if isinstance(optimizer, SAM) else []
        optimizer = getattr(optimizer, "optimizer", None)
    assert len(wrappers) == 1 and wrappers[0].mode == ("momentum" if mode == "momentum" else "sam")
