"""The loss units of every model family users train: a model whose loss ignores `num_items_in_batch` (BERT-style
encoders, T5, BART, EfficientNet...) must get the mean of its micro-batches' (or chunks') SAM gradients, whatever
its `forward` looks like, and `sam/*` must mean what docs/telemetry.md says. The reference is the hand SAM step on
the model's own loss; the control families (a causal LM, a ViT) normalise by `num_items_in_batch` themselves."""

import copy
from dataclasses import dataclass

import pytest
import torch
from toy import tiny_efficientnet
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from hf_sam import SAMArguments, SAMMixin, SAMTrainer, SAMTrainingArguments

LR, RHO = 0.1, 0.05
DROPOUT_KEYS = (
    "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout", "activation_dropout",
    "dropout_rate", "classifier_dropout", "seq_classif_dropout", "qa_dropout", "embedding_dropout",
    "mlp_dropout", "drop_connect_rate", "dropout_prob", "pooler_dropout", "classifier_dropout_prob",
)  # fmt: skip


def _no_dropout(config):
    """Dropout off, so the hand reference and the Trainer see the same function."""
    for key in DROPOUT_KEYS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    return config


def _text(classes):
    """A builder of tiny `classes` models from config and the rows they train on (4 tokens each, every label
    counted, so each micro-batch and chunk holds the same number of items)."""

    def build(task: str):
        import transformers as t

        encoder = dict(
            vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
        )
        configs = {
            "bert": lambda: t.BertConfig(**encoder, max_position_embeddings=16),
            "roberta": lambda: t.RobertaConfig(**encoder, max_position_embeddings=16, pad_token_id=1),
            "distilbert": lambda: t.DistilBertConfig(
                vocab_size=50, dim=8, n_layers=1, n_heads=2, hidden_dim=8
            ),
            "deberta-v2": lambda: t.DebertaV2Config(**encoder, max_position_embeddings=16),
            "modernbert": lambda: t.ModernBertConfig(
                **encoder,
                max_position_embeddings=16,
                global_attn_every_n_layers=1,
                local_attention=4,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                sep_token_id=2,
                cls_token_id=1,
            ),
            "electra": lambda: t.ElectraConfig(**encoder, embedding_size=8, max_position_embeddings=16),
            "t5": lambda: t.T5Config(
                vocab_size=50, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2, decoder_start_token_id=0
            ),
            "bart": lambda: t.BartConfig(
                vocab_size=50,
                d_model=8,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=8,
                decoder_ffn_dim=8,
                max_position_embeddings=16,
            ),  # fmt: skip
            "llama": lambda: t.LlamaConfig(**encoder, num_key_value_heads=2, max_position_embeddings=16),
        }
        config = _no_dropout(configs[classes]())
        config.num_labels = 3
        torch.manual_seed(0)
        model = getattr(t, task).from_config(config, attn_implementation="eager")
        g = torch.Generator().manual_seed(1)
        rows = []
        for i in range(8):
            ids = torch.randint(3, 50, (4,), generator=g)
            if task == "AutoModelForSequenceClassification":
                label = torch.tensor(i % 3)
            elif task == "AutoModelForTokenClassification":
                label = torch.randint(0, 3, (4,), generator=g)
            else:  # seq2seq and causal LM: token targets
                label = torch.randint(3, 50, (4,), generator=g)
            rows.append(
                {"input_ids": ids, "attention_mask": torch.ones(4, dtype=torch.long), "labels": label}
            )
        return model, rows

    return build


def _image(kind):
    def build(task: str):
        g = torch.Generator().manual_seed(1)
        if kind == "efficientnet":
            model = tiny_efficientnet()
            size = 32
        else:
            from transformers import ViTConfig, ViTForImageClassification

            torch.manual_seed(0)
            config = ViTConfig(
                hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, image_size=8,
                patch_size=4, num_labels=3, attn_implementation="eager",
            )  # fmt: skip
            model, size = ViTForImageClassification(_no_dropout(config)), 8
        rows = [
            {"pixel_values": torch.randn(3, size, size, generator=g), "labels": torch.tensor(i % 3)}
            for i in range(8)
        ]
        return model, rows

    return build


