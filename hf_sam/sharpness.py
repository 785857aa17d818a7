"""Measure sharpness: top Hessian eigenvalues (Lanczos) and m-sharpness. Imports torch only.

The public names of the diagnostics, from `hf_sam.hessian` (the Lanczos spectrum), `hf_sam.m_sharpness` and
`hf_sam.measurement` (the loss of a batch, chunks of m examples, the mode both measure in).

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

from hf_sam.hessian import HessianSpectrum, hessian_eigenvalues
from hf_sam.m_sharpness import MSharpness, m_sharpness
from hf_sam.measurement import measurement_mode, model_loss, split_batch

__all__ = [
    "HessianSpectrum",
    "MSharpness",
    "hessian_eigenvalues",
    "m_sharpness",
    "measurement_mode",
    "model_loss",
    "split_batch",
]
