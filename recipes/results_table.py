"""Fill the results table of recipes/README.md from finished runs (never type a number in by hand).

    python recipes/results_table.py [--outputs outputs] [--readme recipes/README.md] [--seeds 0 1 2 3 4]

For every recipe folder recipes/<dataset>/<model>/ with a sam.yaml, the "ours" columns show the top-1 error (%)
of its three runs over the seeds run: SAM (sam.yaml), the equal-steps baseline (baseline.yaml) and the
compute-matched baseline with twice the steps (baseline_2x.yaml; section 3.1 of the paper). Each cell is the mean ±
the sample standard deviation and the number of seeds, read from
outputs/<dataset>/<model>/{sam,baseline,baseline_2x}/seed-<n>/test_results.json (the recipes'
`output_dir_per_seed`; a run launched with `--seed n` writes there). A run without seed folders
(outputs/.../sam/test_results.json) counts as one seed. A run that has not finished leaves no file, and an empty
cell. `--seeds` keeps only those seeds.

The paper's columns are table 3 of Foret et al. 2021: top-1 error %, mean ± the half-width of the 95% confidence
interval over 5 runs (for 5 runs that is 1.24 x the standard deviation: t(0.975, 4) / sqrt(5)); table 3 gives no
interval for the ImageNet baselines. Table 3 has one baseline column, and the paper does not say which of our two
baselines it corresponds to (C.2 is silent on the baseline's steps).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from readme_block import replace_readme_block  # noqa: E402

BLOCK = "results"  # recipes/README.md's block
START, END = f"<!-- {BLOCK}:start -->", f"<!-- {BLOCK}:end -->"

# Table 3 (top-1 error %, mean ± 95% CI over 5 runs): (SAM, baseline) for EfficientNet-B7 (ImageNet only) and
# EfficientNet-L2.
PAPER = {
    "efficientnet_b7": {"fgvc_aircraft": ("6.80 ± 0.06", "8.15 ± 0.08"),
                        "flowers102": ("0.63 ± 0.02", "1.16 ± 0.05"), "stanford_cars": ("5.18 ± 0.02", "5.94 ± 0.06"),
                        "oxford_pets": ("3.97 ± 0.04", "4.24 ± 0.09"), "cifar10": ("0.88 ± 0.02", "0.95 ± 0.03"),
                        "cifar100": ("7.44 ± 0.06", "7.68 ± 0.06"), "food101": ("7.02 ± 0.02", "7.17 ± 0.03"),
                        "imagenet": ("15.14 ± 0.03", "15.3")},
    "efficientnet_l2": {"fgvc_aircraft": ("4.82 ± 0.08", "5.80 ± 0.1"),
                        "flowers102": ("0.35 ± 0.01", "0.40 ± 0.02"), "stanford_cars": ("4.04 ± 0.03", "4.93 ± 0.04"),
                        "oxford_pets": ("2.90 ± 0.04", "3.08 ± 0.04"), "cifar10": ("0.30 ± 0.01", "0.34 ± 0.02"),
                        "cifar100": ("3.92 ± 0.06", "4.07 ± 0.08"), "food101": ("3.82 ± 0.01", "3.97 ± 0.03"),
                        "imagenet": ("11.39 ± 0.02", "11.8")},
}  # fmt: skip
RUNS = ("sam", "baseline", "baseline_2x")  # the "ours" columns, in order
_SEED_FOLDER = re.compile(r"^seed-(\d+)$")


def seed_errors(run_dir: str, seeds: set[int] | None = None) -> dict[int | None, float]:
    """Top-1 error (%) of every finished seed of one run: {seed: error}; the key is None for a run without
    seed folders."""
    errors: dict[int | None, float] = {}
    for path in glob.glob(os.path.join(run_dir, "seed-*", "test_results.json")):
        match = _SEED_FOLDER.match(os.path.basename(os.path.dirname(path)))
        if match and (seeds is None or int(match.group(1)) in seeds):
            errors[int(match.group(1))] = _error(path)
    flat = os.path.join(run_dir, "test_results.json")
    if not errors and os.path.isfile(flat) and seeds is None:
        errors[None] = _error(flat)
    return errors


def _error(path: str) -> float:
    with open(path) as f:
        return 100 * (1 - json.load(f)["test_top1"])


def summary(errors: dict) -> str:
    """'mean ± std (n=k)' over the seeds; one seed: 'value (n=1)'; none: ''."""
    values = list(errors.values())
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def table(recipes: str = "recipes", outputs: str = "outputs", seeds: set[int] | None = None) -> str:
    rows = [
        "| dataset | model | paper SAM | paper baseline | ours SAM | ours baseline | ours baseline 2x |",
        "|---|---|---|---|---|---|---|",
    ]
    for sam_yaml in sorted(glob.glob(os.path.join(recipes, "*", "*", "sam.yaml"))):
        model_dir = os.path.dirname(sam_yaml)
        dataset, model = os.path.relpath(model_dir, recipes).split(os.sep)
        if dataset == "digits":
            continue  # the offline demo, not a paper experiment
        paper = PAPER.get(model, {}).get(dataset, ("–", "–"))
        ours = [summary(seed_errors(os.path.join(outputs, dataset, model, run), seeds)) for run in RUNS]
        link = f"[{dataset}]({dataset}/{model}/README.md)"
        rows.append(f"| {link} | {model} | {paper[0]} | {paper[1]} | {' | '.join(ours)} |")
    return "\n".join(rows)


def update_readme(
    readme: str, recipes: str = "recipes", outputs: str = "outputs", seeds: set[int] | None = None
) -> bool:
    try:
        return replace_readme_block(BLOCK, table(recipes, outputs, seeds), readme=readme)
    except ValueError as err:  # a script's user error: one line, no traceback
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="recipes")
    parser.add_argument("--outputs", default="outputs")
    parser.add_argument("--readme", default="recipes/README.md")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default: every seed found)")
    a = parser.parse_args()
    changed = update_readme(a.readme, a.recipes, a.outputs, set(a.seeds) if a.seeds else None)
    print(f"{'updated' if changed else 'unchanged (nothing new)'}: {a.readme}")
