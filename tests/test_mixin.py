"""`SAMMixin` on other Trainer subclasses: trl's `SFTTrainer`, `Seq2SeqTrainer` and a user's own. For each, ρ = 0
is the parent bit for bit (weights and every logged value) and ρ > 0 takes the SAM step of a hand computation."""

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
from test_compat_matrix import NaiveSAMMixin, numbers
from torch import nn
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from hf_sam import SAMArguments, SAMMixin, SAMTrainingArguments

trl = pytest.importorskip("trl")
RHO, LR = 0.1, 0.1
WORDS = "the cat dog sat ran on a mat log is red blue what color answer".split()


# ---------------------------------------------------------------- the two-line pattern, as the README shows it
@dataclass
class SAMSFTConfig(SAMArguments, trl.SFTConfig):
    pass


class SAMSFTTrainer(SAMMixin, trl.SFTTrainer):
    pass


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config)


def prompt_completion_rows():
    from datasets import Dataset

    rows = [
        {"prompt": "what color is the cat ?", "completion": "the cat is red"},
        {"prompt": "what color is the dog ?", "completion": "the dog is blue"},
        {"prompt": "what color is a log ?", "completion": "a log is red"},
        {"prompt": "what color is a mat ?", "completion": "the mat is blue"},
    ]
    return Dataset.from_list(rows * 2)


def sft(trainer_cls, config_cls, tmp_path, model, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
        bf16=False,  # SFTConfig's default is bf16 (and gradient checkpointing, kept): the hand reference is fp32
    )
    settings.update(overrides)
    peft_config = settings.pop("peft_config", None)
    trainer = trainer_cls(
        model=model,
        args=config_cls(**settings),
        train_dataset=prompt_completion_rows(),
        processing_class=tokenizer(),
        peft_config=peft_config,
    )
    trainer.train()
    return trainer


