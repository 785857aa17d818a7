"""`SAMMixin` on every trainer trl exports. Each is tested or refused at construction:

- tested (DPO, KTO, Reward, ORPO, CPO; SFT in test_mixin.py): ρ = 0 is the parent bit for bit (weights and every
  logged value), ρ > 0 is the plain SAM step written on top of the parent's own loss (`NaiveSAMMixin`), and the
  parent's metrics (rewards/*, logps/*, KL...) come from the clean pass at w;
- refused (GRPO, RLOO, Distillation, GKD, Online DPO...): their step generates, or their training_step does more
  than one forward+backward; batch-cutting settings on trainers whose rows are not examples (DPO and Reward stack
  chosen then rejected rows, KTO estimates its KL over the batch) and on padding-free batches.

The trainers are constructed the way their own documentation shows, positional `(model, ref_model, args)` included.
"""

import functools
import tempfile
from dataclasses import dataclass, make_dataclass
from pathlib import Path

import pytest
import torch
from test_compat_matrix import NaiveSAMMixin, numbers
from test_mixin import LR, RHO, prompt_completion_rows, tiny_llama, tokenizer

from hf_sam import SAMArguments, SAMMixin
from hf_sam.variants import batch_size

trl = pytest.importorskip("trl")
experimental_orpo = pytest.importorskip("trl.experimental.orpo")
experimental_cpo = pytest.importorskip("trl.experimental.cpo")


def preference_rows():
    from datasets import Dataset

    rows = [
        {"prompt": "what color is the cat ?", "chosen": "the cat is red", "rejected": "the cat is blue"},
        {"prompt": "what color is the dog ?", "chosen": "the dog is blue", "rejected": "a dog is red"},
        {"prompt": "what color is a log ?", "chosen": "a log is red", "rejected": "the log is blue"},
        {"prompt": "what color is a mat ?", "chosen": "the mat is blue", "rejected": "a mat is red"},
    ]
    return Dataset.from_list(rows * 2)


def unpaired_rows():
    from datasets import Dataset

    rows = [
        {"prompt": "what color is the cat ?", "completion": "the cat is red", "label": True},
        {"prompt": "what color is the dog ?", "completion": "a dog is red", "label": False},
        {"prompt": "what color is a log ?", "completion": "a log is red", "label": True},
        {"prompt": "what color is a mat ?", "completion": "a mat is red", "label": False},
    ]
    return Dataset.from_list(rows * 2)


def tiny_reward_model():
    from transformers import LlamaForSequenceClassification

    model = tiny_llama()  # the same seeded body
    torch.manual_seed(1)
    reward = LlamaForSequenceClassification(
        model.config.__class__(**{**model.config.to_dict(), "num_labels": 1})
    )
    reward.model.load_state_dict(model.model.state_dict())
    return reward


@dataclass(frozen=True)
class Spec:
    trainer: type
    config: type
    data: callable
    model: callable = tiny_llama
    reference_model: bool = False  # passed positionally, second, as (model, ref_model, args, ...)


SPECS = {
    "DPOTrainer": Spec(trl.DPOTrainer, trl.DPOConfig, preference_rows, reference_model=True),
    "KTOTrainer": Spec(trl.KTOTrainer, trl.KTOConfig, unpaired_rows, reference_model=True),
    "RewardTrainer": Spec(trl.RewardTrainer, trl.RewardConfig, preference_rows, model=tiny_reward_model),
    "ORPOTrainer": Spec(experimental_orpo.ORPOTrainer, experimental_orpo.ORPOConfig, preference_rows),
    "CPOTrainer": Spec(experimental_cpo.CPOTrainer, experimental_cpo.CPOConfig, preference_rows),
}


@functools.cache
def classes(name: str):
    """(SAM trainer, SAM config, naive SAM trainer) for one trl trainer, as a user writes them."""
    spec = SPECS[name]
    config = make_dataclass(f"SAM{spec.config.__name__}", [], bases=(SAMArguments, spec.config))
    ours = type(f"SAM{name}", (SAMMixin, spec.trainer), {})
    naive = type(f"Naive{name}", (NaiveSAMMixin, spec.trainer), {})
    return ours, config, naive


