"""hf_sam.sharpness against closed forms and dense references computed independently of the code under test."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from hf_sam.sharpness import hessian_eigenvalues, m_sharpness, model_loss, split_batch
from tests.toy import make_model, make_rows, stack


def mse(model, batch):
    x, y = batch
    return ((model(x).squeeze(-1) - y) ** 2).mean()


class Quadratic(nn.Module):
    """L(w) = ½ (w − c)ᵀ H (w − c) + bᵀ(w − c): a loss with a Hessian H we choose. The batch is ignored."""

    def __init__(self, hessian, center=None, linear=None, start=None):
        super().__init__()
        n = hessian.shape[0]
        self.register_buffer("h", torch.as_tensor(hessian, dtype=torch.float64))
        self.register_buffer("c", torch.zeros(n, dtype=torch.float64) if center is None else center.double())
        self.register_buffer("b", torch.zeros(n, dtype=torch.float64) if linear is None else linear.double())
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64) if start is None else start.double())

    def forward(self, batch):
        d = self.w - self.c
        return 0.5 * d @ self.h @ d + self.b @ d


def quadratic_loss(model, batch):
    return model(batch)


# hf_sam.sam.compute_perturbation_ takes ‖g‖ in float32 even for float64 models, so ε = ρ g/‖g‖ carries a relative
# error of ~1e-8: the closed forms below are met to that precision, not to float64's.
FP32_NORM = 1e-6

ONE_BATCH = [torch.zeros(1)]  # the Quadratic ignores its input; one "example" per batch


def random_orthogonal(n, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


# ---------------------------------------------------------------------- Hessian eigenvalues
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-7), (torch.float32, 1e-4)])
def test_linear_regression_top_eigenvalues_match_closed_form(dtype, rtol):
    # MSE of a linear model: H = (2/N) X̃ᵀX̃ with X̃ = [X, 1] (weights then bias), whatever the weights are.
    # 41 parameters > max_iter, so this exercises the early stop on the residual, not an exhaustive Krylov space.
    rng = np.random.default_rng(0)
    n, d = 90, 40
    x = rng.standard_normal((n, d)) * np.linspace(0.2, 3.0, d)  # a spread-out spectrum
    y = rng.standard_normal(n)
    x_tilde = np.hstack([x, np.ones((n, 1))])
    expected = np.sort(np.linalg.eigvalsh(2 / n * x_tilde.T @ x_tilde))[::-1][:5]

    torch.manual_seed(0)
    model = nn.Linear(d, 1).to(dtype)
    xt, yt = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)
    # Unequal batches: the batches must be weighted by their number of examples to give the full-data Hessian.
    batches = [(xt[:40], yt[:40]), (xt[40:80], yt[40:80]), (xt[80:], yt[80:])]
    spectrum = hessian_eigenvalues(model, batches, top_k=5, loss_fn=mse, tol=1e-6)

    assert spectrum.converged and spectrum.iterations < d + 1
    np.testing.assert_allclose(spectrum.eigenvalues, expected, rtol=rtol)
    assert spectrum.lambda_max == spectrum.eigenvalues[0]
    assert spectrum.ratio == pytest.approx(expected[0] / expected[4], rel=rtol * 10)


def test_repeated_eigenvalues_are_found_with_their_multiplicity():
    # Plain Lanczos sees only one copy of a repeated eigenvalue (its Krylov space closes); the restart finds all.
    eigenvalues = np.array([4.0, 4.0, 4.0, 2.0, 1.0, 1.0, 0.5, 0.25, -0.5, -3.0])
    q = random_orthogonal(10, seed=1)
    model = Quadratic(q @ np.diag(eigenvalues) @ q.T)
    spectrum = hessian_eigenvalues(model, ONE_BATCH, top_k=5, loss_fn=quadratic_loss)
    np.testing.assert_allclose(spectrum.eigenvalues, [4.0, 4.0, 4.0, 2.0, 1.0], atol=1e-9)
    assert spectrum.ratio == pytest.approx(4.0)


def test_ratio_is_nan_when_lambda_k_is_not_positive():
    model = Quadratic(np.diag([3.0, -1.0]))
    spectrum = hessian_eigenvalues(model, ONE_BATCH, top_k=2, loss_fn=quadratic_loss)
    np.testing.assert_allclose(spectrum.eigenvalues, [3.0, -1.0], atol=1e-12)
    assert math.isnan(spectrum.ratio)


def dense_hessian_eigenvalues(model, batch):
    """Independent reference: the full Hessian by torch.func.hessian over the flattened parameters, in eval mode."""
    model = copy.deepcopy(model).eval().double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}

    def loss_of(flat_params):
        pieces = flat_params.split([s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        return torch.func.functional_call(model, params, kwargs=batch)["loss"]

    return torch.linalg.eigvalsh(torch.func.hessian(loss_of)(flat)).flip(0)


def test_nonlinear_network_matches_dense_hessian_and_leaves_the_model_untouched():
    model = make_model(batchnorm=True, dropout=0.5).double()  # 83 parameters, BatchNorm and dropout
    model.train()
    rows = make_rows(n=32, seed=3)
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in stack(rows).items()}
    model(**batch)  # give BatchNorm non-trivial running statistics
    model.norm.eval()  # a frozen-BN recipe: this module's own mode must come back as eval
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # sentinel: measuring must not touch .grad
    before = copy.deepcopy(model.state_dict())
    rng_before = torch.get_rng_state()

    batches = [{k: v[:20] for k, v in batch.items()}, {k: v[20:] for k, v in batch.items()}]
    spectrum = hessian_eigenvalues(model, batches, top_k=3, tol=1e-8, seed=5)
    expected = dense_hessian_eigenvalues(model, batch)[:3]
    np.testing.assert_allclose(spectrum.eigenvalues, expected.numpy(), rtol=1e-6)

    again = hessian_eigenvalues(model, batches, top_k=3, tol=1e-8, seed=5)
    assert again.eigenvalues == spectrum.eigenvalues  # deterministic for a fixed seed
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG not consumed
    assert model.training and model.fc1.training and not model.norm.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and BatchNorm buffers untouched
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


# ---------------------------------------------------------------------- m-sharpness
def test_m_sharpness_of_a_linear_loss_is_rho_times_the_chunk_gradient_norm():
    # L_chunk(w) = w · mean(x over the chunk): the max over the ball is ρ‖mean x‖, reached in one step.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 5))
    model = nn.Linear(5, 1, bias=False).double()

    def linear_loss(model, batch):
        return model(batch).mean()

    batches = [torch.tensor(x[:12]), torch.tensor(x[12:])]
    rho = 0.3
    for m in (1, 4, 5, 12):
        # Reference: chunks of m consecutive rows inside each batch of 12; the leftover 12 % m rows are dropped.
        chunks = [x[s : s + m] for b in (0, 12) for s in range(b, b + 12 - m + 1, m)]
        expected = np.mean([rho * np.linalg.norm(c.mean(axis=0)) for c in chunks])
        for steps in (1, 3):
            result = m_sharpness(model, batches, m=m, rho=rho, ascent_steps=steps, loss_fn=linear_loss)
            assert result.value == pytest.approx(expected, rel=FP32_NORM)
            assert result.num_chunks == len(chunks) and result.dropped_examples == 2 * (12 % m)


def test_m_sharpness_of_an_isotropic_quadratic_is_exact_after_one_step():
    # L = h/2 ‖w − c‖²: max over ‖ε‖ ≤ ρ of L(w+ε) − L(w) = hρ‖w − c‖ + hρ²/2 (ε along w − c).
    h, rho = 3.0, 0.2
    start, center = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.1, -0.4])
    model = Quadratic(h * np.eye(3), center=center, start=start)
    expected = h * rho * (start - center).norm().item() + h * rho**2 / 2
    result = m_sharpness(model, ONE_BATCH, m=1, rho=rho, loss_fn=quadratic_loss)
    assert result.value == pytest.approx(expected, rel=FP32_NORM)


def test_more_ascent_steps_approach_the_true_maximum_on_an_anisotropic_quadratic():
    # A convex loss peaks on the sphere ‖ε‖ = ρ: a fine sweep of the circle is an independent reference.
    # The gradient at w points mostly along the flat direction, the maximum lies along the sharp one.
    hessian = np.array([[5.0, 0.5], [0.5, 0.5]])
    start, linear, rho = torch.zeros(2), torch.tensor([0.05, 0.3]), 0.5
    model = Quadratic(hessian, linear=linear, start=start)

    angles = np.linspace(0, 2 * np.pi, 200_001)
    eps = rho * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    d = start.numpy() + eps
    losses = 0.5 * np.einsum("ni,ij,nj->n", d, hessian, d) + d @ linear.numpy()
    w = start.numpy()
    expected = losses.max() - (0.5 * w @ hessian @ w + linear.numpy() @ w)

    one = m_sharpness(model, ONE_BATCH, m=1, rho=rho, ascent_steps=1, loss_fn=quadratic_loss).value
    many = m_sharpness(model, ONE_BATCH, m=1, rho=rho, ascent_steps=30, loss_fn=quadratic_loss).value
    assert one < expected - 0.3  # the linearised step (SAM's ε) badly underestimates the maximum here
    assert one <= many
    assert many == pytest.approx(expected, rel=1e-9)


def test_m_sharpness_one_step_equals_the_sam_perturbed_loss_and_restores_everything():
    model = make_model(batchnorm=True, dropout=0.5).double()
    rows = make_rows(n=16, seed=4)
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in stack(rows).items()}
    model.train()
    model(**batch)
    before = copy.deepcopy(model.state_dict())
    rho = 0.5

    # Reference by hand, in eval mode on a copy: ε = ρ g/‖g‖ per chunk of 8, then L(w+ε) − L(w) (≥ 0 by the max).
    reference = copy.deepcopy(model).eval()
    params = list(reference.parameters())
    expected = []
    for chunk in split_batch(batch, 8):
        loss = model_loss(reference, chunk)
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(rho * g / norm)
            expected.append(max(model_loss(reference, chunk).item() - loss.item(), 0.0))
            for p, g in zip(params, grads, strict=True):
                p.sub_(rho * g / norm)
    assert min(expected) > 0

    result = m_sharpness(model, [batch], m=8, rho=rho)
    assert result.per_chunk == pytest.approx(expected, rel=FP32_NORM)
    assert result.value == pytest.approx(np.mean(expected), rel=FP32_NORM)
    assert model.training and model.norm.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # exact restore, BatchNorm statistics not updated


def test_plain_module_with_input_target_pairs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    result = m_sharpness(model, [(x, y)], m=4, rho=0.05)
    assert result.num_chunks == 3 and result.value >= 0
    assert hessian_eigenvalues(model, [(x, y)]).lambda_max > 0


# ---------------------------------------------------------------------- helpers and errors
def test_split_batch_slices_tensors_and_shares_the_rest():
    batch = {"x": torch.arange(10).view(5, 2), "y": torch.arange(5), "name": "digits", "t": torch.tensor(1.0)}
    chunks = split_batch(batch, 2)
    assert len(chunks) == 2  # the fifth example is dropped
    assert torch.equal(chunks[1]["x"], torch.tensor([[4, 5], [6, 7]])) and torch.equal(
        chunks[1]["y"], torch.tensor([2, 3])
    )
    assert chunks[0]["name"] == "digits" and chunks[0]["t"].item() == 1.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda mod, b: m_sharpness(mod, b, m=0), "m must be a positive integer"),
        (lambda mod, b: m_sharpness(mod, b, m=2, rho=0), "rho must be a finite number > 0"),
        (lambda mod, b: m_sharpness(mod, b, m=2, ascent_steps=0), "ascent_steps must be a positive integer"),
        (lambda mod, b: m_sharpness(mod, b, m=100), "every batch is smaller than m"),
        (lambda mod, b: m_sharpness(mod, [], m=2), "`batches` is empty"),
        (lambda mod, b: hessian_eigenvalues(mod, b, top_k=0), "top_k must be a positive integer"),
        (
            lambda mod, b: hessian_eigenvalues(mod, b, top_k=2, max_iter=1),
            "max_iter must be an integer >= top_k",
        ),
        (lambda mod, b: hessian_eigenvalues(mod, b, loss_fn=lambda m_, b_: torch.ones(3)), "scalar tensor"),
        (lambda mod, b: hessian_eigenvalues(mod, [{"features": b[0]["features"]}]), "returned no loss"),
        (lambda mod, b: hessian_eigenvalues(mod.requires_grad_(False), b), "no trainable parameter"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        call(model, [stack(make_rows(n=8))])


def test_an_unconverged_lanczos_says_so_with_the_advice():
    model = make_model().double()
    batch = {
        k: (v.double() if v.is_floating_point() else v) for k, v in stack(make_rows(n=32, seed=3)).items()
    }
    with pytest.warns(RuntimeWarning, match="did not converge.*raise max_iter"):
        spectrum = hessian_eigenvalues(model, [batch], top_k=5, max_iter=5, tol=1e-12)
    assert not spectrum.converged
