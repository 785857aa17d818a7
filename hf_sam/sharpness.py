"""Measure sharpness: top Hessian eigenvalues (Lanczos) and m-sharpness. Imports torch only.

The SAM paper's evidence that SAM finds flatter minima (Foret et al. 2021):

- section 4.2: the top eigenvalues of the Hessian of the training loss, λmax and λmax/λ5, estimated with the
  Lanczos algorithm on Hessian-vector products (≈ 25 with SGD versus ≈ 1.0 with SAM; 11.4 versus 2.6);
- section 4.1: m-sharpness, the mean over disjoint chunks of m examples of max_{‖ε‖₂ ≤ ρ} L(w + ε) − L(w).

Both functions here work on any `torch.nn.Module` through a `loss_fn(model, batch) -> scalar loss` (default
`model_loss`: `model(**batch).loss` for Hugging Face models and dict-returning modules, cross-entropy for
`(inputs, targets)` batches). The loss must be a mean over the batch's examples.

Measuring never changes the model: every module is put in eval mode while measuring (BatchNorm uses its running
statistics, so its buffers are not updated and the loss is a deterministic function of w; dropout is off) and each
module's own mode is restored afterwards; weights moved to w + ε are copied back exactly (`WeightBackup`);
gradients are taken with `torch.autograd.grad`, so `.grad` is untouched; the global RNG is not consumed (the
Lanczos start vector comes from a private generator seeded by `seed`). Only the trainable parameters
(`requires_grad=True`; with PEFT, the adapters) are measured: the Hessian is the one over those parameters.

Models with attention: double backward (Hessian-vector products) needs an attention kernel that supports it;
load Hugging Face models with `attn_implementation="eager"` if the fused kernel refuses.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hf_sam.perturbation import PerturbationGroup, perturb_
from hf_sam.weight_backup import WeightBackup

__all__ = [
    "HessianSpectrum",
    "MSharpness",
    "hessian_eigenvalues",
    "m_sharpness",
    "measurement_mode",
    "model_loss",
    "split_batch",
]

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


# ---------------------------------------------------------------------- batches and losses
def model_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The default `loss_fn`: the model's own loss, or cross-entropy for `(inputs, targets)` batches.

    - a mapping (Hugging Face style, labels included): `model(**batch)["loss"]` (works for `ModelOutput` and
      for modules returning a dict with a `"loss"` key);
    - a pair `(inputs, targets)`: `cross_entropy(model(inputs), targets)`, the plain-PyTorch convention.
    """
    if isinstance(batch, Mapping):
        outputs = model(**batch)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError(
                f"{type(model).__name__} returned no loss for this batch: include the labels in the batch "
                "(e.g. `labels`) or pass loss_fn=lambda model, batch: <scalar mean loss>."
            )
        return loss
    if isinstance(batch, Sequence) and len(batch) == 2:
        inputs, targets = batch
        logits = model(inputs)
        logits = getattr(logits, "logits", logits)
        return F.cross_entropy(logits, targets)
    raise ValueError(
        f"Cannot compute a loss for a batch of type {type(batch).__name__}: pass a dict with labels, an "
        "(inputs, targets) pair, or loss_fn=lambda model, batch: <scalar mean loss>."
    )


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the length of dimension 0 of its first tensor."""
    for value in _tensors(batch):
        if value.dim() > 0:
            return value.shape[0]
    raise ValueError(f"Found no tensor with a batch dimension in a batch of type {type(batch).__name__}.")


def split_batch(batch: Any, m: int) -> list[Any]:
    """Split a batch into consecutive chunks of `m` examples along dimension 0; a last chunk with fewer than
    `m` examples is dropped (m-sharpness is defined on disjoint subsets of exactly m examples).

    Works on tensors and on (nested) dicts / tuples / lists of tensors; non-tensor values are shared by all
    chunks.
    """
    n = batch_size(batch)
    return [_slice(batch, start, start + m) for start in range(0, n - m + 1, m)]


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, start, stop) for v in batch)
    return batch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _tensors(v)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _collect_batches(batches: Iterable, num_batches: int | None) -> list:
    """Materialise the batches once: Lanczos passes over them many times and must see the same data each time
    (a shuffling DataLoader would give a different operator per pass)."""
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(
            f"num_batches must be a positive integer or None (all batches), got {num_batches!r}."
        )
    collected = list(itertools.islice(batches, num_batches))
    if not collected:
        raise ValueError("No batch to measure on: `batches` is empty.")
    return collected


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter (requires_grad=True) to measure."
        )
    return params


def _scalar_loss(loss_fn: LossFn, model: torch.nn.Module, batch: Any) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor (the mean loss over the batch), got {loss!r}.")
    return loss.reshape(())


# Attention kernels without a double backward (Hessian-vector products need one); PyTorch's SDPA is measured
# through its math backend, which has one.
_NO_DOUBLE_BACKWARD = ("flash_attention_2", "flash_attention_3", "flex_attention")


def check_attention(model: torch.nn.Module) -> None:
    """Refuse, in one line, a model whose attention kernel cannot be differentiated twice."""
    config = getattr(model, "config", None)
    kernel = getattr(config, "_attn_implementation", None)
    if kernel in _NO_DOUBLE_BACKWARD or (isinstance(kernel, str) and "flash" in kernel):
        raise ValueError(
            f"The sharpness measurements need a second derivative, which attn_implementation={kernel!r} does not "
            "have. Load the model with attn_implementation='sdpa' (measured through PyTorch's math kernel) or "
            "'eager'."
        )


@contextmanager
def measurement_mode(model: torch.nn.Module):
    """Every module in eval mode (BatchNorm on running statistics, no dropout), gradients enabled, and
    `scaled_dot_product_attention` on its math backend (the only one with a double backward: the fused CPU and
    GPU kernels raise in a Hessian-vector product); each module's own `training` flag is restored afterwards (not
    a blanket `model.train()`: frozen-BN recipes keep some BatchNorm layers in eval mode on purpose)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    check_attention(model)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for module, training in modes:
            module.training = training


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # optional, and only imported for long runs that ask for it

    return tqdm(iterable, **kwargs)


