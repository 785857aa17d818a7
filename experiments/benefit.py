"""What share of SAM's gain each cheaper method keeps, on settings where the gain survives tuning.

    python experiments/benefit.py [--model mlp|vit] [--optimizer sgd|adamw] [--seeds N] [--tuning-seeds N]
                                  [--workers 2] [--readme] [--only NAME ...]

Three benchmarks, each a (model, optimizer family) pair on the same data:
- `--model mlp --optimizer sgd` (the default): the experiments' MLP (64-256-256-10), SGD with momentum 0.9, weight
  decay 5e-4, 50 epochs;
- `--model mlp --optimizer adamw`: the same MLP with AdamW (weight decay 0.01), the Trainer's default optimizer;
- `--model vit --optimizer adamw`: a ViT from `transformers` built from config (patches of 4x4 pixels, hidden 128,
  2 layers, 4 heads, ≈ 0.27M weights), AdamW (weight decay 0.01) with a 5% warm-up, 50 epochs; one noisy training
  set for every seed, and a coordinate search (ρ, then lr) to fit in about 30 minutes (`Benchmark`).
All three: scikit-learn's digits (the only real images here) with 30% pair-flip label noise on the training labels
(a random 30% of the training images get the label of the next class, c -> c + 1 mod 10; Han et al. 2018), batch
64, cosine decay, every method through `SAMTrainer` (the product's path).

Why pair-flip and not the symmetric noise of the other experiments: once the learning rate is tuned, symmetric
noise leaves SAM little to gain on these models. At a fixed number of epochs a small lr is an implicit early stop,
and early-stopped SGD is about as good as SAM against wrong labels spread evenly over nine classes (measured on the
validation images; experiments/README.md has the settings tried). Pair-flip labels agree with each other, so they
are a pattern the network learns alongside the true one, and early stopping can't wait them out.

Hyperparameters are chosen on a validation slice, never on the test split: 20% of the training images are held out
(with their noisy labels, as a user would have them), every method's grid (the learning rate, and ρ for every
method that has one) is run on the tuning seeds, and the best mean validation accuracy wins, for each method
separately. A grid is widened until its choice is inside it: when the best lr or ρ is the grid's smallest or
largest value, the next value beyond it (same ratio as the last step) is added and tuned, up to
`MAX_WIDENINGS` times per side; a choice still at an edge after that is marked * in the table. Then each method
trains with its chosen setting on the same final seeds (0, 1, ...), and is measured on the clean test labels. For
each method: test top-1 mean ± std, and its share of SAM's gain, (method − baseline) / (SAM − baseline), with a
90% bootstrap interval over the seeds (paired: a resample draws the same seeds for the method, the baseline and
SAM). Cost: forward+backward passes per step, from the trainer's own `sam/forward_passes`, and the wall time
against the baseline's in the same run (a rough figure: the CPU step benchmark is
`benchmarks/variant_overhead.py`).

Writes experiments/results/<stem>.json (every run, the grids as widened and the choices) and <stem>.md, the stem
being benefit (MLP, SGD), benefit_adamw (MLP, AdamW) or benefit_vit_adamw; with `--readme` also the table into
its block of experiments/README.md. `experiments/budget_guide.py` then writes the budget guide of README.md and
docs/variants.md from the three.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, digits, train_through_sam_trainer  # noqa: E402
from common import DictMLP as MLP  # noqa: E402

from hf_sam.finetune.data import noisy_labels  # noqa: E402

NOISE, BATCH, VALIDATION = 0.3, 64, 0.2
# Per axis (lr, ρ) of a method's search. 2 left the MLP-AdamW sam_interval=5 ρ at its edge (27*).
MAX_WIDENINGS = 4
BASELINE, SAM = "baseline", "SAM"


@dataclass(frozen=True)
class Optimizer:
    """An optimizer family's Trainer settings."""

    label: str
    fields: dict


OPTIMIZERS = {
    "sgd": Optimizer("SGD momentum 0.9, weight decay 5e-4", {"optim": "sgd", "optim_args": "momentum=0.9", "weight_decay": 5e-4}),
    "adamw": Optimizer("AdamW (the Trainer's default), weight decay 0.01", {"optim": "adamw_torch", "weight_decay": 0.01}),
}  # fmt: skip


