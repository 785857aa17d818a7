"""A parent Trainer that prepares its inputs (`_prepare_inputs`) or transforms its batch (`training_step`) in its
own way: both SAM passes see the batch the parent trains on, or the combination is refused at construction.

The reference is the stock Trainer's plain SAM step (`NaiveSAMTrainer`) on data that already holds what the
parent's hook would make of it (features doubled), so it needs neither hook."""

import pytest
import torch
from test_compat_matrix import RHO, NaiveSAMTrainer, numbers
from test_trainer import make_args
from toy import make_model, make_rows
from transformers import Trainer, TrainingArguments

from hf_sam import SAMMixin, SAMTrainer, SAMTrainingArguments


def doubled(rows):
    return [{"features": 2 * r["features"], "target": r["target"]} for r in rows]


class DoublingPreparation(Trainer):
    """A preparation that is not idempotent: prepared twice, the features would be quadrupled."""

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        return {**inputs, "features": 2 * inputs["features"]}


class SAMDoublingPreparation(SAMMixin, DoublingPreparation):
    pass


def augment(inputs):
    return {**inputs, "features": 2 * inputs["features"]}


class AugmentingStep(Trainer):
    """A user's training_step that transforms the batch, then takes the stock step."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        return super().training_step(model, augment(inputs), num_items_in_batch)


class SAMOverAugmentingStep(SAMMixin, AugmentingStep):  # the override sits below SAM: refused
    pass


class AugmentingSAMTrainer(SAMTrainer):  # the ordering that works: the override calls SAM's step
    def training_step(self, model, inputs, num_items_in_batch=None):
        return super().training_step(model, augment(inputs), num_items_in_batch)


def run(tmp_path, trainer_cls, args_cls, rows, **overrides):
    settings = {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 3,
        **overrides,
    }
    trainer = trainer_cls(
        model=make_model(), args=make_args(tmp_path, cls=args_cls, **settings), train_dataset=rows
    )
    trainer.train()
    return trainer


def assert_same_weights(a, b, atol):
    for (n, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        torch.testing.assert_close(q, p, atol=atol, rtol=0, msg=n)


def test_inputs_are_prepared_once_for_both_passes(tmp_path):
    rows = make_rows(n=12)
    stock = run(tmp_path / "stock", DoublingPreparation, TrainingArguments, rows)
    zero = run(tmp_path / "zero", SAMDoublingPreparation, SAMTrainingArguments, rows, sam_rho=0.0)
    assert numbers(zero.state.log_history) == numbers(stock.state.log_history)
    assert_same_weights(stock, zero, atol=0)
    reference = run(tmp_path / "naive", NaiveSAMTrainer, TrainingArguments, doubled(rows))
    ours = run(tmp_path / "ours", SAMDoublingPreparation, SAMTrainingArguments, rows, sam_rho=RHO)
    assert_same_weights(reference, ours, atol=1e-6)


def test_a_training_step_override_below_the_mixin_is_refused_with_the_ordering_that_works(tmp_path):
    args = SAMTrainingArguments(output_dir=str(tmp_path / "out"), sam_rho=RHO, use_cpu=True, report_to=[])
    with pytest.raises(
        ValueError, match=r"AugmentingStep.training_step overrides the stock step below SAMMixin"
    ):
        SAMOverAugmentingStep(model=make_model(), args=args, train_dataset=make_rows())
    with pytest.raises(ValueError, match=r"`class AugmentingStep\(SAMTrainer\)`"):
        SAMOverAugmentingStep(model=make_model(), args=args, train_dataset=make_rows())
    assert not (tmp_path / "out").exists()
    # ρ = 0 is the parent, whatever it overrides
    stock = run(tmp_path / "stock", AugmentingStep, TrainingArguments, make_rows(n=12))
    zero = run(tmp_path / "zero", SAMOverAugmentingStep, SAMTrainingArguments, make_rows(n=12), sam_rho=0.0)
    assert_same_weights(stock, zero, atol=0)


def test_a_training_step_override_above_sam_gives_both_passes_the_transformed_batch(tmp_path):
    """Measured before: ε from the raw batch, the descent on the transformed one, 4.4e-3 away from SAM."""
    rows = make_rows(n=12)
    reference = run(tmp_path / "naive", NaiveSAMTrainer, TrainingArguments, doubled(rows))
    ours = run(tmp_path / "ours", AugmentingSAMTrainer, SAMTrainingArguments, rows, sam_rho=RHO)
    assert_same_weights(reference, ours, atol=1e-6)


def test_settings_changed_after_construction_are_checked_before_the_first_sam_step(tmp_path):
    """A hyperparameter trial sets sam_rho (and the variants) on a trainer built at sam_rho=0, which skipped the
    construction checks: they run again before the run's first SAM step, and nothing is trained."""
    args = SAMTrainingArguments(
        output_dir=str(tmp_path / "out"), sam_rho=0.0, max_steps=2, use_cpu=True, report_to=[]
    )
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = SAMOverAugmentingStep(model=model, args=args, train_dataset=make_rows())
    trainer.args.sam_rho = RHO  # what a trial does
    with pytest.raises(
        ValueError, match="AugmentingStep.training_step overrides the stock step below SAMMixin"
    ):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