def settings(output_dir, **overrides):
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 2,
        "learning_rate": LR,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "train_sampling_strategy": "sequential",
        "seed": 0,
        "bf16": False,  # trl's configs default to bf16: the references are fp32
        **overrides,
    }


def build(name: str, trainer_cls, config_cls, output_dir, **overrides):
    spec = SPECS[name]
    positional = (spec.model(), spec.model()) if spec.reference_model else (spec.model(),)
    return trainer_cls(
        *positional,
        args=config_cls(**settings(output_dir, **overrides)),
        train_dataset=spec.data(),
        processing_class=tokenizer(),
    )


def run(name, trainer_cls, config_cls, output_dir, **overrides):
    trainer = build(name, trainer_cls, config_cls, output_dir, **overrides)
    trainer.train()
    return trainer.state.log_history, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@functools.cache
def stock_run(name: str):
    spec = SPECS[name]
    with tempfile.TemporaryDirectory() as tmp:
        return run(name, spec.trainer, spec.config, Path(tmp))


@pytest.mark.parametrize("name", SPECS)
def test_rho_zero_is_the_parent_bit_for_bit(tmp_path, name):
    ours, config, _ = classes(name)
    history, weights = run(name, ours, config, tmp_path, sam_rho=0.0)
    stock_history, stock_weights = stock_run(name)
    assert numbers(history) == numbers(stock_history)
    assert weights.keys() == stock_weights.keys()
    for key, value in stock_weights.items():
        assert torch.equal(weights[key], value), key


@pytest.mark.parametrize("name", SPECS)
def test_rho_positive_is_the_hand_sam_step_with_metrics_from_the_clean_pass(tmp_path, name):
    ours, config, naive = classes(name)
    history, weights = run(name, ours, config, tmp_path / "ours", sam_rho=RHO)
    _, expected = run(name, naive, SPECS[name].config, tmp_path / "naive")
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=0, msg=key)
    # Step 1 starts from the parent's weights: every metric the parent logs (loss at w, rewards/*, logps/*, KL,
    # token counts) is the plain run's if it comes from the clean pass, and only then.
    stock_first, first = numbers(stock_run(name)[0])[0], numbers(history)[0]
    parent_metrics = {k for k in stock_first if k not in ("grad_norm", "learning_rate", "epoch", "step")}
    assert len(parent_metrics) > 3, parent_metrics
    for key in parent_metrics:
        assert first[key] == pytest.approx(stock_first[key], rel=1e-5, abs=1e-7), key
    assert history[0]["sam/sharpness"] != 0.0  # and the step was a SAM step


# ---------------------------------------------------------------- refused at construction
CUTTING = [{"sam_group_size": 1}, {"sam_ascent_fraction": 0.5}]


@pytest.mark.parametrize("name", ["DPOTrainer", "RewardTrainer", "KTOTrainer"])
@pytest.mark.parametrize("cut", CUTTING, ids=["group_size", "ascent_fraction"])
def test_cutting_batches_whose_rows_are_not_examples_is_refused(tmp_path, name, cut):
    ours, config, _ = classes(name)
    with pytest.raises(ValueError, match=f"cuts each micro-batch by rows, but {name}"):
        build(name, ours, config, tmp_path / "out", sam_rho=RHO, **cut)
    assert not (tmp_path / "out").exists()


@dataclass
class SAMSFTConfig(SAMArguments, trl.SFTConfig):
    pass


class SAMSFTTrainer(SAMMixin, trl.SFTTrainer):
    pass


@pytest.mark.parametrize("cut", CUTTING, ids=["group_size", "ascent_fraction"])
def test_cutting_padding_free_sft_batches_is_refused(tmp_path, cut):
    """Measured before the fix: padding_free with sam_group_size=1 took 5.000x plain SAM's update."""
    with pytest.raises(ValueError, match="concatenates the batch's sequences into one row"):
        SAMSFTTrainer(
            model=tiny_llama(),
            args=SAMSFTConfig(**settings(tmp_path / "out", sam_rho=RHO, padding_free=True, **cut)),
            train_dataset=prompt_completion_rows(),
            processing_class=tokenizer(),
        )
    assert not (tmp_path / "out").exists()


