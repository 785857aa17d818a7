"""Offline demo (`make demo`): what SAM buys when finetuning on real images, on a CPU, in about three minutes.

    python recipes/demo.py            # the demo: prints the table, writes everything under outputs/
    python recipes/demo.py --readme   # the same, then writes the table and the picture into the README
    python recipes/demo.py --select   # how ρ was chosen: a ρ grid on a validation slice of the train split
    python recipes/demo.py --select --rhos 0.05 --only noise --max_steps 192   # extra flags go to finetune.py

Every run is `recipes/finetune.py` with a recipe of `recipes/digits/test_efficientnet/`, on scikit-learn's
handwritten digits (the `digits` dataset spec, 1,797 real 8x8 images) and timm's 0.1M-parameter
`test_efficientnet` at 32x32:

1. pretrain.yaml: train it from random init on digits 0-4 (the "pretrained checkpoint"), once;
2. finetune it on digits 5-9 (new head, frozen BatchNorm, SGD momentum 0.9 + cosine, the `SAMTrainer`), for
   each of 3 seeds, plain SGD (`sam_rho: 0`) and SAM, with the same seeds and the same number of epochs:
   clean labels (baseline.yaml, sam.yaml, 120 steps) and 40% symmetric label noise on the train split
   (noisy_*.yaml, 240 steps; the paper's section 3.3 setting; the test labels stay clean).

Each final model is then measured on the same 256 training images (with the labels it was trained on): the top
Hessian eigenvalue λmax (Lanczos, `hf_sam.sharpness.hessian_eigenvalues`) and m-sharpness (m = 32, at the SAM
runs' ρ, `hf_sam.sharpness.m_sharpness`). Prints a table of mean ± std over seeds and one summary line per
setting, and saves a picture to outputs/digits/test_efficientnet/demo/demo.png. The Trainer's logs go to each
run's `log.txt`; only a progress bar per run reaches the terminal. Re-running starts over.
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
    preprocessing_from_processor,
)
from hf_sam.finetune.models import save_timm_checkpoint  # noqa: E402
from hf_sam.sharpness import hessian_eigenvalues, m_sharpness  # noqa: E402

RECIPES = "recipes/digits/test_efficientnet"
OUT = "outputs/digits/test_efficientnet/demo"
SEEDS = (0, 1, 2)
# (setting, baseline recipe, SAM recipe): each pair differs only in sam_rho.
SETTINGS = (
    ("clean labels", "baseline.yaml", "sam.yaml"),
    ("40% label noise", "noisy_baseline.yaml", "noisy_sam.yaml"),
)
MEASURE_EXAMPLES = 256  # the first 256 training images of digits 5-9: the same slice for every model
M = 32  # m-sharpness chunk: the training batch, so it is the quantity SAM minimises per step
README_PNG = f"{RECIPES}/demo.png"  # the picture the README shows (written by --readme only)
MARKERS = ("<!-- demo:start -->", "<!-- demo:end -->")


# ====================================================================== running a recipe quietly
class ProgressBar(TrainerCallback):
    """One tqdm bar per run on the terminal (the Trainer's own bar and log lines go to the run's log.txt)."""

    def __init__(self, desc: str, stream):
        self.desc, self.stream, self.bar = desc, stream, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(
            total=state.max_steps, desc=self.desc, file=self.stream, leave=True, dynamic_ncols=True
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

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
    """`recipes/finetune.py --config recipe`, logs to output_dir/log.txt, a progress bar on the terminal."""
    os.makedirs(output_dir, exist_ok=True)
    argv = ["--config", recipe, "--output_dir", output_dir, "--overwrite_output_dir", "true"]
    argv += ["--disable_tqdm", "true", *flags]
    log = os.path.join(output_dir, "log.txt")
    try:
        with output_to(log):
            return finetune.main(argv, callbacks=[ProgressBar(desc, terminal)])
    except SystemExit as err:  # a recipe error: finetune.py's one line, on the terminal
        raise SystemExit(f"{err} (log: {log})") from None


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
        train = add_label_noise(train, data.label_column, config["label_noise"], seed, len(data.label_names))
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
        return yaml.safe_load(f)[key]


# ====================================================================== the demo
def run_all(
    out: str, flags: list[str], settings, seeds, terminal, measure_flatness: bool = True
) -> list[dict]:
    """Every (setting, method, seed) finetune from one pretrained checkpoint; one record per run."""
    checkpoint = pretrain(out, terminal)
    records, total = [], len(settings) * 2 * len(seeds)
    for setting, *recipes in settings:
        sam_rho = recipe_value(f"{RECIPES}/{recipes[1]}", "sam_rho")
        for seed in seeds:
            for method, recipe in zip(("baseline", "SAM"), recipes):
                name = re.sub(r"\W+", "_", f"{setting}_{method}_seed{seed}").lower()
                run_dir = os.path.join(out, name)
                desc = f"[{len(records) + 1:>2}/{total}] {setting:<15} {method:<8} seed {seed}"
                run_flags = ["--model_name_or_path", checkpoint, "--seed", str(seed), *flags]
                metrics = run_recipe(f"{RECIPES}/{recipe}", run_dir, run_flags, desc, terminal)
                # sam_rho: this run's own ρ (0 for the baseline); m_sharpness_rho: the ball its flatness is
                # measured in (SAM's ρ for both methods, so the two are comparable).
                record = {"setting": setting, "method": method, "seed": seed, "dir": run_dir,
                          "top1": metrics["test_top1"], "sam_rho": recipe_value(f"{RECIPES}/{recipe}", "sam_rho"),
                          "m_sharpness_rho": sam_rho}  # fmt: skip
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
    return [r[key] for r in records if r["setting"] == setting and r["method"] == method]


def table(records) -> str:
    header = ["setting", "method", "test top-1 (%)", "λmax", f"m-sharpness (m={M}, SAM's ρ)", "train loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting in dict.fromkeys(r["setting"] for r in records):
        rho = cells(records, setting, "SAM", "sam_rho")[0]
        for method in ("baseline", "SAM"):
            label = "baseline (SGD)" if method == "baseline" else f"SAM ρ={rho}"
            row = [setting, label, mean_std(cells(records, setting, method, "top1"), 100)]
            row += [mean_std(cells(records, setting, method, "lambda_max"), digits=2)]
            row += [mean_std(cells(records, setting, method, "m_sharpness"), digits=4)]
            row += [mean_std(cells(records, setting, method, "train_loss"), digits=3)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdicts(records) -> list[str]:
    """One line per setting: SAM's gain against the larger of the two standard deviations over seeds."""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in records):
        base = 100 * np.array(cells(records, setting, "baseline", "top1"))
        sam = 100 * np.array(cells(records, setting, "SAM", "top1"))
        gain, spread = sam.mean() - base.mean(), max(base.std(ddof=1), sam.std(ddof=1))
        if gain > spread:
            verdict = f"SAM is better by more than the seeds' spread (larger std {spread:.1f})"
        elif gain < -spread:
            verdict = f"SAM is worse by more than the seeds' spread (larger std {spread:.1f})"
        else:
            verdict = f"within the seeds' spread (larger std {spread:.1f}): no clear difference"
        lam_b = np.mean(cells(records, setting, "baseline", "lambda_max"))
        lam_s = np.mean(cells(records, setting, "SAM", "lambda_max"))
        flat = "flatter" if lam_s < lam_b else "not flatter"
        out.append(
            f"{setting}: SAM {gain:+.1f} points top-1, {verdict}; λmax {lam_b:.2f} → {lam_s:.2f} ({flat})."
        )
    return out


