"""`sam_mode="momentum"` (Momentum-SAM, Becker, Altrock & Risse 2024): one forward+backward per step, taken at
w − ρ·v/‖v‖ with v the optimizer's momentum, against hand-written loops: the paper's algorithm 1 for SGD
(v ← μ·v + g(w − ρ·v/‖v‖), w ← w − lr·v) and the released code's AdamW version (the perturbation along the first
moment exp_avg, normalised as for SGD)."""

import math

import pytest
import torch
from test_trainer import make_args
from test_variants import batches
from toy import TinyNet, make_model, make_rows

from hf_sam import SAM, SAMTrainer, SAMTrainingArguments

RHO, LR, MU = 0.5, 0.1, 0.9


def grad_at(model, batch, params):
    return torch.autograd.grad(model(**batch)["loss"], params)


def hand_msam_sgd(model, windows, rho=RHO, lr=LR, momentum=MU, weight_decay=0.0, clip=None):
    """Algorithm 1 of the paper, with torch's SGD conventions (weight decay added to g at w, Nesterov off), over
    optimizer steps whose micro-batches all take their gradient at the same perturbed point. Returns the weights
    after each step and the loss of each step (the mean of its micro-batches' losses at the perturbed point)."""
    params = list(model.parameters())
    v, weights, losses = None, [], []
    for window in windows:
        w = [p.detach().clone() for p in params]
        if v is not None:
            norm = math.sqrt(sum(float((x**2).sum()) for x in v))
            with torch.no_grad():
                for p, x in zip(params, v, strict=True):
                    p -= rho * x / norm
        g, loss = [torch.zeros_like(p) for p in params], 0.0
        for batch in window:
            loss += float(model(**batch)["loss"].detach()) / len(window)
            g = [a + b / len(window) for a, b in zip(g, grad_at(model, batch, params), strict=True)]
        with torch.no_grad():
            for p, x in zip(params, w, strict=True):
                p.copy_(x)  # back to w
            if clip is not None:
                total = math.sqrt(sum(float((x**2).sum()) for x in g))
                g = [x * min(1.0, clip / (total + 1e-6)) for x in g]
            # the Trainer decays weight matrices, not biases (its decay parameter groups)
            d = [x + (weight_decay if p.ndim > 1 else 0.0) * p for x, p in zip(g, params, strict=True)]
            v = d if v is None else [momentum * a + b for a, b in zip(v, d, strict=True)]
            for p, x in zip(params, v, strict=True):
                p -= lr * x
        weights.append([p.detach().clone() for p in params])
        losses.append(loss)
    return weights, losses


def hand_msam_adamw(model, windows, rho=RHO, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    """The released code's AdamW-MSAM: the same look-ahead along −m/‖m‖ with m Adam's first moment, then the AdamW
    step at w (decoupled weight decay, bias corrections) written out plainly."""
    params = list(model.parameters())
    m = v = None
    for step, window in enumerate(windows, start=1):
        w = [p.detach().clone() for p in params]
        if m is not None:
            norm = math.sqrt(sum(float((x**2).sum()) for x in m))
            with torch.no_grad():
                for p, x in zip(params, m, strict=True):
                    p -= rho * x / norm
        g = [torch.zeros_like(p) for p in params]
        for batch in window:
            g = [a + b / len(window) for a, b in zip(g, grad_at(model, batch, params), strict=True)]
        with torch.no_grad():
            for p, x in zip(params, w, strict=True):
                p.copy_(x)
            m = (
                [(1 - betas[0]) * x for x in g]
                if m is None
                else [betas[0] * a + (1 - betas[0]) * b for a, b in zip(m, g, strict=True)]
            )
            v = (
                [(1 - betas[1]) * x * x for x in g]
                if v is None
                else [betas[1] * a + (1 - betas[1]) * b * b for a, b in zip(v, g, strict=True)]
            )
            for p, a, b in zip(params, m, v, strict=True):
                p.mul_(1 - lr * (weight_decay if p.ndim > 1 else 0.0))  # weight matrices only, as the Trainer
                denominator = (b / (1 - betas[1] ** step)).sqrt() + eps
                p -= lr / (1 - betas[0] ** step) * a / denominator
    return [p.detach().clone() for p in params]


class Weights:
    """Records the weights at every step end, save and evaluation: they must never be the perturbed ones."""

    def __init__(self):
        from transformers import TrainerCallback

        record = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                record.at_step_end.append([p.detach().clone() for p in model.parameters()])

            def on_evaluate(self, args, state, control, model=None, **kwargs):
                record.at_evaluate.append([p.detach().clone() for p in model.parameters()])

        self.at_step_end, self.at_evaluate, self.callback = [], [], Callback()


def train(tmp_path, rows, model=None, callbacks=(), **overrides):
    settings = {"sam_rho": RHO, "sam_mode": "momentum", "optim_args": f"momentum={MU}", "max_steps": 4}
    settings.update(overrides)
    trainer = SAMTrainer(
        model=model or make_model(),
        args=make_args(tmp_path, **settings),
        train_dataset=rows,
        eval_dataset=rows[:4],
        callbacks=list(callbacks),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2], ids=["ga1", "ga2"])
