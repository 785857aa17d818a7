"""What SAM costs per step: SAMTrainer against the stock Trainer, same model and batches, interleaved in one process.

    python benchmarks/step_overhead.py                  # CPU preset: small ViT, ResNet, EfficientNet (~3 min)
    python benchmarks/step_overhead.py --preset gpu     # ViT-B/16 and EfficientNet-B3, bf16, batch 64
    python benchmarks/step_overhead.py --readme         # also write the table into benchmarks/README.md

Variants, all on the same model weights and the same batches:
- `stock`: `transformers.Trainer`;
- `two-pass`: a Trainer whose `training_step` simply runs the stock forward+backward twice (the floor SAM
  cannot beat: it needs two gradients);
- `SAM`: `hf_sam.SAMTrainer` (ρ = 0.05).

Each round runs every variant for a few optimizer steps (the order rotates each round); the first step of a
round is warm-up and discarded. Reported: medians over steps, and the median over rounds of the per-round
ratio SAM / stock (paired: both saw the same machine state). "fwd+bwd part" times `training_step` alone (the
forward+backward-bound part: SAM's two passes and ε work); "whole step" is the Trainer's step from
`on_step_begin` to `on_step_end` (adds data loading, clipping, the optimizer and scheduler, shared by all).
"ε work" times computing ε and perturbing/restoring the weights alone, as a share of one stock forward+backward.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from readme_block import replace_readme_block  # noqa: E402

import hf_sam.trainer  # noqa: E402
from hf_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402
from hf_sam.batchnorm import freeze_batchnorm  # noqa: E402
from hf_sam.sam import NORM_EPS, WeightBackup, global_norm  # noqa: E402

# Steady-state step times. Left out, as one-off work of a run: the look-ahead guard's extra forward on steps 1, 2,
# 8, 16, ... of a one-pass run (log2(steps) forwards in a whole run, 3 in a 10-step benchmark run), and the
# loss-units probe's two forwards at a run's first micro-batch (sam_fix_loss_normalization=False: both arms keep
# the stock Trainer's loss scaling, which does not change the time).
hf_sam.trainer.is_look_ahead_check_step = lambda step: False


def build_model(name: str, preset: str, num_labels: int = 10):
    from transformers import (
        EfficientNetConfig,
        EfficientNetForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    if preset == "gpu":
        if name == "ViT-B/16":
            return ViTForImageClassification(ViTConfig(num_labels=num_labels)), 224  # ViT-B/16 defaults
        if name == "EfficientNet-B3":
            config = EfficientNetConfig(
                width_coefficient=1.2,
                depth_coefficient=1.4,
                hidden_dim=1536,
                image_size=300,
                dropout_rate=0.3,
                num_labels=num_labels,
            )  # B3 scaling; the config's defaults are B7's
            return EfficientNetForImageClassification(config), 300
        if name == "ResNet-50":
            return ResNetForImageClassification(ResNetConfig(num_labels=num_labels)), 224
    if name == "ViT-S (4 layers)":
        config = ViTConfig(
            hidden_size=192,
            num_hidden_layers=4,
            num_attention_heads=3,
            intermediate_size=768,
            image_size=64,
            patch_size=8,
            num_labels=num_labels,
        )
        return ViTForImageClassification(config), 64
    if name == "ResNet-18":
        config = ResNetConfig(
            depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic", num_labels=num_labels
        )
        return ResNetForImageClassification(config), 64
    if name == "EfficientNet-B0":
        config = EfficientNetConfig(
            width_coefficient=1.0,
            depth_coefficient=1.0,
            hidden_dim=1280,
            image_size=64,
            dropout_rate=0.2,
            num_labels=num_labels,
        )  # B0 scaling; the config's defaults are B7's
        return EfficientNetForImageClassification(config), 64
    raise ValueError(f"unknown model {name!r} for preset {preset!r}")


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (device-synchronised)."""

    def __init__(self, sync):
        self.sync, self.times, self._start = sync, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        self.times.append(time.perf_counter() - self._start)


