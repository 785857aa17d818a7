"""Offline demo (`make demo`): SAM vs plain SGD finetuning on real images, on a CPU, in about two minutes.

    python recipes/demo.py

Three runs of `recipes/finetune.py` (the recipes in `recipes/digits/test_efficientnet/`), on scikit-learn's
handwritten digits (the `digits` dataset spec) and timm's 0.1M-parameter `test_efficientnet` at 32x32:

1. pretrain.yaml: from random init on digits 0-4 (the "pretrained checkpoint");
2. baseline.yaml: finetune it on digits 5-9 with a new head, frozen BatchNorm, SGD + cosine, sam_rho 0;
3. sam.yaml: the same with sam_rho 0.05.

Prints a baseline-vs-SAM table and saves the training curves to outputs/digits/test_efficientnet/demo.png.
Re-running starts over (each run is passed --overwrite_output_dir true).
"""

from __future__ import annotations

import json
import os
import sys
import time

import timm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune  # noqa: E402  (recipes/ is not a package: the demo runs from its own folder)

from hf_sam.models import save_timm_checkpoint  # noqa: E402

RECIPES = "recipes/digits/test_efficientnet"
OUT = "outputs/digits/test_efficientnet"


def write_random_init(folder: str) -> None:
    """A randomly initialised timm test_efficientnet in the Hub's timm layout, preprocessing at 32x32."""
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    save_timm_checkpoint(
        model,
        folder,
        input_size=(3, 32, 32),
        crop_pct=1.0,
        interpolation="bicubic",
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )


def history(run: str) -> list[dict]:
    with open(os.path.join(OUT, run, "trainer_state.json")) as f:
        return json.load(f)["log_history"]


def summary(run: str) -> dict:
    logs = history(run)
    with open(os.path.join(OUT, run, "test_results.json")) as f:
        test = json.load(f)
    losses = [h for h in logs if "loss" in h]
    sharpness = [h["sam/sharpness"] for h in logs if "sam/sharpness" in h]
    return {
        "top1": test["test_top1"],
        "loss": losses[-1]["loss"],
        "sharpness": sharpness[-1] if sharpness else None,
    }


def plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_sharp) = plt.subplots(1, 2, figsize=(10, 4))
    for run, style in (("baseline", "-"), ("sam", "--")):
        logs = [h for h in history(run) if "loss" in h]
        label = "SAM" if run == "sam" else run
        ax_loss.plot([h["step"] for h in logs], [h["loss"] for h in logs], style, label=label)
        if any("sam/sharpness" in h for h in logs):
            ax_sharp.plot([h["step"] for h in logs], [h["sam/sharpness"] for h in logs], style, label=label)
    ax_loss.set(xlabel="step", ylabel="train loss (at w)", title="digits 5-9, finetuned from digits 0-4")
    ax_sharp.set(xlabel="step", ylabel="sam/sharpness = L(w+ε) - L(w)", title="SAM run")
    ax_loss.legend()
    ax_sharp.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    start = time.time()
    write_random_init(os.path.join(OUT, "random_init"))
    for run in ("pretrain", "baseline", "sam"):
        print(f"\n=== {run}: recipes/finetune.py --config {RECIPES}/{run}.yaml", flush=True)
        finetune.main(["--config", f"{RECIPES}/{run}.yaml", "--overwrite_output_dir", "true"])
    plot(os.path.join(OUT, "demo.png"))

    rows = {"baseline": summary("baseline"), "SAM": summary("sam")}
    print("\nFinetuning on digits 5-9 from a digits-0-4 checkpoint (top-1 on the digits 5-9 test images):\n")
    print(f"| {'run':<8} | {'top-1':>6} | {'final train loss':>16} | {'sam/sharpness':>13} |")
    print(f"|{'-' * 10}|{'-' * 8}|{'-' * 18}|{'-' * 15}|")
    for name, r in rows.items():
        sharp = f"{r['sharpness']:.4f}" if r["sharpness"] is not None else "n/a (ρ=0)"
        print(f"| {name:<8} | {r['top1']:>6.3f} | {r['loss']:>16.4f} | {sharp:>13} |")
    print(f"\nCurves: {OUT}/demo.png   Runs: {OUT}/{{pretrain,baseline,sam}}   ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
