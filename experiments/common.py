"""Shared pieces of the digits experiments: data, label noise, model, the SAM training loop, parallel runs, output.

The data are scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes): the only real images on a
machine without network. The model is a 2-hidden-layer ReLU MLP (64-256-256-10, ≈ 85k parameters), trained with
SGD (momentum 0.9, weight decay 5e-4, cosine decay) in plain loops that use the toolkit's own `hf_sam.SAM`
wrapper, so the experiments exercise exactly the code users run. Each run is one process-local job; runs are
spread over worker processes (one torch thread each: a tiny MLP gains nothing from intra-op threads).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hf_sam.sam import SAM
from hf_sam.sharpness import hessian_eigenvalues, m_sharpness

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402, F401  (re-exported to the experiment scripts)

RESULTS = Path(__file__).resolve().parent / "results"
TEST_FRACTION = 0.2  # 1,437 training / 360 test images, stratified, the same split for every run


@dataclass(frozen=True)
class Run:
    """One training run. `perturbation`: "none" (plain SGD), "2" (SAM), "inf" (ε = ρ sign g), "random"
    (ε = ρ z/‖z‖₂, z ~ N(0, I)). `m`: examples per SAM chunk (m-sharpness; None = the whole batch)."""

    seed: int
    noise: float = 0.0
    perturbation: str = "2"
    rho: float = 0.05
    epochs: int = 50
    batch_size: int = 64
    m: int | None = None
    lr: float = 0.05
    weight_decay: float = 5e-4
    width: int = 256
    measure: bool = False  # also measure Hessian eigenvalues and m-sharpness of the final model

    @property
    def cost(self) -> float:
        """Relative runtime, to start the longest jobs first."""
        passes = 1 if self.perturbation == "none" else 2
        chunks = self.batch_size // self.m if self.m else 1
        return self.epochs * passes * (1 + 0.3 * (chunks - 1))


@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test), pixels standardised with the training statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=0
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # some border pixels are always 0
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


def symmetric_noise(labels: torch.Tensor, rate: float, seed: int, classes: int = 10) -> torch.Tensor:
    """Replace the labels of a random `rate` fraction of the examples by a uniformly drawn *other* class."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    noisy = labels.clone()
    flipped = torch.randperm(len(labels), generator=generator)[: round(rate * len(labels))]
    shift = torch.randint(1, classes, (len(flipped),), generator=generator)  # 1..9: never the true class
    noisy[flipped] = (noisy[flipped] + shift) % classes
    return noisy


def make_model(run: Run) -> nn.Module:
    torch.manual_seed(run.seed)
    return nn.Sequential(
        nn.Linear(64, run.width),
        nn.ReLU(),
        nn.Linear(run.width, run.width),
        nn.ReLU(),
        nn.Linear(run.width, 10),
    )


class DictMLP(nn.Module):
    """The experiments' MLP (64-256-256-10) in the form the Trainer trains: `pixels`, `labels` in, a dict with the
    logits and the mean cross-entropy out (the SAMTrainer experiments: benefit.py, variants.py)."""

    def __init__(self, hidden: int = 256, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, pixels, labels=None):
        logits = self.net(pixels)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"logits": logits, "loss": loss}


def train_through_sam_trainer(
    model: nn.Module, rows: list[dict], steps: int, **arguments
) -> tuple[float, float]:
    """Train `model` on `rows` for `steps` optimizer steps with `SAMTrainer` (the product's path), `arguments` the
    `SAMTrainingArguments` fields of the run; one log at the last step carries the pass accounting of the whole run.
    Returns (forward+backward passes per step, from `sam/forward_passes`; seconds of `train()`)."""
    import tempfile

    from transformers import PrinterCallback

    from hf_sam import SAMTrainer, SAMTrainingArguments

    with tempfile.TemporaryDirectory() as output_dir:
        args = SAMTrainingArguments(
            output_dir=output_dir, max_steps=steps, logging_steps=steps, report_to=[], save_strategy="no",
            disable_tqdm=True, use_cpu=True, **arguments,
        )  # fmt: skip
        trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    log = next((e for e in trainer.state.log_history if "sam/forward_passes" in e), None)
    return (log["sam/forward_passes"] / trainer.state.global_step if log else 1.0), seconds


