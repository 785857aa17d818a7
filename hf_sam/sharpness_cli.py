"""Compare the sharpness of image-classification checkpoints on the same examples (image classifiers only: for
any other model, call `hf_sam.sharpness.hessian_eigenvalues` and `m_sharpness` with your own batches).

    python -m hf_sam.sharpness_cli --model runs/baseline --model runs/sam --dataset data/pets_train \\
        --num-examples 512 --batch-size 64 --top-k 5 [--json]

For each checkpoint (a local directory saved with `save_pretrained`, or a Hub id) it loads the model and its own
image processor, preprocesses the same `--num-examples` examples (a seeded draw from `--split`), and prints a table:
loss and accuracy on those examples, the top `--top-k` Hessian eigenvalues (Lanczos), λmax/λk, and m-sharpness
(mean over chunks of m examples of max_{‖ε‖₂≤ρ} L(w+ε) − L(w)). The measurement is `hf_sam.sharpness`; this module
only loads and preprocesses. `--dataset` is a directory written by `datasets.Dataset.save_to_disk` (a DatasetDict
or a single split), an image folder (class sub-directories), or a Hub dataset id.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import torch

from hf_sam.sharpness import hessian_eigenvalues, m_sharpness

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CLIError(ValueError):
    """Bad input, reported as one line on stderr with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_sam.sharpness_cli",
        description="Top Hessian eigenvalues and m-sharpness of image classifiers, on the same examples.",
    )
    parser.add_argument(
        "--model", action="append", required=True, help="checkpoint dir or Hub id (repeatable)"
    )
    parser.add_argument("--dataset", required=True, help="save_to_disk dir, image folder, or Hub dataset id")
    parser.add_argument(
        "--split", default="train", help="split to measure on (default: train, as in the paper)"
    )
    parser.add_argument("--image-column", default=None, help="default: the first Image column")
    parser.add_argument(
        "--label-column", default=None, help="default: the first ClassLabel column, else 'label'"
    )
    parser.add_argument("--num-examples", type=int, default=256, help="examples measured on (seeded draw)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--m", type=int, default=None, help="examples per m-sharpness chunk (default: batch size)"
    )
    parser.add_argument("--rho", type=float, default=0.05, help="radius of the m-sharpness ball")
    parser.add_argument("--ascent-steps", type=int, default=1, help="projected gradient ascent steps")
    parser.add_argument("--top-k", type=int, default=5, help="Hessian eigenvalues to compute (ratio λmax/λk)")
    parser.add_argument("--max-iter", type=int, default=30, help="Lanczos iterations at most")
    parser.add_argument("--seed", type=int, default=0, help="seeds the example draw and the Lanczos start")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bars of the measurements, on stderr (default: on; --no-progress for none)",
    )
    return parser


# ---------------------------------------------------------------------- data
def load_examples(dataset: str, split: str, num_examples: int, seed: int):
    """A seeded draw of `num_examples` examples of `split`, as a `datasets.Dataset`."""
    import datasets

    if os.path.isdir(dataset):
        is_saved = any(os.path.exists(os.path.join(dataset, f)) for f in ("dataset_dict.json", "state.json"))
        if is_saved:
            data = datasets.load_from_disk(dataset)
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise CLIError(
                        f"split {split!r} not in {dataset} (splits: {', '.join(data)}); use --split."
                    )
                data = data[split]
        else:
            data = datasets.load_dataset("imagefolder", data_dir=dataset, split=split)
    elif _HUB_ID.match(dataset):
        try:
            data = datasets.load_dataset(dataset, split=split)
        except Exception as error:  # offline, no such dataset or split: one line, not a traceback
            raise CLIError(
                f"cannot load dataset {dataset!r} split {split!r}: {str(error).splitlines()[0]}"
            ) from error
    else:
        raise CLIError(f"--dataset {dataset!r}: no such directory (and not a Hub dataset id).")
    if len(data) == 0:
        raise CLIError(f"--dataset {dataset!r} split {split!r} is empty.")
    count = min(num_examples, len(data))
    return data.shuffle(seed=seed).select(range(count)) if count < len(data) else data


