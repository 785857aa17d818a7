"""Experiment 2 — Hessian spectrum and m-sharpness of the final models, SGD versus SAM (paper, section 4.2, C.6).

    python experiments/hessian.py [--workers 2] [--seeds 3]

For each final model: λ1..λ5 of the Hessian of the training loss over the whole training set (Lanczos,
`hf_sam.sharpness.hessian_eigenvalues`), λmax/λ5, and m-sharpness (m = 64 = the batch, ρ = 0.05 for every model)
estimated with 1 and with 5 projected ascent steps. Clean labels (the paper's setting) and 40% label noise.
Writes results/hessian.{md,png,json}.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import Run, markdown_table, mean_std, plt, run_all, seeds_runs, select, write_outputs

NOISE = (0.0, 0.4)
RHOS = (0.05, 0.2, 0.5)
EPOCHS = 50
# Paper, section 4.2 (WideResNet40-10 without BatchNorm, CIFAR-10): λmax ≈ 25 (SGD) vs ≈ 1.0 (SAM);
# λmax/λ5 up to 11.4 (SGD) vs 2.6 (SAM).
PAPER = {"SGD": ("≈ 25", "11.4"), "SAM": ("≈ 1.0", "2.6")}


def main(workers: int = 2, seeds: int = 3) -> str:
    start = time.perf_counter()
    runs = []
    for noise in NOISE:
        runs += seeds_runs(
            Run(seed=0, measure=True), seeds, noise=noise, perturbation="none", epochs=2 * EPOCHS
        )
        for rho in RHOS:
            runs += seeds_runs(Run(seed=0, measure=True), seeds, noise=noise, rho=rho, epochs=EPOCHS)
    results = run_all(runs, workers)

    methods = [("SGD", dict(perturbation="none"))] + [
        (f"SAM ρ={rho}", dict(perturbation="2", rho=rho)) for rho in RHOS
    ]
    header = [
        "labels",
        "method",
        "test acc (%)",
        "train loss",
        "λmax",
        "λmax/λ5",
        "m-sharpness, 1 step",
        "m-sharpness, 5 steps",
    ]
    rows, bars = [], {}
    for noise in NOISE:
        for name, where in methods:
            sel = select(results, noise=noise, **where)
            get = lambda key, sel=sel: [r[key] for r in sel]  # noqa: E731
            rows.append(
                [
                    "clean" if noise == 0 else f"{int(noise * 100)}% noise",
                    name,
                    mean_std(get("test_accuracy"), 100),
                    mean_std(get("train_loss"), digits=4),
                    mean_std(get("lambda_max"), digits=3),
                    mean_std(get("lambda_ratio"), digits=2),
                    mean_std(get("m_sharpness_1"), digits=4),
                    mean_std(get("m_sharpness_5"), digits=4),
                ]
            )
            bars[(noise, name)] = (get("lambda_max"), get("lambda_ratio"))
    rows += [["CIFAR-10 (paper)", k, "", "", lam, ratio, "", ""] for k, (lam, ratio) in PAPER.items()]
    converged = sum(r["lanczos_converged"] for r in results)
    body = (
        f"Mean ± std over {seeds} seeds; SGD {2 * EPOCHS} epochs, SAM {EPOCHS} epochs. Eigenvalues and m-sharpness "
        f"on the training set with the labels trained on. Lanczos converged (residual ≤ 1e-3·λmax) in {converged}/"
        f"{len(results)} runs.\n\n" + markdown_table(header, rows)
    )

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [name for name, _ in methods]
    width = 0.38
    for k, noise in enumerate(NOISE):
        label = "clean" if noise == 0 else f"{int(noise * 100)}% noise"
        for axis, index in zip(axes, (0, 1), strict=True):
            values = [bars[(noise, n)][index] for n in names]
            axis.bar(
                np.arange(len(names)) + (k - 0.5) * width,
                [np.mean(v) for v in values],
                width,
                yerr=[np.std(v, ddof=1) for v in values],
                capsize=3,
                label=label,
            )
    for axis, title in zip(axes, ("λmax (log scale)", "λmax / λ5"), strict=True):
        axis.set_xticks(np.arange(len(names)), names, fontsize=8)
        axis.set_title(title)
        axis.legend(fontsize=8)
    axes[0].set_yscale("log")
    figure.suptitle("Hessian of the training loss at the end of training (digits MLP)")
    return write_outputs(
        "hessian",
        "2. Hessian spectrum (paper section 4.2)",
        body,
        figure,
        results,
        time.perf_counter() - start,
        workers,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    main(args.workers, args.seeds)
