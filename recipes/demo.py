"""Offline demo (`make demo`): what SAM and its one-pass mode buy when finetuning on real images, on a CPU.

    python recipes/demo.py            # the demo: prints the table, writes everything under outputs/
    python recipes/demo.py --readme   # the same, then writes the table and the picture into the README
    python recipes/digits/tune_demo.py --summary   # how lr, steps and ρ were chosen (validation slice)

Every run is `recipes/finetune.py` with a recipe of `recipes/digits/test_efficientnet/`, on scikit-learn's
handwritten digits (the `digits` dataset spec, 1,797 real 8x8 images) and timm's 0.1M-parameter
`test_efficientnet` at 32x32:

1. pretrain.yaml: train it from random init on digits 0-4 (the "pretrained checkpoint"), once;
2. finetune it on digits 5-9 (new head, frozen BatchNorm, SGD momentum 0.9 + cosine, the `SAMTrainer`) with
   three methods on the same seeds: plain SGD (`sam_rho: 0`), SAM, and Momentum-SAM (`sam_mode: momentum`, one
   forward+backward pass per step), in two settings: clean labels (baseline.yaml, sam.yaml, momentum_sam.yaml)
   and 30% pair-flip label noise on the train split (pair_*.yaml: a seed-drawn 30% of the training labels moved
   to the next class, 5 -> 6 -> ... -> 9 -> 5, by the recipes' own `label_noise_type: pair`; the test labels
   stay clean). Each recipe's learning rate, steps and ρ were chosen on a validation slice of the train split
   (recipes/digits/tune_demo.py; the numbers in recipes/digits/test_efficientnet/README.md).

Each final model is then measured on the same first training images (with the labels it was trained on): the
top Hessian eigenvalue λmax (Lanczos, `hf_sam.sharpness.hessian_eigenvalues`) and m-sharpness (m = 32, at the
SAM recipe's ρ, `hf_sam.sharpness.m_sharpness`). Prints a table (top-1 mean ± std over seeds, each method's gain
over the baseline as the mean of the per-seed differences with its 90% paired t interval, wall time per step
relative to the baseline's, flatness), one line per setting with the verdict its interval gives ("clear gain"
when the one-sided 95% lower bound is above 0), a closing line on what each method costs and buys, and saves a
picture of every seed's runs to outputs/digits/test_efficientnet/demo/demo.png; results.json there has one row
per run. The Trainer's logs go to each run's `log.txt`; only a progress bar per run reaches the terminal.
Re-running starts over.
"""

from __future__ import annotations

import sys
import time

STARTED = time.time()  # the run time the demo reports includes its imports (torch, transformers: seconds)
sys.dont_write_bytecode = True  # the demo writes nothing outside outputs/ (not even recipes/__pycache__)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoImageProcessor, AutoModelForImageClassification, TrainerCallback  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune  # noqa: E402  (recipes/ is not a package: the demo runs from its own folder)

from hf_sam.finetune.data import (  # noqa: E402
    SPECS,
    add_label_noise,
    digits_dataset,
    load_image_classification,
    make_transform,
    noisy_labels,
    preprocessing_from_processor,
)
from hf_sam.finetune.models import save_timm_checkpoint  # noqa: E402
from hf_sam.sam import NonFiniteTrainingError  # noqa: E402
from hf_sam.sharpness import hessian_eigenvalues, m_sharpness  # noqa: E402

RECIPES = "recipes/digits/test_efficientnet"
OUT = "outputs/digits/test_efficientnet/demo"
SEEDS = (0, 1, 2, 3, 4, 5)
SUBSET = ["5", "6", "7", "8", "9"]  # the finetuning task (every recipe's label_subset)
METHODS = ("baseline", "SAM", "Momentum-SAM")  # one recipe each per setting; they differ in their sam_* keys


class Setting(NamedTuple):
    title: str
    noise: float  # pair-flip label noise on the train split (the recipes' `label_noise`); 0: clean
    recipes: dict  # method -> recipe file in RECIPES


