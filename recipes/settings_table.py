"""Count the recipes' settings by where they come from, from the YAMLs themselves, and write the table into
recipes/README.md between `<!-- settings:start -->` and `<!-- settings:end -->`:

    python recipes/settings_table.py

A setting is a key of a recipe that changes what the run computes; the checkpoint and dataset (what is finetuned,
on what) and the bookkeeping keys (logging, checkpoints, workers, seed, licence) are not counted. Each setting's
status is read from its own comment in `sam.yaml` (the pairs differ from it only in `sam_*` and the run length,
which tests/test_recipes.py checks), or from the comment lines just above it:

- *as released*: the comment opens with its source: the SAM paper (`paper, C.2`, `paper (... table 8`), the
  authors' released code (`released code:`), their published command, the ViT paper (`ViT paper, ...`) or its code
  (`ViT code, ...`), or says where C.2 is silent which released default it takes;
- *stated departure*: the comment says it departs (`our choice`, `our pick`, `not in the paper`, `departure`), and
  the recipe README says why;
- *no effect*: the comment says so (BatchNorm freezing on a ViT, which has none);
- *undocumented*: none of these. tests/test_recipes.py fails on any.

Implementation-level differences that no key sets (torchvision's crop draw, the last partial step of an epoch,
SAM's 1e-12, random numbers) are in each recipe README's departures, not in this count.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from readme_block import replace_readme_block  # noqa: E402

BLOCK = "settings"  # recipes/README.md's block
START, END = f"<!-- {BLOCK}:start -->", f"<!-- {BLOCK}:end -->"

# What is finetuned and on what, and bookkeeping: not settings of the method.
IDENTITY = ("model_name_or_path", "dataset")
BOOKKEEPING = ("dataloader_num_workers", "license", "license_link", "license_name", "logging_steps",
               "output_dir_per_seed", "per_device_eval_batch_size", "report_to", "save_steps", "save_strategy",
               "save_total_limit", "seed")  # fmt: skip
SOURCES = re.compile(
    r"^(paper[,( ]|released code|released SAM code|ViT paper|ViT code|SAM paper|C\.2 is silent|"
    r"the authors' one published)"
)
DEPARTURES = re.compile(r"our choice|our pick|not in the paper|\bdeparture\b")
STATUSES = ("as released", "stated departure", "no effect", "undocumented")
# The recipe families, each held to its own sources: C.2 (+ the released SAM code), C.2's ImageNet sentences, and
# the ViT paper (+ the ViT code).
FAMILIES = (
    (
        "EfficientNet-B7/L2 (C.2)",
        lambda dataset, model: model.startswith("efficientnet") and dataset != "imagenet",
    ),
    (
        "EfficientNet-B7/L2, ImageNet",
        lambda dataset, model: model.startswith("efficientnet") and dataset == "imagenet",
    ),
    ("ViT-B/16", lambda dataset, model: model == "vit_b16"),
)


def comments(path: str) -> dict[str, str]:
    """Each key's comment: its inline one, or the comment lines right above it (a block that explains the key)."""
    out, block = {}, []
    for line in open(path):
        if line.startswith("#"):
            block.append(line.lstrip("# ").strip())
            continue
        if match := re.match(r"^([a-z_0-9]+):", line):
            inline, above = line.partition("#")[2].strip(), " ".join(block)
            out[match.group(1)] = (
                inline if SOURCES.match(inline) or DEPARTURES.search(inline) or not above else above
            )
        block = []
    return out


def status(comment: str) -> str:
    if DEPARTURES.search(comment):
        return "stated departure"
    if SOURCES.match(comment):
        return "as released"
    if comment.startswith("no effect"):
        return "no effect"
    return "undocumented"


def settings(recipes: str = os.path.dirname(os.path.abspath(__file__))) -> list[dict]:
    """One row per (family, setting, status): the values it takes and the recipes (dataset/model) that set it so."""
    rows: dict[tuple[str, str, str], dict] = {}
    for path in sorted(glob.glob(os.path.join(recipes, "*", "*", "sam.yaml"))):
        dataset, model = os.path.relpath(path, recipes).split(os.sep)[:2]
        family = next((name for name, member in FAMILIES if member(dataset, model)), None)
        if family is None:  # the offline demo (recipes/digits): no paper behind it
            continue
        with open(path) as f:
            values = yaml.safe_load(f)
        notes = comments(path)
        for key, value in values.items():
            if key in IDENTITY or key in BOOKKEEPING:
                continue
            row = rows.setdefault((family, key, status(notes.get(key, ""))), {"values": set(), "recipes": []})
            row["values"].add(str(value))
            row["recipes"].append(f"{dataset}/{model}")
    order = [name for name, _ in FAMILIES]
    return [
        {"family": family, "setting": key, "status": state, "values": sorted(row["values"], key=_natural),
         "recipes": row["recipes"]}
        for (family, key, state), row in sorted(rows.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1], kv[0][2]))
    ]  # fmt: skip


def _natural(text: str):
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def table(recipes: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    rows = settings(recipes)
    counts = {state: sum(r["status"] == state for r in rows) for state in STATUSES}
    per_family = {}
    for r in rows:
        per_family.setdefault(r["family"], {s: 0 for s in STATUSES})[r["status"]] += 1
    lines = [
        f"{len(rows)} settings (a setting of one recipe family; one that is as released in some of the family's "
        f"recipes and a stated departure in others counts once for each): {counts['as released']} as released, "
        f"{counts['stated departure']} stated departures, {counts['no effect']} with no effect, "
        f"{counts['undocumented']} undocumented.",
        "",
        "| recipes | as released | stated departure | no effect | undocumented |",
        "|---|---|---|---|---|",
        *(f"| {family} | {' | '.join(str(c[s]) for s in STATUSES)} |" for family, c in per_family.items()),
        "",
        "| recipes | setting | status | value(s) | recipes that set it so |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        family_size = len({p for q in rows if q["family"] == r["family"] for p in q["recipes"]})
        where = "all" if len(r["recipes"]) == family_size else ", ".join(r["recipes"])
        lines.append(
            f"| {r['family']} | `{r['setting']}` | {r['status']} | {', '.join(r['values'])} | {where} |"
        )
    return "\n".join(lines)


def update_readme(readme: str, recipes: str = os.path.dirname(os.path.abspath(__file__))) -> bool:
    try:
        return replace_readme_block(BLOCK, table(recipes), readme=readme)
    except ValueError as err:  # a script's user error: one line, no traceback
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--readme", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
    )
    a = parser.parse_args()
    changed = update_readme(a.readme)
    print(f"{'updated' if changed else 'unchanged'}: {a.readme}")