class TimedTrainingStep:
    """Mixin: wall time of each `training_step` call (the forward+backward-bound part)."""

    sync = staticmethod(lambda: None)

    def training_step(self, *args, **kwargs):
        self.sync()
        start = time.perf_counter()
        loss = super().training_step(*args, **kwargs)
        self.sync()
        self.fwd_bwd_times.append(time.perf_counter() - start)
        return loss


class StockTrainer(TimedTrainingStep, Trainer):
    pass


class _TwoPasses(Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        super().training_step(model, dict(inputs), num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)


class TwoPassTrainer(TimedTrainingStep, _TwoPasses):
    pass


class TimedSAMTrainer(TimedTrainingStep, SAMTrainer):
    pass


VARIANTS = {
    "stock": (StockTrainer, TrainingArguments, {}),
    "two-pass": (TwoPassTrainer, TrainingArguments, {}),
    "SAM": (TimedSAMTrainer, SAMTrainingArguments, {"sam_rho": 0.05, "sam_fix_loss_normalization": False}),
    # The ascent on a quarter of each micro-batch: (1 + 1/4) passes of work instead of 2.
    "SAM f=0.25": (
        TimedSAMTrainer,
        SAMTrainingArguments,
        {"sam_rho": 0.05, "sam_ascent_fraction": 0.25, "sam_fix_loss_normalization": False},
    ),
    # Momentum-SAM: one pass at w − ρ·v/‖v‖ (ρ as tuned for SGD in docs/variants.md).
    "momentum": (
        TimedSAMTrainer,
        SAMTrainingArguments,
        {"sam_rho": 0.3, "sam_mode": "momentum", "sam_fix_loss_normalization": False},
    ),
}


def make_trainer(name, model, rows, args_kwargs, sync, steps):
    trainer_cls, args_cls, extra = VARIANTS[name]
    args = args_cls(max_steps=steps, **args_kwargs, **extra)
    trainer = trainer_cls(model=model, args=args, train_dataset=rows)
    trainer.remove_callback(PrinterCallback)
    trainer.sync, trainer.fwd_bwd_times = sync, []
    timer = StepTimer(sync)
    trainer.add_callback(timer)
    return trainer, timer


def perturbation_time(model, repeats: int, sync) -> float:
    """Median time of SAMTrainer's default ε path on the model's trainable parameters (random gradients):
    ‖g‖, w ← w + (ρ/‖g‖)·g after backing w up, and the exact restore."""
    params = [p for p in model.parameters() if p.requires_grad]
    backup, times = WeightBackup(), []
    for _ in range(repeats + 2):
        grads = [torch.randn_like(p) for p in params]
        sync()
        start = time.perf_counter()
        grad_norm = global_norm(grads)
        backup.perturb_(params, grads, alpha=0.05 / (float(grad_norm) + NORM_EPS))
        backup.restore_()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def bench_model(name, preset, device, batch_size, rounds, steps, bf16):
    torch.manual_seed(0)
    model, image_size = build_model(name, preset)
    # BatchNorm frozen for every variant, as the recipes do: the one-pass modes refuse train-mode BatchNorm.
    freeze_batchnorm(model)
    model.to(device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    rows = [
        {"pixel_values": torch.randn(3, image_size, image_size, generator=g), "labels": torch.tensor(i % 10)}
        for i in range(batch_size * steps)
    ]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out_dir = tempfile.mkdtemp()
    args_kwargs = dict(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-3,
        optim="sgd",
        optim_args="momentum=0.9",  # every variant, stock included (Momentum-SAM needs a momentum)
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        seed=0,
    )
    whole = {v: [] for v in VARIANTS}
    fwd_bwd = {v: [] for v in VARIANTS}
    ratios_whole, ratios_fb, ratios_fraction, ratios_momentum = [], [], [], []
    peak = {}
    for r in range(rounds):
        k = r % len(VARIANTS)
        order = list(VARIANTS)[k:] + list(VARIANTS)[:k]  # rotate who runs first
        round_whole, round_fb = {}, {}
        for variant in order:
            model.load_state_dict(initial)
            trainer, timer = make_trainer(variant, model, rows, args_kwargs, sync, steps)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
            if device.type == "cuda":
                peak[variant] = max(peak.get(variant, 0), torch.cuda.max_memory_allocated())
            round_whole[variant] = statistics.median(timer.times[1:])
            round_fb[variant] = statistics.median(trainer.fwd_bwd_times[1:])
            whole[variant] += timer.times[1:]
            fwd_bwd[variant] += trainer.fwd_bwd_times[1:]
            del trainer
            gc.collect()
        ratios_whole.append(round_whole["SAM"] / round_whole["stock"])
        ratios_fb.append(round_fb["SAM"] / round_fb["stock"])
        ratios_fraction.append(round_whole["SAM f=0.25"] / round_whole["stock"])
        ratios_momentum.append(round_whole["momentum"] / round_whole["stock"])
    eps_time = perturbation_time(model, repeats=10, sync=sync)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    result = {
        "model": name,
        "params (M)": n_params / 1e6,
        "stock fwd+bwd (ms)": 1e3 * statistics.median(fwd_bwd["stock"]),
        "SAM fwd+bwd (ms)": 1e3 * statistics.median(fwd_bwd["SAM"]),
        "ratio fwd+bwd": statistics.median(ratios_fb),
        "two-pass ratio": statistics.median(fwd_bwd["two-pass"]) / statistics.median(fwd_bwd["stock"]),
        "SAM / two-pass": statistics.median(fwd_bwd["SAM"]) / statistics.median(fwd_bwd["two-pass"]),
        "ratio whole step": statistics.median(ratios_whole),
        "f=0.25 ratio whole step": statistics.median(ratios_fraction),
        "momentum ratio whole step": statistics.median(ratios_momentum),
        "ε work / fwd+bwd": eps_time / statistics.median(fwd_bwd["stock"]),
        "param copy (MB)": param_mb,
    }
    if peak:
        result["peak mem over stock (MB)"] = (peak["SAM"] - peak["stock"]) / 2**20
    return result


def to_markdown(results, header_note) -> str:
    keys = list(results[0])
    lines = [header_note, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in results:
        cells = []
        for k in keys:
            v = r[k]
            if isinstance(v, str):
                cells.append(v)
            elif "ratio" in k or "/" in k and "MB" not in k and "ms" not in k:
                cells.append(f"{v:.1%}" if k.startswith("ε") else f"{v:.3f}")
            else:
                cells.append(f"{v:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps per variant per round (first discarded)"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    parser.add_argument(
        "--output", default=None, help="markdown file for the table (default: benchmarks/results/)"
    )
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()

    gpu = args.preset == "gpu"
    device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    models = args.models or (
        ["ViT-B/16", "EfficientNet-B3"] if gpu else ["ViT-S (4 layers)", "ResNet-18", "EfficientNet-B0"]
    )
    batch_size = args.batch_size or (64 if gpu else 32)
    results = []
    for name in models:
        print(f"benchmarking {name} ...", flush=True)
        results.append(bench_model(name, args.preset, device, batch_size, args.rounds, args.steps, bf16=gpu))
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name()}, bf16 autocast, batch {batch_size}"
    else:
        machine = f"CPU, {torch.get_num_threads()} threads, fp32, batch {batch_size}"
    note = (
        f"`python benchmarks/step_overhead.py --preset {args.preset}` on {machine}; "
        f"{args.rounds} interleaved rounds x {args.steps - 1} timed steps per variant; torch {torch.__version__}."
    )
    table = to_markdown(results, note)
    print(table)
    output = args.output or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"step_overhead_{args.preset}.md"
    )
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        f.write(table + "\n")
    if args.readme:
        replace_readme_block(f"step_overhead_{args.preset}", table)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
