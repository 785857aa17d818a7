"""`WeightBackup`: save w, move to w + ε in place, copy w back exactly (torch only). Every perturbation of the
weights goes through one: `hf_sam.perturbation.perturb_` (the two-pass step, the `SAM` wrapper, `hf_sam.sharpness`)
and, for weights held in low precision, the one-pass look-ahead (`hf_sam.one_pass.LookAhead`)."""

from __future__ import annotations

import warnings

import torch

from hf_sam.low_precision import (
    AppliedPerturbation,
    LowPrecisionPerturbationWarning,
    measure_applied_perturbation,
)
from hf_sam.norms import LOW_PRECISION, local_tensors


class WeightBackup:
    """Save w, move to w + ε in place, and copy w back exactly.

    Restoring by subtracting ε is not exact in floating point (DDP replicas drift apart by ~1e-9 after a few
    steps) and swapping `p.data` breaks tied weights, FSDP views and CUDA graphs; copying into the same
    storage does neither. The backup buffers are allocated on first use and reused every step.

    Weights held in bf16/fp16 cannot hold w + ε exactly (the forward must run on them, so it cannot be avoided
    there; restore stays exact). The first perturbation of such a set of parameters is measured against the intended ε
    (`applied_perturbation`, an `AppliedPerturbation`) and reported once per backup in a
    `LowPrecisionPerturbationWarning`. Float32 weights are never measured: one flag read per step.
    """

    def __init__(self) -> None:
        self._params: list[torch.Tensor] = []
        self._params_list: list[torch.Tensor] | None = None
        self._local: list[torch.Tensor] = []
        self._backup: list[torch.Tensor] = []
        self.perturbed = False
        self.applied_perturbation: AppliedPerturbation | None = None
        # Measure the next perturbation: set when the buffers of low-precision weights are allocated.
        self._measure = False
        self._warned = False

    @torch.no_grad()
    def perturb_(self, params: list[torch.Tensor], eps: list[torch.Tensor], alpha: float = 1.0) -> None:
        """w ← w + alpha·eps in place, after saving w. `alpha` lets a caller pass the unscaled gradient and
        the scalar ρ/‖g‖, which saves a full read and write of the gradients compared with scaling them first."""
        if self.perturbed:
            raise RuntimeError("The weights are already perturbed: call restore_() before perturbing again.")
        if not self._matches(params):
            self._params, self._params_list = list(params), params
            self._local = local_tensors(self._params)  # FSDP2: perturb and restore each rank's shard in place
            self._backup = [torch.empty_like(p) for p in self._local]
            self._measure = any(t.dtype in LOW_PRECISION for t in self._local)
        torch._foreach_copy_(self._backup, self._local)
        torch._foreach_add_(self._local, local_tensors(eps), alpha=alpha)
        self.perturbed = True
        if self._measure:
            self._measure_applied(local_tensors(eps), alpha)

    def _measure_applied(self, eps: list[torch.Tensor], alpha: float) -> None:
        measured = measure_applied_perturbation(self._backup, self._local, eps, alpha)
        if measured is None:
            return  # ε = 0 (a zero gradient): nothing to compare yet, measure the next perturbation
        self._measure, self.applied_perturbation = False, measured
        if not self._warned:
            self._warned = True
            warnings.warn(measured.message(), LowPrecisionPerturbationWarning, stacklevel=2)

    @torch.no_grad()
    def restore_(self) -> None:
        if self.perturbed:
            torch._foreach_copy_(self._local, self._backup)
            self.perturbed = False

    def _matches(self, params: list[torch.Tensor]) -> bool:
        if (
            params is self._params_list
        ):  # the trainer passes the same cached list every step: no per-tensor loop
            return True
        matches = len(params) == len(self._params) and all(
            a is b and loc.shape == buf.shape and loc.dtype == buf.dtype and loc.device == buf.device
            for a, b, loc, buf in zip(params, self._params, self._local, self._backup, strict=True)
        )
        if matches:
            self._params_list = params
        return matches
