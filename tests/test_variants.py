"""SAM variants of SAMTrainer against hand computations on a tiny model (SGD, constant LR, sequential batches)."""

import copy
import math
import os

import pytest
import torch
from test_trainer import LR, make_args
from toy import loss_and_grads, make_model, make_rows, reference_sam_gradient, stack
from transformers import TrainerCallback

from hf_sam import SAMTrainer

RHO = 0.1


def batches(rows, size):
    return [stack(rows[i : i + size]) for i in range(0, len(rows), size)]


def sgd_(model, grads, lr=LR):
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads, strict=True):
            p -= lr * g


def flat_dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def flat_norm(a):
    return torch.sqrt(flat_dot(a, a))


def assert_same_weights(model, reference, atol=1e-6):
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=atol, rtol=0)


def train(tmp_path, model, rows, **overrides):
    args = make_args(tmp_path, **{"sam_rho": RHO, "per_device_train_batch_size": 4, **overrides})
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    ("overrides", "sam_steps"),
    [
        ({"sam_interval": 2}, {0, 2}),
        ({"sam_start": 0.5}, {2, 3}),
        ({"sam_end": 0.5}, {0, 1}),
        ({"sam_interval": 2, "sam_start": 0.25}, {1, 3}),
    ],
    ids=["interval", "late-phase", "early-phase", "interval-in-window"],
)
def test_sam_runs_exactly_on_the_chosen_steps(tmp_path, overrides, sam_steps):
    rows, model = make_rows(16), make_model()
    reference = copy.deepcopy(model)
    for step, batch in enumerate(batches(rows, 4)):
        grads = (
            reference_sam_gradient(reference, batch, RHO)[0]
            if step in sam_steps
            else loss_and_grads(reference, batch)[1]
        )
        sgd_(reference, grads)
    trainer = train(tmp_path, model, rows, max_steps=4, logging_steps=4, **overrides)
    assert_same_weights(model, reference)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["sam/fraction_sam_steps"] == len(sam_steps) / 4
    assert log["sam/forward_passes"] == 4 + len(sam_steps)  # one extra forward per SAM step, none elsewhere


def test_looksam_reuses_the_orthogonal_component_between_sam_steps(tmp_path):
    rows, model = make_rows(16), make_model()
    reference, alpha = copy.deepcopy(model), 0.7
    g_v = None
    for step, batch in enumerate(batches(rows, 4)[:3]):
        _, g = loss_and_grads(reference, batch)
        if step % 2 == 0:  # full SAM step: store g_v = g_s − (<g_s, g>/‖g‖²) g
            g_s, _ = reference_sam_gradient(reference, batch, RHO)
            c = flat_dot(g_s, g) / flat_dot(g, g)
            g_v = [a - c * b for a, b in zip(g_s, g, strict=True)]
            update = g_s
        else:  # reuse: g + α ‖g‖/‖g_v‖ g_v
            update = [a + alpha * flat_norm(g) / flat_norm(g_v) * v for a, v in zip(g, g_v, strict=True)]
        sgd_(reference, update)
    trainer = train(
        tmp_path,
        model,
        rows,
        max_steps=3,
        logging_steps=3,
        sam_mode="looksam",
        sam_interval=2,
        sam_looksam_alpha=alpha,
    )
    assert_same_weights(model, reference)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["sam/forward_passes"] == 5 and log["sam/backward_passes"] == 5  # 2 + 1 + 2


def test_gsam_descends_on_the_surrogate_gap_as_the_jax_version(tmp_path):
    rows, model = make_rows(8), make_model()
    alpha = 0.3
    batch = stack(rows)
    _, g = loss_and_grads(model, batch)
    g_s, _ = reference_sam_gradient(model, batch, RHO)
    unit = [x / flat_norm(g_s) for x in g_s]
    projection = flat_dot(g, unit)
    residual = [a - projection * u for a, u in zip(g, unit, strict=True)]
    expected = [
        p.detach() - LR * (s - alpha * r) for p, s, r in zip(model.parameters(), g_s, residual, strict=True)
    ]
    train(tmp_path, model, rows, per_device_train_batch_size=8, sam_mode="gsam", sam_gsam_alpha=alpha)
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)


def test_gsam_with_gradient_accumulation_uses_the_step_gradients(tmp_path):
    rows, model = make_rows(8), make_model()
    alpha = 0.3
    halves = batches(rows, 4)
    g = [(a + b) / 2 for a, b in zip(*(loss_and_grads(model, h)[1] for h in halves), strict=True)]
    g_s = [
        (a + b) / 2 for a, b in zip(*(reference_sam_gradient(model, h, RHO)[0] for h in halves), strict=True)
    ]
    unit = [x / flat_norm(g_s) for x in g_s]
    residual = [a - flat_dot(g, unit) * u for a, u in zip(g, unit, strict=True)]
    expected = [
        p.detach() - LR * (s - alpha * r) for p, s, r in zip(model.parameters(), g_s, residual, strict=True)
    ]
    train(tmp_path, model, rows, gradient_accumulation_steps=2, sam_mode="gsam", sam_gsam_alpha=alpha)
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)


