"""How the demo's learning rates, steps and ρ were chosen: a grid on a validation slice of the train split.

    python recipes/digits/tune_demo.py --setting pair --method baseline --learning_rates 0.01 0.03 0.1 --steps 100 200
    python recipes/digits/tune_demo.py --setting pair --method SAM --rhos 0.05 0.1 0.2 --learning_rates 0.03
    python recipes/digits/tune_demo.py --setting pair --method Momentum-SAM --rhos 0.1 0.3 1 --learning_rates 0.03
    python recipes/digits/tune_demo.py --summary       # every grid run so far: mean ± std per cell, best marked

The *train* split of the digits is cut in two (every fifth image of each class held out as validation, the rest
trained on; `recipes/demo.py` `validation_copy`); the test split is never loaded. Under label noise
both parts carry the seed's pair-flipped labels, and the score is the top-1 against the validation labels as a
user has them, noisy ones included (with pair-flip noise under 50%, a model that learns the flips loses more on
the clean majority than it gains on the flipped ones, so the ranking is the clean ranking's). Each cell runs the
setting's recipe of `recipes/digits/test_efficientnet/` through `recipes/finetune.py`, from the same digits-0-4
checkpoint the demo pretrains, with the grid's `--learning_rate`, `--max_steps`, `--sam_rho` (and `--sam_mode`)
as flags. Every run appends one row to outputs/digits/test_efficientnet/tune/runs.json; `--summary` prints the
table recipes/digits/test_efficientnet/README.md quotes. One process, one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import demo  # noqa: E402  (recipes/demo.py: the recipes, the pretrain, the data copies, the quiet runner)

from hf_sam.sam import NonFiniteTrainingError  # noqa: E402

OUT = "outputs/digits/test_efficientnet/tune"
RUNS = os.path.join(OUT, "runs.json")


def run_grid(args) -> None:
    setting = demo.SETTINGS[args.setting]
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    os.makedirs(OUT, exist_ok=True)
    checkpoint = os.path.join(OUT, "pretrain")
    if not os.path.exists(os.path.join(checkpoint, "test_results.json")):
        checkpoint = demo.pretrain(
            OUT, terminal
        )  # deterministic (seed 0): the demo's checkpoint, on this grid
    recipe = f"{demo.RECIPES}/{setting.recipes[args.method]}"
    runs = json.load(open(RUNS)) if os.path.exists(RUNS) else []
    rhos = args.rhos if args.method != "baseline" else [0.0]
    for lr in args.learning_rates:
        for steps in args.steps:
            for rho in rhos:
                for seed in args.seeds:
                    data = os.path.join(OUT, f"data_{args.setting}_seed{seed}")
                    if not os.path.exists(data):
                        demo.validation_copy(data, setting.noise, seed, demo.SUBSET)
                    name = f"{args.setting}_{args.method}_lr{lr}_steps{steps}_rho{rho}_seed{seed}"
                    run_dir = os.path.join(OUT, "runs", re.sub(r"[^\w.]+", "_", name).lower())
                    flags = ["--model_name_or_path", checkpoint, "--dataset_path", data, "--seed", str(seed),
                             "--label_noise", "0",  # the copy's labels are noisy already
                             "--learning_rate", str(lr), "--max_steps", str(steps)]  # fmt: skip
                    if args.method != "baseline":
                        flags += ["--sam_rho", str(rho)]
                    desc = (
                        f"{args.setting} {args.method:<12} lr {lr:<5} {steps:>3} steps ρ {rho:<5} seed {seed}"
                    )
                    try:
                        top1 = demo.run_recipe(recipe, run_dir, flags, desc, terminal)["test_top1"]
                    except NonFiniteTrainingError:  # diverged: the cell cannot be chosen
                        print(f"{desc}: diverged (non-finite loss)", file=terminal)
                        top1 = None
                    runs.append({"setting": args.setting, "method": args.method, "learning_rate": lr,
                                 "max_steps": steps, "sam_rho": rho, "seed": seed,
                                 "validation_top1": top1})  # fmt: skip
                    with open(RUNS, "w") as f:
                        json.dump(runs, f, indent=1)
    summary()


def summary() -> str:
    """One line per (setting, method, lr, steps, ρ): validation top-1 mean ± std over its seeds; per setting and
    method, the chosen cell in bold: the best mean among the cells run on the most seeds (the grid runs seeds 0-2;
    the best few cells then run seeds 3-5 too), none diverged; a tie goes to fewer steps."""
    runs = json.load(open(RUNS))
    cells: dict[tuple, dict[int, float]] = {}
    for r in runs:  # a rerun cell keeps its latest value per seed
        key = (r["setting"], r["method"], r["learning_rate"], r["max_steps"], r["sam_rho"])
        top1 = r["validation_top1"]
        cells.setdefault(key, {})[r["seed"]] = None if top1 is None else 100 * top1
    best = {}  # per (setting, method): the best mean among the cells run on the most seeds (3 first, then the
    # finalists on 3 more), none diverged
    for group in {key[:2] for key in cells}:
        mine = {
            key: v for key, v in cells.items() if key[:2] == group and None not in v.values() and len(v) >= 3
        }
        most = max((len(v) for v in mine.values()), default=0)
        # a tie (the same number of validation images right) goes to the cheaper cell: fewer steps, then lower lr
        finalists = {key: (round(np.mean(list(v.values())), 6), -key[3], -key[2]) for key, v in mine.items()
                     if len(v) == most}  # fmt: skip
        if finalists:
            best[group] = (max(finalists, key=finalists.get),)
    lines = [
        "| setting | method | lr | steps | ρ | seeds | validation top-1 (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(demo.METHODS)}
    for key in sorted(cells, key=lambda k: (k[0], order[k[1]], k[2], k[3], k[4])):
        values = list(cells[key].values())
        diverged = [seed for seed, v in cells[key].items() if v is None]
        cell = f"diverged (seed {', '.join(map(str, diverged))})" if diverged else demo.mean_std(values)
        if best.get(key[:2], (None,))[0] == key:
            cell = f"**{cell}**"
        seeds = ",".join(map(str, sorted(cells[key])))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {seeds} | {cell} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(OUT, "summary.md"), "w") as f:
        f.write(table + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=list(demo.SETTINGS), default="pair")
    parser.add_argument("--method", choices=list(demo.METHODS), default="baseline")
    parser.add_argument("--learning_rates", type=float, nargs="+", default=[0.03])
    parser.add_argument("--steps", type=int, nargs="+", default=[120])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.05], help="SAM and Momentum-SAM")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--summary", action="store_true", help="only print the table of the runs so far")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.summary:
        summary()
    else:
        run_grid(args)


if __name__ == "__main__":
    main()