def resolve_columns(data, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    import datasets

    columns = list(data.column_names)

    def pick(given, feature_type, fallbacks, flag):
        if given is not None:
            if given not in columns:
                raise CLIError(f"{flag} {given!r} not in the dataset's columns: {', '.join(columns)}.")
            return given
        typed = [c for c in columns if isinstance(data.features[c], feature_type)]
        named = [c for c in fallbacks if c in columns]
        if not typed + named:
            what = "no image column" if flag == "--image-column" else "no label column I can tell"
            raise CLIError(
                f"sharpness_cli measures image classifiers, and the dataset has {what}; pass {flag} "
                f"(columns: {', '.join(columns)}). For a text or other model, call hf_sam.sharpness's "
                "hessian_eigenvalues and m_sharpness on your own batches (README, 'Sharpness you can measure')."
            )
        return (typed + named)[0]

    image = pick(image_column, datasets.Image, ("image", "img", "pixel_values"), "--image-column")
    label = pick(label_column, datasets.ClassLabel, ("label", "labels", "fine_label"), "--label-column")
    return image, label


# ---------------------------------------------------------------------- models
def check_checkpoint(name: str) -> None:
    """Before any data is read: the checkpoint exists and is an image classifier (its config, not its weights)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    if not os.path.isdir(name) and not _HUB_ID.match(name):
        raise CLIError(f"--model {name!r}: no such checkpoint directory (and not a Hub model id).")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot load checkpoint {name!r}: {str(error).splitlines()[0]}") from error
    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        raise CLIError(
            f"--model {name!r} is a {type(config).__name__} checkpoint, not an image classifier: sharpness_cli "
            "measures image classifiers. For a text or other model, call hf_sam.sharpness's hessian_eigenvalues "
            "and m_sharpness on your own batches (README, 'Sharpness you can measure')."
        )


def load_checkpoint(name: str, device: str):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        try:
            # Hessian-vector products need double backward, which fused attention kernels (SDPA) lack.
            model = AutoModelForImageClassification.from_pretrained(name, attn_implementation="eager")
        except (ValueError, TypeError):  # a model class that does not take the argument
            model = AutoModelForImageClassification.from_pretrained(name)
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError as error:
        raise CLIError(f"cannot load checkpoint {name!r}: {str(error).splitlines()[0]}") from error
    return model.to(device), processor


def make_batches(data, processor, model, image_column, label_column, batch_size) -> list[dict]:
    labels = torch.tensor(data[label_column])
    num_labels = model.config.num_labels
    if labels.min() < 0 or labels.max() >= num_labels:
        raise CLIError(
            f"the model has {num_labels} labels but column {label_column!r} holds values in "
            f"[{labels.min().item()}, {labels.max().item()}]: a checkpoint for another dataset, or the wrong column?"
        )
    rgb = getattr(model.config, "num_channels", 3) == 3
    batches = []
    for start in range(0, len(data), batch_size):
        images = data[start : start + batch_size][image_column]
        if rgb:  # grayscale datasets (MNIST, digits) fed to RGB checkpoints
            images = [image.convert("RGB") if hasattr(image, "convert") else image for image in images]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        batches.append({"pixel_values": pixels, "labels": labels[start : start + batch_size]})
    return batches


@torch.no_grad()
def accuracy(model, batches, device) -> float:
    training = model.training
    model.eval()
    correct = sum(
        (model(pixel_values=b["pixel_values"].to(device)).logits.argmax(-1).cpu() == b["labels"]).sum().item()
        for b in batches
    )
    model.train(training)
    return correct / sum(len(b["labels"]) for b in batches)


def measure(args, name: str, device: str, data, image_column: str, label_column: str) -> dict:
    start = time.perf_counter()
    model, processor = load_checkpoint(name, device)
    batches = make_batches(data, processor, model, image_column, label_column, args.batch_size)
    m = args.m or args.batch_size
    spectrum = hessian_eigenvalues(
        model,
        batches,
        top_k=args.top_k,
        max_iter=max(args.max_iter, args.top_k),
        seed=args.seed,
        progress=args.progress,
    )
    sharp = m_sharpness(
        model, batches, m=m, rho=args.rho, ascent_steps=args.ascent_steps, progress=args.progress
    )
    return {
        "model": name,
        "examples": len(data),
        "loss": sharp.loss,
        "accuracy": accuracy(model, batches, device),
        "eigenvalues": spectrum.eigenvalues,
        "lambda_max": spectrum.lambda_max,
        "lambda_max_over_lambda_k": spectrum.ratio,
        "lanczos_converged": spectrum.converged,
        "m_sharpness": sharp.value,
        "m_sharpness_std": sharp.std,
        "m": m,
        "rho": args.rho,
        "ascent_steps": args.ascent_steps,
        "seconds": time.perf_counter() - start,
    }


def format_table(results: list[dict], top_k: int) -> str:
    first = results[0]
    rows = [
        ("loss", [f"{r['loss']:.4f}" for r in results]),
        ("accuracy", [f"{r['accuracy']:.4f}" for r in results]),
        ("λmax", [f"{r['lambda_max']:.4g}" for r in results]),
    ]
    if top_k > 1:
        rows.append((f"λ{top_k}", [f"{r['eigenvalues'][-1]:.4g}" for r in results]))
        rows.append((f"λmax/λ{top_k}", [_fmt(r["lambda_max_over_lambda_k"]) for r in results]))
    label = f"m-sharpness (m={first['m']}, ρ={first['rho']:g}, {first['ascent_steps']} step(s))"
    rows.append((label, [f"{r['m_sharpness']:.4g} ± {r['m_sharpness_std']:.2g}" for r in results]))
    rows.append(("seconds", [f"{r['seconds']:.1f}" for r in results]))
    header = ["metric"] + column_names([r["model"] for r in results])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([name, *values]) + " |" for name, values in rows]
    notes = f"\n\n{first['examples']} examples; λmax/λk is NaN when λk ≤ 0."
    unconverged = [name for name, r in zip(header[1:], results, strict=True) if not r["lanczos_converged"]]
    if unconverged:
        notes += (
            f"\nLanczos did not converge for {', '.join(unconverged)}: the eigenvalues are lower bounds; raise "
            "--max-iter."
        )
    return "\n".join(lines) + notes


def column_names(models: list[str]) -> list[str]:
    """The table's headers: each checkpoint's last path component (`runs/sam/` -> `sam`), or its whole name where
    two would read the same."""
    short = [os.path.basename(os.path.normpath(m)) or m for m in models]
    return short if len(set(short)) == len(short) else list(models)


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3g}"


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the "Loading weights" bars would bury the measurements' own
    try:
        for flag, value in (("--num-examples", args.num_examples), ("--batch-size", args.batch_size)):
            if value < 1:
                raise CLIError(f"{flag} must be >= 1, got {value}.")
        for name in args.model:
            check_checkpoint(name)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        data = load_examples(args.dataset, args.split, args.num_examples, args.seed)
        image_column, label_column = resolve_columns(data, args.image_column, args.label_column)
        results = [measure(args, name, device, data, image_column, label_column) for name in args.model]
    except (CLIError, ValueError) as error:
        print(f"sharpness_cli: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(results, indent=2) if args.json else format_table(results, args.top_k))
    return results


if __name__ == "__main__":
    main()
