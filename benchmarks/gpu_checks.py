"""Mixed-precision checks that need a GPU (CI has none): run by hand on a CUDA machine.

    python benchmarks/gpu_checks.py

1. fp16 autocast + the real GradScaler: the SAMTrainer update equals the fp32 update up to fp16 rounding
   (the closure trap would give a 65536x update: the GradScaler's initial scale), and the scale is unchanged;
2. bf16 autocast: same comparison;
3. an overflow in the descent pass (inf loss) is skipped by the GradScaler: weights unchanged, scale halved.
Prints one line per check and exits non-zero if one fails.
"""

from __future__ import annotations

import copy
import sys
import tempfile

import torch
from transformers import ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

from hf_sam import SAMTrainer, SAMTrainingArguments


def tiny_vit():
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def rows(n=32):
    g = torch.Generator().manual_seed(0)
    return [
        {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": torch.tensor(i % 5)} for i in range(n)
    ]


def train(model, precision, steps=3, trainer_cls=SAMTrainer):
    args = SAMTrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=16,
        max_steps=steps,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        sam_rho=0.05,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        train_sampling_strategy="sequential"
        if hasattr(SAMTrainingArguments, "train_sampling_strategy")
        else "random",
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=rows())
    trainer.train()
    return trainer


def relative_update_error(initial, model, reference):
    delta = torch.cat(
        [(p.detach().float() - q).flatten() for p, q in zip(model.parameters(), initial, strict=True)]
    )
    ref = torch.cat(
        [(p.detach().float() - q).flatten() for p, q in zip(reference.parameters(), initial, strict=True)]
    )
    return float((delta - ref).norm() / ref.norm())


def main() -> int:
    hf_logging.set_verbosity_error()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failures = 0
    base = tiny_vit().cuda()
    initial = [p.detach().float().clone() for p in base.parameters()]
    reference = copy.deepcopy(base)
    train(reference, "fp32")

    for precision, tolerance in (("fp16", 0.02), ("bf16", 0.08)):
        model = copy.deepcopy(base)
        trainer = train(model, precision)
        error = relative_update_error(initial, model, reference)
        scale = trainer.accelerator.scaler.get_scale() if trainer.accelerator.scaler is not None else None
        ok = error < tolerance
        failures += not ok
        print(
            f"{'PASS' if ok else 'FAIL'} {precision}: ||Δw - Δw_fp32|| / ||Δw_fp32|| = {error:.4f} (< {tolerance}); scale={scale}"
        )

    class InfDescent(SAMTrainer):
        """An inf loss in the descent pass of the first step: the GradScaler must skip that step."""

        calls = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            InfDescent.calls += 1
            return loss * float("inf") if InfDescent.calls == 2 else loss

    model = copy.deepcopy(base)
    trainer = train(model, "fp16", steps=1, trainer_cls=InfDescent)
    unchanged = all(
        torch.equal(p.detach().float(), q) for p, q in zip(model.parameters(), initial, strict=True)
    )
    halved = trainer.accelerator.scaler.get_scale() < 65536.0
    ok = unchanged and halved
    failures += not ok
    print(
        f"{'PASS' if ok else 'FAIL'} fp16 overflow in the descent pass: step skipped={unchanged}, scale lowered={halved}"
    )
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
