"""Fill the results table of recipes/README.md from finished runs (never type a number in by hand).

    python recipes/results_table.py [--outputs outputs] [--readme recipes/README.md]

For every recipe pair recipes/<dataset>/<model>/{sam,baseline}.yaml the "ours" columns show the top-1 error
(%) read from outputs/<dataset>/<model>/{sam,baseline}/test_results.json; a run that has not finished leaves
its cell empty. The paper's columns are table 3 of Foret et al. 2021 (top-1 error %, SAM / baseline).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

# Table 3 (top-1 error %): (SAM, baseline) for EfficientNet-B7 (ImageNet only) and EfficientNet-L2.
PAPER = {
    "efficientnet_b7": {"flowers102": ("0.63", "1.16"), "stanford_cars": ("5.18", "5.94"),
                        "oxford_pets": ("3.97", "4.24"), "cifar10": ("0.88", "0.95"),
                        "cifar100": ("7.44", "7.68"), "food101": ("7.02", "7.17")},
    "efficientnet_l2": {"flowers102": ("0.35", "0.40"), "stanford_cars": ("4.04", "4.93"),
                        "oxford_pets": ("2.90", "3.08"), "cifar10": ("0.30", "0.34"),
                        "cifar100": ("3.92", "4.07"), "food101": ("3.82", "3.97")},
}  # fmt: skip
START, END = "<!-- results:start -->", "<!-- results:end -->"


def error_percent(run_dir: str) -> str:
    path = os.path.join(run_dir, "test_results.json")
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        return f"{100 * (1 - json.load(f)['test_top1']):.2f}"


def table(recipes: str = "recipes", outputs: str = "outputs") -> str:
    rows = [
        "| dataset | model | paper SAM | paper baseline | ours SAM | ours baseline |",
        "|---|---|---|---|---|---|",
    ]
    for sam_yaml in sorted(glob.glob(os.path.join(recipes, "*", "*", "sam.yaml"))):
        model_dir = os.path.dirname(sam_yaml)
        dataset, model = os.path.relpath(model_dir, recipes).split(os.sep)
        if dataset == "digits":
            continue  # the offline demo, not a paper experiment
        paper = PAPER.get(model, {}).get(dataset, ("–", "–"))
        ours = [error_percent(os.path.join(outputs, dataset, model, run)) for run in ("sam", "baseline")]
        link = f"[{dataset}]({dataset}/{model}/README.md)"
        rows.append(f"| {link} | {model} | {paper[0]} | {paper[1]} | {ours[0]} | {ours[1]} |")
    return "\n".join(rows)


def update_readme(readme: str, recipes: str = "recipes", outputs: str = "outputs") -> None:
    with open(readme) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} block to fill.")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{table(recipes, outputs)}\n{END}",
                 text, flags=re.S)  # fmt: skip
    with open(readme, "w") as f:
        f.write(new)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="recipes")
    parser.add_argument("--outputs", default="outputs")
    parser.add_argument("--readme", default="recipes/README.md")
    a = parser.parse_args()
    update_readme(a.readme, a.recipes, a.outputs)
    print(f"updated {a.readme}")