@dataclass(frozen=True)
class Benchmark:
    """One (model, optimizer family) pair: its training length, and every method's starting grids."""

    model: str
    optimizer: str
    stem: str  # results/<stem>.{json,md}, and the README block variants_<stem>
    epochs: int
    tuning_seeds: int
    baseline_lrs: tuple[float, ...]
    lrs: tuple[float, ...]  # every other method's
    rhos: dict[str, tuple[float, ...]]  # method -> its starting ρ grid
    extra: dict = field(default_factory=dict)  # more SAMTrainingArguments fields (a warm-up)
    # "grid": every (lr, ρ) of the grids. "coordinate": ρ's grid at the middle lr, then the lr grid at the chosen ρ
    # (each widened as a grid is): 5 points per method instead of 9, what lets the ViT benchmark fit in 30 minutes.
    search: str = "grid"
    # Which labels flip: None, each seed its own draw (and its own share of the seed-to-seed spread); a number, the
    # same noisy training set for every seed (the draw of that seed), as a user's one noisy dataset is.
    noise_draw: int | None = None

    @property
    def title(self) -> str:
        model = "MLP (64-256-256-10)" if self.model == "mlp" else "ViT (4x4 patches, hidden 128, 2 layers)"
        return f"{model}, {OPTIMIZERS[self.optimizer].label}"


# name -> the method's fixed SAMTrainingArguments fields (ρ comes from its grid).
METHODS = {
    BASELINE: {"sam_rho": 0.0},
    SAM: {},
    "momentum": {"sam_mode": "momentum"},
    "adam_update": {"sam_mode": "adam_update"},
    "previous_gradient": {"sam_mode": "previous_gradient"},
    "sam_ascent_fraction=0.25": {"sam_ascent_fraction": 0.25},
    "sam_ascent_fraction=0.5": {"sam_ascent_fraction": 0.5},
    "sam_interval=5": {"sam_interval": 5},
    "LookSAM, k=5": {"sam_mode": "looksam", "sam_interval": 5},
}

# Fine near SAM's best (0.5-0.7 with SGD, and ρ = 1 already diverges for plain SAM), wide for the cheaper methods.
_SGD_RHOS = (0.2, 0.3, 0.5, 0.7, 1.0, 2.0, 3.0)
_ADAM_RHOS = (0.1, 0.3, 1.0, 3.0)
_VIT_RHOS = (0.1, 0.3, 1.0)
BENCHMARKS = {
    ("mlp", "sgd"): Benchmark(
        "mlp", "sgd", "benefit", epochs=50, tuning_seeds=2,
        # The baseline's grid reaches lower than the others': at a fixed number of epochs a small lr is an
        # implicit early stop, which is what plain SGD wants under label noise.
        baseline_lrs=(0.001, 0.002, 0.005, 0.01, 0.02), lrs=(0.005, 0.01, 0.02, 0.05, 0.1),
        rhos={name: _SGD_RHOS for name in METHODS if name not in (BASELINE, "adam_update")}
        | {"momentum": (1.0, 2.0, 3.0, 5.0, 10.0)},
    ),
    ("mlp", "adamw"): Benchmark(
        "mlp", "adamw", "benefit_adamw", epochs=50, tuning_seeds=3,
        baseline_lrs=(3e-5, 1e-4, 3e-4, 1e-3), lrs=(3e-4, 1e-3, 3e-3),
        rhos={name: _ADAM_RHOS for name in METHODS if name != BASELINE},
    ),
    ("vit", "adamw"): Benchmark(
        "vit", "adamw", "benefit_vit_adamw", epochs=50, tuning_seeds=2,
        # Three values per axis, so that a choice inside them does not widen. The centres come from the first run
        # of this benchmark (its validation choices: the baseline 3.3e-5, the others 1e-4 to 1e-3), and ρ's grids
        # from the same run's choices per method.
        baseline_lrs=(1e-5, 3e-5, 1e-4), lrs=(1e-4, 3e-4, 1e-3),
        rhos={name: _VIT_RHOS for name in METHODS if name != BASELINE}
        | {"momentum": (0.3, 1.0, 3.0), "adam_update": (0.3, 1.0, 3.0), "sam_interval=5": (0.3, 1.0, 3.0),
           "previous_gradient": (0.003, 0.01, 0.03), "sam_ascent_fraction=0.25": (0.03, 0.1, 0.3)},
        extra={"warmup_steps": 0.05}, search="coordinate", noise_draw=0,
    ),
}  # fmt: skip