def test_group_size_averages_one_sam_gradient_per_chunk(tmp_path):
    rows, model = make_rows(8), make_model()
    per_chunk = [reference_sam_gradient(model, chunk, RHO)[0] for chunk in batches(rows, 4)]
    expected = [p.detach() - LR * (a + b) / 2 for p, a, b in zip(model.parameters(), *per_chunk, strict=True)]
    trainer = train(tmp_path, model, rows, per_device_train_batch_size=8, sam_group_size=4)
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    # Example-weighted: two passes over each half of the micro-batch are two passes over the micro-batch.
    assert log["sam/forward_passes"] == 2 and log["sam/backward_passes"] == 2


@pytest.mark.parametrize(
    "overrides", [{"sam_group_size": 8}, {"sam_group_size": 64}, {"sam_ascent_steps": 1}]
)
def test_degenerate_settings_reproduce_plain_sam_exactly(tmp_path, overrides):
    rows = make_rows(16)
    plain, variant = make_model(batchnorm=True, dropout=0.2), make_model(batchnorm=True, dropout=0.2)
    train(tmp_path / "plain", plain, rows, per_device_train_batch_size=8, max_steps=2)
    train(tmp_path / "variant", variant, rows, per_device_train_batch_size=8, max_steps=2, **overrides)
    for p, q in zip(plain.state_dict().values(), variant.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_multi_step_ascent_is_projected_gradient_ascent_in_the_ball(tmp_path):
    rows, model = make_rows(8), make_model()
    batch = stack(rows)
    work = copy.deepcopy(model)
    params = list(work.parameters())
    _, g1 = loss_and_grads(work, batch)
    eps = [RHO * g / flat_norm(g1) for g in g1]
    for _ in range(2):  # steps 2 and 3: move by ρ·ĝ at w + ε, project onto the ρ-ball
        with torch.no_grad():
            for p, p0, e in zip(params, model.parameters(), eps, strict=True):
                p.copy_(p0 + e)
        _, g = loss_and_grads(work, batch)
        eps = [e + RHO * x / flat_norm(g) for e, x in zip(eps, g, strict=True)]
        norm = flat_norm(eps)
        eps = [e * min(1.0, RHO / float(norm)) for e in eps]
    assert float(flat_norm(eps)) == pytest.approx(RHO, rel=1e-5)
    with torch.no_grad():
        for p, p0, e in zip(params, model.parameters(), eps, strict=True):
            p.copy_(p0 + e)
    _, g_final = loss_and_grads(work, batch)
    expected = [p.detach() - LR * g for p, g in zip(model.parameters(), g_final, strict=True)]
    trainer = train(tmp_path, model, rows, per_device_train_batch_size=8, sam_ascent_steps=3)
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)
    assert next(e for e in trainer.state.log_history if "loss" in e)["sam/forward_passes"] == 4


def test_rho_follows_the_learning_rate(tmp_path):
    rows, model = make_rows(8), make_model()
    reference, rho_min = copy.deepcopy(model), 0.02
    for step, batch in enumerate(batches(rows, 4)):
        lr = LR * 0.5 * (1 + math.cos(math.pi * step / 2))  # cosine over 2 steps, no warm-up
        rho = rho_min + (RHO - rho_min) * lr / LR
        sgd_(reference, reference_sam_gradient(reference, batch, rho)[0], lr=lr)
    trainer = train(
        tmp_path,
        model,
        rows,
        max_steps=2,
        lr_scheduler_type="cosine",
        sam_rho_schedule="linear_with_lr",
        sam_rho_min=rho_min,
    )
    assert_same_weights(model, reference)
    rhos = [e["sam/rho"] for e in trainer.state.log_history if "sam/rho" in e]
    assert rhos == pytest.approx([RHO, rho_min + (RHO - rho_min) * 0.5])


def test_param_filter_perturbs_only_matching_parameters(tmp_path):
    rows, model = make_rows(8), make_model()
    batch = stack(rows)
    _, g = loss_and_grads(model, batch)
    names = [n for n, _ in model.named_parameters()]
    head = [x for n, x in zip(names, g, strict=True) if n.startswith("fc2")]
    norm = flat_norm(head)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for (n, p), x in zip(perturbed.named_parameters(), g, strict=True):
            if n.startswith("fc2"):
                p += RHO * x / norm
    _, g_sam = loss_and_grads(perturbed, batch)
    expected = [p.detach() - LR * x for p, x in zip(model.parameters(), g_sam, strict=True)]
    trainer = train(tmp_path, model, rows, per_device_train_batch_size=8, sam_param_filter=r"^fc2\.")
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)
    assert len(trainer._perturbation_plan(model).params) == 2