SETTINGS = {
    "clean": Setting(
        "clean labels", 0.0, dict(zip(METHODS, ("baseline.yaml", "sam.yaml", "momentum_sam.yaml")))
    ),
    "pair": Setting(
        "30% pair-flip noise",
        0.3,
        dict(zip(METHODS, ("pair_baseline.yaml", "pair_sam.yaml", "pair_momentum_sam.yaml"))),
    ),
}
MEASURE_EXAMPLES = 64  # the first 64 training images of digits 5-9: the same slice for every model
M = 32  # m-sharpness chunk: the training batch, so it is the quantity SAM minimises per step
README_PNG = f"{RECIPES}/demo.png"  # the picture the README shows (written by --readme only)
MARKERS = ("<!-- demo:start -->", "<!-- demo:end -->")


# ====================================================================== running a recipe quietly
class ProgressBar(TrainerCallback):
    """One tqdm bar per run on the terminal (the Trainer's own bar and log lines go to the run's log.txt), and
    the run's wall time per optimizer step in the steady state (after the first WARM_STEPS steps)."""

    WARM_STEPS = 5

    def __init__(self, desc: str, stream):
        self.desc, self.stream, self.bar = desc, stream, None
        self.started = self.seconds_per_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(
            total=state.max_steps, desc=self.desc, file=self.stream, leave=True, dynamic_ncols=True
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)
        if state.global_step == self.WARM_STEPS:
            self.started = time.perf_counter()
        elif state.global_step == state.max_steps and self.started is not None:
            self.seconds_per_step = (time.perf_counter() - self.started) / (state.max_steps - self.WARM_STEPS)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "test_top1" in metrics:
            self.bar.set_postfix(test_top1=f"{metrics['test_top1']:.3f}")
        self.bar.close()


@contextmanager
def output_to(path: str):
    """Send everything written to stdout and stderr (Python, transformers' logging, C libraries) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_recipe(recipe: str, output_dir: str, flags: list[str], desc: str, terminal) -> dict:
    """`recipes/finetune.py --config recipe`, logs to output_dir/log.txt, a progress bar on the terminal.
    Returns finetune.py's test metrics and `seconds_per_step` (steady-state wall time per optimizer step)."""
    os.makedirs(output_dir, exist_ok=True)
    argv = ["--config", recipe, "--output_dir", output_dir, "--overwrite_output_dir", "true"]
    argv += ["--disable_tqdm", "true", *flags]
    log = os.path.join(output_dir, "log.txt")
    bar = ProgressBar(desc, terminal)
    try:
        with output_to(log):
            metrics = finetune.main(argv, callbacks=[bar])
    except SystemExit as err:  # a recipe error: finetune.py's one line, on the terminal
        raise SystemExit(f"{err} (log: {log})") from None
    except NonFiniteTrainingError as err:  # the run diverged: say which, not a traceback
        raise SystemExit(f"{desc}: training diverged ({err}) (log: {log})") from None
    return {**metrics, "seconds_per_step": bar.seconds_per_step}