def sft_loss_sum(model, batch):
    """SFTTrainer's loss before normalisation: the summed next-token NLL over the completion tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
    )


def hand_sft_sam_steps(tmp_path, micro_batches_per_step, steps):
    """The SAM step by hand, on the batches SFTTrainer itself collates (sequential order)."""
    probe = trl.SFTTrainer(
        model=tiny_llama(),
        args=trl.SFTConfig(
            output_dir=str(tmp_path / "probe"),
            per_device_train_batch_size=4 // micro_batches_per_step,
            train_sampling_strategy="sequential",
            use_cpu=True,
            report_to=[],
        ),
        train_dataset=prompt_completion_rows(),
        processing_class=tokenizer(),
    )
    batches = list(probe.get_train_dataloader())
    model = tiny_llama()
    params = list(model.parameters())
    for step in range(steps):
        window = batches[step * micro_batches_per_step : (step + 1) * micro_batches_per_step]
        items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)  # num_items_in_batch
        total = [torch.zeros_like(p) for p in params]
        for batch in window:
            g = torch.autograd.grad(sft_loss_sum(model, batch) / items, params)
            norm = torch.sqrt(sum((x**2).sum() for x in g))
            with torch.no_grad():
                saved = [p.clone() for p in params]
                for p, x in zip(params, g, strict=True):
                    p += RHO * x / norm
            g_sam = torch.autograd.grad(sft_loss_sum(model, batch) / items, params)
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
            total = [t + x for t, x in zip(total, g_sam, strict=True)]
        with torch.no_grad():
            for p, x in zip(params, total, strict=True):
                p -= LR * x
    return model


def test_sft_rho_zero_is_the_plain_sft_trainer(tmp_path):
    plain = sft(trl.SFTTrainer, trl.SFTConfig, tmp_path / "plain", tiny_llama())
    ours = sft(SAMSFTTrainer, SAMSFTConfig, tmp_path / "ours", tiny_llama(), sam_rho=0.0)
    assert numbers(ours.state.log_history) == numbers(plain.state.log_history)
    for (n, p), (_, q) in zip(plain.model.state_dict().items(), ours.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("accumulation", [1, 2], ids=["ga1", "ga2"])
def test_sft_rho_positive_is_the_hand_sam_step(tmp_path, accumulation):
    expected = hand_sft_sam_steps(tmp_path, accumulation, steps=2)
    ours = sft(
        SAMSFTTrainer,
        SAMSFTConfig,
        tmp_path / "ours",
        tiny_llama(),
        sam_rho=RHO,
        per_device_train_batch_size=4 // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    for (n, p), (_, q) in zip(expected.state_dict().items(), ours.model.state_dict().items(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=n)


@pytest.mark.parametrize("mode", ["momentum", "previous_gradient"])
def test_sft_one_pass_modes_are_the_hand_loop_and_log_metrics_at_the_look_ahead_point(tmp_path, mode):
    """SFT through the one-pass modes: 3 steps of the hand loop (SGD momentum 0.9, the look-ahead along −v/‖v‖ or
    the previous gradient, each step's gradient of the completion-token NLL there), and trl's metrics recorded once
    per step by the one pass, at the look-ahead point (docs/telemetry.md): the step's `loss` is the NLL there."""
    probe = trl.SFTTrainer(
        model=tiny_llama(),
        args=trl.SFTConfig(
            output_dir=str(tmp_path / "probe"),
            per_device_train_batch_size=4,
            use_cpu=True,
            train_sampling_strategy="sequential",
            report_to=[],
        ),  # fmt: skip
        train_dataset=prompt_completion_rows(),
        processing_class=tokenizer(),
    )
    batches = list(probe.get_train_dataloader())
    batches = [batches[i % len(batches)] for i in range(3)]
    model, mu = tiny_llama(), 0.9
    params = list(model.parameters())
    v, previous, losses = None, None, []

    def loss_of(batch):
        return sft_loss_sum(model, batch) / int((batch["labels"][:, 1:] != -100).sum())

    for batch in batches:
        direction = (-1.0, v) if mode == "momentum" else (1.0, previous)
        saved = [p.detach().clone() for p in params]
        if direction[1] is not None:
            norm = torch.sqrt(sum((x**2).sum() for x in direction[1]))
            with torch.no_grad():
                for p, x in zip(params, direction[1], strict=True):
                    p += direction[0] * RHO * x / norm
        loss = loss_of(batch)
        g = torch.autograd.grad(loss, params)
        losses.append(float(loss))
        with torch.no_grad():
            for p, x in zip(params, saved, strict=True):
                p.copy_(x)
            v = list(g) if v is None else [mu * a + b for a, b in zip(v, g, strict=True)]
            previous = list(g)
            for p, x in zip(params, v, strict=True):
                p -= LR * x
    ours = sft(SAMSFTTrainer, SAMSFTConfig, tmp_path / "ours", tiny_llama(), sam_rho=RHO, sam_mode=mode,
               optim_args="momentum=0.9", max_steps=3)  # fmt: skip
    for (n, p), q in zip(ours.model.named_parameters(), params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-5, rtol=0, msg=n)
    logs = [e for e in ours.state.log_history if "loss" in e and "num_tokens" in e]
    assert [e["loss"] for e in logs] == pytest.approx(losses, rel=1e-4)
    assert all("mean_token_accuracy" in e and "entropy" in e for e in logs)
    tokens = [e["num_tokens"] for e in logs]
    assert (
        tokens == sorted(tokens) and tokens[1] - tokens[0] == tokens[2] - tokens[1] > 0
    )  # one record per step


def test_sft_metrics_are_logged_once_per_step_from_the_clean_pass(tmp_path):
    """At step 1 both runs start from the same weights: the clean pass's token accuracy, entropy and token count
    are the plain run's (a record from the perturbed pass would change the means, a second one double the tokens)."""
    plain = sft(trl.SFTTrainer, trl.SFTConfig, tmp_path / "plain", tiny_llama(), max_steps=1)
    ours = sft(SAMSFTTrainer, SAMSFTConfig, tmp_path / "ours", tiny_llama(), sam_rho=RHO, max_steps=1)
    first = {k: v for k, v in plain.state.log_history[0].items()}
    mine = ours.state.log_history[0]
    for key in ("entropy", "mean_token_accuracy", "num_tokens", "loss"):
        assert mine[key] == pytest.approx(first[key], rel=1e-6), key


def test_sft_lora_through_peft_config_perturbs_the_adapters_only(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ours = sft(SAMSFTTrainer, SAMSFTConfig, tmp_path, base, sam_rho=RHO, peft_config=config)
    perturbed = ours._perturbation_plan(ours.model).params
    names = {id(p): n for n, p in ours.model.named_parameters()}
    assert perturbed and all("lora_" in names[id(p)] for p in perturbed)
    for n, p in ours.model.named_parameters():
        if "lora_" not in n:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), frozen[key]), n
    assert any(
        not torch.equal(p, 0 * p) for p in perturbed if "lora_B" in names[id(p)]
    )  # the adapters trained