# (family, task, builder, whether its loss ignores num_items_in_batch)
FAMILIES = [
    ("bert", "AutoModelForSequenceClassification", _text("bert"), True),
    ("roberta", "AutoModelForSequenceClassification", _text("roberta"), True),
    ("distilbert", "AutoModelForSequenceClassification", _text("distilbert"), True),
    ("deberta-v2", "AutoModelForSequenceClassification", _text("deberta-v2"), True),
    ("modernbert", "AutoModelForSequenceClassification", _text("modernbert"), True),
    ("electra", "AutoModelForSequenceClassification", _text("electra"), True),
    ("bert-token", "AutoModelForTokenClassification", _text("bert"), True),
    ("t5", "AutoModelForSeq2SeqLM", _text("t5"), True),
    ("bart", "AutoModelForSeq2SeqLM", _text("bart"), True),
    ("llama", "AutoModelForCausalLM", _text("llama"), False),
    ("efficientnet", None, _image("efficientnet"), True),
    ("vit", None, _image("vit"), False),
]
IDS = [f[0] for f in FAMILIES]


@dataclass
class SAMSeq2SeqArguments(SAMArguments, Seq2SeqTrainingArguments):
    pass


class SAMSeq2SeqTrainer(SAMMixin, Seq2SeqTrainer):
    pass


def _train(tmp_path, task, model, rows, **overrides):
    seq2seq = task == "AutoModelForSeq2SeqLM"
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=1, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
        train_sampling_strategy="sequential", report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0, max_grad_norm=0.0, sam_rho=RHO,
    )  # fmt: skip
    kwargs.update(overrides)
    args = (SAMSeq2SeqArguments if seq2seq else SAMTrainingArguments)(**kwargs)
    trainer = (SAMSeq2SeqTrainer if seq2seq else SAMTrainer)(model=model, args=args, train_dataset=rows)
    trainer.train()
    return trainer


def _eval_bn(model):
    """BatchNorm in eval mode throughout, so chunks and micro-batches do not interact through batch statistics
    (what is tested here is the loss units); the Trainer's model.train() then leaves them as they are."""
    model.eval()
    model.train = lambda mode=True: model
    return model


def _hand_sam_gradient(model, batch, params):
    """SAM's gradient on one batch of the model's own loss, by hand (ε = ρ g/‖g‖)."""
    model = copy.deepcopy(model)
    params = [dict(model.named_parameters())[n] for n in params]
    g = torch.autograd.grad(model(**batch).loss, params)
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    with torch.no_grad():
        for p, x in zip(params, g, strict=True):
            p.add_(RHO * x / norm)
    return torch.autograd.grad(model(**batch).loss, params), norm