def test_sgd_steps_are_the_papers_algorithm(tmp_path, accumulation):
    rows = make_rows(32)
    per_device = 8 // accumulation
    micro = batches(rows, per_device)
    windows = [micro[i : i + accumulation] for i in range(0, 4 * accumulation, accumulation)]
    expected, losses = hand_msam_sgd(make_model(), windows, weight_decay=0.01)
    weights = Weights()
    trainer = train(
        tmp_path,
        rows,
        callbacks=[weights.callback],
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=1,
    )
    for step, (got, want) in enumerate(zip(weights.at_step_end, expected, strict=True)):
        for p, q in zip(got, want, strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"step {step + 1}")
    assert len(weights.at_evaluate) == 4
    for got, want in zip(weights.at_evaluate, expected, strict=True):  # evaluation sees w, never w − ρ·v/‖v‖
        for p, q in zip(got, want, strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["loss"] for e in logs] == pytest.approx(losses, rel=1e-5)  # the loss at the perturbed point
    assert [e["sam/fraction_sam_steps"] for e in logs] == [0.0, 1.0, 1.0, 1.0]  # no momentum at step 1: plain
    assert all(
        e["sam/forward_passes"] == accumulation and e["sam/backward_passes"] == accumulation for e in logs
    )
    assert not any(k in e for e in logs for k in ("sam/sharpness", "sam/perturbed_loss", "sam/grad_norm"))


@pytest.mark.parametrize("accumulation", [1, 2], ids=["ga1", "ga2"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_twenty_steps_stay_within_1e6_of_the_hand_loop(tmp_path, optimizer, accumulation):
    """The look-ahead is left by subtracting ε (no copy of w): over 20 steps the weights stay within 1e-6
    (relative, in norm) of the hand loop, which copies w back exactly."""
    rows, per_device = make_rows(160), 8 // accumulation
    micro = batches(rows, per_device)
    windows = [micro[i : i + accumulation] for i in range(0, 20 * accumulation, accumulation)]
    settings = dict(
        max_steps=20, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation
    )
    if optimizer == "sgd":
        expected = hand_msam_sgd(make_model(), windows)[0][-1]
        trainer = train(tmp_path, rows, **settings)
    else:
        expected = hand_msam_adamw(make_model(), windows)
        trainer = train(tmp_path, rows, optim="adamw_torch", optim_args=None, learning_rate=0.01,
                        weight_decay=0.01, **settings)  # fmt: skip
    got = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    want = torch.cat([q.reshape(-1) for q in expected])
    assert float((got - want).norm() / want.norm()) < 1e-6


def test_max_grad_norm_clips_the_one_gradient(tmp_path):
    rows = make_rows(32)
    expected, _ = hand_msam_sgd(make_model(), [[b] for b in batches(rows, 8)], clip=0.05)
    trainer = train(tmp_path, rows, max_grad_norm=0.05)
    for p, q in zip(trainer.model.parameters(), expected[-1], strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)


def test_adamw_follows_the_released_codes_version(tmp_path):
    rows = make_rows(32)
    expected = hand_msam_adamw(make_model(), [[b] for b in batches(rows, 8)])
    trainer = train(
        tmp_path, rows, optim="adamw_torch", optim_args=None, learning_rate=0.01, weight_decay=0.01
    )
    for p, q in zip(trainer.model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)


def test_the_wrapper_in_a_custom_loop_is_the_papers_algorithm():
    rows = make_rows(32)
    windows = [[b] for b in batches(rows, 8)]
    expected, _ = hand_msam_sgd(make_model(), windows)
    model = make_model()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=MU), rho=RHO, mode="momentum")
    for (batch,) in windows:
        sam.ascent_step()  # w -> w − ρ·v/‖v‖ (nothing at the first step)
        model(**batch)["loss"].backward()
        sam.descent_step()  # back to w exactly, then the SGD step
        sam.zero_grad()
    for p, q in zip(model.parameters(), expected[-1], strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="takes no ascent gradient"):
        sam.ascent_step(model(**windows[0][0])["loss"])


