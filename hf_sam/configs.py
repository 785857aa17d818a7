"""`SAMTrainingArguments`: `transformers.TrainingArguments` plus the `sam_*` fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from hf_sam.sam import SAM_NORMS, validate_sam_hparams

# Optimizers that step inside backward (per-parameter hooks) or fuse backward and step: SAM needs the gradient
# at w + ε to reach one optimizer step after w is restored, which these cannot give.
_INCOMPATIBLE_OPTIM_MARKERS = ("lomo", "layerwise")


@dataclass
class SAMTrainingArguments(TrainingArguments):
    r"""`TrainingArguments` for `SAMTrainer`.

    Every inherited field keeps its `transformers` default (momentum, frozen BatchNorm, label smoothing are
    recipe settings, not ours). The SAM fields:

    > SAM (Foret et al. 2021)

    sam_rho (`float`, defaults to `0.05`):
        Radius ρ of the neighbourhood. `0` disables SAM: one forward and backward per micro-batch, exactly the
        stock `Trainer`.
    sam_norm (`str`, defaults to `"2"`):
        `"2"`: ε = ρ·g/‖g‖₂ (the paper's choice); `"inf"`: ε = ρ·sign(g) (paper, appendix C.5).
    sam_sync_perturbation (`bool`, defaults to `False`):
        `False`: each process computes ε from its own micro-batch gradient (m = per-device batch, the paper's
        multi-accelerator setting). `True`: the ascent gradients are averaged over processes first, one global ε.

    > ASAM (Kwon et al. 2021)

    sam_adaptive (`bool`, defaults to `False`):
        Scale-invariant perturbation: ε = ρ·T²g/‖Tg‖₂ with T = |w| + η.
    sam_eta (`float`, defaults to `0.01`):
        η in T = |w| + η.
    """

    sam_rho: float = field(
        default=0.05,
        metadata={"help": "SAM neighbourhood radius rho (0 disables SAM and reproduces the stock Trainer)."},
    )
    sam_adaptive: bool = field(
        default=False,
        metadata={"help": "ASAM: scale the perturbation by T = |w| + sam_eta (Kwon et al. 2021)."},
    )
    sam_eta: float = field(default=0.01, metadata={"help": "ASAM's eta in T = |w| + eta."})
    sam_norm: str = field(
        default="2",
        metadata={
            "help": "Norm of the rho-ball: '2' (eps = rho g/||g||_2) or 'inf' (eps = rho sign(g)).",
            "choices": list(SAM_NORMS),
        },
    )
    sam_sync_perturbation: bool = field(
        default=False,
        metadata={
            "help": "Average the ascent gradients over processes before computing eps (one global eps). "
            "Default: each process uses its own micro-batch gradient (the paper's setting)."
        },
    )

    def __post_init__(self):
        # Check our own fields first: a typo in a SAM field should not wait behind device set-up.
        self.sam_norm = _normalize_norm(self.sam_norm)
        validate_sam_hparams(self.sam_rho, self.sam_adaptive, self.sam_eta, self.sam_norm, prefix="sam_")
        if not isinstance(self.sam_sync_perturbation, bool):
            raise ValueError(
                f"sam_sync_perturbation must be True or False, got {self.sam_sync_perturbation!r}."
            )
        if self.sam_rho > 0:
            self._check_sam_compatible()
        super().__post_init__()

    def _check_sam_compatible(self) -> None:
        """Reject the set-ups the two-pass step cannot run under, before any model or data is touched."""
        optim = str(getattr(self.optim, "value", self.optim)).lower()
        if any(marker in optim for marker in _INCOMPATIBLE_OPTIM_MARKERS):
            raise ValueError(
                f"optim={optim!r} updates the weights during backward, so SAM cannot take the second gradient at "
                "w + eps and step from w. Use a regular optimizer (e.g. optim='sgd' or 'adamw_torch'), "
                "or set sam_rho=0."
            )
        if self.deepspeed:
            raise ValueError(
                "SAMTrainer does not support DeepSpeed yet (ZeRO shards the gradients, so the ascent norm would "
                "be a shard's norm). Train with DDP (plain `accelerate launch --multi_gpu`) or set sam_rho=0."
            )
        if self.fsdp:
            raise ValueError(
                "SAMTrainer does not support FSDP yet (the ascent gradient norm must be taken over all shards). "
                "Train with DDP (plain `accelerate launch --multi_gpu`) or set sam_rho=0."
            )


def _normalize_norm(norm) -> str:
    """Accept 2, "2", "inf", float("inf") (YAML and Python users write all of these)."""
    if isinstance(norm, bool):
        return str(norm)
    if isinstance(norm, (int, float)):
        return "inf" if norm == float("inf") else ("2" if norm == 2 else str(norm))
    return str(norm).strip().lower()