# ---------------------------------------------------------------------- Hessian spectrum
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
        sizes = [batch_size(b) for b in batches]
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
            loss = _scalar_loss(self.loss_fn, self.model, _to_device(batch, self.device))
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
    batches = _collect_batches(batches, num_batches)
    params = _trainable(model)
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
    for j in _progress(range(iterations), progress, desc="Lanczos", leave=False):
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


# ---------------------------------------------------------------------- m-sharpness
@dataclass
class MSharpness:
    """max_{‖ε‖₂≤ρ} L(w+ε) − L(w), averaged over the chunks of m examples (paper, section 4.1)."""

    value: float  # mean over chunks
    std: float  # standard deviation over chunks (0 for a single chunk)
    loss: float  # mean L(w) over the chunks
    m: int
    rho: float
    ascent_steps: int
    num_chunks: int
    dropped_examples: int  # examples in incomplete last chunks, left out
    per_chunk: list[float] = field(repr=False, default_factory=list)


def m_sharpness(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    m: int,
    rho: float = 0.05,
    ascent_steps: int = 1,
    step_size: float | None = None,
    loss_fn: LossFn = model_loss,
    num_batches: int | None = None,
    progress: bool = False,
) -> MSharpness:
    """m-sharpness: the mean over disjoint chunks of `m` examples of max_{‖ε‖₂ ≤ ρ} L_chunk(w + ε) − L_chunk(w).

    Each batch is cut into consecutive chunks of `m` examples (an incomplete last chunk is dropped and counted in
    `dropped_examples`); `m` = the batch size gives SAM's per-batch sharpness. The inner maximum is estimated by
    `ascent_steps` steps of projected, normalised gradient ascent on the p = 2 ball:
    ε ← Π_ρ(ε + α ∇L(w+ε)/‖∇L(w+ε)‖₂), with α = `step_size` (default ρ, so that one step is exactly SAM's
    ε = ρ g/‖g‖₂, computed by the same `hf_sam.perturbation.perturb_` the optimizer uses). The estimate is the largest
    loss over the visited points (ε = 0 included): every one of them lies in the ball, so it is a lower bound on
    the true maximum that can only grow with more steps (the paper's appendix C.6 finds 1 step underestimates it
    near convergence). Each chunk costs `ascent_steps` forward+backward passes and one forward.

    Every module is in eval mode while measuring (BatchNorm on running statistics, so its buffers stay as they
    are; no dropout); the weights are copied back exactly after each chunk, `.grad` is untouched, modes are
    restored. Deterministic (no random numbers are drawn).
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive integer (examples per chunk), got {m!r}.")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < math.inf:
        raise ValueError(f"rho must be a finite number > 0 (radius of the ball), got {rho!r}.")
    if isinstance(ascent_steps, bool) or not isinstance(ascent_steps, int) or ascent_steps < 1:
        raise ValueError(f"ascent_steps must be a positive integer, got {ascent_steps!r}.")
    step_size = rho if step_size is None else step_size
    if not 0 < step_size < math.inf:
        raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}.")
    batches = _collect_batches(batches, num_batches)
    params = _trainable(model)
    device = params[0].device

    chunks, dropped = [], 0
    for batch in batches:
        pieces = split_batch(batch, m)
        chunks.extend(pieces)
        dropped += batch_size(batch) - m * len(pieces)
    if not chunks:
        raise ValueError(
            f"No chunk of m={m} examples: every batch is smaller than m. Use larger batches or a smaller m."
        )

    backup = WeightBackup()
    per_chunk, losses = [], []
    with measurement_mode(model):
        try:
            for chunk in _progress(chunks, progress, desc=f"m-sharpness (m={m})", leave=False):
                chunk = _to_device(chunk, device)
                clean, best = _chunk_sharpness(
                    model, chunk, loss_fn, params, rho, ascent_steps, step_size, backup
                )
                per_chunk.append(best - clean)
                losses.append(clean)
        finally:
            backup.restore_()
    values = torch.tensor(per_chunk, dtype=torch.float64)
    return MSharpness(
        value=values.mean().item(),
        std=values.std().item() if len(per_chunk) > 1 else 0.0,
        loss=sum(losses) / len(losses),
        m=m,
        rho=float(rho),
        ascent_steps=ascent_steps,
        num_chunks=len(per_chunk),
        dropped_examples=dropped,
        per_chunk=per_chunk,
    )


def _chunk_sharpness(model, chunk, loss_fn, params, rho, steps, step_size, backup) -> tuple[float, float]:
    """(L(w), max over the ascent iterates of L(w + ε)) for one chunk; leaves the weights at w."""
    loss = _scalar_loss(loss_fn, model, chunk)
    grads = list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))
    clean = best = loss.item()

    def gradient_at_perturbed_weights():
        nonlocal best
        loss = _scalar_loss(loss_fn, model, chunk)
        best = max(best, loss.item())
        return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))

    # SAM's own ascent with step α = step_size, projected onto the ρ-ball.
    perturb_(backup, [PerturbationGroup(params, grads, step_size)], steps, rho, gradient_at_perturbed_weights)
    with torch.no_grad():
        best = max(best, _scalar_loss(loss_fn, model, chunk).item())
    backup.restore_()
    return clean, best
