"""The budget guide (README.md, docs/variants.md) and the ρ guidance (docs/variants.md), from the benchmarks' results.

    python experiments/budget_guide.py [--check]

Reads experiments/results/benefit*.json (`experiments/benefit.py`: what share of SAM's gain each method keeps,
per benchmark) and benchmarks/results/variant_overhead_cpu*.md (`benchmarks/variant_overhead.py`: what a step
costs against the stock Trainer's, with SGD and with AdamW), and writes one table per concept between generated
markers, so no number in them is typed by hand. A benchmark whose results are missing gets a column of "not
measured". `--check` fails (exit 1) when a block differs from what the results give, instead of writing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from benefit import share_of_gain  # noqa: E402
from readme_block import replace_readme_block  # noqa: E402

# (results stem, column title): the benefit benchmarks, in the guide's column order.
BENEFIT = [
    ("benefit", "MLP, SGD"),
    ("benefit_adamw", "MLP, AdamW"),
    ("benefit_vit_adamw", "ViT, AdamW"),
]
# The guide's rows: (label, method name in the benefit results, row name in variant_overhead's tables).
ROWS = [
    ('`sam_mode="adam_update"`', "adam_update", "sam_mode='adam_update'"),
    ('`sam_mode="momentum"` (Momentum-SAM)', "momentum", "Momentum-SAM, sam_mode='momentum'"),
    ('`sam_mode="previous_gradient"`', "previous_gradient", "sam_mode='previous_gradient'"),
    ("`sam_interval=5`", "sam_interval=5", "SAM, sam_interval=5"),
    ("LookSAM, k = 5", "LookSAM, k=5", "LookSAM, k=5"),
    ("`sam_ascent_fraction=0.25`", "sam_ascent_fraction=0.25", "ascent on 1/4 of the batch, sam_ascent_fraction=0.25"),
    ("`sam_ascent_fraction=0.5`", "sam_ascent_fraction=0.5", "ascent on 1/2 of the batch, sam_ascent_fraction=0.5"),
    ("SAM", "SAM", "SAM"),
]  # fmt: skip
# Names an earlier version of benefit.py wrote.
OLD_NAMES = {"baseline (SGD)": "baseline", "baseline (AdamW)": "baseline", "SAM (AdamW)": "SAM",
             "momentum (MSAM)": "momentum", "momentum (MSAM, AdamW)": "momentum"}  # fmt: skip
RESULTS = os.path.join(HERE, "results")
OVERHEAD = os.path.join(REPO, "benchmarks", "results")
TARGETS = (os.path.join(REPO, "README.md"), os.path.join(REPO, "docs", "variants.md"))


def load_benefit(stem: str) -> dict | None:
    """{method: {"test": [per seed], "lr", "rho", "lr_grid", "rho_grid"}} from results/<stem>.json, or None."""
    path = os.path.join(RESULTS, f"{stem}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    methods: dict = {}
    for run in record["final"]:
        name = OLD_NAMES.get(run["method"], run["method"])
        methods.setdefault(name, {"test": []})["test"].append(100 * run["test"])
    for name, (lr, rho) in record["chosen"].items():
        entry = methods[OLD_NAMES.get(name, name)]
        tried = [r for r in record["tuning"] if r["method"] == name]
        entry.update(lr=lr, rho=rho, lr_grid=sorted({r["lr"] for r in tried}),
                     rho_grid=sorted({r["rho"] for r in tried if r["rho"] is not None}))  # fmt: skip
    return methods


def step_costs(optimizer: str, image_size: int | None = None) -> dict[str, float]:
    """variant row name -> step time / stock, from variant_overhead's table (empty when not measured)."""
    stem = (
        "variant_overhead_cpu"
        + ("_adamw" if optimizer == "adamw" else "")
        + (f"_{image_size}px" if image_size else "")
    )
    path = os.path.join(OVERHEAD, f"{stem}.md")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [
            line.split("|")[1:3] for line in f if line.startswith("| ") and not line.startswith("| variant")
        ]
    return {name.strip(): float(value) for name, value in rows}


def share_text(methods: dict | None, name: str, stem: str) -> str:
    if name == "adam_update" and "adamw" not in stem:
        return "— (Adam only)"
    if methods is None or name not in methods:
        return "not measured"
    if name == "SAM":
        return "100% (reference)"
    value, low, high = share_of_gain(
        methods[name]["test"], methods["baseline"]["test"], methods["SAM"]["test"]
    )
    return f"{value:.0%} [{low:.0%}, {high:.0%}]"