def pair_noise(labels: torch.Tensor, rate: float, seed: int, classes: int = 10) -> torch.Tensor:
    """Pair-flip label noise (Han et al. 2018, "Co-teaching"): a random `rate` fraction of the examples, drawn
    uniformly, get the label of the next class, c -> (c + 1) mod 10. Unlike symmetric noise the wrong labels
    agree with each other, so they are a pattern a network can learn, not a spread that early stopping averages
    away. The recipes' `label_noise_type: pair` (`noisy_labels`), drawn from 10_000 + seed."""
    return noisy_labels(labels, rate, 10_000 + seed, classes, "pair")


def splits(seed: int, noise_draw: int | None = None):
    """(training images and noisy labels, validation x and noisy y, test x and clean y). The noise is drawn per
    seed over the whole training split; the validation slice is the same images for every seed."""
    x_train, y_train, x_test, y_test = digits()
    noisy = pair_noise(y_train, NOISE, seed if noise_draw is None else noise_draw)
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(4321))
    held = round(VALIDATION * len(y_train))
    val, fit = order[:held], order[held:]
    return (x_train[fit], noisy[fit]), (x_train[val], noisy[val]), (x_test, y_test)


class ViT(torch.nn.Module):
    """`transformers`' ViTForImageClassification on the 8x8 digits (one channel, 4x4 patches: 4 tokens and
    [CLS]); built from config, so nothing is downloaded. 2x2 patches (hidden 64) were tried first: SAM's gain did
    not survive the baseline's tuning there (experiments/README.md)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=8, patch_size=4, num_channels=1, hidden_size=128, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=256, num_labels=10,
        )  # fmt: skip
        self.vit = ViTForImageClassification(config)

    def forward(self, pixels, labels=None):
        output = self.vit(pixel_values=pixels.view(-1, 1, 8, 8), labels=labels)
        return {"logits": output.logits, "loss": output.loss}


def make_model(name: str) -> torch.nn.Module:
    return MLP() if name == "mlp" else ViT()


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x)["logits"].argmax(-1) == y).float().mean().item()


def train(job: tuple[str, str, str, float, float | None, int]) -> dict:
    """One run: (model, optimizer, method, learning rate, ρ, seed) -> validation and test accuracy, passes per
    step, seconds."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny models: intra-op threads cost more than they bring
    model_name, optimizer, name, lr, rho, seed = job
    bench = BENCHMARKS[model_name, optimizer]
    (x_fit, y_fit), (x_val, y_val), (x_test, y_test) = splits(seed, bench.noise_draw)
    rows = [{"pixels": x, "labels": y} for x, y in zip(x_fit, y_fit, strict=True)]
    torch.manual_seed(seed)
    model = make_model(model_name)
    passes, seconds = train_through_sam_trainer(
        model,
        rows,
        bench.epochs * math.ceil(len(rows) / BATCH),
        per_device_train_batch_size=BATCH,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        seed=seed,
        **OPTIMIZERS[optimizer].fields,
        **bench.extra,
        **{"sam_rho": rho, **METHODS[name]},
    )
    return {
        "method": name,
        "lr": lr,
        "rho": rho,
        "seed": seed,
        "validation": accuracy(model, x_val, y_val),
        "test": accuracy(model, x_test, y_test),
        "passes": passes,
        "seconds": seconds,
    }


