"""`make demo` end to end (recipes/demo.py): the table's structure, its numbers against the runs' own files,
the verdicts from paired intervals, a quiet terminal, and nothing written outside outputs/; and the interval
arithmetic against a hand computation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from finetune_helpers import REPO

OUT = os.path.join(REPO, "outputs/digits/test_efficientnet/demo")
SETTINGS = ("clean labels", "30% pair-flip noise")
METHODS = ("baseline", "SAM", "Momentum-SAM")
GAIN = re.compile(r"^([+-]\d+\.\d+) \[([+-]\d+\.\d+), ([+-]\d+\.\d+)\]$")
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


def t_bounds(base, other, t_quantile):
    """The paired one-sided 95% bounds, written out: mean of the differences ∓ t · sd / √n."""
    diff = np.array(other) - np.array(base)
    half = t_quantile * diff.std(ddof=1) / np.sqrt(len(diff))
    return diff.mean(), diff.mean() - half, diff.mean() + half


T95 = {2: 2.919986, 3: 2.353363, 4: 2.131847, 5: 2.015048, 6: 1.943180, 7: 1.894579, 9: 1.833113}  # t tables


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
        assert {"setting", "method", "seed", "top1"} <= set(r)  # what other tools read

    # Arms and seeds: every (setting, method) has the same seeds as its setting's baseline, at least 3.
    seeds = {}
    for r in records:
        seeds.setdefault((r["setting"], r["method"]), []).append(r["seed"])
    assert set(seeds) == {(s, m) for s in SETTINGS for m in METHODS}
    assert all(sorted(v) == sorted(seeds[(s, "baseline")]) and len(set(v)) == len(v) >= 3
               for (s, _), v in seeds.items())  # fmt: skip
    # The recorded accuracy is the run's own test_results.json; λmax came from a converged Lanczos run; the run
    # trained with its method (the resolved recipe's sam_rho / sam_mode) and its step time was measured.
    for r in records:
        test = json.load(open(os.path.join(r["dir"], "test_results.json")))
        assert r["top1"] == test["test_top1"] and r["converged"] and r["lambda_max"] > 0
        assert r["seconds_per_step"] > 0
        config = open(os.path.join(r["dir"], "resolved_config.yaml")).read()
        assert (r["method"] == "baseline") == ("sam_rho: 0.0\n" in config or "sam_rho: 0\n" in config)
        assert (r["method"] == "Momentum-SAM") == ("sam_mode: momentum" in config)
    # Under pair-flip noise the recipes flip 30% of the train labels c -> c+1 themselves, every method of a seed
    # from the same draw (10_000 + seed, the draws the README's numbers were measured with).
    for r in records:
        config = yaml.safe_load(open(os.path.join(r["dir"], "resolved_config.yaml")))
        noisy = r["setting"] == SETTINGS[1]
        assert config["label_noise"] == (0.3 if noisy else 0) and config.get("dataset_path") is None
        assert (config["label_noise_type"], config["label_noise_seed"]) == (
            ("pair", 10_000 + r["seed"]) if noisy else ("symmetric", None)
        )

    # The table: one row per arm; top-1 and λmax are mean ± std of the records (recomputed here); the gain is the
    # paired t interval of the per-seed differences (recomputed here from the t table).
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and " ± " in line]
    header = next(line for line in lines if line.startswith("| setting |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:6] == ["setting", "method", "test top-1 (%)", "gain (points) [90% paired interval]",
                           "time/step vs baseline", "λmax"] and columns[6].startswith("m-sharp")  # fmt: skip
    assert len(rows) == len(SETTINGS) * len(METHODS)
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        setting = cells[0]
        method = next(m for m in reversed(METHODS) if cells[1].startswith(m.split(" ")[0]))
        mine = sorted(
            (r for r in records if r["setting"] == setting and r["method"] == method), key=lambda r: r["seed"]
        )
        base = sorted((r for r in records if r["setting"] == setting and r["method"] == "baseline"),
                      key=lambda r: r["seed"])  # fmt: skip
        for cell, key, scale, tol in ((cells[2], "top1", 100, 0.05), (cells[5], "lambda_max", 1, 0.005)):
            mean, std = parse_cell(cell)
            values = scale * np.array([r[key] for r in mine])
            assert abs(mean - values.mean()) <= tol and abs(std - values.std(ddof=1)) <= tol, (line, key)
        parse_cell(cells[6])
        ratio = np.mean([r["seconds_per_step"] for r in mine]) / np.mean(
            [r["seconds_per_step"] for r in base]
        )
        assert cells[4] == f"{ratio:.2f}x"
        if method == "baseline":
            assert cells[3] == "(reference)"
            continue
        match = GAIN.match(cells[3])
        assert match, cells[3]
        expected = t_bounds(
            [100 * r["top1"] for r in base], [100 * r["top1"] for r in mine], T95[len(mine) - 1]
        )
        assert np.allclose([float(g) for g in match.groups()], expected, atol=0.051), (line, expected)

    # One summary line per setting; its verdicts follow from the intervals (not from the std).
    for setting in SETTINGS:
        line = next(line for line in lines if line.startswith(f"- {setting} ("))
        for method in METHODS[1:]:
            base = [100 * r["top1"] for r in sorted(records, key=lambda r: r["seed"])
                    if r["setting"] == setting and r["method"] == "baseline"]  # fmt: skip
            mine = [100 * r["top1"] for r in sorted(records, key=lambda r: r["seed"])
                    if r["setting"] == setting and r["method"] == method]  # fmt: skip
            gain, lower, upper = t_bounds(base, mine, T95[len(mine) - 1])
            expected = "clear gain" if lower > 0 else "clear loss" if upper < 0 else "within the spread"
            part = line.split(f"{method} ", 1)[1]
            assert part.startswith(
                f"{gain:+.1f} points top-1 (90% interval [{lower:+.1f}, {upper:+.1f}]): {expected}"
            )
    # The demo's claim (issue 28): under label noise, SAM's gain has a one-sided 95% lower bound above 0.
    assert "SAM" in next(line for line in lines if line.startswith(f"- {SETTINGS[1]} ("))
    noisy_line = next(line for line in lines if line.startswith(f"- {SETTINGS[1]} ("))
    assert noisy_line.split("; Momentum-SAM")[0].split("SAM ", 1)[1].split(": ")[1].startswith("clear gain")
    assert any(
        line.startswith("In short: SAM (two forward+backward passes per step) costs") for line in lines
    )
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
        # differences 4, 6, 5, 5: mean 5, sd √(2/3) = 0.8165, se 0.4082, t(0.95, 3) = 2.3534: 5 ∓ 0.9608
        ([0.80, 0.82, 0.84, 0.86], [0.84, 0.88, 0.89, 0.91], (5.0, 4.0392, 5.9608, "clear gain")),
        # differences 5, 8, 2: mean 5, sd 3, se √3 = 1.7321, t(0.95, 2) = 2.9200: 5 ∓ 5.0576 (just reaches below 0)
        ([0.80, 0.82, 0.84], [0.85, 0.90, 0.86], (5.0, -0.0576, 10.0576, "within the spread")),
        # differences -4, -6, -5, -5: the mirror image of the first
        ([0.84, 0.88, 0.89, 0.91], [0.80, 0.82, 0.84, 0.86], (-5.0, -5.9608, -4.0392, "clear loss")),
    ],
)
def test_paired_interval_against_a_hand_computation(base, sam, expected):
    """The gain is the mean of the per-seed differences, its bounds mean ∓ t(0.95, n-1)·sd/√n, the verdict from
    the bounds; records are paired by seed whatever their order in results.json."""
    demo = load_demo()
    gain, lower, upper, word = expected
    got = demo.paired_gain(100 * np.array(base), 100 * np.array(sam))
    assert np.allclose(got, (gain, lower, upper), atol=1e-4)
    assert demo.verdict(got[1], got[2]) == word
    records = [
        {"setting": "noisy", "method": method, "seed": seed, "top1": top1, "lambda_max": lam, "m_sharpness": 0.01,
         "train_loss": 0.1, "sam_rho": rho, "seconds_per_step": secs, "max_steps": steps}
        for method, values, lam, rho, secs, steps in (("baseline", base, 9.0, 0, 0.02, 60),
                                                      ("SAM", sam, 3.0, 0.05, 0.04, 240),
                                                      ("Momentum-SAM", base, 5.0, 0.2, 0.021, 120))
        for seed, top1 in enumerate(values)
    ][::-1]  # fmt: skip
    (line,) = demo.verdicts(records)
    assert line.startswith(f"noisy ({len(base)} paired seeds; baseline λmax 9.00): SAM {gain:+.1f} points top-1 "
                           f"(90% interval [{lower:+.1f}, {upper:+.1f}]): {word}, at 2.00x the time per step (8.0x the "
                           "training time: 240 steps against 60), λmax 3.00; Momentum-SAM +0.0 points top-1 (90% "
                           "interval [+0.0, +0.0]): within the spread, at 1.05x the time per step (2.1x the training "
                           "time: 120 steps against 60), λmax 5.00.")  # fmt: skip
    table = demo.table(records).splitlines()
    assert table[3] == "| noisy | SAM ρ=0.05 | " + " | ".join(
        [f"{100 * np.mean(sam):.1f} ± {100 * np.std(sam, ddof=1):.1f}", f"{gain:+.1f} [{lower:+.1f}, {upper:+.1f}]",
         "2.00x", "3.00 ± 0.00", "0.0100 ± 0.0000", "0.100 ± 0.000"]
    ) + " |"  # fmt: skip
    assert table[2].startswith("| noisy | baseline (SGD) | ") and "| (reference) | 1.00x |" in table[2]


def test_paired_interval_pairs_by_seed_and_refuses_unpaired_runs():
    demo = load_demo()
    records = [{"setting": "s", "method": m, "seed": seed, "top1": v}
               for m, seed, v in (("baseline", 1, 0.5), ("baseline", 0, 0.6), ("SAM", 0, 0.7), ("SAM", 1, 0.6))]  # fmt: skip
    assert demo.seed_pairs(records, "s", "SAM") == ([60.0, 50.0], [70.0, 60.0])  # seed 0 with seed 0
    records.append({"setting": "s", "method": "SAM", "seed": 2, "top1": 0.9})
    with pytest.raises(ValueError, match="seeds"):
        demo.seed_pairs(records, "s", "SAM")
    with pytest.raises(ValueError, match="at least 2 seeds"):
        demo.paired_gain([50.0], [60.0])
