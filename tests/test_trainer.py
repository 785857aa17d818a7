"""SAMTrainer against independent references: hand-computed SAM updates and the stock Trainer at rho = 0."""

import copy
import json
import os
import re

import pytest
import torch
from toy import (
    TinyNet,
    loss_and_grads,
    make_model,
    make_rows,
    reference_sam_gradient,
    stack,
    tiny_efficientnet,
)
from transformers import Trainer, TrainingArguments

from hf_sam import SAM, SAMTrainer, SAMTrainingArguments

LR = 0.1


def make_args(tmp_path, cls=SAMTrainingArguments, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",  # so the reference knows each micro-batch
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        max_grad_norm=0.0,  # no clipping unless a test asks (the Trainer's default clips at 1.0)
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(model, expected, atol=1e-6):
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=atol, rtol=0)


# ---------------------------------------------------------------- 1. one step == hand-computed SAM update
@pytest.mark.parametrize(
    ("norm", "adaptive"),
    [("2", False), ("inf", False), ("2", True), ("inf", True)],
    ids=["l2", "linf", "asam-l2", "asam-linf"],
)
def test_sgd_step_equals_hand_computed_sam_update(tmp_path, norm, adaptive):
    rows, model = make_rows(8), make_model()
    g_sam, _ = reference_sam_gradient(model, stack(rows), rho=0.05, norm=norm, adaptive=adaptive, eta=0.01)
    expected = [p.detach() - LR * g for p, g in zip(model.parameters(), g_sam, strict=True)]

    args = make_args(tmp_path, sam_rho=0.05, sam_norm=norm, sam_adaptive=adaptive, sam_eta=0.01)
    SAMTrainer(model=model, args=args, train_dataset=rows).train()
    assert_params_close(model, expected)


def test_adamw_with_weight_decay_step_equals_hand_computed_update(tmp_path):
    """AdamW's first step from the SAM gradient; decay on the weights only, not in ε, not on biases."""
    rows, model = make_rows(8), make_model()
    g_sam, _ = reference_sam_gradient(model, stack(rows), rho=0.1)
    beta1, beta2, adam_eps, wd = 0.9, 0.999, 1e-8, 0.1
    expected = []
    for (name, p), g in zip(model.named_parameters(), g_sam, strict=True):
        decay = wd if name.endswith("weight") else 0.0
        m_hat = (1 - beta1) * g / (1 - beta1)
        v_hat = (1 - beta2) * g * g / (1 - beta2)
        expected.append(p.detach() * (1 - LR * decay) - LR * m_hat / (v_hat.sqrt() + adam_eps))

    args = make_args(tmp_path, sam_rho=0.1, optim="adamw_torch", weight_decay=wd)
    SAMTrainer(model=model, args=args, train_dataset=rows).train()
    assert_params_close(model, expected, atol=2e-6)


def test_trainer_wraps_the_stock_optimizer_with_its_settings(tmp_path):
    args = make_args(tmp_path, sam_rho=0.05, optim_args="momentum=0.9", weight_decay=1e-5)
    trainer = SAMTrainer(model=make_model(), args=args, train_dataset=make_rows(8))
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, SAM) and isinstance(optimizer.base_optimizer, torch.optim.SGD)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-5, 0.0]  # decay groups kept
    assert all(g["momentum"] == 0.9 and g["rho"] == 0.05 for g in optimizer.param_groups)


