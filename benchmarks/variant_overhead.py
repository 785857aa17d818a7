"""What each SAM variant costs per optimizer step, against the stock Trainer in the same run.

    python benchmarks/variant_overhead.py            # CPU: ResNet-18 (64 px, batch 32), ~3 minutes
    python benchmarks/variant_overhead.py --readme   # also write the table into benchmarks/README.md
    python benchmarks/variant_overhead.py --optimizer adamw --readme   # the budget guide's variants, with AdamW
    python benchmarks/variant_overhead.py --optimizer adamw --image-size 224 --readme \
        --variants SAM "Momentum-SAM, sam_mode='momentum'" "sam_mode='adam_update'"   # at the recipes' resolution

Every variant trains the same model on the same batches; each round runs every variant for `--steps`
optimizer steps (a multiple of the interval k = 5, so each round holds the same mix of SAM and cheap steps),
the order rotating each round. The cost of a variant is the **mean** step time over a round (a median would
hide the SAM steps of the interval variants); the table gives the median over rounds of the paired ratio
variant / stock, and the forward and backward passes the variant actually ran per optimizer step (from its
`sam/forward_passes` accounting).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from readme_block import replace_readme_block  # noqa: E402
from step_overhead import StepTimer, build_model  # noqa: E402

import hf_sam.trainer  # noqa: E402
from hf_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402
from hf_sam.batchnorm import freeze_batchnorm  # noqa: E402

# Steady-state step times. Left out, as one-off work of a run: the look-ahead guard's extra forward on steps 1, 2,
# 8, 16, ... of a one-pass run (log2(steps) forwards in a whole run, 3 in a 10-step benchmark run), and the
# loss-units probe's two forwards at a run's first micro-batch (sam_fix_loss_normalization=False: both arms keep
# the stock Trainer's loss scaling, which does not change the time).
hf_sam.trainer.is_look_ahead_check_step = lambda step: False

VARIANTS = {
    "stock Trainer": None,
    "SAM": {},
    "SAM, sam_interval=5": {"sam_interval": 5},
    "LookSAM, k=5": {"sam_mode": "looksam", "sam_interval": 5},
    "GSAM": {"sam_mode": "gsam"},
    "late-phase SAM, sam_start=0.5": {"sam_start": 0.5},
    "m-sharpness, sam_group_size=8": {"sam_group_size": 8},
    "SAM-ON, sam_param_filter='normalization'": {"sam_param_filter": "normalization"},
    "2 ascent steps": {"sam_ascent_steps": 2},
    "ascent on 1/2 of the batch, sam_ascent_fraction=0.5": {"sam_ascent_fraction": 0.5},
    "ascent on 1/4 of the batch, sam_ascent_fraction=0.25": {"sam_ascent_fraction": 0.25},
    "sam_ascent_fraction=0.25, sam_interval=2": {"sam_ascent_fraction": 0.25, "sam_interval": 2},
    "Momentum-SAM, sam_mode='momentum'": {"sam_mode": "momentum"},
    "sam_mode='previous_gradient'": {"sam_mode": "previous_gradient"},
    "sam_mode='adam_update'": {"sam_mode": "adam_update"},  # AdamW only
}
# With AdamW: the budget guide's rows (docs/variants.md), and adam_update, which needs Adam's moments.
ADAMW_VARIANTS = (
    "stock Trainer", "SAM", "SAM, sam_interval=5", "LookSAM, k=5",
    "ascent on 1/2 of the batch, sam_ascent_fraction=0.5", "ascent on 1/4 of the batch, sam_ascent_fraction=0.25",
    "Momentum-SAM, sam_mode='momentum'", "sam_mode='adam_update'", "sam_mode='previous_gradient'",
)  # fmt: skip
OPTIMIZERS = {
    "sgd": ("SGD momentum 0.9", {"optim": "sgd", "optim_args": "momentum=0.9"}),
    "adamw": ("AdamW", {"optim": "adamw_torch"}),
}


def run_variant(name, model, initial, rows, steps, common):
    model.load_state_dict(initial)
    overrides = VARIANTS[name]
    if overrides is None:
        trainer = Trainer(model=model, args=TrainingArguments(max_steps=steps, **common), train_dataset=rows)
    else:
        args = SAMTrainingArguments(
            max_steps=steps,
            sam_rho=0.05,
            logging_steps=steps,
            sam_fix_loss_normalization=False,
            **overrides,
            **common,
        )
        trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.remove_callback(PrinterCallback)
    timer = StepTimer(lambda: None)
    trainer.add_callback(timer)
    trainer.train()
    log = next((e for e in trainer.state.log_history if "sam/forward_passes" in e), None)
    passes = (log["sam/forward_passes"] / steps, log["sam/backward_passes"] / steps) if log else (1.0, 1.0)
    return statistics.mean(timer.times), passes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ResNet-18")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--steps", type=int, default=10, help="optimizer steps per variant per round (multiple of 5)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="pixels (default: the model's 64); a per-parameter cost (a one-pass look-ahead) weighs less at the "
        "224 px the recipes finetune at, where the forward and backward do 12x the work per step",
    )
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd")
    parser.add_argument(
        "--variants", nargs="*", default=None, help="a subset of the variants (the stock Trainer always runs)"
    )
    parser.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    args = parser.parse_args(argv)
    label, optimizer = OPTIMIZERS[args.optimizer]
    hf_logging.set_verbosity_error()

    torch.manual_seed(0)
    model, image_size = build_model(args.model, "cpu")
    image_size = args.image_size or image_size
    # BatchNorm frozen for every variant, as the recipes do: the one-pass modes refuse train-mode BatchNorm.
    freeze_batchnorm(model)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    rows = [
        {"pixel_values": torch.randn(3, image_size, image_size, generator=g), "labels": torch.tensor(i % 10)}
        for i in range(args.batch_size * args.steps)
    ]
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3,
        **optimizer,  # every variant, stock included (Momentum-SAM needs a momentum)
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    names = [
        n for n in VARIANTS if (n in ADAMW_VARIANTS if args.optimizer == "adamw" else "adam_update" not in n)
    ]
    if args.variants:
        unknown = [n for n in args.variants if n not in names]
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; choose from {names}")
        names = [n for n in names if n == "stock Trainer" or n in args.variants]
    ratios = {name: [] for name in names}
    passes = {}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        times = {}
        for name in order:
            print(f"round {r + 1}/{args.rounds}: {name}", flush=True)
            times[name], passes[name] = run_variant(name, model, initial, rows, args.steps, common)
            gc.collect()
        for name in names:
            ratios[name].append(times[name] / times["stock Trainer"])

    lines = [
        f"`python benchmarks/variant_overhead.py` on CPU ({torch.get_num_threads()} threads), {args.model} from config "
        f"at {image_size} px, batch {args.batch_size}, fp32, {label}; {args.rounds} interleaved rounds x {args.steps} steps; "
        f"ratio = median over rounds of (mean step time / stock Trainer's).",
        "",
        "| variant | step time / stock | forward passes per step | backward passes per step |",
        "|---|---|---|---|",
    ]
    for name in names:
        fwd, bwd = passes[name]
        lines.append(f"| {name} | {statistics.median(ratios[name]):.2f} | {fwd:.2f} | {bwd:.2f} |")
    table = "\n".join(lines)
    print(table)
    stem = "variant_overhead_cpu" + ("_adamw" if args.optimizer == "adamw" else "")
    stem += f"_{args.image_size}px" if args.image_size else ""
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{stem}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(table + "\n")
    if args.readme:
        replace_readme_block(stem, table)


if __name__ == "__main__":
    main()
