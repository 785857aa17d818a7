"""Experiment 4 — p = 2 versus p = ∞ versus random perturbations (paper, appendix C.5, figure 6).

    python experiments/perturbation.py [--workers 2] [--seeds 3]

ε = ρ g/‖g‖₂ (SAM, p = 2), ε = ρ∞ sign(g) (p = ∞) and ε = ρ z/‖z‖₂ with z ~ N(0, I) (random), all through
`hf_sam.SAM`. They are compared at the same Euclidean size ‖ε‖₂ = ρ: for p = ∞ that means ρ∞ = ρ/√d (d = number
of weights), since ‖sign(g)‖₂ = √d. 40% label noise (the paper used clean CIFAR-10, where differences on digits
would drown in seed noise). Writes results/perturbation.{md,png,json}.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from common import Run, make_model, markdown_table, mean_std, plt, run_all, seeds_runs, select, write_outputs

NOISE = 0.4
RADII = (0.05, 0.1, 0.2, 0.5)
KINDS = {"2": "p = 2 (SAM)", "inf": "p = ∞", "random": "random"}
EPOCHS = 50


def main(workers: int = 2, seeds: int = 3) -> str:
    start = time.perf_counter()
    template = Run(seed=0, noise=NOISE, epochs=EPOCHS)
    sqrt_d = math.sqrt(sum(p.numel() for p in make_model(template).parameters()))
    runs = seeds_runs(template, seeds, perturbation="none", epochs=2 * EPOCHS)
    for kind in KINDS:
        for radius in RADII:
            rho = radius / sqrt_d if kind == "inf" else radius
            runs += seeds_runs(template, seeds, perturbation=kind, rho=rho)
    results = run_all(runs, workers)

    sgd = [r["test_accuracy"] for r in select(results, perturbation="none")]
    header = ["perturbation", *[f"‖ε‖₂ = {radius}" for radius in RADII]]
    rows, curves = [], {}
    for kind, name in KINDS.items():
        accs = [
            [
                r["test_accuracy"]
                for r in select(results, perturbation=kind)
                if math.isclose(r["rho"] * (sqrt_d if kind == "inf" else 1.0), radius)
            ]
            for radius in RADII
        ]
        rows.append([name, *[mean_std(a, 100) for a in accs]])
        curves[name] = accs
    rows.append([f"SGD ({2 * EPOCHS} epochs)", mean_std(sgd, 100), *[""] * (len(RADII) - 1)])
    body = (
        f"Clean test accuracy (%), {int(NOISE * 100)}% label noise, SAM {EPOCHS} epochs, batch 64, mean ± std over "
        f"{seeds} seeds; p = ∞ uses ρ∞ = ‖ε‖₂/√d with √d = {sqrt_d:.1f}. Paper (figure 6, CIFAR-10, no numbers to "
        "quote): adversarial beats random, p = 2 beats p = ∞.\n\n" + markdown_table(header, rows)
    )

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, accs in curves.items():
        axis.errorbar(
            RADII,
            [100 * np.mean(a) for a in accs],
            yerr=[100 * np.std(a, ddof=1) for a in accs],
            marker="o",
            capsize=3,
            label=name,
        )
    axis.axhline(100 * np.mean(sgd), color="gray", linestyle="--", label=f"SGD, {2 * EPOCHS} epochs")
    axis.set_xscale("log")
    axis.set(
        xlabel="‖ε‖₂",
        ylabel="clean test accuracy (%)",
        title=f"Perturbation type, {int(NOISE * 100)}% label noise",
    )
    axis.legend(fontsize=8)
    return write_outputs(
        "perturbation",
        "4. p = 2 vs p = ∞ vs random (paper appendix C.5)",
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