def test_resume_is_exact(tmp_path):
    rows = make_rows(48)
    common = dict(
        max_steps=6, save_strategy="steps", save_steps=3, train_sampling_strategy="random", logging_steps=1
    )
    whole = train(tmp_path / "whole", rows, **common)
    args = make_args(
        tmp_path / "whole", sam_rho=RHO, sam_mode="momentum", optim_args=f"momentum={MU}", **common
    )
    resumed = SAMTrainer(model=make_model(), args=args, train_dataset=rows, eval_dataset=rows[:4])
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / "checkpoint-3"))
    for p, q in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    logged = lambda t: [  # noqa: E731
        {k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
        for e in t.state.log_history
        if "loss" in e and e["step"] > 3
    ]
    assert logged(resumed) == logged(whole)


def test_bf16_autocast_and_a_cosine_schedule_take_the_fp32_steps_within_bf16_rounding(tmp_path):
    """bf16 autocast (fp32 weights) with a cosine schedule and warm-up: within bf16 rounding of the fp32 run, and
    far from the same run without the look-ahead (a mode that did not perturb would sit there)."""
    rows, settings = make_rows(32), dict(lr_scheduler_type="cosine", warmup_steps=1)
    bf16 = train(tmp_path / "bf16", rows, bf16=True, **settings)
    fp32 = train(tmp_path / "fp32", rows, **settings)
    plain = train(tmp_path / "plain", rows, bf16=True, sam_rho=0.0, sam_mode="sam", **settings)
    distance = lambda a, b: max(  # noqa: E731
        float((p - q).abs().max()) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True)
    )
    assert all(math.isfinite(e["loss"]) for e in bf16.state.log_history if "loss" in e)
    assert distance(bf16, fp32) < distance(bf16, plain) / 5


def test_lora_perturbs_and_trains_the_adapters_only(tmp_path):
    """The look-ahead moves the adapters (seen by the forward itself) and never the frozen base weights."""
    from transformers import TrainerCallback

    peft = pytest.importorskip("peft")

    class Recording(TinyNet):
        def forward(self, features, target=None):
            if self.training and torch.is_grad_enabled():
                seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
            return super().forward(features, target)

    seen = []
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False)
    model = peft.get_peft_model(Recording(), config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    at_step_end = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            at_step_end.append({n: p.detach().clone() for n, p in model.named_parameters()})

    train(tmp_path, make_rows(32), model=model, callbacks=[StepEnds()])
    assert len(seen) == 4  # one pass per step
    for step in (1, 2, 3):  # each step after the first looks ahead from the previous step's end
        for name, value in seen[step].items():
            moved = not torch.equal(value, at_step_end[step - 1][name])
            assert moved == (name not in frozen), name  # adapters perturbed, the base never
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optim": "sgd", "optim_args": None}, "optim='sgd' \\(optim_args=None\\) keeps none"),
        ({"optim": "sgd", "optim_args": "momentum=0.0"}, "keeps none"),
        ({"optim": "adagrad", "optim_args": None}, "optim='adagrad'"),
        ({"optim": "adafactor", "optim_args": None}, "optim='adafactor'"),
        # The Trainer passes no optim_args to Adafactor: "beta1" in them gives it no momentum.
        ({"optim": "adafactor", "optim_args": "beta1=0.9"}, "optim='adafactor'"),
        ({"optim": "schedule_free_sgd", "optim_args": None}, "optim='schedule_free_sgd'"),
        ({"sam_group_size": 2}, "cannot be combined with sam_group_size=2"),
        ({"sam_ascent_fraction": 0.5}, "cannot be combined with sam_ascent_fraction=0.5"),
        ({"sam_ascent_steps": 2}, "cannot be combined with sam_ascent_steps=2"),
        ({"sam_adaptive": True}, "cannot be combined with sam_adaptive=True"),
        ({"fsdp": True, "fsdp_config": {"version": 2}}, "not supported under FSDP"),
    ],
)
def test_settings_without_a_momentum_or_an_engine_for_it_are_refused(tmp_path, overrides, message):
    settings = {
        "sam_rho": RHO,
        "sam_mode": "momentum",
        "optim": "sgd",
        "optim_args": "momentum=0.9",
        **overrides,
    }
    with pytest.raises(ValueError, match=message):
        SAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **settings)


