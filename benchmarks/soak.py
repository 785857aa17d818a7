"""Soak test: thousands of SAM steps on a tiny model, resident memory sampled every N steps, must stay flat.

    python benchmarks/soak.py [--steps 3000] [--every 100] [--mode sam|looksam|gsam] [--readme]

Growth from SAM's buffers (the backup of w, LookSAM's stored direction), hooks or telemetry would show as a
positive slope. The same run with `sam_rho=0` (the stock Trainer path) goes first, so the Trainer's own drift
(its log history, Python's allocator) is measured beside it. Prints the least-squares slope of each after warm-up
(KiB per 1,000 steps) and exits non-zero when SAM's exceeds the stock one by more than `--max-slope-kib`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import psutil
import torch
from torch import nn
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging

from hf_sam import SAMTrainer, SAMTrainingArguments


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10)
        )

    def forward(self, x, y=None):
        logits = self.body(x)
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, y)}


class MemorySampler(TrainerCallback):
    def __init__(self, every: int):
        self.every, self.samples, self.process = every, [], psutil.Process(os.getpid())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.samples.append((state.global_step, self.process.memory_info().rss))


def slope_kib_per_1000_steps(samples) -> float:
    xs = [s for s, _ in samples]
    ys = [r / 1024 for _, r in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return (
        1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--mode", default="sam", choices=["sam", "looksam", "gsam"])
    parser.add_argument("--max-slope-kib", type=float, default=256.0)
    parser.add_argument("--readme", action="store_true", help="write the result into benchmarks/README.md")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    slopes, lines = {}, []
    for label, rho in (("stock (sam_rho=0)", 0.0), (f"SAM mode {args.mode!r}", 0.05)):
        samples = soak(args, rho)
        warm = [s for s in samples if s[0] > args.steps // 5]  # allocator and caches settle first
        slopes[label] = slope_kib_per_1000_steps(warm)
        lines.append(
            f"{label}: {args.steps} steps, RSS {warm[0][1] / 2**20:.1f} MiB -> {warm[-1][1] / 2**20:.1f} MiB after "
            f"warm-up, slope {slopes[label]:+.1f} KiB per 1,000 steps"
        )
        print(lines[-1], flush=True)
    excess = slopes[f"SAM mode {args.mode!r}"] - slopes["stock (sam_rho=0)"]
    lines.append(f"SAM minus stock: {excess:+.1f} KiB per 1,000 steps (limit {args.max_slope_kib})")
    print(lines[-1])
    if args.readme:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from readme_block import replace_readme_block

        text = (
            f"`python benchmarks/soak.py --steps {args.steps}` on CPU:\n\n```\n" + "\n".join(lines) + "\n```"
        )
        replace_readme_block("soak", text)
    return 0 if excess <= args.max_slope_kib else 1


def soak(args, rho: float):
    torch.manual_seed(0)
    rows = [{"x": torch.randn(32), "y": torch.tensor(i % 10)} for i in range(512)]
    extra = {"sam_interval": 5} if args.mode == "looksam" else {}
    training_args = SAMTrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=args.steps,
        per_device_train_batch_size=32,
        learning_rate=0.01,
        optim="sgd",
        optim_args="momentum=0.9",
        report_to=[],
        save_strategy="no",
        logging_steps=50,
        disable_tqdm=True,
        use_cpu=True,
        sam_rho=rho,
        sam_mode=args.mode,
        **extra,
    )
    sampler = MemorySampler(args.every)
    trainer = SAMTrainer(model=Net(), args=training_args, train_dataset=rows, callbacks=[sampler])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return sampler.samples


if __name__ == "__main__":
    sys.exit(main())