def train(run: Run) -> dict:
    """Train one model; return its clean test accuracy (and sharpness measurements with `run.measure`)."""
    start = time.perf_counter()
    x_train, clean_train, x_test, y_test = digits()
    y_train = symmetric_noise(clean_train, run.noise, run.seed)
    model = make_model(run)
    base = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=0.9, weight_decay=run.weight_decay)
    sam = (
        None
        if run.perturbation == "none"
        else SAM(base, rho=run.rho, norm="inf" if run.perturbation == "inf" else "2")
    )
    steps = run.epochs * math.ceil(len(y_train) / run.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(base, steps)
    order = torch.Generator().manual_seed(run.seed)  # data order
    noise = torch.Generator().manual_seed(20_000 + run.seed)  # random perturbations

    def loss_on(xb, yb):
        return F.cross_entropy(model(xb), yb)

    for _ in range(run.epochs):
        permutation = torch.randperm(len(y_train), generator=order)
        for begin in range(0, len(y_train), run.batch_size):
            index = permutation[begin : begin + run.batch_size]
            xb, yb = x_train[index], y_train[index]
            if sam is None:
                loss_on(xb, yb).backward()
                base.step()
            elif run.m is None:
                sam_step(sam, model, loss_on, xb, yb, run.perturbation, noise)
            else:
                chunked_sam_step(sam, model, loss_on, xb, yb, run.m)
            base.zero_grad()
            schedule.step()

    model.eval()
    with torch.no_grad():
        test_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        fit = (model(x_train).argmax(1) == y_train).float().mean().item()  # accuracy on the labels trained on
    result = {**asdict(run), "test_accuracy": test_accuracy, "train_fit": fit}
    if run.measure:
        result.update(measure_sharpness(model, x_train, y_train, run.batch_size))
    result["seconds"] = time.perf_counter() - start
    return result


def sam_step(sam: SAM, model, loss_on, xb, yb, perturbation: str, noise: torch.Generator) -> None:
    """One SAM step with the wrapper: gradient at w, ascent to w + ε, gradient at w + ε, restore w and step."""
    loss_on(xb, yb).backward()
    if perturbation == "random":
        # Appendix C.5's control: ε = ρ z/‖z‖₂ with z ~ N(0, I). Putting z where the gradient was lets the
        # wrapper's own p = 2 ascent compute exactly that ε.
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=noise)
    sam.ascent_step()
    loss_on(xb, yb).backward()
    sam.descent_step()


def chunked_sam_step(sam: SAM, model, loss_on, xb, yb, m: int) -> None:
    """m-sharpness SAM (section 4.1), the plain-loop equivalent of `sam_group_size = m`: the batch is cut into
    chunks of m examples, each chunk gets its own ε from its own gradient, and the descent gradients
    ∇L_chunk(w + ε_chunk) are averaged (not summed: summing would multiply the learning rate by the number of
    chunks). m = batch size is plain SAM."""
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p) for p in params]
    chunks = range(0, len(yb), m)
    for begin in chunks:
        xc, yc = xb[begin : begin + m], yb[begin : begin + m]
        sam.zero_grad()
        loss_on(xc, yc).backward()
        sam.ascent_step()  # w → w + ε_chunk, grads zeroed
        loss_on(xc, yc).backward()
        sam.restore()  # back to w exactly before the next chunk
        torch._foreach_add_(total, [p.grad for p in params])
    torch._foreach_div_(total, len(chunks))
    for p, g in zip(params, total, strict=True):
        p.grad = g
    sam.descent_step()  # w is already restored: this is the base optimizer step with the averaged gradient


def measure_sharpness(model, x, y, batch_size: int) -> dict:
    """λ1..λ5 of the training-loss Hessian (Lanczos over the whole training set) and m-sharpness (m = batch size,
    ρ = 0.05) with 1 and 5 ascent steps (appendix C.6), all with hf_sam.sharpness."""
    batches = [(x[i : i + 512], y[i : i + 512]) for i in range(0, len(y), 512)]
    spectrum = hessian_eigenvalues(model, batches, top_k=5, max_iter=40, seed=0)
    one = m_sharpness(model, batches, m=batch_size, rho=0.05, ascent_steps=1)
    five = m_sharpness(model, batches, m=batch_size, rho=0.05, ascent_steps=5)
    return {
        "eigenvalues": spectrum.eigenvalues,
        "lambda_max": spectrum.lambda_max,
        "lambda_ratio": spectrum.ratio,
        "lanczos_converged": spectrum.converged,
        "train_loss": one.loss,
        "m_sharpness_1": one.value,
        "m_sharpness_5": five.value,
    }


# ---------------------------------------------------------------------- running and reporting
def _worker_init() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def run_all(runs: list[Run], workers: int) -> list[dict]:
    """Train every run (longest first, over `workers` processes); results come back in the order given."""
    digits()  # load once before forking
    order = sorted(range(len(runs)), key=lambda i: -runs[i].cost)
    if workers <= 1:
        _worker_init()
        results = [train(runs[i]) for i in order]
    else:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init) as pool:
            results = pool.map(train, [runs[i] for i in order], chunksize=1)
    by_index = dict(zip(order, results, strict=True))
    return [by_index[i] for i in range(len(runs))]


def select(results: list[dict], **where) -> list[dict]:
    return [r for r in results if all(r[k] == v for k, v in where.items())]


def mean_std(values, scale: float = 1.0, digits: int = 1) -> str:
    a = np.asarray(values, dtype=float) * scale
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def write_outputs(
    name: str, title: str, body: str, figure, results: list[dict], seconds: float, workers: int
):
    """results/<name>.md (table + plot link + runtime), results/<name>.png, results/<name>.json (every run)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure.savefig(RESULTS / f"{name}.png", dpi=120, bbox_inches="tight")
    runtime = f"Runtime: {seconds:.0f} s ({len(results)} training runs on {workers} worker process(es), {os.cpu_count()} CPU cores)."
    text = f"### {title}\n\n{body}\n\n![{title}]({name}.png)\n\n{runtime}\n"
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    print(text, flush=True)
    return text


def seeds_runs(template: Run, seeds: int, **changes) -> list[Run]:
    return [replace(template, seed=s, **changes) for s in range(seeds)]