def write_random_init(folder: str) -> None:
    """A randomly initialised timm test_efficientnet in the Hub's timm layout, preprocessing at 32x32."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    save_timm_checkpoint(
        model,
        folder,
        input_size=(3, 32, 32),
        crop_pct=1.0,
        interpolation="bicubic",
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )


def pretrain(out: str, terminal) -> str:
    write_random_init(os.path.join(out, "random_init"))
    folder = os.path.join(out, "pretrain")
    flags = ["--model_name_or_path", os.path.join(out, "random_init")]
    run_recipe(f"{RECIPES}/pretrain.yaml", folder, flags, "pretrain digits 0-4", terminal)
    return folder


# ====================================================================== flatness
def measure(run_dir: str, rho: float) -> dict:
    """λmax and m-sharpness of a finished run's model on the first MEASURE_EXAMPLES images of its train split,
    with the labels it was trained on (label noise re-drawn from the run's own resolved config)."""
    with open(os.path.join(run_dir, "resolved_config.yaml")) as f:
        config = yaml.safe_load(f)
    data = load_image_classification(
        SPECS[config["dataset"]],
        config["dataset_path"],
        label_subset=config["label_subset"],
        verify_images=False,
    )
    train = data.train
    if config["label_noise"]:
        seed = config["seed"] if config["label_noise_seed"] is None else config["label_noise_seed"]
        train = add_label_noise(
            train,
            data.label_column,
            config["label_noise"],
            seed,
            len(data.label_names),
            config["label_noise_type"],
        )
    model = AutoModelForImageClassification.from_pretrained(run_dir)
    processor = AutoImageProcessor.from_pretrained(run_dir)
    transform = make_transform(
        preprocessing_from_processor(processor).eval, data.image_column, data.label_column
    )
    batch = transform(train[:MEASURE_EXAMPLES])
    batch = {"pixel_values": torch.stack(batch["pixel_values"]), "labels": torch.tensor(batch["labels"])}
    spectrum = hessian_eigenvalues(model, [batch], top_k=1, max_iter=20, tol=1e-2)
    sharp = m_sharpness(model, [batch], m=M, rho=rho)
    return {"lambda_max": spectrum.lambda_max, "converged": spectrum.converged, "m_sharpness": sharp.value,
            "train_loss": sharp.loss}  # fmt: skip


def recipe_value(recipe: str, key: str):
    with open(recipe) as f:
        return yaml.safe_load(f).get(key)


# ====================================================================== the demo
def run_all(out: str, settings, seeds, terminal, measure_flatness: bool = True) -> list[dict]:
    """Every (setting, seed, method) finetune from one pretrained checkpoint; one record per run. A setting with
    label noise draws its pair-flipped train labels from `noise_seed(seed)` in each recipe, so every method of a
    seed sees the same noisy labels."""
    checkpoint = pretrain(out, terminal)
    records, total = [], len(settings) * len(METHODS) * len(seeds)
    for setting in settings:
        # m-sharpness is measured in SAM's ball for every method, so the methods are comparable.
        sam_rho = recipe_value(f"{RECIPES}/{setting.recipes['SAM']}", "sam_rho")
        for seed in seeds:
            data_flags = ["--label_noise_seed", str(noise_seed(seed))] if setting.noise else []
            for method in METHODS:
                recipe = f"{RECIPES}/{setting.recipes[method]}"
                name = re.sub(r"\W+", "_", f"{setting.title}_{method}_seed{seed}").lower()
                run_dir = os.path.join(out, name)
                desc = f"[{len(records) + 1:>2}/{total}] {setting.title:<19} {method:<12} seed {seed}"
                flags = ["--model_name_or_path", checkpoint, "--seed", str(seed), *data_flags]
                metrics = run_recipe(recipe, run_dir, flags, desc, terminal)
                record = {"setting": setting.title, "method": method, "seed": seed, "top1": metrics["test_top1"],
                          "seconds_per_step": metrics["seconds_per_step"], "dir": run_dir,
                          "sam_rho": recipe_value(recipe, "sam_rho"), "sam_mode": recipe_value(recipe, "sam_mode"),
                          "learning_rate": recipe_value(recipe, "learning_rate"),
                          "max_steps": recipe_value(recipe, "max_steps"), "m_sharpness_rho": sam_rho}  # fmt: skip
                if measure_flatness:
                    with output_to(os.path.join(run_dir, "measure_log.txt")):
                        record.update(measure(run_dir, sam_rho))
                records.append(record)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    return records


def mean_std(values, scale: float = 1.0, digits: int = 1) -> str:
    values = np.asarray(values, dtype=float) * scale
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def cells(records, setting, method, key):
    """`key` of the runs of (setting, method), in seed order."""
    runs = sorted(
        (r for r in records if r["setting"] == setting and r["method"] == method), key=lambda r: r["seed"]
    )
    return [r[key] for r in runs]


def paired_gain(base, other, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, lower, upper) of the per-seed differences other - base (paired: the same seeds, in the same order):
    one-sided `confidence` bounds from Student's t over the seeds, mean ∓ t(confidence, n-1) · sd / √n (so
    [lower, upper] is the two-sided 2·confidence-1 interval: 90% for 0.95)."""
    from scipy.stats import t

    diff = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    if len(diff) < 2:
        raise ValueError(f"a paired interval needs at least 2 seeds, got {len(diff)}")
    half = t.ppf(confidence, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return diff.mean(), diff.mean() - half, diff.mean() + half


def verdict(lower: float, upper: float) -> str:
    """From the interval, not the std: a clear gain when even its lower bound is above 0."""
    if lower > 0:
        return "clear gain"
    if upper < 0:
        return "clear loss"
    return "within the spread"


def seed_pairs(records, setting, method) -> tuple[list[float], list[float]]:
    """Top-1 (%) of the baseline and of `method`, seed by seed (the seeds must be the same)."""
    base = {
        r["seed"]: 100 * r["top1"] for r in records if r["setting"] == setting and r["method"] == "baseline"
    }
    mine = {r["seed"]: 100 * r["top1"] for r in records if r["setting"] == setting and r["method"] == method}
    if set(base) != set(mine):
        raise ValueError(f"{setting}: {method} ran seeds {sorted(mine)}, the baseline {sorted(base)}")
    return [base[s] for s in sorted(base)], [mine[s] for s in sorted(base)]


def gain_cell(records, setting, method) -> str:
    if method == "baseline":
        return "(reference)"
    gain, lower, upper = paired_gain(*seed_pairs(records, setting, method))
    return f"{gain:+.1f} [{lower:+.1f}, {upper:+.1f}]"


def time_ratio(records, setting, method) -> float:
    """Mean wall time per step of `method` over the baseline's, in the same setting (same runs' seeds)."""
    return np.mean(cells(records, setting, method, "seconds_per_step")) / np.mean(
        cells(records, setting, "baseline", "seconds_per_step")
    )


def method_label(records, setting, method) -> str:
    rho = cells(records, setting, method, "sam_rho")[0]
    return {"baseline": "baseline (SGD)", "SAM": f"SAM ρ={rho}", "Momentum-SAM": f"Momentum-SAM ρ={rho}"}[
        method
    ]


def table(records) -> str:
    header = ["setting", "method", "test top-1 (%)", "gain (points) [90% paired interval]",
              "time/step vs baseline", "λmax", f"m-sharpness (m={M}, SAM's ρ)", "train loss"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting in dict.fromkeys(r["setting"] for r in records):
        for method in METHODS:
            row = [setting, method_label(records, setting, method)]
            row += [
                mean_std(cells(records, setting, method, "top1"), 100),
                gain_cell(records, setting, method),
            ]
            row += [f"{time_ratio(records, setting, method):.2f}x"]
            row += [mean_std(cells(records, setting, method, "lambda_max"), digits=2)]
            row += [mean_std(cells(records, setting, method, "m_sharpness"), digits=4)]
            row += [mean_std(cells(records, setting, method, "train_loss"), digits=3)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def run_time_ratio(records, setting, method) -> float:
    """Mean training time of a whole run (its own steps x its time per step) over the baseline's."""

    def seconds(m):
        return np.mean([r["max_steps"] * r["seconds_per_step"] for r in records
                        if r["setting"] == setting and r["method"] == m])  # fmt: skip

    return seconds(method) / seconds("baseline")


