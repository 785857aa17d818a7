"""The Trainer internals `SAMMixin` relies on below its public hooks (`hf_sam.trainer_internals`), named in one
place: if a transformers or trl upgrade moves one of them, this file says which, before a numerical test fails
for a reason that is hard to read."""

import inspect

import pytest
from transformers import Trainer

from hf_sam import SAMMixin
from hf_sam.trainer_internals import inputs_already_prepared, loss_weighted, records_undone


def test_the_stock_step_still_prepares_its_inputs_and_divides_by_the_accumulation_steps():
    step = inspect.getsource(Trainer.training_step)
    assert callable(Trainer._prepare_inputs)
    assert "self._prepare_inputs(" in step  # hidden for the descent pass (inputs_already_prepared)
    assert "self.current_gradient_accumulation_steps" in step  # scaled for a chunk (loss_weighted)
    assert "self.current_gradient_accumulation_steps =" in inspect.getsource(Trainer)


def test_trl_still_records_what_sam_clean_pass_state_undoes():
    trl = pytest.importorskip("trl")
    recorded = {
        name
        for cls in (trl.SFTTrainer, trl.DPOTrainer)
        for name in SAMMixin.sam_clean_pass_state
        if f"self.{name}" in inspect.getsource(cls)
    }
    assert {"_metrics", "_total_train_tokens"} <= recorded


class FakeTrainer:
    sam_clean_pass_state = ("_metrics",)

    def __init__(self):
        self._metrics = {"train": {"tokens": [1]}}
        self.current_gradient_accumulation_steps = 4

    def _prepare_inputs(self, inputs):
        return {**inputs, "prepared": True}


def test_each_patch_is_undone_when_its_block_ends():
    trainer = FakeTrainer()
    with inputs_already_prepared(trainer):
        assert trainer._prepare_inputs({"x": 1}) == {"x": 1}
    assert trainer._prepare_inputs({"x": 1}) == {"x": 1, "prepared": True}
    with loss_weighted(trainer, 0.5):
        assert trainer.current_gradient_accumulation_steps == 8
    assert trainer.current_gradient_accumulation_steps == 4
    with records_undone(trainer):
        trainer._metrics["train"]["tokens"].append(2)
    assert trainer._metrics == {"train": {"tokens": [1]}}
