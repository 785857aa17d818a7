"""Per-GPU memory and time per run of the finetuning recipes, *estimated* on CPU (no GPU measured).

    python benchmarks/recipe_estimates.py     # ~1 min on 2 cores; writes benchmarks/results/recipe_estimates.json

For each architecture of the recipes (randomly initialised, timm's registry entry of the recipe's checkpoint):
- activations: the bytes of every distinct tensor autograd saves for backward in one forward at batch 1, under
  bf16 autocast with BatchNorm in eval mode (the recipes freeze it), measured on CPU at a reduced resolution
  (EfficientNet-L2 at 475 px would need ~25 GB of RAM), then scaled by pixels to the real resolution and by the
  recipe's m (per-device batch). GPU kernels may save somewhat more or less (cuDNN, fused attention).
- memory per GPU = activations of one micro-batch + 16 bytes per parameter (fp32 weights, gradients, momentum and
  SAM's copy of w; 12 for the baseline) + 2 GB assumed for the CUDA context, workspaces and allocator slack.
- time per run = forward FLOPs at the real resolution (counted on meta tensors with `torch.utils.flop_counter`)
  x passes per image (SAM: two forward+backward = 6 forwards; baseline 3; +1 forward per pass with gradient
  checkpointing) x images (max_steps x global batch), on 8 A100s (312 TFLOP/s bf16 peak each) at an assumed
  fraction of peak: 5-10% for EfficientNets (depthwise convolutions and BatchNorm are memory-bound), 30-40% for ViT.
"""

from __future__ import annotations

import json
import os
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

A100_BF16_FLOPS = 312e12
# arch, real resolution, measured resolution, m, global batch, max_steps, gradient checkpointing, assumed MFU range
RECIPES = {
    "efficientnet_b7": ("tf_efficientnet_b7", 600, 300, 16, 1024, 5000, False, (0.05, 0.10)),
    "efficientnet_l2": ("tf_efficientnet_l2", 475, 160, 4, 512, 10000, True, (0.05, 0.10)),
    # ViT-B/16 finetuned at 384 px (ViT paper, B.1.1): timm's 384-px entry of the same architecture. Its recipes run
    # 10k steps (CIFAR, Food-101) or 500 (Pets, Flowers, Cars): their READMEs scale the time by max_steps.
    "vit_b16": ("vit_base_patch16_384", 384, 384, 64, 512, 10000, False, (0.30, 0.40)),
}


def measure(arch: str, full: int, small: int) -> dict:
    drop = {"drop_rate": 0.5, "drop_path_rate": 0.2} if "efficientnet" in arch else {}
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=100, **drop)
    out = {"params": sum(p.numel() for p in model.parameters())}
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, full, full, device="meta"))
    out["forward_flops"] = counter.get_total_flops()
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=100, **drop).train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    seen, total = set(), [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:  # a tensor saved by several ops (or a view of one) counts once
            seen.add(key)
            total[0] += storage.nbytes()
        return tensor

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(1, 3, small, small)).float().logsumexp(-1).sum()
    out["activation_bytes_measured"] = total[0]
    out["seconds"] = round(time.perf_counter() - start, 1)
    del loss
    return out


def estimate(name: str) -> dict:
    arch, full, small, m, global_batch, steps, checkpointing, (low, high) = RECIPES[name]
    got = measure(arch, full, small)
    per_image = got["activation_bytes_measured"] * (full / small) ** 2
    activations = per_image * m
    images = steps * global_batch
    passes = {"sam": 8 if checkpointing else 6, "baseline": 4 if checkpointing else 3}

    def hours(run: str, mfu: float) -> float:
        return images * passes[run] * got["forward_flops"] / (8 * A100_BF16_FLOPS * mfu) / 3600

    return {
        "arch": arch, "resolution": full, "measured_at": small, "m": m, "global_batch": global_batch, "max_steps": steps,
        **got,
        "activation_gb_per_image": per_image / 1e9, "activation_gb_per_micro_batch": activations / 1e9,
        "memory_gb_sam": (activations + 16 * got["params"]) / 1e9 + 2,
        "memory_gb_baseline": (activations + 12 * got["params"]) / 1e9 + 2,
        "gradient_checkpointing_in_recipe": checkpointing, "assumed_mfu": [low, high],
        "hours_8xA100_sam": [hours("sam", high), hours("sam", low)],
        "hours_8xA100_baseline": [hours("baseline", high), hours("baseline", low)],
    }  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    results = {name: estimate(name) for name in RECIPES}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "recipe_estimates.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    for name, r in results.items():
        print(f"{name}: ~{r['memory_gb_sam']:.0f} GB per GPU (SAM), "
              f"{r['hours_8xA100_sam'][0]:.1f}-{r['hours_8xA100_sam'][1]:.1f} h on 8 x A100 (estimates)")  # fmt: skip
    print(f"wrote {path}")