def verdicts(records) -> list[str]:
    """One line per setting: each method's top-1 gain over the baseline with its paired interval, the verdict the
    interval gives (not the std), what it costs (time per step, and a whole run's training time with its own
    steps), and λmax."""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in records):
        n = len(cells(records, setting, "baseline", "seed"))
        base_steps = cells(records, setting, "baseline", "max_steps")[0]
        parts = []
        for method in METHODS[1:]:
            gain, lower, upper = paired_gain(*seed_pairs(records, setting, method))
            lam = np.mean(cells(records, setting, method, "lambda_max"))
            steps = cells(records, setting, method, "max_steps")[0]
            parts.append(
                f"{method} {gain:+.1f} points top-1 (90% interval [{lower:+.1f}, {upper:+.1f}]): "
                f"{verdict(lower, upper)}, at {time_ratio(records, setting, method):.2f}x the time per step "
                f"({run_time_ratio(records, setting, method):.1f}x the training time: {steps} steps against "
                f"{base_steps}), λmax {lam:.2f}"
            )
        lam_b = np.mean(cells(records, setting, "baseline", "lambda_max"))
        out.append(f"{setting} ({n} paired seeds; baseline λmax {lam_b:.2f}): " + "; ".join(parts) + ".")
    return out


def costs_and_gains(records) -> str:
    """The closing line: what each method costs (time per step, over every setting) and what it buys (its gain
    and verdict in each setting)."""
    settings = list(dict.fromkeys(r["setting"] for r in records))
    parts = []
    for method in METHODS[1:]:
        ratio = np.mean([time_ratio(records, s, method) for s in settings])
        gains = []
        for s in settings:
            gain, lower, upper = paired_gain(*seed_pairs(records, s, method))
            gains.append(f"{gain:+.1f} points top-1 with {s} ({verdict(lower, upper)})")
        passes = "two forward+backward passes" if method == "SAM" else "one forward+backward pass"
        parts.append(f"{method} ({passes} per step) costs {ratio:.2f}x the baseline's time per step and buys "
                     + ", ".join(gains))  # fmt: skip
    return "In short: " + "; ".join(parts) + "."