def test_param_filter_matching_nothing_is_refused(tmp_path):
    args = make_args(tmp_path, sam_param_filter="nope")
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        SAMTrainer(model=make_model(), args=args, train_dataset=make_rows(8))
    assert not os.path.exists(args.output_dir)  # refused before the Trainer creates anything


class CountPasses:
    """Independent accounting: hooks on the top-level model count forward and backward calls."""

    def __init__(self, model):
        self.forwards = self.backwards = 0
        model.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output):
        self.forwards += 1
        if output.get("loss") is not None and output["loss"].requires_grad:
            # Fires once for every backward pass (or autograd.grad) through this forward's loss.
            output["loss"].register_hook(self._on_backward)

    def _on_backward(self, grad):
        self.backwards += 1


class PassesPerStep(TrainerCallback):
    def __init__(self, counter):
        self.counter, self.per_step, self._last = counter, [], (0, 0)

    def on_step_end(self, args, state, control, **kwargs):
        now = (self.counter.forwards, self.counter.backwards)
        self.per_step.append((now[0] - self._last[0], now[1] - self._last[1]))
        self._last = now


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"sam_interval": 3}, [(2, 2), (1, 1), (1, 1), (2, 2), (1, 1), (1, 1)]),
        ({"sam_mode": "looksam", "sam_interval": 3}, [(2, 2), (1, 1), (1, 1), (2, 2), (1, 1), (1, 1)]),
        ({"sam_start": 0.5}, [(1, 1), (1, 1), (1, 1), (2, 2), (2, 2), (2, 2)]),
    ],
    ids=["interval", "looksam", "late-phase"],
)
def test_cheap_steps_run_exactly_one_forward_and_backward(tmp_path, overrides, expected):
    model = make_model()
    counter = CountPasses(model)
    callback = PassesPerStep(counter)
    args = make_args(
        tmp_path, sam_rho=RHO, per_device_train_batch_size=4, max_steps=6, logging_steps=3, **overrides
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=make_rows(24), callbacks=[callback])
    trainer.train()
    assert callback.per_step == expected
    logged = [
        (e["sam/forward_passes"], e["sam/backward_passes"]) for e in trainer.state.log_history if "loss" in e
    ]
    assert logged == [
        tuple(map(sum, zip(*expected[:3], strict=True))),
        tuple(map(sum, zip(*expected[3:], strict=True))),
    ]


def test_looksam_state_is_checkpointed_and_resume_is_exact(tmp_path):
    rows = make_rows(24)
    common = dict(
        sam_rho=RHO,
        sam_mode="looksam",
        sam_interval=3,
        per_device_train_batch_size=4,
        max_steps=5,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="cosine",
        sam_rho_schedule="linear_with_lr",
        train_sampling_strategy="random",
        save_strategy="steps",
        save_steps=2,
    )
    straight = make_model(dropout=0.2)
    initial = copy.deepcopy(straight)
    SAMTrainer(model=straight, args=make_args(tmp_path / "a", **common), train_dataset=rows).train()

    class StopAfterTwoSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    SAMTrainer(
        model=copy.deepcopy(initial),
        args=make_args(tmp_path / "b", **common),
        train_dataset=rows,
        callbacks=[StopAfterTwoSteps()],
    ).train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert "looksam_gv" in state["sam_state"]  # step 2 is a reuse step: it needs g_v from step 0
    resumed = copy.deepcopy(initial)
    SAMTrainer(model=resumed, args=make_args(tmp_path / "b", **common), train_dataset=rows).train(
        resume_from_checkpoint=str(checkpoint)
    )
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sam_interval": 0}, "sam_interval"),
        ({"sam_interval": 2.5}, "sam_interval"),
        ({"sam_start": 0.6, "sam_end": 0.4}, "sam_start"),
        ({"sam_end": 1.5}, "sam_end"),
        ({"sam_mode": "asam"}, "sam_mode"),
        ({"sam_mode": "looksam"}, "sam_interval >= 2"),
        ({"sam_mode": "looksam", "sam_interval": 2, "sam_group_size": 4}, "sam_group_size"),
        ({"sam_mode": "gsam", "sam_ascent_steps": 2}, "sam_ascent_steps"),
        ({"sam_mode": "gsam", "sam_param_filter": "fc"}, "sam_param_filter"),
        ({"sam_group_size": 0}, "sam_group_size"),
        ({"sam_group_size": 4, "sam_sync_perturbation": True}, "sam_sync_perturbation"),
        ({"sam_ascent_steps": 0}, "sam_ascent_steps"),
        ({"sam_ascent_steps": 2, "sam_norm": "inf"}, "sam_norm"),
        ({"sam_rho_schedule": "cosine"}, "sam_rho_schedule"),
        ({"sam_rho_min": 1.0}, "sam_rho_min"),
        ({"sam_param_filter": "("}, "sam_param_filter"),
        ({"sam_looksam_alpha": -1.0}, "sam_looksam_alpha"),
    ],
)
def test_unsupported_or_invalid_variant_settings_raise(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)
