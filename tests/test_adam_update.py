"""`sam_mode="adam_update"`: one forward+backward per step at w − ρ·u/‖u‖, u = m̂/(√v̂ + ε) the update AdamW takes
next (Momentum-SAM's look-ahead along Adam's own step instead of its first moment), against a hand-written AdamW
loop; read a tensor at a time (`hf_sam.sam.AdamUpdate`), never stored whole."""

import math

import pytest
import torch
from test_momentum_sam import Weights, grad_at
from test_trainer import make_args
from test_variants import batches
from toy import make_model, make_rows

from hf_sam import SAM, SAMTrainer, SAMTrainingArguments
from hf_sam.sam import AdamUpdate, adam_update_direction, direction_norm, global_norm

RHO, LR, BETAS, EPS, WD = 0.3, 0.01, (0.9, 0.999), 1e-8, 0.01


def hand_adam_update(model, windows, rho=RHO, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD):
    """AdamW written out plainly (decoupled weight decay on weight matrices, as the Trainer's groups), with every
    step after the first taking its gradient at w − ρ·u/‖u‖, u = m̂/(√v̂ + ε) from the moments so far. Returns
    the weights after each step and each step's loss (the mean of its micro-batches' losses at that point)."""
    params = list(model.parameters())
    m = v = None
    weights, losses = [], []
    for step, window in enumerate(windows, start=1):
        w = [p.detach().clone() for p in params]
        if m is not None:
            done = step - 1
            u = [
                (a / (1 - betas[0] ** done)) / ((b / (1 - betas[1] ** done)).sqrt() + eps)
                for a, b in zip(m, v, strict=True)
            ]
            norm = math.sqrt(sum(float((x**2).sum()) for x in u))
            with torch.no_grad():
                for p, x in zip(params, u, strict=True):
                    p -= rho * x / norm
        g, loss = [torch.zeros_like(p) for p in params], 0.0
        for batch in window:
            loss += float(model(**batch)["loss"].detach()) / len(window)
            g = [a + b / len(window) for a, b in zip(g, grad_at(model, batch, params), strict=True)]
        with torch.no_grad():
            for p, x in zip(params, w, strict=True):
                p.copy_(x)  # back to w
            m = [(1 - betas[0]) * x if m is None else betas[0] * a + (1 - betas[0]) * x
                 for a, x in zip(m or g, g, strict=True)]  # fmt: skip
            v = [(1 - betas[1]) * x * x if v is None else betas[1] * a + (1 - betas[1]) * x * x
                 for a, x in zip(v or g, g, strict=True)]  # fmt: skip
            for p, a, b in zip(params, m, v, strict=True):
                p.mul_(1 - lr * (weight_decay if p.ndim > 1 else 0.0))
                p -= lr / (1 - betas[0] ** step) * a / ((b / (1 - betas[1] ** step)).sqrt() + eps)
        weights.append([p.detach().clone() for p in params])
        losses.append(loss)
    return weights, losses


def train(tmp_path, rows, callbacks=(), **overrides):
    settings = {"sam_rho": RHO, "sam_mode": "adam_update", "optim": "adamw_torch", "optim_args": None,
                "learning_rate": LR, "weight_decay": WD, "max_steps": 5}  # fmt: skip
    settings.update(overrides)
    trainer = SAMTrainer(
        model=make_model(),
        args=make_args(tmp_path, **settings),
        train_dataset=rows,
        eval_dataset=rows[:4],
        callbacks=list(callbacks),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2], ids=["ga1", "ga2"])
def test_steps_are_the_hand_adamw_loop_looking_ahead_along_its_update(tmp_path, accumulation):
    rows, per_device = make_rows(40 * accumulation), 8 // accumulation
    micro = batches(rows, per_device)
    windows = [micro[i : i + accumulation] for i in range(0, 5 * accumulation, accumulation)]
    expected, losses = hand_adam_update(make_model(), windows)
    weights = Weights()
    trainer = train(
        tmp_path, rows, callbacks=[weights.callback], per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, eval_strategy="steps", eval_steps=1,
    )  # fmt: skip
    for step, (got, want) in enumerate(zip(weights.at_step_end, expected, strict=True)):
        for p, q in zip(got, want, strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"step {step + 1}")
    for got, want in zip(weights.at_evaluate, expected, strict=True):  # evaluation sees w, never w − ρ·u/‖u‖
        for p, q in zip(got, want, strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["loss"] for e in logs] == pytest.approx(losses, rel=1e-5)  # the loss at the look-ahead point
    assert [e["sam/fraction_sam_steps"] for e in logs] == [0.0, 1.0, 1.0, 1.0, 1.0]  # no moments at step 1
    assert all(e["sam/forward_passes"] == accumulation for e in logs)


def test_it_differs_from_the_look_ahead_along_the_first_moment(tmp_path):
    """The control: the same run with sam_mode='momentum' (along m) ends elsewhere, so the test above can fail."""
    rows = make_rows(40)
    along_u = train(tmp_path / "u", rows)
    along_m = train(tmp_path / "m", rows, sam_mode="momentum")
    gap = max(
        float((p - q).detach().abs().max())
        for p, q in zip(along_u.model.parameters(), along_m.model.parameters())
    )
    assert gap > 1e-4


