"""Peak memory of SAM and the one-pass modes over the stock Trainer, in copies of the trainable parameters.

    python benchmarks/memory.py [--width 2048] [--readme]

Each configuration trains in a process of its own (so one's allocations cannot hide in another's), through the
stock `Trainer` or `SAMTrainer`, a parameter-heavy MLP (4 linear layers of `--width`, ≈ 67M parameters at 4096)
with AdamW for 4 steps of batch 8, whose activations are negligible next to its parameters. Reported: the peak
memory during `train()` over the memory just before it (the resident set sampled every millisecond on CPU,
`torch.cuda.max_memory_allocated` on a GPU), in copies of the parameters, and its excess over the stock Trainer's. What each keeps: SAM a backup of w (its ascent
gradient becomes ε in place and is freed before the descent pass); `sam_mode="momentum"` nothing (ε is added and
subtracted along the optimizer's own first moment); `"adam_update"` one tensor the size of the largest parameter
(Adam's update is computed a tensor at a time); `"previous_gradient"` the previous step's gradient.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from readme_block import replace_readme_block  # noqa: E402

CONFIGS = {
    "stock Trainer": None,
    "SAM": {"sam_rho": 0.05},
    'sam_mode="momentum"': {"sam_rho": 0.05, "sam_mode": "momentum"},
    'sam_mode="adam_update"': {"sam_rho": 0.05, "sam_mode": "adam_update"},
    'sam_mode="previous_gradient"': {"sam_rho": 0.05, "sam_mode": "previous_gradient"},
}


class ResidentPeak:
    """The process's resident set sampled every millisecond while the block runs (large tensors are mmap'ed, so a
    freed one leaves the resident set at once): `start` before the block, `peak` the largest seen."""

    def __enter__(self):
        import threading

        self.start = self.peak = self._rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _sample(self):
        while not self._done.wait(0.001):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()


def measure(name: str, width: int) -> dict:
    """Train one configuration in this process; its peak memory and the size of one parameter copy."""
    import torch
    from torch import nn
    from transformers import Trainer, TrainingArguments

    from hf_sam import SAMTrainer, SAMTrainingArguments

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)], nn.Linear(width, 10))

        def forward(self, features, labels=None):
            logits = self.net(features)
            return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    model = MLP().to("cuda" if cuda else "cpu")
    rows = [{"features": torch.randn(width), "labels": torch.tensor(i % 10)} for i in range(32)]
    sam = CONFIGS[name]
    with tempfile.TemporaryDirectory() as out:
        settings = dict(output_dir=out, max_steps=4, per_device_train_batch_size=8, optim="adamw_torch",
                        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=not cuda)  # fmt: skip
        if sam is None:
            trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=rows)
        else:
            trainer = SAMTrainer(
                model=model, args=SAMTrainingArguments(**settings, **sam), train_dataset=rows
            )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            trainer.train()
            peak = torch.cuda.max_memory_allocated() - start
        else:
            with ResidentPeak() as resident:
                trainer.train()
            peak = resident.peak - resident.start
    copy = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"peak_bytes": peak, "copy_bytes": copy, "device": "cuda" if cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one configuration
    a = parser.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.width)))
        return
    results = {}
    for name in CONFIGS:
        child = subprocess.run([sys.executable, __file__, "--one", name, "--width", str(a.width)],
                               capture_output=True, text=True, check=True)  # fmt: skip
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    stock, copy = results["stock Trainer"]["peak_bytes"], results["stock Trainer"]["copy_bytes"]
    device = results["stock Trainer"]["device"]
    rows = [
        f"| {name} | {r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / copy:.2f} | {round((r['peak_bytes'] - stock) / copy, 2) + 0.0:+.2f} |"
        for name, r in results.items()
    ]
    measure_name = "resident set" if device == "cpu" else "max_memory_allocated"
    table = "\n".join([
        f"`python benchmarks/memory.py --width {a.width}` on {device}: a {copy / 4 / 1e6:.1f}M-parameter MLP "
        f"(one copy = {copy / 2**20:.0f} MiB), AdamW, fp32, each configuration in its own process.",
        "",
        f"| configuration | peak {measure_name} during train() over before it (MiB) | in parameter copies | "
        "over the stock Trainer, in parameter copies |",
        "|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    print(table)
    if a.readme:
        replace_readme_block(f"memory_{device}", table)


if __name__ == "__main__":
    main()