@pytest.mark.parametrize(
    ("optim", "optim_args"),
    [
        ("sgd", "momentum=0.9"),
        ("sgd", None),
        ("sgd", "momentum=0.0"),
        ("adamw_torch", None),
        ("adamw_torch_fused", None),
        ("adafactor", None),
        ("adafactor", "beta1=0.9"),
        ("adagrad", None),
        ("rmsprop", None),
        ("schedule_free_sgd", None),
    ],
)
@pytest.mark.parametrize("mode", ["momentum", "adam_update"])
def test_arguments_and_the_built_optimizer_agree_on_its_state(tmp_path, optim, optim_args, mode):
    """One table (`hf_sam.optimizer_state`) decides for the arguments and for the optimizer the Trainer builds from
    them: the arguments are refused exactly when the built optimizer would be."""
    from transformers import Trainer, TrainingArguments

    plain = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], optim=optim, optim_args=optim_args
    )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(plain)
    built = cls(make_model().parameters(), **kwargs)
    try:
        SAM(built, RHO, mode=mode)
        wrapper_refuses = False
    except ValueError:
        wrapper_refuses = True
    try:
        SAMTrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to=[], optim=optim, optim_args=optim_args,
            sam_rho=RHO, sam_mode=mode,
        )  # fmt: skip
        arguments_refuse = False
    except ValueError:
        arguments_refuse = True
    assert arguments_refuse == wrapper_refuses


def test_a_users_optimizer_without_momentum_is_refused_before_the_first_step(tmp_path):
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    args = make_args(tmp_path, sam_rho=RHO, sam_mode="momentum", optim_args="momentum=0.9", max_steps=2)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=LR)
    trainer = SAMTrainer(model=model, args=args, train_dataset=make_rows(16), optimizers=(optimizer, None))
    with pytest.raises(ValueError, match="Adagrad keeps no momentum"):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_rho_zero_is_the_stock_trainer(tmp_path):
    """ρ = 0 with sam_mode='momentum' is the stock Trainer bit for bit, weights and every logged number."""
    from test_compat_matrix import numbers
    from transformers import Trainer, TrainingArguments

    zero = train(tmp_path / "zero", make_rows(32), sam_rho=0.0)
    settings = {k: v for k, v in make_args(tmp_path / "stock").to_dict().items() if not k.startswith("sam_")}
    settings.update(optim_args=f"momentum={MU}", max_steps=4, output_dir=str(tmp_path / "stock"))
    settings = {k: v for k, v in settings.items() if k in TrainingArguments.__dataclass_fields__ and
                TrainingArguments.__dataclass_fields__[k].init}  # fmt: skip
    stock = Trainer(model=make_model(), args=TrainingArguments(**settings), train_dataset=make_rows(32))
    stock.train()
    assert all(
        torch.equal(p, q) for p, q in zip(stock.model.parameters(), zero.model.parameters(), strict=True)
    )
    assert numbers(zero.state.log_history) == numbers(stock.state.log_history)