# ---------------------------------------------------------------- 2. rho = 0 is the stock Trainer, bit for bit
def _run(trainer_cls, args_cls, tmp_path, model, rows, **overrides):
    args = make_args(
        tmp_path,
        cls=args_cls,
        max_steps=6,
        per_device_train_batch_size=4,
        train_sampling_strategy="random",
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="cosine",
        **overrides,
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, torch.get_rng_state()


def test_rho_zero_reproduces_the_stock_trainer_bit_for_bit(tmp_path):
    rows = make_rows(16)
    stock_model = make_model(batchnorm=True, dropout=0.2)
    sam_model = copy.deepcopy(stock_model)
    stock_losses, _ = _run(
        Trainer, TrainingArguments, tmp_path / "stock", stock_model, rows, gradient_accumulation_steps=2
    )
    sam_losses, _ = _run(
        SAMTrainer,
        SAMTrainingArguments,
        tmp_path / "sam",
        sam_model,
        rows,
        gradient_accumulation_steps=2,
        sam_rho=0.0,
    )
    assert len(stock_losses) == 6 and sam_losses == stock_losses
    for p, q in zip(stock_model.state_dict().values(), sam_model.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_sam_draws_no_extra_random_numbers(tmp_path):
    """Same dropout masks in both passes, and the global RNG advances exactly as in the stock Trainer, so
    data order and later random draws are the ones a plain run would have."""
    rows = make_rows(16)
    _, stock_rng = _run(Trainer, TrainingArguments, tmp_path / "stock", make_model(dropout=0.3), rows)
    _, sam_rng = _run(
        SAMTrainer, SAMTrainingArguments, tmp_path / "sam", make_model(dropout=0.3), rows, sam_rho=0.05
    )
    assert torch.equal(stock_rng, sam_rng)


# ---------------------------------------------------------------- 3. gradient accumulation
def test_gradient_accumulation_averages_per_micro_batch_sam_gradients(tmp_path):
    rows, model = make_rows(8), make_model()
    halves = [stack(rows[:4]), stack(rows[4:])]  # sequential sampler: the two micro-batches
    per_micro = [reference_sam_gradient(model, half, rho=0.05)[0] for half in halves]
    expected = [p.detach() - LR * (a + b) / 2 for p, a, b in zip(model.parameters(), *per_micro, strict=True)]

    args = make_args(tmp_path, sam_rho=0.05, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert_params_close(model, expected)
    # ε is per micro-batch: the logged ascent norm is the mean of the two micro-batch norms.
    norms = [
        torch.sqrt(sum((g**2).sum() for g in loss_and_grads(copy.deepcopy(make_model()), h)[1]))
        for h in halves
    ]
    logged = next(e for e in trainer.state.log_history if "sam/grad_norm" in e)
    assert logged["sam/grad_norm"] == pytest.approx(float(sum(norms) / 2), rel=1e-5)


def test_models_whose_loss_ignores_num_items_in_batch_are_normalised(tmp_path):
    """EfficientNet takes **kwargs but ignores num_items_in_batch; with the stock Trainer its gradient comes out
    multiplied by the accumulation steps. SAMTrainer must give the mean of the micro-batch gradients."""
    model = tiny_efficientnet()
    model.eval()  # BN in eval mode below: micro-batches then do not interact through batch statistics
    # Which families' losses ignore the count is tests/test_loss_units.py's; this is the EfficientNet step.

    g = torch.Generator().manual_seed(0)
    rows = [
        {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": torch.tensor(i % 3)} for i in range(4)
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    micro = [
        loss_and_grads(model, stack(rows[:2]), params)[1],
        loss_and_grads(model, stack(rows[2:]), params)[1],
    ]
    expected = [p.detach() - LR * (a + b) / 2 for p, a, b in zip(params, *micro, strict=True)]

    class EvalBN(SAMTrainer):  # keep BN in eval mode although the Trainer calls model.train()
        def training_step(self, model, inputs, num_items_in_batch=None):
            model.train = lambda mode=True: model
            return super().training_step(model, inputs, num_items_in_batch)

    args = make_args(tmp_path, sam_rho=0.0, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    EvalBN(model=model, args=args, train_dataset=rows).train()
    assert_params_close(model, expected, atol=1e-6)


# ---------------------------------------------------------------- 5. BatchNorm statistics from the clean pass
def test_batchnorm_running_stats_come_from_the_clean_pass_only(tmp_path):
    rows, model = make_rows(8), make_model(batchnorm=True)
    clean = copy.deepcopy(model)
    clean.train()
    clean(**stack(rows))  # one clean forward: the statistics SAM must end with

    SAMTrainer(model=model, args=make_args(tmp_path, sam_rho=0.5), train_dataset=rows).train()
    assert model.norm.num_batches_tracked.item() == 1
    torch.testing.assert_close(model.norm.running_mean, clean.norm.running_mean, atol=1e-7, rtol=0)
    torch.testing.assert_close(model.norm.running_var, clean.norm.running_var, atol=1e-7, rtol=0)
    assert model.norm.track_running_stats


# ---------------------------------------------------------------- 6. checkpoint and resume
def test_checkpoint_holds_base_optimizer_state_and_resume_is_exact(tmp_path):
    rows = make_rows(16)
    common = dict(
        sam_rho=0.05,
        per_device_train_batch_size=4,
        max_steps=4,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="cosine",
        train_sampling_strategy="random",
        save_strategy="steps",
        save_steps=2,
    )
    straight = make_model(dropout=0.2)
    resumed = copy.deepcopy(straight)
    SAMTrainer(model=straight, args=make_args(tmp_path / "a", **common), train_dataset=rows).train()

    from transformers import TrainerCallback

    class StopAfterTwoSteps(TrainerCallback):  # the same 4-step run (same LR schedule), stopped after step 2
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    interrupted = copy.deepcopy(resumed)
    SAMTrainer(
        model=interrupted,
        args=make_args(tmp_path / "b", **common),
        train_dataset=rows,
        callbacks=[StopAfterTwoSteps()],
    ).train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert optimizer_state["state"] and all("momentum_buffer" in s for s in optimizer_state["state"].values())

    # A fresh process would start from the initial weights and load the checkpoint.
    SAMTrainer(model=resumed, args=make_args(tmp_path / "b", **common), train_dataset=rows).train(
        resume_from_checkpoint=str(checkpoint)
    )
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_saved_weights_are_never_the_perturbed_ones(tmp_path):
    rows, model = make_rows(8), make_model()
    trainer = SAMTrainer(
        model=model,
        args=make_args(tmp_path, sam_rho=1.0, save_strategy="steps", save_steps=1),
        train_dataset=rows,
    )
    trainer.train()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "checkpoint-1" / "model.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(saved[name], value)


# ---------------------------------------------------------------- 7. PEFT / LoRA
def test_lora_perturbs_and_updates_only_the_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    rows = make_rows(8)
    base = make_model()
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False)
    )
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = SAMTrainer(model=model, args=make_args(tmp_path, sam_rho=0.5, max_steps=2), train_dataset=rows)
    trainer.train()

    perturbed = trainer._perturbation_plan(model).params
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(perturbed) == len(lora_params) and all(any(p is q for q in lora_params) for p in perturbed)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, lora_before[name]), name
    for name, p in base.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_layer.", "")
            assert torch.equal(p, frozen_before[key]), name


# ---------------------------------------------------------------- 8. mixed precision
def test_bf16_on_cpu_trains_with_finite_losses(tmp_path):
    rows = make_rows(16)
    trainer = SAMTrainer(
        model=make_model(batchnorm=True),
        args=make_args(tmp_path, sam_rho=0.05, bf16=True, max_steps=4, per_device_train_batch_size=4),
        train_dataset=rows,
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 4
    assert all(
        torch.isfinite(torch.tensor([e["loss"], e["sam/perturbed_loss"], e["sam/grad_norm"]])).all()
        for e in logs
    )


def test_fp16_loss_scaling_applies_unscaled_gradients(tmp_path):
    """Regression test for the closure trap: with a GradScaler at scale 1024 the update must equal the unscaled
    one (a closure through the scaler would apply 1024x gradients)."""
    rows, model = make_rows(8), make_model()
    reference = copy.deepcopy(model)
    SAMTrainer(
        model=reference, args=make_args(tmp_path / "fp32", sam_rho=0.05, max_steps=2), train_dataset=rows
    ).train()

    trainer = SAMTrainer(
        model=model,
        args=make_args(tmp_path / "scaled", sam_rho=0.05, max_steps=2, max_grad_norm=1e9),
        train_dataset=rows,
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 1024.0  # no overflow, no skipped step
    assert_params_close(model, params_of(reference), atol=1e-6)


# ---------------------------------------------------------------- telemetry
def test_logs_carry_sam_metrics_consistent_with_a_hand_computation(tmp_path):
    rows, model = make_rows(8), make_model()
    batch = stack(rows)
    clean_loss, g = loss_and_grads(model, batch)
    _, eps = reference_sam_gradient(model, batch, rho=0.05)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(perturbed.parameters(), eps, strict=True):
            p += e
    perturbed_loss = perturbed(**batch)["loss"].item()

    trainer = SAMTrainer(model=model, args=make_args(tmp_path, sam_rho=0.05), train_dataset=rows)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["loss"] == pytest.approx(clean_loss.item(), rel=1e-6)  # `loss` is the loss at w
    assert log["sam/perturbed_loss"] == pytest.approx(perturbed_loss, rel=1e-6)
    assert log["sam/sharpness"] == pytest.approx(perturbed_loss - clean_loss.item(), abs=1e-6)
    assert log["sam/grad_norm"] == pytest.approx(float(torch.sqrt(sum((x**2).sum() for x in g))), rel=1e-6)
    assert log["sam/skipped_ascents"] == 0


def test_non_finite_ascent_gradient_skips_the_perturbation_and_is_counted(tmp_path):
    class NaNOnce(TinyNet):
        calls = 0

        def forward(self, features, target=None):
            out = super().forward(features, target)
            NaNOnce.calls += 1
            if NaNOnce.calls == 1:  # first call of the run is the ascent pass of step 1
                out["loss"] = out["loss"] * float("nan")
            return out

    rows = make_rows(8)
    torch.manual_seed(0)
    model = NaNOnce()
    expected = [
        p.detach() - LR * g
        for p, g in zip(model.parameters(), loss_and_grads(make_model(), stack(rows))[1], strict=True)
    ]
    trainer = SAMTrainer(model=model, args=make_args(tmp_path, sam_rho=0.05), train_dataset=rows)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["sam/skipped_ascents"] == 1
    assert_params_close(model, expected)  # a plain SGD step from w: nothing left perturbed


# ---------------------------------------------------------------- 9. invalid configurations
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sam_rho": -0.1}, "sam_rho"),
        ({"sam_rho": float("nan")}, "sam_rho"),
        ({"sam_rho": "0.05"}, "sam_rho"),
        ({"sam_norm": "1"}, "sam_norm"),
        ({"sam_eta": -1.0}, "sam_eta"),
        ({"sam_adaptive": "yes"}, "sam_adaptive"),
        ({"sam_sync_perturbation": 1}, "sam_sync_perturbation"),
        ({"optim": "lomo"}, "lomo"),
        ({"optim": "adalomo"}, "adalomo"),
        ({"optim": "galore_adamw_layerwise", "optim_target_modules": ["fc1"]}, "galore_adamw_layerwise"),
        ({"optim": "apollo_adamw_layerwise", "optim_target_modules": ["fc1"]}, "apollo_adamw_layerwise"),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3}}, "sam_sync_perturbation": False},
            "impossible under DeepSpeed ZeRO-3",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3}}, "sam_group_size": 2},
            "impossible under DeepSpeed ZeRO-3",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3}}, "sam_mode": "gsam"},
            "not supported under DeepSpeed ZeRO-3",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3}}, "sam_ascent_fraction": 0.5},
            "not supported under DeepSpeed ZeRO-3",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3}}, "sam_ascent_steps": 2},
            "not supported under DeepSpeed ZeRO-3",
        ),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}, "fp16": True}, "fp16 under DeepSpeed ZeRO-3"),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}},
            "ZeRO-3 offload yet \\(offload_optimizer.device='cpu'",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 2}}, "sam_mode": "gsam"},
            "not supported under DeepSpeed",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 1}}, "sam_group_size": 2},
            "not supported under DeepSpeed",
        ),
        ({"fsdp": True, "fsdp_config": {"version": 1}}, "FSDP2 only"),
        ({"fsdp": True, "sam_sync_perturbation": False}, "impossible under FSDP"),
        ({"fsdp": True, "sam_group_size": 2}, "sam_group_size=2"),
        ({"fsdp": True, "sam_mode": "gsam"}, "not supported under FSDP"),
        ({"fsdp": True, "sam_mode": "looksam", "sam_interval": 2}, "not supported under FSDP"),
    ],
)
def test_invalid_configurations_raise_a_clear_error(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("env", "overrides", "message"),
    [
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, {},
         "ZeRO-3 offload yet \\(offload_optimizer.device='cpu'"),
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, {"sam_sync_perturbation": False}, "impossible under DeepSpeed ZeRO-3"),
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, {"sam_mode": "gsam"}, "not supported under DeepSpeed"),
    ],
)  # fmt: skip
def test_a_deepspeed_launch_config_is_refused_with_the_arguments(
    tmp_path, monkeypatch, env, overrides, message
):
    """Under `accelerate launch` with a DeepSpeed config the plugin comes from the environment, not from
    `deepspeed=`: its refusals must still come when the arguments are built (a recipe parses them before it loads
    any model or data), and leave no ZeRO-3 config registered for a later `from_pretrained`."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    errors = []
    try:
        make_args(tmp_path, sam_rho=0.05, **overrides)
    except ValueError as error:
        errors.append(error)
    assert errors and re.search(message, str(errors[0])), errors
    assert not is_deepspeed_zero3_enabled()


def test_sam_norm_accepts_the_spellings_users_write(tmp_path):
    assert make_args(tmp_path, sam_norm=2).sam_norm == "2"
    assert make_args(tmp_path, sam_norm="INF").sam_norm == "inf"
    assert make_args(tmp_path, sam_norm=float("inf")).sam_norm == "inf"


def test_inherited_defaults_are_unchanged(tmp_path):
    sam_args = SAMTrainingArguments(output_dir=str(tmp_path))
    stock = TrainingArguments(output_dir=str(tmp_path))
    sam_fields = {k: v for k, v in sam_args.to_dict().items() if not k.startswith("sam_")}
    assert sam_fields == stock.to_dict()
    assert (sam_args.sam_rho, sam_args.sam_norm, sam_args.sam_adaptive, sam_args.sam_eta) == (
        0.05,
        "2",
        False,
        0.01,
    )


def test_stock_training_arguments_are_refused_with_the_fix(tmp_path):
    with pytest.raises(TypeError, match="SAMTrainingArguments"):
        SAMTrainer(
            model=make_model(), args=TrainingArguments(output_dir=str(tmp_path)), train_dataset=make_rows(8)
        )


def test_dataparallel_is_refused(tmp_path, monkeypatch):
    args = make_args(tmp_path, sam_rho=0.05)
    monkeypatch.setattr(type(args), "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match="DataParallel"):
        SAMTrainer(model=make_model(), args=args, train_dataset=make_rows(8))


def test_reentrant_gradient_checkpointing_is_refused(tmp_path):
    args = make_args(
        tmp_path,
        sam_rho=0.05,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    with pytest.raises(ValueError, match="use_reentrant"):
        SAMTrainer(model=make_model(), args=args, train_dataset=make_rows(8))


# ---------------------------------------------------------------- other combinations that must work
def test_max_grad_norm_clips_the_descent_gradient(tmp_path):
    rows, model = make_rows(8), make_model()
    g_sam, _ = reference_sam_gradient(model, stack(rows), rho=0.05)
    total = torch.sqrt(sum((g**2).sum() for g in g_sam))
    clip = float(total) / 4
    expected = [
        p.detach() - LR * g * clip / (total + 1e-6) for p, g in zip(model.parameters(), g_sam, strict=True)
    ]
    SAMTrainer(
        model=model, args=make_args(tmp_path, sam_rho=0.05, max_grad_norm=clip), train_dataset=rows
    ).train()
    assert_params_close(model, expected)


def test_callbacks_see_every_step(tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    SAMTrainer(
        model=make_model(),
        args=make_args(tmp_path, max_steps=3, per_device_train_batch_size=4),
        train_dataset=make_rows(8),
        callbacks=[Record()],
    ).train()
    assert seen == [1, 2, 3]


def test_gradient_checkpointing_and_hf_vit_model(tmp_path):
    """A transformers model with (non-reentrant) gradient checkpointing: the SAM step equals the hand reference."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=8,
        patch_size=4,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    g = torch.Generator().manual_seed(1)
    rows = [
        {"pixel_values": torch.randn(3, 8, 8, generator=g), "labels": torch.tensor(i % 3)} for i in range(4)
    ]
    g_sam, _ = reference_sam_gradient(model, stack(rows), rho=0.05)
    expected = [p.detach() - LR * g for p, g in zip(model.parameters(), g_sam, strict=True)]
    args = make_args(tmp_path, sam_rho=0.05, per_device_train_batch_size=4, gradient_checkpointing=True)
    SAMTrainer(model=model, args=args, train_dataset=rows).train()
    assert_params_close(model, expected)


@pytest.mark.slow
def test_torch_compile(tmp_path):
    rows, model = make_rows(8), make_model()
    g_sam, _ = reference_sam_gradient(model, stack(rows), rho=0.05)
    expected = [p.detach() - LR * g for p, g in zip(model.parameters(), g_sam, strict=True)]
    SAMTrainer(
        model=model, args=make_args(tmp_path, sam_rho=0.05, torch_compile=True), train_dataset=rows
    ).train()
    assert_params_close(model, expected, atol=1e-5)


def test_trainer_state_json_has_sam_metrics(tmp_path):
    SAMTrainer(
        model=make_model(),
        args=make_args(tmp_path, sam_rho=0.05, save_strategy="steps", save_steps=1),
        train_dataset=make_rows(8),
    ).train()
    state = json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())
    assert "sam/sharpness" in state["log_history"][0]
    assert os.path.exists(tmp_path / "out" / "checkpoint-1" / "optimizer.pt")