def test_resume_is_exact(tmp_path):
    rows = make_rows(48)
    common = dict(
        max_steps=6, save_strategy="steps", save_steps=3, train_sampling_strategy="random", logging_steps=1
    )
    whole = train(tmp_path / "whole", rows, **common)
    args = make_args(tmp_path / "whole", sam_rho=RHO, sam_mode="adam_update", optim="adamw_torch",
                     optim_args=None, learning_rate=LR, weight_decay=WD, **common)  # fmt: skip
    resumed = SAMTrainer(model=make_model(), args=args, train_dataset=rows, eval_dataset=rows[:4])
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / "checkpoint-3"))
    for p, q in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_the_wrapper_in_a_custom_loop_is_the_hand_loop():
    rows = make_rows(40)
    windows = [[b] for b in batches(rows, 8)]
    expected, _ = hand_adam_update(make_model(), windows)
    model = make_model()
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}]
    sam = SAM(torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS), rho=RHO, mode="adam_update")
    for (batch,) in windows:
        sam.ascent_step()
        model(**batch)["loss"].backward()
        sam.descent_step()
        sam.zero_grad()
    order = {id(p): i for i, p in enumerate(model.parameters())}
    for p in model.parameters():
        torch.testing.assert_close(p.detach(), expected[-1][order[id(p)]], atol=1e-6, rtol=0)


def test_the_direction_is_read_a_tensor_at_a_time_and_matches_adams_formula():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, amsgrad=True)
    params = list(model.parameters())
    assert adam_update_direction(optimizer, params) is None  # before the first step
    rows = make_rows(8)
    for batch in batches(rows, 4):
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    u = adam_update_direction(optimizer, params)
    assert isinstance(u, AdamUpdate) and len(u) == len(params)
    for p, got in zip(params, u, strict=True):  # amsgrad: the running maximum of v̂ is Adam's denominator
        state = optimizer.state[p]
        want = (state["exp_avg"] / (1 - 0.9**2)) / ((state["max_exp_avg_sq"] / (1 - 0.999**2)).sqrt() + 1e-8)
        torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
    materialised = list(u)
    torch.testing.assert_close(direction_norm([u[:2], u[2:]]), global_norm(materialised), atol=0, rtol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [{"optim": "sgd", "optim_args": "momentum=0.9"}, {"optim": "adafactor"}],
    ids=["sgd", "adafactor"],
)
def test_an_optimizer_that_is_not_adam_is_refused_by_the_arguments(tmp_path, overrides):
    with pytest.raises(ValueError, match="sam_mode='adam_update'.*Use optim='adamw_torch'"):
        SAMTrainingArguments(output_dir=str(tmp_path), sam_rho=RHO, sam_mode="adam_update", **overrides)


def test_a_users_optimizer_that_is_not_adam_is_refused_before_the_first_step(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = SAMTrainer(
        model=model, args=make_args(tmp_path, sam_rho=RHO, sam_mode="adam_update", optim="adamw_torch", max_steps=2),
        train_dataset=make_rows(16), optimizers=(optimizer, None),
    )  # fmt: skip
    with pytest.raises(ValueError, match="sam_mode='adam_update'.*optimizer is SGD"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize(
    "mode, base",
    [("adam_update", lambda p: torch.optim.AdamW(p, maximize=True)),
     ("momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, maximize=True))],
    ids=["adam_update", "momentum"],
)  # fmt: skip
def test_a_maximizing_optimizer_is_refused(mode, base):
    """maximize=True steps along +u (+v): a look-ahead along −u would point away from the step it anticipates."""
    with pytest.raises(ValueError, match=f"mode='{mode}'.*maximize=True"):
        SAM(base(make_model().parameters()), rho=RHO, mode=mode)


@pytest.mark.parametrize("piece", [7, 1 << 20], ids=["in pieces", "whole tensors"])
def test_entering_and_norming_in_pieces_match_adams_formula(monkeypatch, piece):
    """`AdamUpdate.add_to_` and its norm walk each tensor in pieces of ≤ PIECE elements with a reused scratch buffer:
    ragged pieces (7 does not divide the sizes), a strided tensor (read whole) and a parameter Adam has not stepped
    give w + α·u and ‖u‖ of Adam's formula."""
    import hf_sam.one_pass as one_pass

    monkeypatch.setattr(one_pass, "PIECE", piece)
    torch.manual_seed(0)
    params = [
        torch.randn(5, 9),
        torch.randn(3, 4).t(),
        torch.randn(30),
        torch.randn(6),
    ]  # the second is strided
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params[:3], lr=LR, betas=BETAS, eps=EPS)
    for _ in range(3):
        for p in params[:3]:
            p.grad = torch.randn_like(p)
        optimizer.step()
    u = adam_update_direction(optimizer, params)
    step = 3
    want = []
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            want.append(torch.zeros_like(p))
            continue
        m_hat, v_hat = state["exp_avg"] / (1 - BETAS[0] ** step), state["exp_avg_sq"] / (1 - BETAS[1] ** step)
        want.append(m_hat / (v_hat.sqrt() + EPS))
    torch.testing.assert_close(direction_norm([u]), global_norm(want), atol=0, rtol=1e-5)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        u.add_to_(params, -0.5)
    for p, w, d in zip(params, before, want, strict=True):
        torch.testing.assert_close(p.detach(), w - 0.5 * d, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        u.add_to_(params, 0.5)
    for p, w in zip(params, before, strict=True):
        torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=0)
