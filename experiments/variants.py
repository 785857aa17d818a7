"""Cost against benefit of each SAM variant, with the toolkit's own SAMTrainer, on real images.

    python experiments/variants.py [--seeds 5] [--epochs 30] [--noise 0.4]

A wide sweep at one fixed ρ and learning rate, nothing tuned: every variant side by side, for a first look. The
shares of SAM's gain, with hyperparameters chosen on a validation slice and intervals over seeds, are
`experiments/benefit.py`'s (the table in experiments/README.md).

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images, the only real images on this machine), with
the split, standardisation and symmetric label noise of the other experiments (`experiments/common.py`: each
noisy example gets a uniformly drawn *other* class); accuracy is measured on the clean test labels. Model: an MLP
(64-256-256-10), SGD with momentum 0.9, cosine decay, batch 128. Each variant runs with several seeds (mean ± std);
the plain baseline also runs with twice the epochs, as in the paper's label-noise comparison. Cost: forward and
backward passes per optimizer step from the trainer's own `sam/forward_passes` accounting, and wall time relative
to the baseline at the same epochs. Writes `experiments/results/variants.md` and `variants.png`.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DictMLP as MLP  # noqa: E402
from common import digits, symmetric_noise, train_through_sam_trainer  # noqa: E402

BATCH = 128
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

VARIANTS = {
    "baseline (SGD)": {"sam_rho": 0.0},
    "baseline (SGD), 2x epochs": {"sam_rho": 0.0, "_epochs": 2},
    "SAM": {},
    "SAM, sam_interval=5": {"sam_interval": 5},
    "LookSAM, k=5": {"sam_mode": "looksam", "sam_interval": 5},
    "GSAM": {"sam_mode": "gsam"},
    "late-phase SAM (last 50%)": {"sam_start": 0.5},
    "m-sharpness, m=16": {"sam_group_size": 16},
    "2 ascent steps": {"sam_ascent_steps": 2},
    "ASAM": {"sam_adaptive": True, "_rho": 1.0},
    "ascent on 1/2 of the batch (f=0.5)": {"sam_ascent_fraction": 0.5},
    "ascent on 1/4 of the batch (f=0.25)": {"sam_ascent_fraction": 0.25},
    "f=0.25, sam_interval=2": {"sam_ascent_fraction": 0.25, "sam_interval": 2},
}


def load_noisy_digits(noise: float, seed: int):
    """The same split, standardisation and symmetric noise as the other experiments (`experiments/common.py`)."""
    x_train, y_train, x_test, y_test = digits()
    noisy = symmetric_noise(y_train, noise, seed)
    rows = [{"pixels": x, "labels": y} for x, y in zip(x_train, noisy, strict=True)]
    return rows, x_test, y_test


def run(name: str, seed: int, epochs: int, noise: float, rho: float):
    overrides = dict(VARIANTS[name])
    epochs *= overrides.pop("_epochs", 1)
    rho = overrides.pop("_rho", rho)
    overrides.setdefault("sam_rho", rho)
    rows, x_test, y_test = load_noisy_digits(noise, seed)
    torch.manual_seed(seed)
    model = MLP()
    passes, seconds = train_through_sam_trainer(
        model,
        rows,
        epochs * math.ceil(len(rows) / BATCH),
        per_device_train_batch_size=BATCH,
        learning_rate=0.1,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="cosine",
        weight_decay=5e-4,
        seed=seed,
        **overrides,
    )
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test)["logits"].argmax(-1) == y_test).float().mean().item()
    return accuracy, passes, seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--noise", type=float, default=0.4)
    parser.add_argument("--rho", type=float, default=0.1)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny MLP: threading costs more than it brings

    started = time.perf_counter()
    results = {}
    for name in VARIANTS:
        runs = [run(name, seed, args.epochs, args.noise, args.rho) for seed in range(args.seeds)]
        results[name] = runs
        acc = [100 * r[0] for r in runs]
        print(
            f"{name:32s} {statistics.mean(acc):5.1f} ± {statistics.stdev(acc) if len(acc) > 1 else 0:.1f}",
            flush=True,
        )
    runtime = time.perf_counter() - started

    base_time = statistics.mean(r[2] for r in results["baseline (SGD)"])
    lines = [
        f"Digits, {args.noise:.0%} symmetric label noise, MLP, {args.epochs} epochs (baseline also 2x), ρ = {args.rho} "
        f"(ASAM: 1.0), {args.seeds} seeds; clean test accuracy mean ± std. `python experiments/variants.py`, "
        f"{runtime / 60:.1f} min on this CPU.",
        "",
        "| variant | test accuracy (%) | forward+backward passes per step | wall time / baseline |",
        "|---|---|---|---|",
    ]
    for name, runs in results.items():
        acc = [100 * r[0] for r in runs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        passes = statistics.mean(r[1] for r in runs)
        wall = statistics.mean(r[2] for r in runs) / base_time
        lines.append(f"| {name} | {statistics.mean(acc):.1f} ± {std:.1f} | {passes:.2f} | {wall:.2f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "variants.md"), "w") as f:
        f.write(table + "\n")
    _plot(results, os.path.join(RESULTS, "variants.png"), args)


def _plot(results, path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in results.items():
        acc = [100 * r[0] for r in runs]
        passes = statistics.mean(r[1] for r in runs)
        ax.errorbar(
            passes,
            statistics.mean(acc),
            yerr=statistics.stdev(acc) if len(acc) > 1 else 0,
            fmt="o",
            capsize=3,
        )
        ax.annotate(
            name, (passes, statistics.mean(acc)), textcoords="offset points", xytext=(5, 3), fontsize=7
        )
    ax.set_xlabel("forward+backward passes per optimizer step")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title(f"SAM variants: cost vs benefit (digits, {args.noise:.0%} label noise, {args.seeds} seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
