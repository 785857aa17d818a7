"""The top eigenvalues of the Hessian of the training loss, by the Lanczos algorithm on Hessian-vector products
(the SAM paper's section 4.2: λmax and λmax/λ5). Imports torch only; the public names are also `hf_sam.sharpness`'s."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hf_sam import measurement
from hf_sam.measurement import LossFn, measurement_mode, model_loss


@dataclass
class HessianSpectrum:
    """Top eigenvalues of the Hessian of the training loss, largest first (algebraic order)."""

    eigenvalues: list[float]
    residuals: list[float]  # ‖H y − θ y‖ of each Ritz pair: an error bar on each eigenvalue
    iterations: int  # Hessian-vector products taken (each one pass over all batches)
    converged: bool

    @property
    def lambda_max(self) -> float:
        return self.eigenvalues[0]

    @property
    def ratio(self) -> float:
        """λmax/λk with k = len(eigenvalues) (the paper reports λmax/λ5); NaN when λk ≤ 0."""
        lambda_k = self.eigenvalues[-1]
        return self.eigenvalues[0] / lambda_k if lambda_k > 0 else math.nan


class _HessianOperator:
    """v ↦ H v for the example-weighted mean loss over fixed batches, by double backward (no Hessian stored)."""

    def __init__(self, model, batches, loss_fn, params, dtype):
        self.model, self.loss_fn, self.params, self.dtype = model, loss_fn, params, dtype
        self.device = params[0].device
        self.batches = batches
        sizes = [measurement.batch_size(b) for b in batches]
        # Weight each batch by its share of the examples: the result is the Hessian of the mean loss over the
        # union of the batches even when the last batch is smaller.
        self.weights = [s / sum(sizes) for s in sizes]
        self.numel = sum(p.numel() for p in params)

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        pieces = [
            v.view_as(p).to(p.dtype)
            for v, p in zip(vector.split([p.numel() for p in self.params]), self.params, strict=True)
        ]
        out = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        for batch, weight in zip(self.batches, self.weights, strict=True):
            loss = measurement.scalar_loss(
                self.loss_fn, self.model, measurement.to_device(batch, self.device)
            )
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            # H v = ∇(∇L · v): one more backward through the gradient graph.
            dot = sum(
                (g * v).sum() for g, v in zip(grads, pieces, strict=True) if g is not None and g.requires_grad
            )
            if not isinstance(dot, torch.Tensor):
                continue  # the loss is linear in every parameter on this batch: H = 0
            hv = torch.autograd.grad(dot, self.params, allow_unused=True, materialize_grads=True)
            out.add_(torch.cat([h.reshape(-1).to(self.dtype) for h in hv]), alpha=weight)
        return out


def hessian_eigenvalues(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    top_k: int = 1,
    loss_fn: LossFn = model_loss,
    num_batches: int | None = None,
    max_iter: int = 30,
    tol: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> HessianSpectrum:
    """The `top_k` largest eigenvalues of the Hessian of the training loss, by the Lanczos algorithm.

    The loss is the example-weighted mean of `loss_fn` over the first `num_batches` batches (all if None); the
    batches are held in memory and the same ones are used for every Hessian-vector product. Lanczos runs with
    full reorthogonalisation and stops once the top `top_k` Ritz values have residual ‖H y − θ y‖ ≤ tol·|θ₁|,
    or after `max_iter` products (one pass over the batches each). A repeated eigenvalue is found with its
    multiplicity: when the Krylov space closes (an invariant subspace), Lanczos restarts from a fresh vector
    orthogonal to it. Memory: `max_iter` vectors of the trainable-parameter size (≈ 10 GB in float32 for
    ViT-B with max_iter = 30). Every module is in eval mode while measuring (BatchNorm on running statistics,
    no dropout); modes, weights, `.grad` and the global RNG are left as they were. Deterministic for a fixed
    `seed` (the start vector's).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    if not isinstance(max_iter, int) or max_iter < top_k:
        raise ValueError(f"max_iter must be an integer >= top_k ({top_k}), got {max_iter!r}.")
    batches = measurement.collect_batches(batches, num_batches)
    params = measurement.trainable_parameters(model)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    with measurement_mode(model):
        operator = _HessianOperator(model, batches, loss_fn, params, dtype)
        n = operator.numel
        if top_k > n:
            raise ValueError(f"top_k={top_k} exceeds the number of trainable parameters ({n}).")
        spectrum = _lanczos(operator, n, top_k, min(max_iter, n), tol, seed, dtype, progress)
    if not spectrum.converged:
        scale = abs(spectrum.eigenvalues[0]) or 1.0
        warnings.warn(
            f"hessian_eigenvalues: Lanczos did not converge in {spectrum.iterations} Hessian-vector products "
            f"(largest residual {max(spectrum.residuals) / scale:.2g} of |λmax|, tol={tol:g}). Each eigenvalue is a "
            f"lower bound on the true one, within its residual; raise max_iter (e.g. to {2 * max_iter}) or tol. "
            "More eigenvalues (top_k) need more iterations.",
            RuntimeWarning,
            stacklevel=2,
        )
    return spectrum


def _lanczos(matvec, n, top_k, iterations, tol, seed, dtype, progress) -> HessianSpectrum:
    device = matvec.device
    generator = torch.Generator().manual_seed(seed)  # private: measuring must not move the training RNG

    def random_unit_vector(basis: torch.Tensor) -> torch.Tensor:
        v = torch.randn(n, generator=generator, dtype=dtype).to(device)
        v = _orthogonalize(v, basis)
        return v / v.norm()

    basis = torch.empty(iterations, n, dtype=dtype, device=device)  # the Lanczos vectors, one per row
    alphas: list[float] = []
    betas: list[float] = []  # off-diagonal of T; 0 where Lanczos restarted
    v = random_unit_vector(basis[:0])
    v_prev, beta = None, 0.0
    theta = residuals = None
    converged = False
    for j in measurement.with_progress(range(iterations), progress, desc="Lanczos", leave=False):
        basis[j] = v
        w = matvec(v)
        alpha = torch.dot(w, v).item()
        w = w - alpha * v if v_prev is None else w - alpha * v - beta * v_prev
        # Full reorthogonalisation against every Lanczos vector: without it rounding errors bring back copies of
        # converged eigenvectors ("ghost" eigenvalues). Done twice, as classical Gram-Schmidt needs.
        w = _orthogonalize(w, basis[: j + 1])
        beta = w.norm().item()
        alphas.append(alpha)

        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(t)  # Ritz values, ascending
        # ‖H y_i − θ_i y_i‖ = |β_j · s_{j,i}| for the Ritz vector y_i = Q s_i (the standard Lanczos bound).
        residuals = (beta * s[-1, :].abs()).tolist()
        scale = max(abs(theta[-1].item()), abs(theta[0].item()), 1e-30)
        if j + 1 == iterations:
            break
        if beta <= 1e-10 * scale:
            # Invariant subspace: its Ritz values are exact, but a repeated eigenvalue appears in it only once
            # (the Krylov space holds one vector per distinct eigenvalue). Restart from a fresh vector orthogonal
            # to it to find the other copies; the residuals would otherwise all read 0 and stop us too early.
            v_prev, beta = None, 0.0
            v = random_unit_vector(basis[: j + 1])
        elif j + 1 >= top_k and max(residuals[::-1][:top_k]) <= tol * scale:
            converged = True
            break
        else:
            v_prev, v = v, w / beta
        betas.append(beta)

    order = theta.argsort(descending=True)[:top_k]
    if len(order) < top_k:  # cannot happen when iterations >= top_k; kept as a clear failure
        raise RuntimeError(f"Lanczos found {len(order)} eigenvalues, fewer than top_k={top_k}.")
    return HessianSpectrum(
        eigenvalues=[theta[i].item() for i in order],
        residuals=[residuals[i] for i in order],
        iterations=len(alphas),
        converged=converged or len(alphas) == n,  # a full-dimensional Krylov space is exact
    )


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    for _ in range(2):
        if basis.shape[0]:
            w = w - basis.T @ (basis @ w)
    return w
