"""Local stand-ins for Hub checkpoints and datasets, and a handle on recipes/finetune.py (not a package)."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import timm
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from hf_sam.finetune.data import DatasetSpec
from hf_sam.finetune.models import save_timm_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_finetune():
    """recipes/finetune.py as a module (imported once)."""
    if "finetune" not in sys.modules:
        path = os.path.join(REPO, "recipes", "finetune.py")
        spec = importlib.util.spec_from_file_location("finetune", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["finetune"] = module
        spec.loader.exec_module(module)
    return sys.modules["finetune"]


def tiny_timm_checkpoint(folder: str, num_classes: int = 7, size: int = 32, seed: int = 0) -> str:
    """timm's test_efficientnet (BatchNormAct2d layers) in the Hub's timm layout, preprocessing at `size` px."""
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=num_classes)
    with torch.no_grad():  # non-trivial BN statistics, so "frozen" and "updated" differ visibly
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    save_timm_checkpoint(
        model, folder, input_size=(3, size, size), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    return folder


def tiny_vit_checkpoint(folder: str, num_classes: int = 7, size: int = 32) -> str:
    """A transformers ViT built from config, saved with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=size, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=num_classes)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


_MODES = ("RGB", "L", "RGBA", "P", "CMYK")  # the modes that occur in the Hub datasets


def fake_image(i: int, rng: np.random.Generator) -> Image.Image:
    """A small random image; the mode cycles through _MODES, sizes vary (non-square too)."""
    h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    mode = _MODES[i % len(_MODES)]
    if mode == "P":
        image = image.convert("P")
        image.info["transparency"] = 0
        return image
    return image.convert(mode)


def fixture_for_spec(spec: DatasetSpec, folder: str, per_split: int = 4) -> str:
    """A `save_to_disk` copy with the Hub dataset's split names, columns and label feature (few images)."""
    rng = np.random.default_rng(0)
    names = [spec.first_label or "class_0"] + [f"class_{i}" for i in range(1, spec.num_classes)]
    extra = {  # other columns the Hub datasets carry, so that column handling meets them too
        "cifar100": {"coarse_label": ClassLabel(num_classes=20)},
        "oxford_pets": {"image_id": Value("string"), "label_cat_dog": ClassLabel(names=["cat", "dog"])},
        "fgvc_aircraft": {"family": ClassLabel(num_classes=70), "manufacturer": ClassLabel(num_classes=30)},
    }.get(spec.name, {})
    features = Features(
        {spec.image_column: ImageFeature(), spec.label_column: ClassLabel(names=names), **extra}
    )
    splits = {}
    for split in {*spec.train_split.split("+"), *spec.test_split.split("+")}:
        rows = {spec.image_column: [fake_image(i, rng) for i in range(per_split)],
                spec.label_column: [i % spec.num_classes for i in range(per_split)]}  # fmt: skip
        for column, feature in extra.items():
            rows[column] = [
                str(i) if isinstance(feature, Value) else i % feature.num_classes for i in range(per_split)
            ]
        splits[split] = Dataset.from_dict(rows, features=features)
    DatasetDict(splits).save_to_disk(folder)
    return folder


# The image sizes (width, height) of the real datasets, as their files come (hub-ids.md, the dataset papers):
# CIFAR is 32x32 PNG; the others are JPEG photographs of a few hundred pixels a side, landscape and portrait.
REAL_IMAGE_SIZES = {
    "cifar10": [(32, 32)],
    "cifar100": [(32, 32)],
    "oxford_pets": [(500, 375), (375, 500)],
    "flowers102": [(500, 667), (754, 500)],
    "stanford_cars": [(640, 480), (1024, 683)],
    "food101": [(512, 512), (512, 384)],
    "fgvc_aircraft": [(1024, 683), (800, 533)],  # photographs of about a megapixel, landscape
    "imagenet": [(500, 375), (375, 500)],  # ILSVRC JPEGs, typically a few hundred pixels a side
}


def real_size_fixture_for_spec(spec: DatasetSpec, folder: str, per_split: int = 2) -> str:
    """Like `fixture_for_spec`, with the real dataset's image sizes and encoding (PNG for CIFAR, JPEG else)."""
    import io

    rng = np.random.default_rng(0)
    sizes = REAL_IMAGE_SIZES[spec.name]
    fixture_for_spec(spec, folder, per_split=per_split)  # columns, label feature, extra columns, split names
    from datasets import load_from_disk

    saved = load_from_disk(folder)
    out = {}
    for split, ds in saved.items():
        images = []
        for i in range(len(ds)):
            width, height = sizes[i % len(sizes)]
            # Smooth content (JPEG-like statistics) rather than noise: a gradient plus a few blobs.
            y, x = np.mgrid[0:height, 0:width]
            base = np.stack(
                [(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], -1
            )
            image = Image.fromarray(
                (base + rng.integers(0, 30, (height, width, 3))).clip(0, 255).astype(np.uint8)
            )
            buffer = io.BytesIO()
            image.save(buffer, format="PNG" if spec.name.startswith("cifar") else "JPEG", quality=90)
            images.append({"bytes": buffer.getvalue(), "path": None})
        rows = ds.to_dict()
        rows[spec.image_column] = images
        out[split] = Dataset.from_dict(rows, features=ds.features)
    import shutil

    shutil.rmtree(folder)
    DatasetDict(out).save_to_disk(folder)
    return folder


def real_architecture_checkpoint(hub_id: str, folder: str) -> str:
    """The Hub checkpoint's architecture and preprocessing (timm's registry entry for `timm/<name>`: input
    size, crop, interpolation, mean/std, number of classes), randomly initialised, in the Hub's timm layout."""
    name = hub_id.removeprefix("timm/")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    save_timm_checkpoint(model, folder)
    return folder