def run_jobs(jobs: list, workers: int) -> list[dict]:
    if workers <= 1:
        return [train(job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return list(pool.imap(train, jobs))


def widened(values: list[float], chosen: float, floor: float = 0.0) -> float | None:
    """The value one step beyond `chosen` when it is at an edge of `values` (geometric step, as the grid's own
    last step, rounded to 3 significant digits: 3.33e-05, not 3.3333333333333335e-05), else None."""
    ordered = sorted(values)
    if len(ordered) < 2:
        return None
    if chosen == ordered[-1]:
        return float(f"{ordered[-1] * ordered[-1] / ordered[-2]:.3g}")
    if chosen == ordered[0]:
        low = float(f"{ordered[0] * ordered[0] / ordered[1]:.3g}")
        return low if low > floor else None
    return None


@dataclass
class Grid:
    """One method's (lr, ρ) search: starts from the benchmark's grids, widens on the side its choice sits at.

    search="grid": every (lr, ρ) pair. search="coordinate": ρ's grid at the middle lr first (widened until its choice
    is inside), then the lr grid at the chosen ρ (widened likewise)."""

    lrs: list[float]
    rhos: list[float | None]
    search: str = "grid"
    widenings: dict = field(default_factory=lambda: {"lr": 0, "rho": 0})

    def __post_init__(self) -> None:
        self.stage = "rho" if self.search == "coordinate" and self.rhos != [None] else "lr"
        middle = sorted(self.lrs)[len(self.lrs) // 2]
        self._points = [(middle, rho) for rho in self.rhos] if self.stage == "rho" else self._product()

    def _product(self) -> list[tuple[float, float | None]]:
        return [(lr, rho) for lr in self.lrs for rho in self.rhos]

    def points(self) -> list[tuple[float, float | None]]:
        return self._product() if self.search == "grid" else list(self._points)

    def _grow(self, axis: str, value: float | None) -> float | None:
        """The value added beyond `value` on `axis` when it sits at an edge (None when inside, or widened enough)."""
        values = self.lrs if axis == "lr" else self.rhos
        if value is None or self.widenings[axis] >= MAX_WIDENINGS:
            return None
        extra = widened(values, value)
        if extra is not None:
            values.append(extra)
            values.sort()
            self.widenings[axis] += 1
        return extra

    def widen(self, chosen: tuple[float, float | None]) -> bool:
        """Add what the search needs next given the choice so far; False when the search is over."""
        lr, rho = chosen
        if self.search == "grid":  # lr, then ρ: every new value pairs with every value of the other axis
            grown_lr, grown_rho = self._grow("lr", lr), self._grow("rho", rho)
            return grown_lr is not None or grown_rho is not None
        if self.stage == "rho":
            extra = self._grow("rho", rho)
            if extra is not None:
                self._points.append((lr, extra))
                return True
            self.stage = "lr"
            self._points += [(other, rho) for other in self.lrs if (other, rho) not in self._points]
            return True
        extra = self._grow("lr", lr)
        if extra is not None:
            self._points.append((extra, rho))
        return extra is not None

    def at_edge(self, chosen: tuple[float, float | None]) -> tuple[bool, bool]:
        lr, rho = chosen
        edge = lambda values, v: v is not None and len(values) > 1 and v in (min(values), max(values))  # noqa: E731
        return edge(self.lrs, lr), edge([r for r in self.rhos if r is not None], rho)


def mean_validation(tuning: list[dict], name: str, point) -> float:
    scores = [r["validation"] for r in tuning if (r["method"], r["lr"], r["rho"]) == (name, *point)]
    return statistics.fmean(scores)


def tune(bench: Benchmark, names: list[str], workers: int) -> tuple[dict, dict, list[dict]]:
    """Every method's grid on the validation slice, widened until its choice is inside (or `MAX_WIDENINGS` is
    reached). All methods run each round together, so the workers stay busy. Returns (chosen, grids, runs)."""
    seeds = [1000 + s for s in range(bench.tuning_seeds)]  # disjoint from the final seeds
    grids = {
        n: Grid(
            list(bench.baseline_lrs if n == BASELINE else bench.lrs),
            list(bench.rhos.get(n, (None,))),
            bench.search,
        )
        for n in names
    }
    done: set = set()
    tuning: list[dict] = []
    pending = list(names)
    chosen: dict = {}
    while pending:
        jobs = [
            (bench.model, bench.optimizer, n, lr, rho, s)
            for n in pending
            for lr, rho in grids[n].points()
            if (n, lr, rho) not in done
            for s in seeds
        ]
        print(f"tuning: {len(jobs)} runs on the validation slice ({', '.join(pending)})", flush=True)
        tuning += run_jobs(jobs, workers)
        done |= {(n, lr, rho) for _, _, n, lr, rho, _ in jobs}
        for n in pending:
            chosen[n] = max(grids[n].points(), key=lambda point: mean_validation(tuning, n, point))
        pending = [n for n in pending if grids[n].widen(chosen[n])]
    for n in names:
        print(
            f"  {n}: lr {chosen[n][0]:g}, rho {chosen[n][1]} (validation {mean_validation(tuning, n, chosen[n]):.3f})"
        )
    return chosen, grids, tuning


def share_of_gain(method: list[float], baseline: list[float], sam: list[float], resamples: int = 10_000):
    """(method − baseline) / (SAM − baseline) over the seeds' means, and its 90% paired bootstrap interval: each
    resample draws n seeds with replacement, the same ones for the method, the baseline and SAM."""
    runs = torch.tensor([method, baseline, sam], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    draws = torch.randint(0, runs.shape[1], (resamples, runs.shape[1]), generator=generator)
    m, b, s = runs[:, draws].mean(-1)
    shares = ((m - b) / (s - b))[s != b].sort().values
    low, high = shares[int(0.05 * len(shares))], shares[int(0.95 * len(shares)) - 1]
    m, b, s = runs.mean(-1)
    return float((m - b) / (s - b)) if s != b else math.nan, float(low), float(high)


def summary(bench: Benchmark, chosen: dict, grids: dict, finals: dict[str, list[dict]]) -> dict:
    """Per method: the chosen setting (and whether each sits at an edge), test top-1, share of SAM's gain with its
    interval, passes per step, wall time against the baseline. What the table and the budget guide print."""
    base, sam = ([100 * r["test"] for r in finals[k]] for k in (BASELINE, SAM))
    base_time = statistics.fmean(r["seconds"] for r in finals[BASELINE])
    rows = {}
    for name, runs in finals.items():
        acc = [100 * r["test"] for r in runs]
        share = None if name in (BASELINE, SAM) else share_of_gain(acc, base, sam)
        lr_edge, rho_edge = grids[name].at_edge(chosen[name])
        rows[name] = {
            "lr": chosen[name][0], "rho": chosen[name][1], "lr_at_edge": lr_edge, "rho_at_edge": rho_edge,
            "grid_lrs": grids[name].lrs, "grid_rhos": grids[name].rhos,
            "top1_mean": statistics.fmean(acc), "top1_std": statistics.stdev(acc),
            "share": share, "passes": statistics.fmean(r["passes"] for r in runs),
            "wall": statistics.fmean(r["seconds"] for r in runs) / base_time,
        }  # fmt: skip
    return rows


def searched(row: dict) -> str:
    """The values each axis of a method's search took (a coordinate search tries them along a line, not as a grid)."""
    lrs = ", ".join(f"{v:g}" for v in sorted(row["grid_lrs"]))
    rhos = [v for v in row["grid_rhos"] if v is not None]
    return f"{lrs}; " + (", ".join(f"{v:g}" for v in sorted(rhos)) if rhos else "—")


def fmt(value: float, at_edge: bool) -> str:
    return f"{value:g}" + ("*" if at_edge else "")


def table(bench: Benchmark, rows: dict, seeds: int, minutes: float, command: str) -> str:
    base, sam = rows[BASELINE], rows[SAM]
    noise_text = (
        "Each seed draws its own noisy labels."
        if bench.noise_draw is None
        else f"One noisy training set for every seed (the draw of seed {bench.noise_draw}); the seeds vary the "
        "initialisation and the batch order."
    )
    search_text = (
        " (ρ's grid at the middle lr, then the lr grid at the chosen ρ)"
        if bench.search == "coordinate"
        else ""
    )
    lines = [
        f"Digits, {NOISE:.0%} pair-flip label noise (class c → c + 1), {bench.title}, {bench.epochs} epochs of "
        f"batch {BATCH}, through `SAMTrainer`. {noise_text} Learning rate and ρ chosen per method on a "
        f"{VALIDATION:.0%} validation slice of the (noisy) training set over {bench.tuning_seeds} tuning seeds"
        f"{search_text}, each grid widened "
        "until its choice is inside it (* marks a choice still at an edge; the values searched are in the last "
        "column, every run in the json); test top-1 "
        f"on the clean test labels over seeds 0-{seeds - 1} (mean ± std), the same seeds for every method. "
        f"SAM's gain: {sam['top1_mean'] - base['top1_mean']:+.1f} points. Share of SAM's gain = (method − "
        "baseline) / (SAM − baseline), with its 90% paired bootstrap interval over the seeds. "
        f"`{command}`, {minutes:.0f} min on this CPU.",
        "",
        "| method | chosen lr, ρ | test top-1 (%) | share of SAM's gain [90% interval] | passes per step "
        "| wall time / baseline | lr searched; ρ searched |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        setting = fmt(row["lr"], row["lr_at_edge"])
        if row["rho"] is not None:
            setting += f", {fmt(row['rho'], row['rho_at_edge'])}"
        if row["share"] is None:
            share_text = "0% (reference)" if name == BASELINE else "100% (reference)"
        else:
            value, low, high = row["share"]
            share_text = f"{value:.0%} [{low:.0%}, {high:.0%}]"
        lines.append(
            f"| {name} | {setting} | {row['top1_mean']:.1f} ± {row['top1_std']:.1f} | {share_text} "
            f"| {row['passes']:.2f} | {row['wall']:.2f} | {searched(row)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["mlp", "vit"], default="mlp")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--seeds", type=int, default=10, help="final seeds per method (at least 5)")
    parser.add_argument(
        "--tuning-seeds", type=int, default=None, help="seeds per grid point on the validation slice"
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--readme", action="store_true", help="write the table into experiments/README.md")
    parser.add_argument(
        "--from-results",
        action="store_true",
        help="write the table again from results/<stem>.json, without training (after a change of the table)",
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help="methods to run (baseline and SAM always run)"
    )
    args = parser.parse_args(argv)
    if (args.model, args.optimizer) not in BENCHMARKS:
        parser.error(
            f"no benchmark for --model {args.model} --optimizer {args.optimizer}; choose from {list(BENCHMARKS)}."
        )
    if args.seeds < 5:
        parser.error(f"--seeds must be at least 5 for an interval over seeds, got {args.seeds}.")
    bench = BENCHMARKS[args.model, args.optimizer]
    if args.tuning_seeds is not None:
        bench = Benchmark(**{**bench.__dict__, "tuning_seeds": args.tuning_seeds})
    methods = [n for n in METHODS if n == BASELINE or n in bench.rhos]
    names = methods if not args.only else [BASELINE, SAM, *[n for n in args.only if n not in (BASELINE, SAM)]]
    unknown = [n for n in names if n not in methods]
    if unknown:
        parser.error(f"unknown method(s) {unknown} for this benchmark; choose from {methods}.")

    command = " ".join(["python experiments/benefit.py", *(argv if argv is not None else sys.argv[1:])])
    command = command.replace(" --readme", "").replace(" --from-results", "")
    if args.from_results:  # the table again from the recorded runs (no training): a new column, a fixed text
        with open(os.path.join(RESULTS, f"{bench.stem}.json")) as f:
            record = json.load(f)
        seeds = record["benchmark"]["seeds"]
        # Described as it was run: the recorded protocol wins over today's definition (absent keys: today's).
        recorded = {
            k: v
            for k, v in record["benchmark"].items()
            if k in ("epochs", "tuning_seeds", "search", "noise_draw")
        }
        bench = Benchmark(**{**bench.__dict__, **recorded})
        text = table(bench, record["summary"], seeds, record["minutes"], record.get("command", command))
        write_table(bench, text, args.readme)
        print(text)
        return
    started = time.perf_counter()
    chosen, grids, tuning = tune(bench, names, args.workers)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{bench.stem}_tuning.json"), "w") as f:
        json.dump(tuning, f, indent=1)  # kept at once: the longest part of the run
    jobs = [(bench.model, bench.optimizer, n, *chosen[n], s) for n in names for s in range(args.seeds)]
    print(f"final: {len(jobs)} runs", flush=True)
    results = run_jobs(jobs, args.workers)
    finals = {n: [r for r in results if r["method"] == n] for n in names}
    minutes = (time.perf_counter() - started) / 60
    rows = summary(bench, chosen, grids, finals)
    text = table(bench, rows, args.seeds, minutes, command)
    print(text)
    record = {
        "benchmark": {"model": bench.model, "optimizer": bench.optimizer, "title": bench.title,
                      "epochs": bench.epochs, "tuning_seeds": bench.tuning_seeds, "seeds": args.seeds},
        "chosen": {k: list(v) for k, v in chosen.items()},
        "summary": rows, "tuning": tuning, "final": results, "minutes": minutes, "command": command,
    }  # fmt: skip
    with open(os.path.join(RESULTS, f"{bench.stem}.json"), "w") as f:
        json.dump(record, f, indent=1)
    write_table(bench, text, args.readme)


def write_table(bench: Benchmark, text: str, readme: bool) -> None:
    """results/<stem>.md, and with `readme` the table's block of experiments/README.md."""
    with open(os.path.join(RESULTS, f"{bench.stem}.md"), "w") as f:
        f.write(text + "\n")
    if readme:
        sys.path.insert(
            0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
        )
        from readme_block import EXPERIMENTS_README, replace_readme_block

        replace_readme_block(f"variants_{bench.stem}", text, readme=EXPERIMENTS_README)


if __name__ == "__main__":
    main()
