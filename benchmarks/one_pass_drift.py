"""How far the one-pass modes' weights drift from an exact copy: the look-ahead is left by subtracting ε.

    python benchmarks/one_pass_drift.py [--steps 1000] [--readme]

`sam_mode="momentum"` and `"previous_gradient"` enter the look-ahead point w + ε for each micro-batch's pass and
leave it by adding −ε to the same storage (`hf_sam.sam.LookAhead`): no copy of the weights, so w comes back
within float32 rounding rather than bit for bit. This script trains `--steps` optimizer steps of 2 micro-batches
through `SAMTrainer` (the experiments' 64-256-256-10 MLP on scikit-learn's digits, SGD momentum 0.9 and AdamW,
fp32 and bf16 autocast with fp32 weights) and measures every round trip against a copy of w taken before it:

- per round trip: the largest |w after − w before| and ‖w after − w before‖ / ‖w‖ (the median and the worst);
- summed over the run: Σ‖w after − w before‖ / ‖w‖, a bound on how far the weights could have moved from an
  exact-copy run if both had taken the same gradients;
- for scale: how far apart the final weights of two runs end, first the shipped one against an exact copy
  (`LookAhead(copy=True)`), then two exact-copy runs whose initial weights differ by one float32 ulp (every weight). Training
  amplifies any ulp-sized difference; the two columns show the restore is no worse than a one-ulp change.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_sam.one_pass  # noqa: E402
from benchmarks.readme_block import replace_readme_block  # noqa: E402
from experiments.common import DictMLP, digits  # noqa: E402
from hf_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402
from hf_sam.sam import LookAhead  # noqa: E402

SETTINGS = {  # name: (optim, optim_args, learning rate, ρ)
    "SGD momentum 0.9": ("sgd", "momentum=0.9", 0.05, 1.0),
    "AdamW": ("adamw_torch", None, 1e-3, 1.0),
}


class MeasuredLookAhead(LookAhead):
    """The shipped LookAhead, with every round trip compared against a copy of w taken before entering."""

    trips: list[tuple[float, float]] = []

    def enter_(self) -> None:
        if self._groups and not self.entered:
            self._before = [p.detach().clone() for params, _, _ in self._groups for p in params]
        super().enter_()

    def leave_(self) -> None:
        was_entered = self.entered
        super().leave_()
        if was_entered:
            after = torch.cat([p.detach().reshape(-1) for params, _, _ in self._groups for p in params])
            before = torch.cat([b.reshape(-1) for b in self._before])
            error = after - before
            self.trips.append((float(error.abs().max()), float(error.norm() / before.norm())))


def run(steps: int, mode: str, optimizer: str, bf16: bool, look_ahead, nudge: bool = False) -> torch.Tensor:
    optim, optim_args, lr, rho = SETTINGS[optimizer]
    x, y, _, _ = digits()
    rows = [{"pixels": a, "labels": b} for a, b in zip(x, y, strict=True)]
    torch.manual_seed(0)
    model = DictMLP(hidden=256)
    if nudge:  # every weight one ulp up: the scale of the dynamics' own sensitivity
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    hf_sam.one_pass.LookAhead = look_ahead
    args = SAMTrainingArguments(
        output_dir="/tmp/one_pass_drift", max_steps=steps, per_device_train_batch_size=32,
        gradient_accumulation_steps=2, learning_rate=lr, optim=optim, optim_args=optim_args, bf16=bf16,
        sam_rho=rho, sam_mode=mode, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        logging_steps=steps,
    )  # fmt: skip
    SAMTrainer(model=model, args=args, train_dataset=rows).train()
    hf_sam.one_pass.LookAhead = LookAhead
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _apart(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{float((a - b).norm() / b.norm()):.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    a = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    exact = functools.partial(LookAhead, copy=True)
    for mode in ("momentum", "previous_gradient"):
        for optimizer in SETTINGS:
            for bf16 in (False, True):
                MeasuredLookAhead.trips = []
                shipped = run(a.steps, mode, optimizer, bf16, MeasuredLookAhead)
                largest, relative = (
                    torch.tensor(column) for column in zip(*MeasuredLookAhead.trips, strict=True)
                )
                copied = run(a.steps, mode, optimizer, bf16, exact)
                nudged = run(a.steps, mode, optimizer, bf16, exact, nudge=True)
                rows.append(
                    f"| `{mode}` | {optimizer} | {'bf16 autocast' if bf16 else 'fp32'} | {len(relative)} | "
                    f"{float(largest.max()):.1e} | {float(relative.median()):.1e} / {float(relative.max()):.1e} | "
                    f"{float(relative.sum()):.1e} | {_apart(shipped, copied)} | {_apart(nudged, copied)} |"
                )
    table = "\n".join(
        [
            f"`python benchmarks/one_pass_drift.py --steps {a.steps}` on CPU: {a.steps} optimizer steps of 2 "
            f"micro-batches per row ({time.perf_counter() - start:.0f} s); every difference relative to ‖w‖ "
            "unless marked.",
            "",
            "| mode | optimizer | precision | round trips | largest |w after − w before| | per round trip: "
            "median / worst | summed over the run | final weights: shipped vs exact copy | final weights: two "
            "exact runs, every initial weight one ulp apart |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if a.readme:
        replace_readme_block("one_pass_drift", table)


if __name__ == "__main__":
    main()