def plot(records, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in records))
    colors = {"baseline": "tab:blue", "SAM": "tab:orange", "Momentum-SAM": "tab:green"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, setting in zip(axes[0], settings):  # each seed's runs joined: baseline -> SAM -> Momentum-SAM
        values = np.array([cells(records, setting, m, "top1") for m in METHODS]) * 100
        for seed_values in values.T:
            ax.plot(range(len(METHODS)), seed_values, "-", color="0.6", linewidth=1, zorder=1)
        for i, method in enumerate(METHODS):
            ax.scatter(np.full(values.shape[1], i), values[i], color=colors[method], s=18, zorder=2)
            ax.plot([i - 0.15, i + 0.15], [values[i].mean()] * 2, color="k", linewidth=2, zorder=3)
        ax.set_xticks(range(len(METHODS)), [method_label(records, setting, m) for m in METHODS])
        ax.set(ylabel="test top-1 (%), clean test labels",
               title=f"{setting}: each line is one seed (black: mean)")  # fmt: skip
    ax = axes[1, 0]  # the paired gains, seed by seed, with their 90% intervals
    ticks = []
    for i, (setting, method) in enumerate((s, m) for s in settings for m in METHODS[1:]):
        base, mine = seed_pairs(records, setting, method)
        diff = np.array(mine) - np.array(base)
        gain, lower, upper = paired_gain(base, mine)
        ax.scatter(
            np.full(len(diff), i) + np.linspace(-0.12, 0.12, len(diff)), diff, color=colors[method], s=14
        )
        ax.errorbar(
            [i + 0.3], [gain], yerr=[[gain - lower], [upper - gain]], fmt="ks", capsize=4, markersize=4
        )
        ticks.append(f"{method}\n{setting}")
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
    ax.set(ylabel="top-1 gain over the baseline, same seed (points)",
           title="per-seed gains; black: mean and 90% paired t interval")  # fmt: skip
    ax = axes[1, 1]  # flatness, seed by seed
    for j, setting in enumerate(settings):
        values = np.array([cells(records, setting, m, "lambda_max") for m in METHODS])
        x = np.arange(len(METHODS)) + j * (len(METHODS) + 1)
        for seed_values in values.T:
            ax.plot(x, seed_values, "-", color="0.6", linewidth=1, zorder=1)
        for i, method in enumerate(METHODS):
            ax.scatter(np.full(values.shape[1], x[i]), values[i], color=colors[method], s=14, zorder=2,
                       label=method if j == 0 else None)  # fmt: skip
        ax.text(x[1], 0.98, setting, transform=ax.get_xaxis_transform(), ha="center", va="top")
    ax.set_xticks([])
    ax.set_yscale("log")
    ax.set(
        ylabel=f"λmax (top Hessian eigenvalue, first {MEASURE_EXAMPLES} train images)",
        title="lower = flatter minimum (log scale); lines join a seed",
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_readme(block: str, png: str, readme: str = "README.md") -> None:
    shutil.copyfile(png, README_PNG)
    with open(readme) as f:
        text = f.read()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    with open(readme, "w") as f:
        f.write(text[:start] + "\n" + block + "\n" + text[end:])


def demo(readme: bool) -> None:
    terminal = os.fdopen(os.dup(2), "w", buffering=1)  # the bars' stream, while stdout/stderr go to log files
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    settings = list(SETTINGS.values())
    records = run_all(OUT, settings, SEEDS, terminal)
    png = os.path.join(OUT, "demo.png")
    plot(records, png)
    seconds, cpu = time.time() - STARTED, time.process_time()
    runs = "; ".join(
        f"{s.title}: " + ", ".join(
            f"{m} {recipe_value(f'{RECIPES}/{s.recipes[m]}', 'max_steps')} steps at lr "
            f"{recipe_value(f'{RECIPES}/{s.recipes[m]}', 'learning_rate')}" for m in METHODS
        ) for s in settings
    )  # fmt: skip
    block = "\n".join([
        f"`python recipes/demo.py`: {len(SEEDS)} seeds per cell (seeds {', '.join(map(str, SEEDS))}, the same for "
        f"every method; under noise the seed also draws which labels flip). Batch 32; {runs} (chosen on a validation "
        "slice of the train split). Test top-1 on the clean test images of digits 5-9; gain: the mean of the per-seed "
        "differences from the baseline, with its 90% paired t interval (lower end = one-sided 95% lower bound: above 0 "
        "is a clear gain); time/step: steady-state wall time per optimizer step over the baseline's; λmax and "
        f"m-sharpness on the first {MEASURE_EXAMPLES} training images, with the labels trained on. Run time "
        f"{seconds:.0f} s wall, {cpu:.0f} s of CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch thread, "
        f"load average {os.getloadavg()[1]:.1f} over the last 5 minutes; on idle cores the wall time is about the "
        "CPU time).",
        "",
        table(records),
        "",
        *[f"- {line}" for line in verdicts(records)],
        "",
        costs_and_gains(records),
    ])  # fmt: skip
    print("\n" + block)
    print(f"\nPicture: {png}   Runs (each with its log.txt): {OUT}/   Every run: {OUT}/results.json")
    if readme:
        write_readme(block + f"\n\n![demo: per-seed accuracy, paired gains, λmax]({README_PNG})", png)
        print(f"README.md updated; picture copied to {README_PNG}")


# ====================================================================== pair-flip label noise: the tuning data
def noise_seed(seed: int) -> int:
    """Which labels a seed's runs flip: drawn from 10_000 + seed (experiments/benefit.py's offset), the draws the
    README's numbers were measured with, apart from the training seed."""
    return 10_000 + seed


def validation_copy(folder: str, rate: float, seed: int, subset: list[str]) -> str:
    """For tuning (recipes/digits/tune_demo.py): the *train* split of `digits` cut in two, saved where a recipe reads
    it with `dataset_path`: every fifth image of each class held out as `test`, the real test split not in the copy.
    The train labels of the classes in `subset` are pair-flipped within the subset first (`noisy_labels`, seed
    `noise_seed(seed)`), so the held-out images carry noisy labels, as a user's validation slice would; runs on the
    copy pass `--label_noise 0` (the noise is in the data already)."""
    data = digits_dataset()
    train = data["train"]
    names = train.features["label"].names
    ids = [names.index(name) for name in subset]
    labels = list(train["label"])
    rows = [i for i, label in enumerate(labels) if label in ids]
    within = torch.tensor([ids.index(labels[i]) for i in rows])
    for i, k in zip(rows, noisy_labels(within, rate, noise_seed(seed), len(ids), "pair").tolist()):
        labels[i] = ids[k]
    train = train.remove_columns("label").add_column("label", labels, feature=train.features["label"])
    rank, seen = [], {}
    for label in data["train"]["label"]:  # rank within the true class: the same images for every seed
        rank.append(seen.get(label, 0))
        seen[label] = rank[-1] + 1
    held_out = np.array(rank) % 5 == 2
    from datasets import DatasetDict

    data = DatasetDict(
        train=train.select(np.flatnonzero(~held_out)), test=train.select(np.flatnonzero(held_out))
    )
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    with output_to(os.path.join(os.path.dirname(folder) or ".", "data.log")):
        data.save_to_disk(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="write the table and picture into README.md")
    args = parser.parse_args(argv)
    # One thread: for a 0.1M-parameter model at 32x32 a second thread buys little, and on a busy machine two
    # threads per process thrash (measured here: 10x slower steps with 2 threads while other jobs ran).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    demo(args.readme)


if __name__ == "__main__":
    main()
