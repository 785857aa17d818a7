"""Which ρ a transformer trained with AdamW takes: SAM and Momentum-SAM over a grid of ρ on a BERT-style encoder.

    python experiments/rho_transformer.py [--seeds 3] [--steps 300] [--workers 1] [--readme]

The data are scikit-learn's digits read as text: each 8x8 image is a sequence of 64 pixel tokens (values 0-16)
after a [CLS] token, classified by a 2-layer BERT built from config (hidden 64, 4 heads, ≈ 0.1M parameters)
through `SAMTrainer` with the Trainer's default optimizer, AdamW (lr 1e-3, linear decay, 10% warm-up). Every
number is validation accuracy on 20% of the training images (the test images are never read), mean ± std over
the seeds, the same seeds for every setting. `guard` counts the runs in which the look-ahead guard warned (the loss
where the gradient is taken has been more than 1.5x the loss at w and the loss at w has not come down by step 8 or
later: `hf_sam.telemetry.LookAheadGuard`). Writes results/rho_transformer.{md,json}; with `--readme` also the table
into its block of experiments/README.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
# (sam_mode, ρ): 0 is the plain AdamW baseline.
GRID = [("sam", 0.0), ("sam", 0.01), ("sam", 0.05), ("sam", 0.2), ("sam", 0.5),
        ("momentum", 0.05), ("momentum", 0.5), ("momentum", 3.0),
        ("adam_update", 0.5), ("adam_update", 3.0), ("adam_update", 10.0)]  # fmt: skip


def token_digits():
    """(train rows, validation rows): the digits' training split (the test split is left out), 80/20."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, _, y_train, _ = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_train, y_train, test_size=0.2, stratify=y_train, random_state=1
    )

    def rows(images, labels):
        cls = np.full((len(images), 1), 17)
        ids = torch.tensor(np.concatenate([cls, images.astype(int)], axis=1))
        return [
            {"input_ids": i, "labels": torch.tensor(int(label))} for i, label in zip(ids, labels, strict=True)
        ]

    return rows(x_fit, y_fit), rows(x_val, y_val)


def train(job: tuple[str, float, int, int]) -> dict:
    from transformers import BertConfig, BertForSequenceClassification

    import hf_sam.telemetry
    from hf_sam import SAMTrainer, SAMTrainingArguments

    mode, rho, seed, steps = job
    torch.set_num_threads(1)
    fit, val = token_digits()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=18, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=72, num_labels=10,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    warned = []
    hf_sam.telemetry.logger.warning = warned.append  # this worker's own module: count the guard's warnings
    args = SAMTrainingArguments(
        output_dir=f"/tmp/rho_transformer/{mode}-{rho}-{seed}", max_steps=steps, per_device_train_batch_size=64,
        learning_rate=1e-3, warmup_steps=steps // 10, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=seed, sam_rho=rho, sam_mode=mode, logging_steps=steps,
    )  # fmt: skip
    trainer = SAMTrainer(model=model, args=args, train_dataset=fit)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        ids = torch.stack([r["input_ids"] for r in val])
        labels = torch.stack([r["labels"] for r in val])
        accuracy = (model(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()
    return {"mode": mode, "rho": rho, "seed": seed, "val_top1": accuracy, "guard_warned": bool(warned),
            "seconds": seconds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--readme", action="store_true", help="write the table into experiments/README.md")
    a = parser.parse_args()
    jobs = [(mode, rho, seed, a.steps) for mode, rho in GRID for seed in range(a.seeds)]
    start = time.perf_counter()
    if a.workers > 1:
        with multiprocessing.get_context("spawn").Pool(a.workers) as pool:
            results = pool.map(train, jobs, chunksize=1)
    else:
        results = [train(job) for job in jobs]
    rows = []
    for mode, rho in GRID:
        runs = [r for r in results if r["mode"] == mode and r["rho"] == rho]
        top1 = np.array([r["val_top1"] for r in runs]) * 100
        name = "AdamW (baseline)" if rho == 0 else ("SAM" if mode == "sam" else f'`sam_mode="{mode}"`')
        rows.append(f"| {name} | {rho:g} | {top1.mean():.1f} ± {top1.std(ddof=1):.1f} | "
                    f"{sum(r['guard_warned'] for r in runs)}/{len(runs)} |")  # fmt: skip
    table = "\n".join(["| method | ρ | validation top-1 (%) | guard warned |", "|---|---|---|---|", *rows])
    text = (
        f"### ρ for a BERT-style encoder with AdamW (digits as pixel tokens)\n\n{table}\n\n"
        f"{a.seeds} seeds (0-{a.seeds - 1}), {a.steps} steps of batch 64, mean ± std. "
        f"Runtime: {time.perf_counter() - start:.0f} s ({len(jobs)} runs, {a.workers} worker(s)).\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rho_transformer.md").write_text(text)
    (RESULTS / "rho_transformer.json").write_text(json.dumps(results, indent=1))
    print(text)
    if a.readme:
        sys.path.insert(0, str(RESULTS.parent.parent / "benchmarks"))
        from readme_block import EXPERIMENTS_README, replace_readme_block

        replace_readme_block("rho_transformer", text, readme=EXPERIMENTS_README)


if __name__ == "__main__":
    main()
