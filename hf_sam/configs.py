"""The `sam_*` fields: `SAMArguments`, a dataclass mixin for any `TrainingArguments` subclass, and
`SAMTrainingArguments` = `SAMArguments` + `transformers.TrainingArguments`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from hf_sam.argument_checks import SAM_MODES, SAM_RHO_SCHEDULES, check_arguments, check_engine_arguments
from hf_sam.perturbation import SAM_NORMS

__all__ = ["SAMArguments", "SAMTrainingArguments", "SAM_MODES", "SAM_RHO_SCHEDULES"]


@dataclass
class SAMArguments:
    r"""The SAM fields, to mix into any `TrainingArguments` subclass (put it first, so its checks run first):

        @dataclass
        class SAMSFTConfig(SAMArguments, trl.SFTConfig):
            pass

    Every inherited field keeps its default (momentum, frozen BatchNorm, label smoothing are recipe settings, not
    ours). The SAM fields:

    > SAM (Foret et al. 2021)

    sam_rho (`float`, defaults to `0.05`):
        Radius ρ of the neighbourhood. `0` disables SAM: one forward and backward per micro-batch, exactly the
        stock `Trainer`.
    sam_norm (`str`, defaults to `"2"`):
        `"2"`: ε = ρ·g/‖g‖₂ (the paper's choice); `"inf"`: ε = ρ·sign(g) (paper, appendix C.5).
    sam_sync_perturbation (`bool`, *optional*):
        `False`: each process computes ε from its own micro-batch gradient (m = per-device batch, the paper's
        multi-accelerator setting). `True`: the ascent gradients are averaged over processes first, one global ε.
        `None` (default): the engine's natural scope — per process under DDP and DeepSpeed ZeRO-1/2, global under
        FSDP and ZeRO-3, where every process forwards through the same sharded weights (`False` is refused there).

    > ASAM (Kwon et al. 2021)

    sam_adaptive (`bool`, defaults to `False`):
        Scale-invariant perturbation: ε = ρ·T²g/‖Tg‖₂ with T = |w| + η.
    sam_eta (`float`, defaults to `0.01`):
        η in T = |w| + η.

    > Cheaper SAM and variants (all opt-in; the defaults are plain SAM on every step)

    sam_mode (`str`, defaults to `"sam"`):
        `"sam"`; `"looksam"` (Liu et al. 2022: a SAM step every `sam_interval` steps, and in between one clean
        forward+backward plus the stored part of the SAM gradient orthogonal to the clean one); `"gsam"`
        (Zhuang et al. 2022: surrogate-gap guided SAM, as the authors' JAX version); `"momentum"` (Momentum-SAM,
        Becker et al. 2024: one forward+backward per step at w − ρ·v/‖v‖, v the optimizer's momentum, SGD's
        momentum buffer or Adam's first moment; a plain step before the first; needs an optimizer with momentum);
        `"adam_update"` (Momentum-SAM along the step Adam(W) takes: one forward+backward per step at w − ρ·u/‖u‖,
        u = m̂/(√v̂+ε) Adam's bias-corrected update; with AdamW it keeps more of SAM's gain than `"momentum"`,
        see docs/variants.md; needs torch's Adam or AdamW, e.g. `optim="adamw_torch"`, the default);
        `"previous_gradient"` (one forward+backward per step at w + ρ·g_prev/‖g_prev‖, g_prev the gradient the
        previous step applied, kept in the checkpoint; a plain step first).
    sam_interval (`int`, defaults to `1`):
        SAM on optimizer steps 0, k, 2k, ...; a plain step (one forward+backward) on the others. LookSAM's k.
    sam_start, sam_end (`float`, defaults to `0.0`, `1.0`):
        Fractions of training (global step / max steps) between which SAM runs (late-phase SAM: `sam_start=0.5`).
    sam_group_size (`int`, *optional*):
        m-sharpness inside one process: one ε per chunk of m examples of each micro-batch, the chunks' SAM
        gradients averaged. `None`: one ε per micro-batch.
    sam_ascent_steps (`int`, defaults to `1`):
        Steps of projected gradient ascent inside the ρ-ball (paper, appendix C.6); each moves ε by ρ·ĝ and
        projects back onto the ball.
    sam_ascent_fraction (`float`, defaults to `1.0`):
        The ascent pass of each micro-batch uses ⌈f·B⌉ of its examples only, drawn uniformly (seeded by `seed`,
        the step, the micro-batch and the process, so resume is exact; at least 2 with BatchNorm in train mode);
        ε comes from their mean-loss gradient and the descent pass still runs on all B at w + ε, so a SAM step
        costs (1 + f) forward+backward passes instead of 2. `1.0` is plain SAM, bit for bit. BatchNorm running
        statistics then come from the subset's clean pass. With f < 1 the logged `loss` is measured on the subset
        and `sam/sharpness` is not logged (its two losses would be over different examples).
    sam_rho_schedule (`str`, defaults to `"constant"`):
        `"linear_with_lr"`: ρ_t = ρ_min + (ρ − ρ_min)·lr_t/lr_peak, as GSAM does.
    sam_rho_min (`float`, defaults to `0.0`):
        ρ_min of the `"linear_with_lr"` schedule.
    sam_param_filter (`str`, *optional*):
        Regular expression over parameter names: perturb only the matching parameters (e.g. `"norm"` for
        SAM-ON); the ascent gradient is computed for those alone.
    sam_looksam_alpha (`float`, defaults to `0.7`):
        LookSAM's α (the paper's default).
    sam_gsam_alpha (`float`, defaults to `0.1`):
        GSAM's α (task-dependent; the paper tunes it per model).

    > Loss normalisation (applies at every ρ, `0` included)

    sam_fix_loss_normalization (`bool`, defaults to `True`):
        Models whose `forward(**kwargs)` ignores `num_items_in_batch` (BERT-style classifiers, T5, BART,
        EfficientNet, ResNet...) compute a per-micro-batch mean loss, which the stock `Trainer` does not divide by
        the accumulation steps: their gradients come out multiplied by `gradient_accumulation_steps`. `True` asks
        the loss at a run's first micro-batch (two forwards without gradients, with the count and twice the
        count) and averages the micro-batch losses of one that ignores it like any other model's (logged once
        when it applies), so SAM and baseline runs of a recipe take the same, correct step. `False` keeps the stock Trainer's scaling:
        `sam_rho=0` is then the stock Trainer bit for bit for these models too.

    > Safety

    sam_max_nonfinite_steps (`int`, defaults to `3`):
        In fp32/bf16, an optimizer step whose loss or gradient is NaN/inf is skipped (weights untouched, counted in
        `sam/skipped_steps`); this many in a row stop the run with `NonFiniteTrainingError`. `0` disables the check.
        In fp16 the GradScaler skips such steps itself; they are counted the same way.
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
    sam_sync_perturbation: bool | None = field(
        default=None,
        metadata={
            "help": "Average the ascent gradients over processes before computing eps (one global eps). "
            "Default: each process uses its own micro-batch gradient (the paper's setting) under DDP; one global "
            "eps under FSDP (the only scope sharded weights allow)."
        },
    )

    sam_mode: str = field(
        default="sam",
        metadata={
            "help": "'sam', 'looksam' (reuse between SAM steps), 'gsam' (surrogate gap), 'momentum' (Momentum-SAM: "
            "one pass at w - rho*v/||v||, v the optimizer's momentum), 'adam_update' (one pass at w - rho*u/||u||, "
            "u = m/(sqrt(v)+eps) AdamW's update) or 'previous_gradient' (one pass at "
            "w + rho*g/||g||, g the previous step's gradient).",
            "choices": list(SAM_MODES),
        },
    )
    sam_interval: int = field(
        default=1,
        metadata={"help": "SAM on every k-th optimizer step, a plain step otherwise (LookSAM's k)."},
    )
    sam_start: float = field(default=0.0, metadata={"help": "Fraction of training at which SAM starts."})
    sam_end: float = field(default=1.0, metadata={"help": "Fraction of training at which SAM stops."})
    sam_group_size: int | None = field(
        default=None, metadata={"help": "m-sharpness: one eps per chunk of m examples of each micro-batch."}
    )
    sam_ascent_steps: int = field(
        default=1, metadata={"help": "Projected gradient ascent steps inside the rho-ball (appendix C.6)."}
    )
    sam_ascent_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of each micro-batch the ascent pass uses (ceil(f*B) examples drawn uniformly); the descent "
            "runs on all of it. 1.0: plain SAM; 0.25: about 1.25x the stock step instead of 2x."
        },
    )
    sam_rho_schedule: str = field(
        default="constant",
        metadata={
            "help": "'constant' or 'linear_with_lr' (rho follows the LR, as GSAM).",
            "choices": list(SAM_RHO_SCHEDULES),
        },
    )
    sam_rho_min: float = field(
        default=0.0, metadata={"help": "rho at zero learning rate ('linear_with_lr')."}
    )
    sam_param_filter: str | None = field(
        default=None, metadata={"help": "Regular expression over parameter names: perturb only the matches."}
    )
    sam_max_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "fp32/bf16: skip optimizer steps whose loss or gradient is NaN/inf and stop with an error after "
            "this many in a row (0: no check, every step applied as the stock Trainer does). fp16 uses the GradScaler."
        },
    )
    sam_fix_loss_normalization: bool = field(
        default=True,
        metadata={
            "help": "Average the micro-batch losses of models whose loss ignores num_items_in_batch (BERT, T5, "
            "BART, EfficientNet...: asked of the loss at a run's first micro-batch), which the stock Trainer "
            "multiplies by the accumulation steps. False: the stock "
            "Trainer's scaling (sam_rho=0 is then the stock Trainer bit for bit for these models too)."
        },
    )
    sam_looksam_alpha: float = field(default=0.7, metadata={"help": "LookSAM's alpha."})
    sam_gsam_alpha: float = field(default=0.1, metadata={"help": "GSAM's alpha."})

    def __post_init__(self):
        if not isinstance(self, TrainingArguments):
            raise TypeError(
                f"{type(self).__name__}: SAMArguments is a mixin for a TrainingArguments subclass, e.g. "
                "`class SAMSFTConfig(SAMArguments, SFTConfig)`."
            )
        # Our own fields first: a typo in a SAM field should not wait behind device set-up (`hf_sam.argument_checks`).
        self.sam_norm = _normalize_norm(self.sam_norm)
        check_arguments(self)
        super().__post_init__()
        check_engine_arguments(self)  # an engine the arguments name: refused before any model loads


@dataclass
class SAMTrainingArguments(SAMArguments, TrainingArguments):
    """`TrainingArguments` plus the `sam_*` fields of `SAMArguments`, for `SAMTrainer`."""


def _normalize_norm(norm) -> str:
    """Accept 2, "2", "inf", float("inf") (YAML and Python users write all of these)."""
    if isinstance(norm, bool):
        return str(norm)
    if isinstance(norm, (int, float)):
        return "inf" if norm == float("inf") else ("2" if norm == 2 else str(norm))
    return str(norm).strip().lower()
