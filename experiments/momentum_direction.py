"""How Momentum-SAM's ρ relates to SAM's: the loss gradient's component along MSAM's perturbation direction.

    python experiments/momentum_direction.py [--rho 3] [--lr 0.02] [--seeds 3]

To first order a perturbation of length ρ along a unit direction u raises the loss by ρ·⟨g, u⟩. SAM takes
u = g/‖g‖, the steepest: ρ‖g‖. Momentum-SAM takes u = −v/‖v‖ (v the optimizer's momentum), so it raises the loss
by ρ‖g‖·cos(g, −v): if −v were an ascent direction, ρ_MSAM ≈ ρ_SAM / cos(g, −v) would match a SAM ρ_SAM.
Whether it is, is measured here (on this benchmark it is not: cos < 0, −v is a descent direction at w, so
Momentum-SAM's ρ is not a rescaled SAM ρ and has to be tuned on its own). This script trains the benefit
benchmark's model and data (`experiments/benefit.py`: digits at 30% pair-flip label noise, the MLP, SGD momentum 0.9, batch
64, 50 epochs, cosine decay) with the `SAM` wrapper in mode="momentum", and at every step also takes the gradient
at w on the step's batch (an extra pass, for the measurement only) to record cos(g(w), −v) and the first-order loss
increase of the perturbation, ρ⟨g, −v̂⟩, next to SAM's ρ_SAM‖g‖. Writes experiments/results/momentum_direction.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benefit import BATCH, EPOCHS, MLP, splits  # noqa: E402
from common import RESULTS  # noqa: E402

from hf_sam.sam import SAM, global_norm, momentum_direction  # noqa: E402


def measure(seed: int, rho: float, lr: float, sam_rho: float) -> dict:
    torch.manual_seed(seed)
    rows, _, _ = splits(seed)
    x = torch.stack([r["pixels"] for r in rows])
    y = torch.stack([r["labels"] for r in rows])
    model = MLP()
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sam = SAM(base, rho=rho, mode="momentum")
    steps_per_epoch = math.ceil(len(rows) / BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(sam, T_max=EPOCHS * steps_per_epoch)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    cosines, ratios = [], []
    for _ in range(EPOCHS):
        order = torch.randperm(len(rows), generator=generator)
        for start in range(0, len(rows), BATCH):
            batch = order[start : start + BATCH]
            momentum = momentum_direction(base, params, "momentum_buffer")
            if momentum is not None:  # the measurement: g at w, against −v
                g = torch.autograd.grad(model(x[batch], y[batch])["loss"], params)
                dot = sum(float((a * -b).sum()) for a, b in zip(g, momentum, strict=True))
                g_norm, v_norm = float(global_norm(list(g))), float(global_norm(momentum))
                cosines.append(dot / (g_norm * v_norm + 1e-12))
                ratios.append((rho * dot / (v_norm + 1e-12)) / (sam_rho * g_norm + 1e-12))
            sam.ascent_step()
            model(x[batch], y[batch])["loss"].backward()
            sam.descent_step()
            sam.zero_grad()
            schedule.step()
    quarter = len(cosines) // 4
    return {
        "cos median": statistics.median(cosines),
        "cos first quarter": statistics.median(cosines[:quarter]),
        "cos last quarter": statistics.median(cosines[-quarter:]),
        "increase / SAM's": statistics.median(ratios),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rho", type=float, default=3.0, help="Momentum-SAM's ρ (the benefit benchmark's choice)"
    )
    parser.add_argument(
        "--sam-rho", type=float, default=0.7, help="SAM's ρ to compare with (its choice there)"
    )
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = [measure(seed, args.rho, args.lr, args.sam_rho) for seed in range(args.seeds)]
    keys = list(runs[0])
    lines = [
        f"`python experiments/momentum_direction.py --rho {args.rho:g} --sam-rho {args.sam_rho:g} --lr {args.lr:g}`: "
        f"the benefit benchmark's setting, Momentum-SAM ρ = {args.rho:g}, seeds 0-{args.seeds - 1}; medians over the "
        "steps of each run, then mean ± std over seeds. cos = cos(g(w), −v); increase / SAM's = "
        f"ρ⟨g, −v̂⟩ / (ρ_SAM‖g‖) with ρ_SAM = {args.sam_rho:g}, the first-order loss increase of the perturbation "
        "against SAM's.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        "| "
        + " | ".join(
            f"{statistics.fmean(r[k] for r in runs):.3f} ± {statistics.stdev(r[k] for r in runs):.3f}"
            for k in keys
        )
        + " |",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "momentum_direction.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
