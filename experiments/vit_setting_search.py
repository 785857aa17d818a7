"""How the ViT benchmark of benefit.py was found: a ViT on the noisy digits, baseline against SAM, scored on the
validation slice only (the test images are never read).

    python experiments/vit_setting_search.py            # the runs of the search, in order (about 40 minutes)

Each run: (method, lr, ρ, seed, epochs, batch, noise, patch, hidden, layers), AdamW (weight decay 0.01, 5% warm-up,
cosine), through `SAMTrainer`, as benefit.py trains. Printed: validation top-1 on the slice's noisy labels (what
tuning sees) and on their clean labels (what the benchmark is after), and the seconds of `train()`. The search
and its reading are in experiments/README.md; results/vit_setting_search.md keeps the recorded output.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import digits, train_through_sam_trainer  # noqa: E402

# (patch, hidden, layers, epochs, batch, noise) -> [(method, lr, ρ), ...], tuning seeds 1000 and 1001 each.
SEARCH = [
    ((2, 64, 2, 30, 64, 0.3), [("baseline", 1e-3, 0.0), ("baseline", 3e-3, 0.0), ("SAM", 3e-3, 0.1), ("SAM", 3e-3, 0.3),
                               ("adam_update", 3e-3, 0.3), ("momentum", 3e-3, 0.3)]),
    ((2, 64, 2, 20, 64, 0.3), [("baseline", 3e-4, 0.0), ("baseline", 1e-3, 0.0), ("SAM", 1e-3, 0.05), ("SAM", 1e-3, 0.1),
                               ("SAM", 1e-3, 0.2)]),
    ((2, 64, 2, 60, 128, 0.3), [("baseline", 1e-4, 0.0), ("baseline", 3e-4, 0.0), ("baseline", 1e-3, 0.0),
                                ("baseline", 3e-3, 0.0), ("SAM", 3e-3, 0.05), ("SAM", 3e-3, 0.1), ("SAM", 1e-3, 0.02),
                                ("SAM", 1e-3, 0.05), ("SAM", 1e-3, 0.1), ("SAM", 1e-3, 0.2), ("SAM", 1e-3, 0.3),
                                ("SAM", 3e-4, 0.05), ("SAM", 3e-4, 0.2), ("momentum", 1e-3, 0.3),
                                ("adam_update", 1e-3, 1.0), ("adam_update", 1e-3, 3.0), ("adam_update", 3e-3, 1.0)]),
    ((2, 64, 2, 60, 128, 0.4), [("baseline", 1e-4, 0.0), ("baseline", 3e-4, 0.0), ("baseline", 1e-3, 0.0),
                                ("SAM", 1e-3, 0.05), ("SAM", 1e-3, 0.1), ("SAM", 3e-3, 0.1)]),
    ((4, 128, 2, 50, 64, 0.3), [("baseline", 3e-4, 0.0), ("baseline", 1e-3, 0.0), ("SAM", 1e-3, 0.1), ("SAM", 1e-3, 0.3),
                                ("SAM", 1e-3, 1.0)]),
]  # fmt: skip


def run(job) -> tuple:
    import benefit
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    (patch, hidden, layers, epochs, batch, noise), (method, lr, rho), seed = job
    benefit.NOISE = noise

    class ViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = ViTConfig(image_size=8, patch_size=patch, num_channels=1, hidden_size=hidden,
                               num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden,
                               num_labels=10)  # fmt: skip
            self.vit = ViTForImageClassification(config)

        def forward(self, pixels, labels=None):
            output = self.vit(pixel_values=pixels.view(-1, 1, 8, 8), labels=labels)
            return {"logits": output.logits, "loss": output.loss}

    _, y_train, _, _ = digits()
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(4321))
    held = order[: round(benefit.VALIDATION * len(y_train))]  # the validation slice of benefit.splits
    (x_fit, y_fit), (x_val, y_val), _ = benefit.splits(seed)
    rows = [{"pixels": x, "labels": y} for x, y in zip(x_fit, y_fit, strict=True)]
    torch.manual_seed(seed)
    model = ViT()
    _, seconds = train_through_sam_trainer(
        model, rows, epochs * math.ceil(len(rows) / batch), per_device_train_batch_size=batch, learning_rate=lr,
        lr_scheduler_type="cosine", seed=seed, optim="adamw_torch", weight_decay=0.01, warmup_steps=0.05,
        **{"sam_rho": rho, **benefit.METHODS[method]},
    )  # fmt: skip
    noisy, clean = benefit.accuracy(model, x_val, y_val), benefit.accuracy(model, x_val, y_train[held])
    return job, 100 * noisy, 100 * clean, seconds


def main() -> None:
    jobs = [(setting, point, seed) for setting, points in SEARCH for seed in (1000, 1001) for point in points]
    print(
        "| patch, hidden, layers, epochs, batch, noise | method | lr | ρ | seed | validation, noisy labels | clean labels | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for (setting, (method, lr, rho), seed), noisy, clean, seconds in pool.imap(run, jobs):
            print(
                f"| {', '.join(map(str, setting))} | {method} | {lr:g} | {rho:g} | {seed} | {noisy:.1f} | {clean:.1f} | {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