def gain_text(methods: dict | None) -> str:
    if methods is None:
        return "not measured"
    base, sam = (sum(methods[k]["test"]) / len(methods[k]["test"]) for k in ("baseline", "SAM"))
    return f"{sam - base:+.1f} points ({base:.1f} → {sam:.1f}, {len(methods['SAM']['test'])} seeds)"


def budget_table(benefits: dict) -> str:
    sgd, adamw, adamw_224 = step_costs("sgd"), step_costs("adamw"), step_costs("adamw", 224)

    def cost(table: dict, row: str) -> str:
        if row in table:
            return f"{table[row]:.2f}"
        return "— (Adam only)" if table is sgd and "adam_update" in row else "not measured"

    header = ["method", "step time / stock, SGD", "step time / stock, AdamW"]
    header += [f"share of SAM's gain [90% interval], {title}" for _, title in BENEFIT]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, name, row in ROWS:
        cells = [label, cost(sgd, row), cost(adamw, row)]
        cells += [share_text(benefits[stem], name, stem) for stem, _ in BENEFIT]
        lines.append("| " + " | ".join(cells) + " |")
    gains = "; ".join(f"{title}: {gain_text(benefits[stem])}" for stem, title in BENEFIT)
    at_224 = ", ".join(f"{label} {adamw_224[row]:.2f}x" for label, _, row in ROWS if row in adamw_224)
    at_224 = (
        f" At 224 px, the resolution the recipes finetune at, where a step does 12x the work per weight: {at_224} "
        "(`--image-size 224`)."
        if at_224
        else ""
    )
    return "\n".join(
        [
            f"Step time: `benchmarks/variant_overhead.py` (CPU, ResNet-18 at 64 px, batch 32).{at_224} Share of "
            "SAM's gain: `experiments/benefit.py` (digits, 30% pair-flip noise, lr "
            "and ρ chosen per method on a validation slice, 90% paired bootstrap interval over the seeds). SAM's "
            f"gain over the tuned baseline: {gains}. Written by `python experiments/budget_guide.py`.",
            "",
            *lines,
        ]
    )


def rho_table(benefits: dict) -> str:
    """The chosen lr and ρ of every method on every benchmark, * at an edge of the grid it was chosen from."""

    def chosen(methods: dict | None, name: str, stem: str) -> str:
        if name == "adam_update" and "adamw" not in stem:
            return "— (Adam only)"
        if methods is None or name not in methods:
            return "not measured"
        entry = methods[name]
        mark = lambda v, grid: f"{v:g}" + ("*" if len(grid) > 1 and v in (grid[0], grid[-1]) else "")  # noqa: E731
        text = f"lr {mark(entry['lr'], entry['lr_grid'])}"
        has_rho = (
            entry["rho"] is not None and name != "baseline"
        )  # an earlier benefit.py wrote the baseline's 0
        return text + (f", ρ {mark(entry['rho'], entry['rho_grid'])}" if has_rho else "")

    header = ["method", *[title for _, title in BENEFIT]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, name in [("baseline", "baseline"), *[(label, name) for label, name, _ in ROWS]]:
        lines.append(
            "| " + " | ".join([label, *[chosen(benefits[stem], name, stem) for stem, _ in BENEFIT]]) + " |"
        )
    edges = sum(cell.count("*") for cell in lines[2:])
    return "\n".join(
        [
            "Chosen on the validation slice by `experiments/benefit.py` (each benchmark's grids and every run are in "
            "experiments/results/benefit*.json); * marks a value at an edge of its grid"
            + (f" ({edges} left)." if edges else " (none left)."),
            "",
            *lines,
        ]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="fail if a block is out of date instead of writing"
    )
    args = parser.parse_args(argv)
    benefits = {stem: load_benefit(stem) for stem, _ in BENEFIT}
    blocks = {"budget_guide": budget_table(benefits), "rho_guidance": rho_table(benefits)}
    stale = []
    for target in TARGETS:
        with open(target) as f:
            content = f.read()
        for name, text in blocks.items():
            if f"<!-- {name}:start -->" not in content:
                continue
            current = re.search(f"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", content, re.S)
            if args.check:
                if current is None or current.group(1).strip() != text.strip():
                    stale.append(f"{os.path.relpath(target, REPO)}: {name}")
            else:
                replace_readme_block(name, text, readme=target)
    if stale:
        sys.exit(f"out of date (run python experiments/budget_guide.py): {', '.join(stale)}")
    print(blocks["budget_guide"], blocks["rho_guidance"], sep="\n\n")


if __name__ == "__main__":
    main()