# ---------------------------------------------------------------- sam_mode="previous_gradient"
def hand_previous_gradient_sgd(model, windows, rho=RHO, lr=LR, momentum=MU):
    """One pass per step at w + ρ·g_prev/‖g_prev‖, g_prev the gradient the previous step applied (a plain step
    first), then SGD with momentum at w."""
    params = list(model.parameters())
    v = g_prev = None
    for window in windows:
        w = [p.detach().clone() for p in params]
        if g_prev is not None:
            norm = math.sqrt(sum(float((x**2).sum()) for x in g_prev))
            with torch.no_grad():
                for p, x in zip(params, g_prev, strict=True):
                    p += rho * x / norm
        g = [torch.zeros_like(p) for p in params]
        for batch in window:
            g = [a + b / len(window) for a, b in zip(g, grad_at(model, batch, params), strict=True)]
        with torch.no_grad():
            for p, x in zip(params, w, strict=True):
                p.copy_(x)
            v = g if v is None else [momentum * a + b for a, b in zip(v, g, strict=True)]
            for p, x in zip(params, v, strict=True):
                p -= lr * x
        g_prev = g
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("accumulation", [1, 2], ids=["ga1", "ga2"])
def test_previous_gradient_steps_are_the_hand_loop(tmp_path, accumulation):
    rows = make_rows(32)
    micro = batches(rows, 8 // accumulation)
    windows = [micro[i : i + accumulation] for i in range(0, 4 * accumulation, accumulation)]
    expected = hand_previous_gradient_sgd(make_model(), windows)
    trainer = train(
        tmp_path,
        rows,
        sam_mode="previous_gradient",
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    for p, q in zip(trainer.model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["sam/fraction_sam_steps"] for e in logs] == [0.0, 1.0, 1.0, 1.0]
    assert "previous_gradient" in trainer.optimizer.state_dict()["sam_state"]  # in the checkpoint


def test_previous_gradient_resume_is_exact(tmp_path):
    rows = make_rows(48)
    common = dict(
        sam_mode="previous_gradient", max_steps=6, save_strategy="steps", save_steps=3, logging_steps=1,
        train_sampling_strategy="random",
    )  # fmt: skip
    whole = train(tmp_path / "whole", rows, **common)
    args = make_args(tmp_path / "whole", sam_rho=RHO, optim_args=f"momentum={MU}", **common)
    resumed = SAMTrainer(model=make_model(), args=args, train_dataset=rows, eval_dataset=rows[:4])
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / "checkpoint-3"))
    for p, q in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q)


class TwinNet(torch.nn.Module):
    """Two hidden layers of the same shape, so freezing one and unfreezing the other keeps both the count and the
    shapes of the trainable tensors: a positional store of per-parameter state cannot tell them apart."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

    def forward(self, features, target=None):
        logits = self.head(torch.tanh(self.b(torch.tanh(self.a(features)))))
        return {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, target)}


# Which layers are trainable as each optimizer step starts: all, then `a` frozen, then `b` frozen and `a` again
# trainable (the same count and shapes as the step before), then all.
TRAINABLE = [("a", "b", "head"), ("b", "head"), ("a", "head"), ("a", "b", "head")]


def hand_previous_gradient_frozen(model, windows, rho=RHO, lr=LR):
    """The previous-gradient look-ahead keyed by parameter: each step looks ahead along the gradient the previous
    step applied to each parameter it trains now (zero for one the previous step did not train), then plain SGD."""
    g_prev: dict[int, torch.Tensor] = {}
    for step, window in enumerate(windows):
        trainable = [p for name in TRAINABLE[step] for p in getattr(model, name).parameters()]
        w = [p.detach().clone() for p in trainable]
        if g_prev:
            d = [g_prev.get(id(p), torch.zeros_like(p)) for p in trainable]
            norm = math.sqrt(sum(float((x**2).sum()) for x in d))
            with torch.no_grad():
                for p, x in zip(trainable, d, strict=True):
                    p += rho * x / norm
        g = [torch.zeros_like(p) for p in trainable]
        for batch in window:
            g = [a + b / len(window) for a, b in zip(g, grad_at(model, batch, trainable), strict=True)]
        with torch.no_grad():
            for p, x, grad in zip(trainable, w, g, strict=True):
                p.copy_(x - lr * grad)
        g_prev = {id(p): grad for p, grad in zip(trainable, g, strict=True)}
    return [p.detach().clone() for p in model.parameters()]


def test_previous_gradient_follows_its_parameter_through_freezing(tmp_path):
    """Freezing `b` and unfreezing `a` in one step keeps the number (and shapes) of perturbed tensors: the stored
    gradient of `b` must not become `a`'s direction. Each parameter keeps its own previous gradient."""
    from transformers import TrainerCallback

    class Trainable(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            for name in ("a", "b", "head"):
                getattr(model, name).requires_grad_(name in TRAINABLE[state.global_step])

    rows = make_rows(32)
    windows = [[batch] for batch in batches(rows, 8)]
    expected = hand_previous_gradient_frozen(TwinNet(), windows)
    model = TwinNet()
    args = make_args(tmp_path, sam_rho=RHO, sam_mode="previous_gradient", max_steps=4)
    SAMTrainer(model=model, args=args, train_dataset=rows, callbacks=[Trainable()]).train()
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)