# ---------------------------------------------------------------- Seq2SeqTrainer and a user's own Trainer
def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=24,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def seq2seq_rows():
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1, 24, (5,), generator=g),
            "labels": torch.randint(1, 24, (3,), generator=g),
        }
        for _ in range(8)
    ]


def seq2seq(trainer_cls, args_cls, tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=LR,
        optim="sgd",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    trainer = trainer_cls(model=tiny_t5(), args=args_cls(**settings), train_dataset=seq2seq_rows())
    trainer.train()
    return trainer


@dataclass
class SAMSeq2SeqArguments(SAMArguments, Seq2SeqTrainingArguments):
    pass


class SAMSeq2SeqTrainer(SAMMixin, Seq2SeqTrainer):
    pass


class NaiveSAMSeq2SeqTrainer(NaiveSAMMixin, Seq2SeqTrainer):
    pass


def assert_parent_contract(tmp_path, parent, parent_args, ours, our_args, naive):
    """rho = 0 is the parent bit for bit (weights, every logged value); rho > 0 is the naive SAM step on it.

    T5's loss (and this user's) ignores num_items_in_batch, so the parent multiplies its gradient by the
    accumulation steps; SAMMixin's default averages instead (tests/test_loss_units.py, against the hand step).
    The parent's own scaling is the documented `sam_fix_loss_normalization=False`."""
    stock = seq2seq(parent, parent_args, tmp_path / "stock")
    our_args = functools.partial(our_args, sam_fix_loss_normalization=False)
    zero = seq2seq(ours, our_args, tmp_path / "zero", sam_rho=0.0)
    assert numbers(zero.state.log_history) == numbers(stock.state.log_history)
    assert all(
        torch.equal(p, q) for p, q in zip(stock.model.state_dict().values(), zero.model.state_dict().values())
    )
    reference = seq2seq(naive, parent_args, tmp_path / "naive")
    sam = seq2seq(ours, our_args, tmp_path / "ours", sam_rho=RHO)
    for p, q in zip(reference.model.state_dict().values(), sam.model.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0)


def test_seq2seq_rho_zero_is_the_parent_and_rho_positive_the_naive_sam_step(tmp_path):
    assert_parent_contract(
        tmp_path,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        SAMSeq2SeqTrainer,
        SAMSeq2SeqArguments,
        NaiveSAMSeq2SeqTrainer,
    )


class MyTrainer(Trainer):
    """A user's Trainer: its own loss (label smoothing by hand), no call to super().compute_loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], labels=inputs["labels"])
        logits = outputs.logits
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), inputs["labels"].reshape(-1), label_smoothing=0.1
        )
        return (loss, outputs) if return_outputs else loss


class SAMMine(SAMMixin, MyTrainer):
    pass


class NaiveMine(NaiveSAMMixin, MyTrainer):
    pass


def test_users_own_subclass_rho_zero_is_the_parent_and_rho_positive_the_naive_sam_step(tmp_path):
    assert_parent_contract(tmp_path, MyTrainer, TrainingArguments, SAMMine, SAMTrainingArguments, NaiveMine)


# ---------------------------------------------------------------- what is refused
def test_generating_trainers_are_refused_before_anything_runs(tmp_path):
    class SAMGRPOTrainer(SAMMixin, trl.GRPOTrainer):
        pass

    args = SAMTrainingArguments(output_dir=str(tmp_path / "out"), sam_rho=RHO, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="SAM cannot wrap GRPOTrainer, which generates completions"):
        SAMGRPOTrainer(model=None, args=args)
    assert not (tmp_path / "out").exists()


def test_arguments_without_the_sam_fields_are_refused_with_the_pattern(tmp_path):
    with pytest.raises(TypeError, match="class MyConfig\\(SAMArguments, SFTConfig\\)"):
        SAMSFTTrainer(
            model=tiny_llama(), args=trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
        )
    with pytest.raises(ValueError, match="sam_rho must be a finite number"):
        SAMSFTConfig(output_dir=str(tmp_path), sam_rho=-1.0, use_cpu=True, report_to=[])


def test_sam_arguments_alone_is_not_an_arguments_class():
    with pytest.raises(TypeError, match="mixin for a TrainingArguments subclass"):
        SAMArguments()


def test_sam_trainer_is_the_mixin_on_the_stock_trainer():
    from hf_sam import SAMTrainer

    assert SAMTrainer.__mro__[1:3] == (SAMMixin, Trainer)
    assert copy.copy(SAMTrainer.sam_clean_pass_state) == (
        "_metrics",
        "_total_train_tokens",
        "_stored_metrics",
    )