def _stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize(("family", "task", "build", "ignores"), FAMILIES, ids=IDS)
@pytest.mark.parametrize(
    ("accumulation", "group_size"), [(2, None), (1, 2)], ids=["accumulation-2", "sam_group_size-2"]
)
def test_sam_step_is_the_mean_of_the_hand_sam_gradients(
    tmp_path, family, task, build, ignores, accumulation, group_size
):
    """One SGD step is w − lr·mean over micro-batches (or chunks) of each one's hand SAM gradient, and
    `sam/grad_norm` is the mean of their ‖∇L‖ (each of its own mean loss), for every family."""
    model, rows = build(task)
    if family == "efficientnet":
        _eval_bn(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rows = rows[: 4 * accumulation]
    pieces = [rows[i : i + 2] for i in range(0, len(rows), 2)] if group_size else [rows[:4], rows[4:8]]
    grads, norms = zip(*(_hand_sam_gradient(model, _stack(piece), names) for piece in pieces), strict=True)
    hand_step = {n: LR * sum(g[i] for g in grads) / len(grads) for i, n in enumerate(names)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    trainer = _train(
        tmp_path, task, model, rows, gradient_accumulation_steps=accumulation, sam_group_size=group_size
    )
    after = {n: p.detach() for n, p in model.named_parameters()}
    step = torch.sqrt(sum(((before[n] - after[n]) ** 2).sum() for n in names))
    hand = torch.sqrt(sum((hand_step[n] ** 2).sum() for n in names))
    assert float(step / hand) == pytest.approx(1.0, rel=1e-3), f"|Δw| / |Δw_hand| = {float(step / hand):.3f}"
    for n in names:
        torch.testing.assert_close(after[n], before[n] - hand_step[n], atol=2e-6, rtol=1e-4)
    logged = next(e for e in trainer.state.log_history if "sam/grad_norm" in e)
    assert logged["sam/grad_norm"] == pytest.approx(float(sum(norms) / len(norms)), rel=1e-4)
    assert trainer.model_accepts_loss_kwargs is not ignores


@pytest.mark.parametrize(
    ("family", "task", "build", "ignores"), FAMILIES[:1] + FAMILIES[7:8], ids=["bert", "t5"]
)
def test_ascent_fraction_is_in_the_units_of_a_model_that_declares_its_loss(
    tmp_path, family, task, build, ignores
):
    """With sam_ascent_fraction, a BERT or T5 takes the step, and logs the `loss` and `sam/*` values, of the same
    model declaring its per-batch mean loss (`accepts_loss_kwargs = False`, the Trainer's own switch); the logged
    values are the micro-batch's mean loss (within the subset's and ε's difference of it, not 2x)."""
    runs = []
    for declared in (False, True):
        model, rows = build(task)
        if declared:
            model.accepts_loss_kwargs = False
        trainer = _train(tmp_path / str(declared), task, model, rows, sam_ascent_fraction=0.5)
        runs.append((model, next(e for e in trainer.state.log_history if "sam/perturbed_loss" in e)))
    (probed, logged), (declared, reference) = runs
    for key in ("loss", "sam/perturbed_loss", "sam/grad_norm"):
        assert logged[key] == pytest.approx(reference[key], rel=1e-6), key
    for p, q in zip(probed.parameters(), declared.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    model, rows = build(task)
    clean = float(sum(model(**_stack(rows[i : i + 4])).loss for i in (0, 4)) / 2)
    assert logged["loss"] == pytest.approx(clean, rel=0.2)
    assert logged["sam/perturbed_loss"] == pytest.approx(clean, rel=0.2)


@pytest.mark.parametrize(("family", "task", "build", "ignores"), FAMILIES, ids=IDS)
def test_probe_tells_which_losses_ignore_num_items_in_batch(family, task, build, ignores):
    """The probe answers from the model's behaviour (the loss with one count against twice that count)."""
    from hf_sam.loss_units import probe_loss_units

    model, rows = build(task)
    batch = _stack(rows[:4])
    assert probe_loss_units(lambda n: model(**batch, num_items_in_batch=n).loss, torch.tensor(16)) is ignores


def test_rho_zero_on_a_bert_is_the_mean_of_the_micro_batch_gradients_or_with_the_fix_off_the_stock_step(
    tmp_path,
):
    """ρ = 0 with the fix on (the default) takes the mean-of-micro-batches step on a BERT, as documented for
    EfficientNet; with the fix off it is the stock Trainer's step, the accumulation steps times larger."""
    model, rows = FAMILIES[0][2]("AutoModelForSequenceClassification")
    stock = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    grads = [
        torch.autograd.grad(model(**_stack(rows[i : i + 4])).loss, list(model.parameters())) for i in (0, 4)
    ]
    _train(tmp_path / "fixed", "AutoModelForSequenceClassification", model, rows, sam_rho=0.0)
    _train(
        tmp_path / "stock", "AutoModelForSequenceClassification", stock, rows, sam_rho=0.0,
        sam_fix_loss_normalization=False,
    )  # fmt: skip
    for w, fixed, stocked, a, b in zip(before, model.parameters(), stock.parameters(), *grads, strict=True):
        torch.testing.assert_close(fixed.detach(), w - LR * (a + b) / 2, atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(stocked.detach(), w - LR * (a + b), atol=2e-6, rtol=1e-4)
