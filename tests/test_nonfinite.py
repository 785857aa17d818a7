"""Non-finite losses and gradients never corrupt the weights: skipped, counted, and the run stops after N in a row."""

import copy

import pytest
import torch
from test_trainer import LR, make_args
from toy import TinyNet, make_rows, reference_sam_gradient, stack

from hf_sam import SAMTrainer
from hf_sam.sam import NonFiniteTrainingError

RHO = 0.05


class PoisonedNet(TinyNet):
    """Multiplies the loss by `poison` on the forward calls listed in `bad_calls` (0-based, counting every pass)."""

    def __init__(self, bad_calls, poison=float("nan")):
        torch.manual_seed(0)
        super().__init__()
        self.bad_calls, self.poison, self.calls = set(bad_calls), poison, 0

    def forward(self, features, target=None):
        out = super().forward(features, target)
        if self.calls in self.bad_calls:
            out["loss"] = out["loss"] * self.poison
        self.calls += 1
        return out


def sam_steps_by_hand(model, batches, skip=()):
    reference = copy.deepcopy(model)
    for step, batch in enumerate(batches):
        if step in skip:
            continue
        g_sam, _ = reference_sam_gradient(reference, batch, RHO)
        with torch.no_grad():
            for p, g in zip(reference.parameters(), g_sam, strict=True):
                p -= LR * g
    return reference


def batches(rows):
    return [stack(rows[i : i + 4]) for i in range(0, len(rows), 4)]


def test_a_nan_descent_pass_skips_that_step_and_is_counted(tmp_path):
    rows = make_rows(12)
    model = PoisonedNet(bad_calls={3})  # SAM step 1: calls 2 (ascent) and 3 (descent)
    expected = sam_steps_by_hand(model, batches(rows), skip={1})
    args = make_args(tmp_path, sam_rho=RHO, per_device_train_batch_size=4, max_steps=3, logging_steps=3)
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["sam/skipped_steps"] == 1


def test_a_skipped_step_does_not_advance_the_learning_rate_schedule(tmp_path):
    """Linear decay over 3 steps, step 1 skipped: step 2 uses the rate step 1 would have used (LR·2/3), as the
    stock Trainer does for an fp16 overflow; the scheduler has advanced once."""
    rows = make_rows(12)
    model = PoisonedNet(bad_calls={3})
    reference = copy.deepcopy(model)
    for batch, lr in ((batches(rows)[0], LR), (batches(rows)[2], LR * 2 / 3)):
        g_sam, _ = reference_sam_gradient(reference, batch, RHO)
        with torch.no_grad():
            for p, g in zip(reference.parameters(), g_sam, strict=True):
                p -= lr * g
    args = make_args(
        tmp_path, sam_rho=RHO, per_device_train_batch_size=4, max_steps=3, lr_scheduler_type="linear"
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0)
    assert trainer.lr_scheduler.last_epoch == 2  # advanced after steps 0 and 2 only


def test_consecutive_non_finite_steps_stop_the_run_keeping_the_last_good_checkpoint(tmp_path):
    rows = make_rows(16)
    model = PoisonedNet(bad_calls={3, 5})  # steps 1 and 2 are non-finite
    after_step_0 = sam_steps_by_hand(model, batches(rows)[:1])
    args = make_args(
        tmp_path,
        sam_rho=RHO,
        per_device_train_batch_size=4,
        max_steps=4,
        sam_max_nonfinite_steps=2,
        save_strategy="steps",
        save_steps=1,
    )
    with pytest.raises(NonFiniteTrainingError, match="2 consecutive optimizer steps"):
        SAMTrainer(model=model, args=args, train_dataset=rows).train()
    for p, q in zip(model.parameters(), after_step_0.parameters(), strict=True):
        torch.testing.assert_close(
            p.detach(), q.detach(), atol=1e-6, rtol=0
        )  # nothing non-finite was applied
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "checkpoint-1" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    for name, p in after_step_0.named_parameters():
        torch.testing.assert_close(saved[name], p.detach(), atol=1e-6, rtol=0)


def test_a_skipped_ascent_does_not_count_as_a_non_finite_step(tmp_path):
    rows = make_rows(12)
    model = PoisonedNet(bad_calls={0, 2, 4})  # every ascent pass is NaN: SAM degrades to SGD, nothing stops
    args = make_args(
        tmp_path,
        sam_rho=RHO,
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=3,
        sam_max_nonfinite_steps=1,
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["sam/skipped_ascents"] == 3 and log["sam/skipped_steps"] == 0


def test_fp16_overflow_is_skipped_by_the_grad_scaler_and_counted(tmp_path):
    rows = make_rows(12)
    model = PoisonedNet(bad_calls={3}, poison=float("inf"))
    expected = sam_steps_by_hand(model, batches(rows), skip={1})
    args = make_args(tmp_path, sam_rho=RHO, per_device_train_batch_size=4, max_steps=3, logging_steps=3)
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 512.0  # backed off once, as the GradScaler does
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["sam/skipped_steps"] == 1
