"""SharpnessCallback inside a real SAMTrainer run: the right keys at the right steps, right values, no side effects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from hf_sam import SAMTrainer, SAMTrainingArguments
from hf_sam.callbacks import SharpnessCallback
from hf_sam.sharpness import hessian_eigenvalues, m_sharpness
from tests.test_sharpness import dense_hessian_eigenvalues
from tests.toy import make_model, make_rows, stack


class Recorder(TrainerCallback):
    """Stands for a `report_to` backend: it sees exactly what `on_log` hands to the integrations."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def train(tmp_path, rows, callback_kwargs=None, max_steps=5):
    args = SAMTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        logging_steps=2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        sam_rho=0.1,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SAMTrainer(model=make_model(), args=args, train_dataset=rows)
    recorder = Recorder()
    if callback_kwargs is not None:
        trainer.add_callback(SharpnessCallback(trainer, **callback_kwargs))
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder


def test_callback_logs_at_every_n_steps_and_at_the_end_without_changing_training(tmp_path):
    rows = make_rows(n=16, seed=1)
    # num_examples >= len(dataset): the slice is the whole training set, so a reference can be computed on it.
    kwargs = dict(every_n_steps=2, num_examples=32, batch_size=8, m=4, top_k=3, max_iter=40)
    trainer, recorder = train(tmp_path / "with", rows, kwargs)

    sharp = [(step, logs) for step, logs in recorder.logs if "sharpness/lambda_max" in logs]
    assert [step for step, _ in sharp] == [2, 4, 5]  # every 2 steps, then the end of training (step 5)
    expected_keys = {
        "sharpness/lambda_max",
        "sharpness/m_sharpness",
        "sharpness/loss",
        "sharpness/lambda_3",
        "sharpness/lambda_max_over_lambda_3",
    }
    assert all(expected_keys <= set(logs) for _, logs in sharp)
    # The Trainer's own loss log at steps 2 and 4 is still there (logging there runs trainer.log() too).
    assert [step for step, logs in recorder.logs if "loss" in logs] == [2, 4]
    assert sum("sharpness/lambda_max" in entry for entry in trainer.state.log_history) == 3

    # Final values against independent references on the final weights: the dense Hessian of the full-data
    # loss, and m-sharpness (itself checked against closed forms in test_sharpness.py) with m=4, ρ = sam_rho.
    final = sharp[-1][1]
    batch = stack(rows)
    dense = dense_hessian_eigenvalues(trainer.model, batch).tolist()
    np.testing.assert_allclose(
        [final["sharpness/lambda_max"], final["sharpness/lambda_3"]], [dense[0], dense[2]], rtol=1e-3
    )
    assert final["sharpness/lambda_max_over_lambda_3"] == pytest.approx(dense[0] / dense[2], rel=2e-3)
    reference = m_sharpness(trainer.model, [batch], m=4, rho=0.1)
    assert final["sharpness/m_sharpness"] == pytest.approx(reference.value, rel=1e-5)
    assert final["sharpness/loss"] == pytest.approx(reference.loss, rel=1e-5)
    assert final["sharpness/m_sharpness"] > 0 and math.isfinite(final["sharpness/lambda_max"])

    # Measuring leaves no trace: the same run without the callback ends at bit-identical weights.
    plain, _ = train(tmp_path / "without", rows)
    for (name, a), b in zip(
        trainer.model.state_dict().items(), plain.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_callback_rejects_bad_arguments(tmp_path):
    args = SAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = SAMTrainer(model=make_model(), args=args, train_dataset=make_rows(n=8))
    with pytest.raises(TypeError, match="trainer.add_callback"):
        SharpnessCallback(args)
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        SharpnessCallback(trainer, every_n_steps=0)
    callback = SharpnessCallback(trainer, m=64, num_examples=8)
    with pytest.raises(ValueError, match="fewer than m=64"):
        callback._fixed_batches(make_rows(n=8), trainer.data_collator)


# ---------------------------------------------------------------- attention models (transformers' default SDPA)
def test_callback_measures_a_bert_loaded_with_sdpa_attention_as_its_eager_twin(tmp_path):
    """SDPA (transformers' default kernel) has no double backward on its fused kernels: the measurement goes
    through the math backend, and λmax is the eager-attention model's dense Hessian's, training uninterrupted."""
    from tests.toy import text_rows, tiny_bert

    model, rows = tiny_bert(), text_rows(8)
    assert model.config._attn_implementation == "sdpa"
    args = SAMTrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, learning_rate=0.1, report_to="none",
        save_strategy="no", use_cpu=True, sam_rho=0.05, disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    recorder = Recorder()
    trainer.add_callback(SharpnessCallback(trainer, every_n_steps=2, num_examples=8, max_iter=120, m=8))
    trainer.add_callback(recorder)
    trainer.train()
    measured = [logs for _, logs in recorder.logs if "sharpness/lambda_max" in logs]
    assert len(measured) == 1 and trainer.state.global_step == 2
    eager = tiny_bert()
    eager.load_state_dict(model.state_dict())
    eager.config._attn_implementation = "eager"
    twin = hessian_eigenvalues(eager, [stack(rows)], max_iter=120)  # the callback's seed and settings
    assert measured[0]["sharpness/lambda_max"] == pytest.approx(twin.lambda_max, rel=1e-4)
    dense = dense_hessian_eigenvalues(eager, stack(rows))  # float64, no Lanczos: the float32 run within 0.5%
    assert measured[0]["sharpness/lambda_max"] == pytest.approx(float(dense[0]), rel=5e-3)


def test_callback_refuses_an_attention_kernel_without_a_second_derivative_when_built(tmp_path):
    from tests.toy import text_rows, tiny_bert

    model = tiny_bert()
    model.config._attn_implementation = "flash_attention_2"
    args = SAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, sam_rho=0.05)
    trainer = SAMTrainer(model=model, args=args, train_dataset=text_rows(8))
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        SharpnessCallback(trainer)


def test_a_failed_measurement_is_logged_and_training_goes_on(tmp_path, monkeypatch):
    import hf_sam.callbacks

    def broken(*args, **kwargs):
        raise RuntimeError("derivative for aten::some_kernel_backward is not implemented")

    monkeypatch.setattr(hf_sam.callbacks, "hessian_eigenvalues", broken)
    trainer, recorder = train(tmp_path, make_rows(16), dict(every_n_steps=1, num_examples=8), max_steps=3)
    assert trainer.state.global_step == 3
    assert not any("sharpness/lambda_max" in logs for _, logs in recorder.logs)