def test_a_packed_batch_is_never_cut_by_its_longest_tensor():
    """The example count was the largest first dimension of any tensor: cu_seq_lens_q's 5 for one packed row."""
    packed = {
        "input_ids": torch.ones(1, 12, dtype=torch.long),
        "position_ids": torch.arange(12).unsqueeze(0),
        "cu_seq_lens_q": torch.tensor([0, 3, 6, 9, 12]),
    }
    with pytest.raises(ValueError, match="this batch is packed \\(cu_seq_lens_q"):
        batch_size(packed, "sam_group_size=1")
    paired = {"input_ids": torch.ones(8, 5), "margin": torch.ones(4)}
    with pytest.raises(ValueError, match="disagree on the number of rows \\(input_ids: 8, margin: 4\\)"):
        batch_size(paired, "sam_ascent_fraction=0.5")
    assert (
        batch_size({"input_ids": torch.ones(4, 5), "labels": torch.ones(4, 3), "prompt": ["a"] * 4}, "x") == 4
    )


def test_distillation_is_refused_by_what_it_overrides(tmp_path):
    """DistillationTrainer(model, teacher_model, args): constructed through the parent's signature, then refused
    because its training_step does more than wrap the stock step (and its _prepare_inputs generates)."""

    @dataclass
    class Config(SAMArguments, trl.DistillationConfig):
        pass

    class SAMDistillationTrainer(SAMMixin, trl.DistillationTrainer):
        pass

    args = Config(**settings(tmp_path / "out", sam_rho=RHO))
    with pytest.raises(
        ValueError, match="DistillationTrainer.training_step overrides the stock step below SAMMixin"
    ):
        SAMDistillationTrainer(tiny_llama(), tiny_llama(), args, train_dataset=prompt_completion_rows())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["GRPOTrainer", "RLOOTrainer"])
def test_generating_trainers_are_refused(tmp_path, name):
    cls = type(f"SAM{name}", (SAMMixin, getattr(trl, name)), {})
    args = SAMSFTConfig(**settings(tmp_path / "out", sam_rho=RHO))
    with pytest.raises(ValueError, match=f"SAM cannot wrap {name}, which generates completions"):
        cls(model=None, args=args)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the parent's metrics under the variants
@pytest.mark.parametrize(
    "variant",
    [{"sam_ascent_fraction": 0.5}, {"sam_ascent_steps": 2}, {"sam_group_size": 2}],
    ids=["ascent_fraction", "ascent_steps", "group_size"],
)
def test_sft_metrics_describe_the_batch_trained_on_once_whatever_the_variant(tmp_path, variant):
    """Measured before the fix, against the stock run's num_tokens 44 / 88: the ascent subset logged 22 / 44 (and
    its accuracy and entropy), the second ascent step 88 / 176."""
    from test_mixin import sft

    stock = sft(trl.SFTTrainer, trl.SFTConfig, tmp_path / "stock", tiny_llama())
    ours = sft(SAMSFTTrainer, SAMSFTConfig, tmp_path / "ours", tiny_llama(), sam_rho=RHO, **variant)
    tokens = [e["num_tokens"] for e in stock.state.log_history if "loss" in e]
    assert [e["num_tokens"] for e in ours.state.log_history if "loss" in e] == tokens
    if "sam_ascent_steps" in variant:  # the clean pass at w is the stock step's at step 1
        first, mine = stock.state.log_history[0], ours.state.log_history[0]
        for key in ("mean_token_accuracy", "entropy"):
            assert mine[key] == pytest.approx(first[key], rel=1e-6), key


@pytest.mark.parametrize(
    ("variant", "passes"),
    [({}, 2.0), ({"sam_interval": 2}, 1.5), ({"sam_ascent_fraction": 0.5}, 1.5)],
    ids=["sam", "interval_2", "ascent_fraction_half"],
)
def test_total_flos_counts_every_pass(tmp_path, variant, passes):
    """Before: one pass per micro-batch, as the stock step. Now the stock count times the passes taken."""
    from test_mixin import sft

    stock = sft(trl.SFTTrainer, trl.SFTConfig, tmp_path / "stock", tiny_llama())
    ours = sft(SAMSFTTrainer, SAMSFTConfig, tmp_path / "ours", tiny_llama(), sam_rho=RHO, **variant)
    assert stock.state.total_flos > 0
    assert ours.state.total_flos == pytest.approx(passes * stock.state.total_flos, rel=1e-9)