def plot(records, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in records))
    colors = {"baseline": "tab:blue", "SAM": "tab:orange"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    x = np.arange(len(settings))
    for ax, key, scale, ylabel in (
        (axes[0, 0], "top1", 100, "test top-1 (%), clean test labels"),
        (axes[0, 1], "lambda_max", 1, "λmax (top Hessian eigenvalue, train slice)"),
    ):
        for offset, method in ((-0.2, "baseline"), (0.2, "SAM")):
            values = [scale * np.array(cells(records, s, method, key)) for s in settings]
            ax.bar(x + offset, [v.mean() for v in values], 0.4, yerr=[v.std(ddof=1) for v in values],
                   capsize=4, color=colors[method], label=method)  # fmt: skip
            for i, v in enumerate(values):  # the seeds themselves
                ax.plot(np.full(len(v), x[i] + offset), v, "k.", markersize=4)
        ax.set_xticks(x, settings)
        ax.set_ylabel(ylabel)
        ax.legend()
    lows = [100 * min(cells(records, s, m, "top1")) for s in settings for m in colors]
    axes[0, 0].set_ylim(max(0, min(lows) - 10), 100)
    axes[0, 0].set_title(f"mean ± std over {len(set(r['seed'] for r in records))} seeds")
    axes[0, 1].set_title("lower = flatter minimum")
    for ax, setting in zip(axes[1], settings):
        for r in (r for r in records if r["setting"] == setting):
            with open(os.path.join(r["dir"], "trainer_state.json")) as f:
                logs = [h for h in json.load(f)["log_history"] if "loss" in h]
            ax.plot([h["step"] for h in logs], [h["loss"] for h in logs], color=colors[r["method"]], alpha=0.7,
                    label=r["method"] if r["seed"] == records[0]["seed"] else None)  # fmt: skip
        ax.set(
            xlabel="step", ylabel="train loss at w (labels trained on)", title=f"training curves, {setting}"
        )
        ax.legend()
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
    records = run_all(OUT, [], SETTINGS, SEEDS, terminal)
    png = os.path.join(OUT, "demo.png")
    plot(records, png)
    seconds, cpu = time.time() - STARTED, time.process_time()
    steps = ", ".join(f"{name} {recipe_value(f'{RECIPES}/{sam}', 'max_steps')}" for name, _, sam in SETTINGS)
    lr = recipe_value(f"{RECIPES}/sam.yaml", "learning_rate")
    block = "\n".join([
        f"`python recipes/demo.py`: {len(SEEDS)} seeds per cell (seeds {', '.join(map(str, SEEDS))}, the same for "
        f"baseline and SAM); steps of batch 32 at lr {lr} per run: {steps} (the same epochs for baseline and "
        f"SAM; a SAM step costs two forward+backward passes); mean ± std over seeds. Test top-1 on the clean test "
        f"images of digits 5-9; λmax and m-sharpness on the first {MEASURE_EXAMPLES} training images, with the labels trained on. "
        f"Run time {seconds:.0f} s wall, {cpu:.0f} s of CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch "
        "thread; on idle cores the wall time is about the CPU time).",
        "",
        table(records),
        "",
        *[f"- {line}" for line in verdicts(records)],
    ])  # fmt: skip
    print("\n" + block)
    print(f"\nPicture: {png}   Runs (each with its log.txt): {OUT}/")
    if readme:
        write_readme(block + f"\n\n![demo: accuracy, λmax and training curves]({README_PNG})", png)
        print(f"README.md updated; picture copied to {README_PNG}")


# ====================================================================== choosing ρ without the test split
def validation_copy(folder: str) -> str:
    """The digits train split cut in two, saved as a dataset the recipes read with `dataset_path`: `train` =
    4/5 of each class, `test` = the other 1/5 (the validation slice). The real test split is not in it."""
    train = digits_dataset()["train"]
    labels = np.array(train["label"])
    rank = np.zeros(len(labels), dtype=int)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        rank[members] = np.arange(len(members))
    held_out = rank % 5 == 2
    from datasets import DatasetDict

    DatasetDict(
        train=train.select(np.flatnonzero(~held_out)), test=train.select(np.flatnonzero(held_out))
    ).save_to_disk(folder)
    return folder


def select(rhos: list[float], seeds: list[int], only: str | None, flags: list[str]) -> None:
    out = "outputs/digits/test_efficientnet/select"
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    with output_to(os.path.join(out, "data.log")):
        data = validation_copy(os.path.join(out, "validation_data"))
    flags = ["--dataset_path", data, *flags]
    checkpoint = pretrain(out, terminal)
    rows = []
    for setting, baseline, sam in SETTINGS:
        if only and only not in setting:
            continue
        for rho in [0.0, *rhos]:
            accs = []
            for seed in seeds:
                run_dir = os.path.join(out, re.sub(r"\W+", "_", f"{setting}_rho{rho}_seed{seed}").lower())
                run_flags = ["--model_name_or_path", checkpoint, "--seed", str(seed), "--sam_rho", str(rho)]
                desc = f"{setting:<15} ρ={rho:<5} seed {seed}"
                recipe = f"{RECIPES}/{sam if rho else baseline}"
                accs.append(run_recipe(recipe, run_dir, run_flags + flags, desc, terminal)["test_top1"])
            rows.append(f"| {setting} | {rho} | {mean_std(accs, 100)} |")
    report = "\n".join([
        f"`python recipes/demo.py --select --rhos {' '.join(map(str, rhos))} --seeds {' '.join(map(str, seeds))}"
        + (f" --only '{only}'" if only else "") + (f" {' '.join(flags[2:])}" if flags[2:] else "") + "`: validation top-1 (%), mean ± std over seeds "
        "(train on 4/5 of the train split of digits 5-9, evaluate on the other 1/5; the test split is not used).",
        "", "| setting | ρ (0 = baseline) | validation top-1 (%) |", "|---|---|---|", *rows,
    ])  # fmt: skip
    with open(os.path.join(out, "selection.md"), "w") as f:
        f.write(report + "\n")
    print("\n" + report)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="write the table and picture into README.md")
    parser.add_argument(
        "--select", action="store_true", help="the ρ grid on a validation slice (no test split)"
    )
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5], help="with --select")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="with --select")
    parser.add_argument(
        "--only", help="with --select: only the settings whose name contains this (e.g. noise)"
    )
    # With --select, the remaining arguments are finetune.py flags (e.g. --max_steps 200).
    args, flags = parser.parse_known_args(argv)
    if flags and not args.select:
        parser.error(f"unknown arguments {' '.join(flags)} (finetune.py flags go with --select only)")
    # One thread: for a 0.1M-parameter model at 32x32 a second thread buys little, and on a busy machine two
    # threads per process thrash (measured here: 10x slower steps with 2 threads while other jobs ran).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.select:
        select(args.rhos, args.seeds, args.only, flags)
    else:
        demo(args.readme)


if __name__ == "__main__":
    main()
