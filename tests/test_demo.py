"""`make demo` end to end (recipes/demo.py): the table's structure, its numbers against the runs' own files,
a quiet terminal, and nothing written outside outputs/."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from finetune_helpers import REPO

OUT = os.path.join(REPO, "outputs/digits/test_efficientnet/demo")
SETTINGS = ("clean labels", "40% label noise")
CELL = re.compile(r"^(-?\d+\.\d+) ± (\d+\.\d+)$")


def snapshot(root: str) -> dict[str, tuple[float, int]]:
    """Every file of the checkout outside outputs/ (and the git and venv folders), with mtime and size."""
    found = {}
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        if rel == ".":
            dirs[:] = [d for d in dirs if d not in (".git", ".venv", "outputs")]
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                stat = os.stat(path)
                found[os.path.relpath(path, root)] = (stat.st_mtime, stat.st_size)
        found.update({os.path.relpath(os.path.join(folder, d), root): (0, 0) for d in dirs})
    return found


def parse_cell(text: str) -> tuple[float, float]:
    match = CELL.match(text.strip())
    assert match, f"not a 'mean ± std' cell: {text!r}"
    return float(match.group(1)), float(match.group(2))


@pytest.mark.slow
def test_demo_end_to_end():
    stale = os.path.join(OUT, "clean_labels_sam_seed0", "checkpoint-3")
    os.makedirs(stale, exist_ok=True)  # a previous run's leftovers: the re-run must start over regardless
    before = snapshot(REPO)
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "recipes/demo.py"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(REPO) == before, "the demo wrote outside outputs/"
    assert not os.path.exists(stale)

    # The terminal gets progress bars and the table, not the Trainer's per-step log dictionaries.
    assert "'loss'" not in proc.stdout + proc.stderr and "train_runtime" not in proc.stdout + proc.stderr
    records = json.load(open(os.path.join(OUT, "results.json")))
    for r in records:
        assert "'loss'" in open(os.path.join(r["dir"], "log.txt")).read()

    # Arms and seeds: 3 seeds per (setting, method), the same seeds for baseline and SAM.
    seeds = {}
    for r in records:
        seeds.setdefault((r["setting"], r["method"]), []).append(r["seed"])
    assert set(seeds) == {(s, m) for s in SETTINGS for m in ("baseline", "SAM")}
    assert all(sorted(v) == sorted(seeds[(s, "baseline")]) and len(set(v)) >= 3
               for (s, _), v in seeds.items())  # fmt: skip
    # The recorded accuracy is the run's own test_results.json; λmax came from a converged Lanczos run.
    for r in records:
        test = json.load(open(os.path.join(r["dir"], "test_results.json")))
        assert r["top1"] == test["test_top1"] and r["converged"] and r["lambda_max"] > 0

    # The table: one row per arm; every cell mean ± std of the records (recomputed here).
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and " ± " in line]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| setting |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:4] == ["setting", "method", "test top-1 (%)", "λmax"] and columns[4].startswith("m-sharp")
    assert len(rows) == 4
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        setting, method = cells[0], "baseline" if cells[1].startswith("baseline") else "SAM"
        mine = [r for r in records if r["setting"] == setting and r["method"] == method]
        for cell, key, scale, tol in ((cells[2], "top1", 100, 0.05), (cells[3], "lambda_max", 1, 0.005)):
            mean, std = parse_cell(cell)
            values = scale * np.array([r[key] for r in mine])
            assert abs(mean - values.mean()) <= tol and abs(std - values.std(ddof=1)) <= tol, (line, key)
        parse_cell(cells[4])

    # One summary line per setting, and its verdict follows from the numbers (gain vs the larger std).
    for setting in SETTINGS:
        line = next(line for line in proc.stdout.splitlines() if line.startswith(f"- {setting}: SAM "))
        base = [100 * r["top1"] for r in records if r["setting"] == setting and r["method"] == "baseline"]
        sam = [100 * r["top1"] for r in records if r["setting"] == setting and r["method"] == "SAM"]
        gain, spread = np.mean(sam) - np.mean(base), max(np.std(base, ddof=1), np.std(sam, ddof=1))
        expected = "better by more than" if gain > spread else "worse by" if gain < -spread else "within"
        assert expected in line, line
    assert os.path.getsize(os.path.join(OUT, "demo.png")) > 20_000


def load_demo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "recipes", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "base, sam, expected",
    [
        ([0.80, 0.82, 0.84], [0.90, 0.91, 0.92], "better by more than the seeds' spread (larger std 2.0)"),
        ([0.80, 0.82, 0.84], [0.81, 0.83, 0.85], "within the seeds' spread (larger std 2.0)"),
        ([0.90, 0.91, 0.92], [0.80, 0.82, 0.84], "worse by more than the seeds' spread (larger std 2.0)"),
    ],
)
def test_verdict_compares_the_gain_with_the_larger_std(base, sam, expected):
    """The summary line claims a win only when the mean gain exceeds the larger sample std (ddof=1)."""
    demo = load_demo()
    records = [
        {"setting": "noisy", "method": method, "seed": seed, "top1": top1, "lambda_max": lam,
         "m_sharpness": 0.01, "train_loss": 0.1, "sam_rho": 0.05}
        for method, values, lam in (("baseline", base, 9.0), ("SAM", sam, 3.0))
        for seed, top1 in enumerate(values)
    ]  # fmt: skip
    (line,) = demo.verdicts(records)
    gain = 100 * (np.mean(sam) - np.mean(base))
    assert line.startswith(f"noisy: SAM {gain:+.1f} points top-1") and expected in line
    assert "λmax 9.00 → 3.00 (flatter)" in line
    table = demo.table(records).splitlines()
    assert table[2] == "| noisy | baseline (SGD) | " + " | ".join(
        [f"{100 * np.mean(base):.1f} ± {100 * np.std(base, ddof=1):.1f}", "9.00 ± 0.00", "0.0100 ± 0.0000",
         "0.100 ± 0.000"]
    ) + " |"  # fmt: skip
