"""The `sam_*` fields: `SAMArguments`, a dataclass mixin for any `TrainingArguments` subclass, and
`SAMTrainingArguments` = `SAMArguments` + `transformers.TrainingArguments`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from hf_sam.engines import FSDP2, check_deepspeed
from hf_sam.one_pass import ONE_PASS_MODES
from hf_sam.optimizer_state import constructor_settings, is_adam, missing_momentum
from hf_sam.sam import SAM_NORMS, validate_sam_hparams

SAM_MODES = ("sam", "looksam", "gsam", "momentum", "adam_update", "previous_gradient")
# One forward+backward per step: ε comes without an ascent pass.
SAM_RHO_SCHEDULES = ("constant", "linear_with_lr")

# Optimizers that step inside backward (per-parameter hooks) or fuse backward and step: SAM needs the gradient
# at w + ε to reach one optimizer step after w is restored, which these cannot give.
_INCOMPATIBLE_OPTIM_MARKERS = ("lomo", "layerwise")


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
        # Check our own fields first: a typo in a SAM field should not wait behind device set-up.
        self.sam_norm = _normalize_norm(self.sam_norm)
        validate_sam_hparams(self.sam_rho, self.sam_adaptive, self.sam_eta, self.sam_norm, prefix="sam_")
        if not isinstance(self.sam_fix_loss_normalization, bool):
            raise ValueError(
                f"sam_fix_loss_normalization must be True or False, got {self.sam_fix_loss_normalization!r}."
            )
        if self.sam_sync_perturbation is not None and not isinstance(self.sam_sync_perturbation, bool):
            raise ValueError(
                f"sam_sync_perturbation must be True, False or None, got {self.sam_sync_perturbation!r}."
            )
        self._check_variants()
        if self.sam_rho > 0:
            self._check_sam_compatible()
        super().__post_init__()
        # The engines' refusals (`hf_sam.engines`), here when the arguments or an `accelerate launch` DeepSpeed
        # config (TrainingArguments builds its plugin from the environment) name the engine; `SAMMixin` checks again
        # once Accelerate knows it.
        if self.sam_rho > 0 and self.fsdp:
            FSDP2.check(self, self.fsdp_plugin_args["fsdp_version"])
        plugin = getattr(self, "deepspeed_plugin", None)
        if self.sam_rho > 0 and (self.deepspeed or plugin is not None):
            try:
                if self.deepspeed:
                    config = self.hf_deepspeed_config
                    stage = int(config.get_value("zero_optimization.stage", 0))
                    fp16, zero_config = config.is_true("fp16.enabled"), config.config.get("zero_optimization")
                else:
                    stage, fp16 = (
                        plugin.zero_stage,
                        False,
                    )  # a launch config's fp16: the Trainer-time check sees it
                    zero_config = plugin.deepspeed_config.get("zero_optimization")
                check_deepspeed(self, stage, fp16=bool(self.fp16 or fp16), zero_config=zero_config)
            except ValueError:
                # TrainingArguments registered this config globally: a refused one must not make every later
                # from_pretrained build under ZeRO-3's zero.Init.
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
                raise

    def _check_variants(self) -> None:
        """Types, ranges and combinations of the variant fields: one clear error, before any work."""
        if self.sam_mode not in SAM_MODES:
            raise ValueError(
                f"sam_mode must be one of {', '.join(map(repr, SAM_MODES))}, got {self.sam_mode!r}."
            )
        if not _is_int(self.sam_interval) or self.sam_interval < 1:
            raise ValueError(
                f"sam_interval must be an integer >= 1 (1: SAM on every step), got {self.sam_interval!r}."
            )
        for name in ("sam_start", "sam_end"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a fraction of training in [0, 1], got {value!r}.")
        if self.sam_start >= self.sam_end:
            raise ValueError(
                f"sam_start ({self.sam_start}) must be smaller than sam_end ({self.sam_end}): SAM runs in between."
            )
        if self.sam_group_size is not None and (not _is_int(self.sam_group_size) or self.sam_group_size < 1):
            raise ValueError(
                f"sam_group_size must be a positive integer (examples per ε) or None, got {self.sam_group_size!r}."
            )
        if not _is_int(self.sam_ascent_steps) or self.sam_ascent_steps < 1:
            raise ValueError(f"sam_ascent_steps must be an integer >= 1, got {self.sam_ascent_steps!r}.")
        if not _is_number(self.sam_ascent_fraction) or not 0.0 < self.sam_ascent_fraction <= 1.0:
            raise ValueError(
                f"sam_ascent_fraction must be a fraction of the micro-batch in (0, 1] (1.0: plain SAM), got "
                f"{self.sam_ascent_fraction!r}."
            )
        if self.sam_rho_schedule not in SAM_RHO_SCHEDULES:
            raise ValueError(
                f"sam_rho_schedule must be one of {', '.join(map(repr, SAM_RHO_SCHEDULES))}, got {self.sam_rho_schedule!r}."
            )
        if not _is_number(self.sam_rho_min) or not 0 <= self.sam_rho_min <= self.sam_rho:
            raise ValueError(
                f"sam_rho_min must be a number in [0, sam_rho={self.sam_rho}], got {self.sam_rho_min!r}."
            )
        if not _is_int(self.sam_max_nonfinite_steps) or self.sam_max_nonfinite_steps < 0:
            raise ValueError(
                f"sam_max_nonfinite_steps must be an integer >= 0 (0 disables the check), got {self.sam_max_nonfinite_steps!r}."
            )
        for name in ("sam_looksam_alpha", "sam_gsam_alpha"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}.")
        if self.sam_param_filter is not None:
            try:
                re.compile(self.sam_param_filter)
            except (re.error, TypeError) as error:
                raise ValueError(
                    f"sam_param_filter must be a regular expression over parameter names, got {self.sam_param_filter!r} ({error})."
                ) from None

        # Combinations that have no sound meaning (or no implementation yet): refuse rather than guess.
        if self.sam_mode in ("looksam", "gsam"):
            for name, value, default in (
                ("sam_group_size", self.sam_group_size, None),
                ("sam_ascent_steps", self.sam_ascent_steps, 1),
                ("sam_param_filter", self.sam_param_filter, None),
            ):
                if value != default:
                    raise ValueError(
                        f"sam_mode={self.sam_mode!r} cannot be combined with {name}={value!r}: it needs the full clean "
                        f"and SAM gradients of one ε per micro-batch. Use sam_mode='sam' or leave {name} at {default!r}."
                    )
        if self.sam_mode in ONE_PASS_MODES:
            self._check_one_pass_mode()
        if self.sam_ascent_fraction < 1.0:
            for name, value, default, reason in (
                (
                    "sam_mode",
                    self.sam_mode,
                    "sam",
                    "LookSAM and GSAM combine the whole micro-batch's clean gradient",
                ),
                (
                    "sam_group_size",
                    self.sam_group_size,
                    None,
                    "m-sharpness groups cut the micro-batch themselves",
                ),
            ):
                if value != default:
                    raise ValueError(
                        f"sam_ascent_fraction={self.sam_ascent_fraction} cannot be combined with {name}={value!r}: "
                        f"{reason}. Use sam_ascent_fraction=1.0, or leave {name} at {default!r}."
                    )
        if self.sam_mode == "looksam" and self.sam_interval < 2:
            raise ValueError("sam_mode='looksam' needs sam_interval >= 2 (its k: a SAM step every k steps).")
        if self.sam_group_size is not None and self.sam_sync_perturbation:
            raise ValueError(
                "sam_group_size (one ε per chunk of m examples) contradicts sam_sync_perturbation=True (one ε for "
                "all processes): choose one."
            )
        if self.sam_ascent_steps > 1 and (self.sam_adaptive or self.sam_norm != "2"):
            raise ValueError(
                "sam_ascent_steps > 1 projects onto the Euclidean ρ-ball: use it with sam_norm='2' and sam_adaptive=False."
            )

    def _check_one_pass_mode(self) -> None:
        """The one-pass variants take no ascent gradient: the settings that shape an ascent do not apply, and
        Momentum-SAM's optimizer must keep a momentum (the one built from `optim` is checked again once it exists)."""
        for name, value, default in (
            ("sam_group_size", self.sam_group_size, None),
            ("sam_ascent_steps", self.sam_ascent_steps, 1),
            ("sam_ascent_fraction", self.sam_ascent_fraction, 1.0),
            ("sam_adaptive", self.sam_adaptive, False),
            ("sam_norm", self.sam_norm, "2"),
        ):
            if value != default:
                raise ValueError(
                    f"sam_mode={self.sam_mode!r} cannot be combined with {name}={value!r}: it takes no ascent "
                    f"gradient (one pass per step). Leave {name} at {default!r}, or use sam_mode='sam'."
                )
        self._check_optimizer_state()

    def _check_optimizer_state(self) -> None:
        """`sam_mode="adam_update"` needs Adam's state, `"momentum"` a momentum: asked of `hf_sam.optimizer_state`'s
        table about the class and settings the Trainer will build (`Trainer.get_optimizer_cls_and_kwargs`). An
        optimizer that cannot be resolved here (its package missing) is checked once it is built."""
        if self.sam_mode not in ("momentum", "adam_update"):
            return
        try:
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self)
        except (ImportError, ValueError):
            return
        optim = str(getattr(self.optim, "value", self.optim)).lower()
        if self.sam_mode == "adam_update" and not is_adam(cls):
            raise ValueError(
                f"sam_mode='adam_update' looks ahead along Adam's update m̂/(√v̂+ε), which optim={optim!r} does not "
                "take. Use optim='adamw_torch' (the default) or 'adamw_torch_fused', or sam_mode='momentum'."
            )
        if self.sam_mode == "momentum" and missing_momentum(cls, [constructor_settings(cls, kwargs)]):
            raise ValueError(
                f"sam_mode='momentum' perturbs the weights along the optimizer's momentum, but optim={optim!r} "
                f"(optim_args={self.optim_args!r}) keeps none. Use optim='sgd' with optim_args='momentum=0.9', or "
                "optim='adamw_torch'."
            )

    def _check_sam_compatible(self) -> None:
        """Reject the set-ups the two-pass step cannot run under, before any model or data is touched."""
        optim = str(getattr(self.optim, "value", self.optim)).lower()
        if any(marker in optim for marker in _INCOMPATIBLE_OPTIM_MARKERS):
            raise ValueError(
                f"optim={optim!r} updates the weights during backward, so SAM cannot take the second gradient at "
                "w + eps and step from w. Use a regular optimizer (e.g. optim='sgd' or 'adamw_torch'), "
                "or set sam_rho=0."
            )


@dataclass
class SAMTrainingArguments(SAMArguments, TrainingArguments):
    """`TrainingArguments` plus the `sam_*` fields of `SAMArguments`, for `SAMTrainer`."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _normalize_norm(norm) -> str:
    """Accept 2, "2", "inf", float("inf") (YAML and Python users write all of these)."""
    if isinstance(norm, bool):
        return str(norm)
    if isinstance(norm, (int, float)):
        return "inf" if norm == float("inf") else ("2" if norm == 2 else str(norm))
    return str(norm).strip().lower()
