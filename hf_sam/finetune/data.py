"""Image-classification data for the finetuning recipes: dataset specs, lazy transforms, collator.

Everything the recipes know about a Hub dataset (id, revision, splits, columns, classes) lives in `SPECS`
below, and only here. Facts from `shared/hub-ids.md` (read from the dataset cards). Any other Hub dataset id,
or a local folder (`save_to_disk` output, parquet files, or an `imagefolder` tree), works too when the
recipe names its columns and splits.

Images are never decoded up front: the image column is cast to `Image(decode=False)` and each batch is
decoded, converted to RGB and transformed on access (`with_transform`), so a 100k-image dataset costs no
preprocessing pass and no disk cache. Unreadable images: with `verify_images` (the default) every image is
opened once before training (header check, no full decode) and the first unreadable one fails the run with
its split and index; an image that passes that check but fails to decode later stops training with the
decoding error.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_dataset, load_from_disk
from PIL import Image
from transformers import TrainerCallback

from hf_sam.finetune.hub import load_failure, missing_local_path

TRAIN_AUGMENTATIONS = (
    "none",
    "random-resized-crop",
    "cifar-autoaugment",
    "autoaugment",
    "randaugment",
    "trivialaugment",
)
EVAL_RESIZES = ("checkpoint", "full")
INDEX_COLUMN = "__example_index__"  # added to the train split when its augmentation is random


class DataError(ValueError):
    """A problem with the dataset named by the recipe; the message says what to change."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how to read it.

    `test_split` is the split evaluated at the end (Food-101 calls its official test set `validation`).
    `train_split` may join splits with `+` (datasets' split syntax). `data_files` restricts what is
    downloaded (Stanford Cars ships seven corruption splits next to train/test). `first_label` pins the class
    order (the ClassLabel's names are the labels; the first one catches a re-ordered copy).
    """

    name: str
    hub_id: str | None
    image_column: str
    label_column: str
    num_classes: int
    train_split: str = "train"
    test_split: str = "test"
    revision: str | None = None
    config_name: str | None = None
    data_files: dict[str, str] | None = None
    first_label: str | None = None
    title: str | None = None  # the dataset's usual name, for model card titles
    terms: str | None = (
        None  # the dataset's licence / terms of use, as its card states them (model cards repeat it)
    )
    local_path: str | None = None  # a local folder given as `dataset` (then hub_id is None)
    # The Hub id of the data a spec without a loadable `hub_id` describes (ImageNet: gated, read from your copy):
    # what a model card names as its dataset (`datasets:`, the model-index's `dataset.type`), never loaded.
    card_id: str | None = None
    builder: Callable[[], DatasetDict] | None = field(default=None, compare=False)


@functools.lru_cache(maxsize=1)  # built once per process (in memory, ~0.3 MB), shared by both splits
def digits_dataset() -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as grayscale PIL images.

    The only real images available offline; used by `make demo`. Fixed, stratified split: every fifth image
    *of each class* is test (364 test / 1,433 train). (The raw order cycles through 0..9, so "every fifth
    image" alone would put almost only 0s and 5s in the test set.)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "The `digits` dataset comes from scikit-learn: `pip install 'hf-sam[demo]'` (or scikit-learn)."
        ) from None

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    features = Features({"image": datasets.Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    rank_in_class = np.zeros(len(pixels), dtype=int)
    for digit in range(10):
        members = np.flatnonzero(digits.target == digit)
        rank_in_class[members] = np.arange(len(members))
    is_test = rank_in_class % 5 == 0

    def split(mask: np.ndarray) -> Dataset:
        images = [Image.fromarray(p, mode="L") for p in pixels[mask]]
        return Dataset.from_dict({"image": images, "label": digits.target[mask].tolist()}, features=features)

    return DatasetDict(train=split(~is_test), test=split(is_test))


# fmt: off
SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in [
    DatasetSpec("cifar10", "uoft-cs/cifar10", image_column="img", label_column="label", num_classes=10,
                first_label="airplane", title="CIFAR-10"),
    DatasetSpec("cifar100", "uoft-cs/cifar100", image_column="img", label_column="fine_label",
                num_classes=100, first_label="apple", title="CIFAR-100"),
    # The official Food-101 test set is the split named `validation`.
    DatasetSpec("food101", "ethz/food101", image_column="image", label_column="label", num_classes=101,
                test_split="validation", first_label="apple_pie", title="Food-101"),
    # Pets' `train` is the official trainval list (3,680); the standard label order (0 = abyssinian).
    DatasetSpec("oxford_pets", "timm/oxford-iiit-pet", image_column="image", label_column="label",
                num_classes=37, first_label="abyssinian", title="Oxford-IIIT Pets",
                terms="CC BY-SA 4.0 (the dataset card's licence)"),
    # Standard transfer protocol: train on train+validation (2 x 1,020), test on test (6,149). Official
    # category order (0 = pink primrose); avoid `nelorth/oxford-flowers`, whose names are string-sorted.
    DatasetSpec("flowers102", "dpdl-benchmark/oxford_flowers102", image_column="image", label_column="label",
                num_classes=102, train_split="train+validation", first_label="pink primrose",
                title="Oxford Flowers-102"),
    # Only train/test are downloaded (the repo also holds 7 corruption splits of 8,041 images each).
    DatasetSpec("stanford_cars", "tanganke/stanford_cars", image_column="image", label_column="label",
                num_classes=196, revision="9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40",
                data_files={"train": "data/train-*.parquet", "test": "data/test-*.parquet"},
                first_label="AM General Hummer SUV 2000", title="Stanford Cars",
                terms="for non-commercial research purposes only (the Stanford Cars terms of use); a model trained "
                      "on it is subject to them"),
    # Labels are the 100 variants (there is no `label` column); trainval (train + validation, 3,334 + 3,333) / test
    # (3,333). The split names and counts were read from the viewer, not the card (hub-ids.md: confidence M).
    DatasetSpec("fgvc_aircraft", "dpdl-benchmark/fgvc_aircraft", image_column="image", label_column="variant",
                num_classes=100, train_split="train+validation", first_label="707-320", title="FGVC-Aircraft",
                terms="for non-commercial research purposes only (the FGVC-Aircraft terms of use; its images come "
                      "from airliners.net photographers); a model trained on it is subject to them"),
    # ImageNet-1k (ILSVRC 2012): gated on the Hub, and no Hub copy of it is recorded here (shared/hub-ids.md), so the
    # spec names none: supply your copy with `dataset_path` (save_to_disk folder, parquet files or an imagefolder
    # tree with `train` and `validation` splits), its labels in the standard class order (that of an ImageNet
    # checkpoint's head; `head_init: checkpoint` keeps that head). The 50,000 `validation` images are the test set of
    # the paper's table 3.
    DatasetSpec("imagenet", None, image_column="image", label_column="label", num_classes=1000,
                test_split="validation", title="ImageNet-1k", card_id="ILSVRC/imagenet-1k",
                terms="for non-commercial research and educational purposes only (the ImageNet terms of access); a "
                      "model trained on it is subject to them"),
    DatasetSpec("digits", None, image_column="image", label_column="label", num_classes=10, first_label="0",
                title="scikit-learn digits", builder=digits_dataset),
]}
# fmt: on

# Hub specs without a pinned `revision`, and why. A pin must be a full 40-hex commit: the Hub does not resolve a
# short one (transformers#13264), and no full hash of these repos could be read offline (../shared/hub-ids.md has
# only the short ids of their parquet-conversion commits). Pin one with `dataset_revision: <commit>` in a recipe;
# the model card then records it (model-index `dataset.revision`).
UNPINNED_REVISIONS: dict[str, str] = {
    "cifar10": "full hash unknown offline (parquet conversion: commit 0b27149...)",
    "cifar100": "full hash unknown offline (parquet conversion: commit aadb3af...)",
    "food101": "full hash unknown offline (parquet conversion: commit 1ac27ab...)",
    "oxford_pets": "no commit of the repo known offline",
    "flowers102": "full hash unknown offline (README at commit 544b55c...)",
    "fgvc_aircraft": "no commit of the repo known offline",
}


@dataclass
class ImageClassificationData:
    train: Dataset  # image column not decoded yet (see `set_transforms`)
    test: Dataset
    label_names: list[str]
    image_column: str
    label_column: str
    source: str  # what was loaded, for the model card ("uoft-cs/cifar10@<rev>", a local path...)


# ---------------------------------------------------------------------- loading
def resolve_spec(
    dataset: str,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str | None = None,
    test_split: str | None = None,
    revision: str | None = None,
    config_name: str | None = None,
) -> DatasetSpec:
    """The spec for a dataset name, Hub id or local path, with the recipe's overrides applied.

    Pure (no file or Hub access beyond `os.path.exists`), so recipes can be validated before loading anything.
    """
    if dataset in SPECS:
        base = SPECS[dataset]
    elif os.path.exists(dataset) or "/" in dataset:
        # A local folder or another Hub dataset: columns default to the usual `image` / `label`.
        is_local = os.path.exists(dataset)
        base = DatasetSpec(
            name=os.path.basename(os.path.normpath(dataset)),
            hub_id=None if is_local else dataset,
            local_path=dataset if is_local else None,
            image_column="image",
            label_column="label",
            num_classes=0,  # unknown: taken from the data
        )
    else:
        raise DataError(
            f"unknown dataset {dataset!r}: use one of {', '.join(sorted(SPECS))}, a Hub dataset id "
            "(owner/name) or a local folder."
        )
    overrides = {
        "image_column": image_column,
        "label_column": label_column,
        "train_split": train_split,
        "test_split": test_split,
        "revision": revision,
        "config_name": config_name,
    }
    values = {k: v for k, v in overrides.items() if v is not None}
    return DatasetSpec(**{**base.__dict__, **values})


def load_image_classification(
    spec: DatasetSpec,
    local_path: str | None = None,
    num_labels: int | None = None,
    label_subset: Sequence[str] | None = None,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    verify_images: bool = True,
) -> ImageClassificationData:
    """Load the train and test splits, check columns and labels, and return them undecoded.

    `local_path` (or a spec without Hub id) reads from disk instead of the Hub. `label_subset` keeps only
    those classes (by name), relabelled 0..k-1 in the given order.
    """
    local_path = local_path or spec.local_path
    source = local_path or spec.hub_id or spec.name
    splits = {
        "train": _load_split(spec, spec.train_split, local_path),
        "test": _load_split(spec, spec.test_split, local_path),
    }
    for role, ds in splits.items():
        for kind, column in (("image", spec.image_column), ("label", spec.label_column)):
            if column not in ds.column_names:
                raise DataError(
                    f"{kind} column {column!r} not found in {source} ({role} split); columns are "
                    f"{', '.join(ds.column_names)}. Set `{kind}_column` to one of them."
                )
        if not isinstance(ds.features[spec.image_column], datasets.Image):
            raise DataError(
                f"column {spec.image_column!r} of {source} holds {ds.features[spec.image_column]}, not images. "
                "Set `image_column` to the column of images."
            )
    label_names, encode = _label_names(splits["train"], spec.label_column, source)
    expected = num_labels or spec.num_classes
    if expected and len(label_names) != expected:
        field_name = "num_labels" if num_labels else f"the {spec.name} spec's num_classes"
        raise DataError(
            f"{source} has {len(label_names)} classes in column {spec.label_column!r}, but {field_name} says "
            f"{expected}. Check `label_column` (and `dataset_revision`), or fix `num_labels`."
        )
    if spec.first_label is not None and label_names[0] != spec.first_label:
        raise DataError(
            f"{source}: class 0 is {label_names[0]!r}, expected {spec.first_label!r} (the label order differs "
            "from the one the spec was written for). Pin `dataset_revision` or use the dataset the spec names."
        )
    if encode is not None:  # string or unnamed labels: map them through the names read above
        splits = {k: _encode_labels(ds, spec.label_column, encode) for k, ds in splits.items()}
    if label_subset:
        splits, label_names = _select_classes(splits, spec.label_column, label_names, label_subset)
    if max_train_samples is not None:
        splits["train"] = splits["train"].select(range(min(max_train_samples, len(splits["train"]))))
    if max_test_samples is not None:
        splits["test"] = splits["test"].select(range(min(max_test_samples, len(splits["test"]))))
    for role, ds in splits.items():
        if len(ds) == 0:
            raise DataError(f"the {role} split of {source} is empty (after label_subset / max_*_samples).")
        where = f"{role} split ({_split_name(spec, role)})"
        check_label_range(ds, spec.label_column, len(label_names), where, source)
        # Decode in our transform, not in `datasets`: we control the RGB conversion and the error message.
        splits[role] = ds.cast_column(spec.image_column, datasets.Image(decode=False))
        if verify_images:
            verify_image_column(splits[role], spec.image_column, f"{role} split ({_split_name(spec, role)})")
    revision = f"@{spec.revision}" if spec.revision and not local_path else ""
    return ImageClassificationData(
        splits["train"], splits["test"], label_names, spec.image_column, spec.label_column, source + revision
    )


def check_source(spec: DatasetSpec, local_path: str | None = None) -> None:
    """A spec with nothing to load from (no Hub id, no builder, no local folder: ImageNet) needs `dataset_path`.
    Pure, so that `--check_config` refuses such a recipe with the launch's own line, before anything loads."""
    if local_path is None and spec.local_path is None and spec.hub_id is None and spec.builder is None:
        raise DataError(f"dataset {spec.name!r} has no Hub id: set `dataset_path` to a local copy.")


def _split_name(spec: DatasetSpec, role: str) -> str:
    return spec.train_split if role == "train" else spec.test_split


def _load_split(spec: DatasetSpec, split: str, local_path: str | None) -> Dataset:
    """One split (`a+b` joins splits) from the Hub, a local folder, or the spec's builder."""
    if local_path is None and spec.builder is not None:
        return _pick_split(spec.builder(), split, spec.name)
    check_source(spec, local_path)
    path = local_path or spec.hub_id
    if os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_dict.json"))
        or os.path.exists(os.path.join(path, "state.json"))
    ):
        try:
            saved = load_from_disk(path)
        except Exception as err:  # OSError, and datasets' IndexError on a split saved with zero rows
            empty = _empty_saved_splits(path)
            why = (
                f"split(s) {', '.join(empty)} saved with no rows" if empty else f"{type(err).__name__}: {err}"
            )
            raise DataError(f"cannot read the dataset saved at {path} ({why}).") from None
        return _pick_split(saved, split, path)
    if os.path.exists(path):
        # parquet files anywhere in the folder, else an imagefolder tree (class = sub-folder name).
        has_parquet = any(f.endswith(".parquet") for _, _, files in os.walk(path) for f in files)
        builder, kwargs = (
            ("parquet", {"data_dir": path}) if has_parquet else ("imagefolder", {"data_dir": path})
        )
        return _call_load_dataset(builder, split, source=path, **kwargs)
    if message := missing_local_path("dataset", path):  # a mistyped folder, not a Hub failure
        raise DataError(message)
    return _call_load_dataset(
        path, split, source=path, name=spec.config_name, revision=spec.revision, data_files=spec.data_files
    )


def _call_load_dataset(path: str, split: str, source: str, **kwargs) -> Dataset:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return load_dataset(path, split=split, **kwargs)
    except ValueError as err:
        if "split" in str(err).lower():  # 'Unknown split "x". Should be one of [...]'
            raise DataError(f"{source}: {err} Set `train_split` / `test_split`.") from None
        raise
    except Exception as err:  # offline, missing repo, gated repo, network: all surface as different types
        raise DataError(load_failure("dataset", source, err)) from None


def _empty_saved_splits(path: str) -> list[str]:
    """Splits of a `save_to_disk` folder that hold no data file (`load_from_disk` cannot read those back)."""
    import json

    try:
        with open(os.path.join(path, "dataset_dict.json")) as f:
            names = json.load(f)["splits"]
        empty = []
        for name in names:
            with open(os.path.join(path, name, "state.json")) as f:
                if not json.load(f).get("_data_files"):
                    empty.append(name)
        return empty
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _pick_split(dataset_dict: DatasetDict, split: str, source: str) -> Dataset:
    parts = split.split("+")
    missing = [p for p in parts if p not in dataset_dict]
    if missing:
        raise DataError(
            f"split {missing[0]!r} not found in {source}; splits are {', '.join(dataset_dict)}. "
            "Set `train_split` / `test_split`."
        )
    if len(parts) == 1:
        return dataset_dict[parts[0]]
    return datasets.concatenate_datasets([dataset_dict[p] for p in parts])


def _label_names(train: Dataset, column: str, source: str) -> tuple[list[str], dict | None]:
    """Class names in label-index order, and a value->index map when the column is not a ClassLabel."""
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), None
    if not (
        isinstance(feature, datasets.Value)
        and feature.dtype in ("string", "large_string")
        or "int" in str(feature)
    ):
        raise DataError(
            f"label column {column!r} of {source} holds {feature}, not class labels. Set `label_column`."
        )
    values = sorted(set(train[column]))  # one column only: cheap
    return [str(v) for v in values], {v: i for i, v in enumerate(values)}


def _encode_labels(ds: Dataset, column: str, mapping: dict) -> Dataset:
    unknown = sorted({v for v in ds[column] if v not in mapping}, key=str)
    if unknown:
        raise DataError(f"label(s) {unknown[:5]} of column {column!r} do not occur in the train split.")
    return _relabel(ds, column, mapping, [str(v) for v in mapping])


def _relabel(ds: Dataset, column: str, mapping: dict, names: list[str]) -> Dataset:
    """Rewrite the label column through `mapping` and give it a ClassLabel with `names`."""
    features = ds.features.copy()
    features[column] = ClassLabel(names=names)
    return ds.map(
        lambda labels: {column: [mapping[y] for y in labels]},
        input_columns=column,
        batched=True,
        features=features,
    )


def _select_classes(splits: dict, column: str, names: list[str], subset: Sequence[str]):
    subset = [str(s) for s in subset]
    unknown = [s for s in subset if s not in names]
    if unknown:
        raise DataError(
            f"label_subset names {unknown} are not classes of the dataset (first classes: {names[:10]})."
        )
    old_to_new = {names.index(s): i for i, s in enumerate(subset)}
    out = {}
    for role, ds in splits.items():
        ds = ds.filter(lambda labels: [y in old_to_new for y in labels], input_columns=column, batched=True)
        out[role] = _relabel(ds, column, old_to_new, subset)
    return out, subset


def check_label_range(ds: Dataset, column: str, num_classes: int, where: str, source: str) -> None:
    """Every label an integer in [0, num_classes): a label out of range would stop training (or evaluation)
    hours in with an indexing error. `datasets`' ClassLabel lets -1 through (its "no label" value)."""
    for index, label in enumerate(ds[column]):  # one column: cheap even for 100k rows
        if (
            isinstance(label, bool)
            or not isinstance(label, (int, np.integer))
            or not 0 <= label < num_classes
        ):
            hint = " (-1 is datasets' 'no label': a split without labels cannot be trained or evaluated on)"
            raise DataError(
                f"label {label!r} of example {index} of the {where} of {source} is out of range: "
                f"{num_classes} classes, so labels 0..{num_classes - 1}{hint if label == -1 else ''}. "
                "Fix or drop those examples, or set `label_column` / `test_split`."
            )


LABEL_NOISE_TYPES = ("symmetric", "pair")


def check_label_noise(fraction: float, kind: str = "symmetric") -> None:
    """`label_noise` is a fraction in [0, 1): the share of the training labels to corrupt; `label_noise_type` says
    how (LABEL_NOISE_TYPES)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise DataError(
            f"label_noise must be a fraction in [0, 1) (the share of training labels replaced by another "
            f"class; 0 = clean labels), got {fraction!r}. Set e.g. `label_noise: 0.4`."
        )
    if kind not in LABEL_NOISE_TYPES:
        raise DataError(
            f"label_noise_type must be 'symmetric' or 'pair', got {kind!r}. 'symmetric': a corrupted label becomes "
            "any other class; 'pair': the next class, c -> c + 1 (Han et al. 2018)."
        )


def noisy_labels(
    labels: torch.Tensor, fraction: float, seed: int, num_classes: int, kind: str
) -> torch.Tensor:
    """`labels` with exactly round(fraction * n) of them, drawn uniformly without replacement, corrupted:

    - "symmetric" (paper, section 3.3; Jiang et al. 2018, up to "other"): replaced by a uniformly drawn *other*
      class, never the true one;
    - "pair" (pair-flip, Han et al. 2018, "Co-teaching"): moved to the next class, c -> (c + 1) mod K. The wrong
      labels agree with each other: a pattern a network learns, not a spread that averages out.

    Deterministic for a seed (a generator of its own, not the global one). experiments/benefit.py draws its pair
    noise here too."""
    generator = torch.Generator().manual_seed(seed)
    noisy = labels.clone()
    flipped = torch.randperm(len(noisy), generator=generator)[: round(fraction * len(noisy))]
    if kind == "pair":
        shift = torch.ones(len(flipped), dtype=noisy.dtype)
    else:  # a shift of 1..K-1 classes: uniform over the other classes
        shift = torch.randint(1, num_classes, (len(flipped),), generator=generator)
    noisy[flipped] = (noisy[flipped] + shift) % num_classes
    return noisy


def add_label_noise(
    ds: Dataset, column: str, fraction: float, seed: int, num_classes: int, kind: str = "symmetric"
) -> Dataset:
    """The train split `ds` with `noisy_labels` in `column` (`kind`: "symmetric" or "pair"); the images and every
    other column untouched. Apply it to the train split only, after class selection."""
    check_label_noise(fraction, kind)
    if fraction == 0:
        return ds
    if num_classes < 2:
        raise DataError(f"label_noise needs at least 2 classes to swap labels between, got {num_classes}.")
    labels = torch.tensor(ds[column], dtype=torch.long)
    noisy = noisy_labels(labels, fraction, seed, num_classes, kind).tolist()
    return ds.map(
        lambda _, indices: {column: [noisy[i] for i in indices]},
        input_columns=column,
        with_indices=True,
        batched=True,
        features=ds.features,
    )


def verify_image_column(ds: Dataset, column: str, where: str) -> None:
    """Open every image once (header + integrity check, no full decode); fail on the first unreadable one."""
    for start in range(0, len(ds), 256):
        batch = ds.select_columns([column])[start : start + 256][column]
        for offset, item in enumerate(batch):
            try:
                with _open(item) as image:
                    image.verify()
            except Exception as err:
                raise DataError(
                    f"image {start + offset} of the {where} cannot be read ({type(err).__name__}: {err}). "
                    "Remove or fix it (e.g. `ds.select(...)` it out), or set `verify_images: false` to skip this check."
                ) from None


def _open(item) -> Image.Image:
    """A PIL image from datasets' undecoded `{"bytes", "path"}` (or an already decoded image)."""
    if isinstance(item, Image.Image):
        return item
    if item.get("bytes") is not None:
        return Image.open(io.BytesIO(item["bytes"]))
    return Image.open(item["path"])


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the checkpoints saw it in pretraining (torchvision / timm loaders: `convert("RGB")`).

    Palette images with a transparent colour go through RGBA first (PIL warns otherwise). Grayscale, CMYK
    and RGBA convert directly (alpha dropped).
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


# ---------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class Preprocessing:
    """The checkpoint's own preprocessing, reduced to what the train augmentations need."""

    eval: Callable[[list[Image.Image]], torch.Tensor]  # PIL images -> (N, C, H, W), resize + centre crop
    size: tuple[int, int]  # (H, W) the model sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str


def preprocessing_from_processor(processor) -> Preprocessing:
    """From a transformers image processor or transformers' `TimmWrapperImageProcessor` (timm data config)."""
    data_config = getattr(processor, "data_config", None)
    if data_config is not None:  # timm: its own eval transform (resize by crop_pct, centre crop, normalise)
        transform = processor.val_transforms

        def evaluate(images):
            return torch.stack([transform(im) for im in images])

        size = tuple(data_config["input_size"][1:])
        return Preprocessing(evaluate, size, tuple(data_config["mean"]), tuple(data_config["std"]),
                             str(data_config.get("interpolation", "bicubic")))  # fmt: skip

    def evaluate(images):
        return processor(images=images, return_tensors="pt")["pixel_values"]

    size = tuple(evaluate([Image.new("RGB", (64, 48))]).shape[-2:])  # whatever resize/crop the processor does
    resample = getattr(processor, "resample", None)
    interpolation = (
        {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(int(resample), "bilinear")
        if resample is not None
        else "bilinear"
    )
    mean = tuple(processor.image_mean) if getattr(processor, "image_mean", None) else (0.0, 0.0, 0.0)
    std = tuple(processor.image_std) if getattr(processor, "image_std", None) else (1.0, 1.0, 1.0)
    return Preprocessing(evaluate, size, mean, std, interpolation)


def full_resize(preprocessing: Preprocessing) -> Callable[[list[Image.Image]], torch.Tensor]:
    """The whole image resized to the model's resolution (no centre crop), then normalised: the released code's
    CIFAR evaluation (and the last step of its CIFAR training pipeline)."""
    from torchvision import transforms as T

    pipeline = T.Compose([
        T.Resize(preprocessing.size, interpolation=T.InterpolationMode(preprocessing.interpolation)),
        T.ToTensor(),
        T.Normalize(preprocessing.mean, preprocessing.std),
    ])  # fmt: skip
    return lambda images: torch.stack([pipeline(im) for im in images])


class PadAndRandomCrop:
    """Section 3.1's basic augmentation: pad by `padding` pixels on each side (reflected, as the released
    code's `tf.pad(..., mode="REFLECT")`), then a random crop back to the image's own size."""

    def __init__(self, padding: int = 4):
        self.padding = padding

    def __call__(self, image: Image.Image) -> Image.Image:
        from torchvision.transforms import functional as F

        width, height = image.size
        padded = F.pad(image, [self.padding] * 4, padding_mode="reflect")
        top = int(torch.randint(0, 2 * self.padding + 1, ()).item())
        left = int(torch.randint(0, 2 * self.padding + 1, ()).item())
        return F.crop(padded, top, left, height, width)


def random_resized_crop(preprocessing: Preprocessing, min_area: float = 0.08):
    """The Inception-style training crop + flip at the checkpoint's resolution, interpolation and mean/std:
    torchvision's `RandomResizedCrop` keeping `min_area`-100% of the image's area (aspect ratio 3/4-4/3, drawn
    log-uniform), then a horizontal flip. `min_area`: torchvision's default 0.08; the released SAM code's crop
    (`min_object_covered=0.1`) keeps >= 10%, the ViT code's (`area_range=(0.05, 1.0)`) >= 5%."""
    from torchvision import transforms as T

    if isinstance(min_area, bool) or not isinstance(min_area, (int, float)) or not 0 < min_area <= 1:
        raise DataError(
            f"crop_min_area must be in (0, 1] (the smallest share of the image's area a training crop keeps), got "
            f"{min_area!r}. Set e.g. `crop_min_area: 0.08` (torchvision's default)."
        )
    return T.Compose([
        # Aspect ratio: TF's sample_distorted_bounding_box draws it uniformly, torchvision log-uniform (docs/recipes.md).
        T.RandomResizedCrop(preprocessing.size, scale=(float(min_area), 1.0), ratio=(3 / 4, 4 / 3),
                            interpolation=T.InterpolationMode(preprocessing.interpolation)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(preprocessing.mean, preprocessing.std),
    ])  # fmt: skip


def train_augmentation(
    name: str, preprocessing: Preprocessing, crop_min_area: float = 0.08
) -> Callable[[list[Image.Image]], torch.Tensor]:
    """The train transform: the eval pipeline (`none`) or one of `TRAIN_AUGMENTATIONS`.

    Resolution, mean/std and interpolation always come from the checkpoint's own preprocessing.

    - `random-resized-crop`: the released code's ImageNet training preprocessing, which the paper's appendix C.2
      applies to the non-CIFAR finetuning datasets: an Inception-style crop resized to the model's resolution,
      and a horizontal flip. The crop is torchvision's `RandomResizedCrop` (area `crop_min_area`-100%, 8-100% by
      default, aspect ratio 3/4-4/3 drawn log-uniform), standing in for the released TF
      `sample_distorted_bounding_box`, whose `min_object_covered=0.1` over the whole image gives an area of 10-100%,
      with the aspect ratio drawn uniformly (`random_resized_crop`).
    - `cifar-autoaugment`: the released code's CIFAR pipeline, on the 32x32 image: AutoAugment (CIFAR policy),
      then the basic augmentation of section 3.1 (horizontal flip, reflect-pad 4 + random crop), then the whole
      image resized to the model's resolution (no centre crop; pair it with `eval_resize: full`). The policy is
      torchvision's CIFAR-10 one, not the released `policy_cifar`: that samples from 95 sub-policies (policies.py,
      exp0s + exp1s + exp2s) with a translate constant of 250 px on the 32-px image; torchvision's has 25
      sub-policies, only 20 of them among the 95, and translates at most 150/331 x 32 = 14.5 px.
    - `autoaugment`, `randaugment`, `trivialaugment`: flip + the torchvision policy at the image's own
      resolution, before the checkpoint's resize + centre crop (not the released code's pipelines).

    Every random draw comes from torch's RNG; `ImageTransform` seeds it per example.
    """
    from torchvision import transforms as T

    if name not in TRAIN_AUGMENTATIONS:
        raise DataError(
            f"unknown train_augmentation {name!r}; choose one of {', '.join(TRAIN_AUGMENTATIONS)}."
        )
    if name == "none":
        return preprocessing.eval
    if name == "random-resized-crop":
        pipeline = random_resized_crop(preprocessing, crop_min_area)
        return lambda images: torch.stack([pipeline(im) for im in images])
    if name == "cifar-autoaugment":
        augment = T.Compose([T.AutoAugment(T.AutoAugmentPolicy.CIFAR10), T.RandomHorizontalFlip(),
                             PadAndRandomCrop(4)])  # fmt: skip
        resize = full_resize(preprocessing)
        return lambda images: resize([augment(im) for im in images])
    policy = {
        "autoaugment": T.AutoAugment(T.AutoAugmentPolicy.CIFAR10),
        "randaugment": T.RandAugment(),
        "trivialaugment": T.TrivialAugmentWide(),
    }[name]
    augment = T.Compose([T.RandomHorizontalFlip(), policy])
    return lambda images: preprocessing.eval([augment(im) for im in images])


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a function of (run seed, epoch, example index) only."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(epoch), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class ImageTransform:
    """The `with_transform` function: undecoded batch -> `pixel_values` + `labels`.

    With a `seed`, each example's random augmentation is a function of (seed, epoch, example index): it runs
    inside `torch.random.fork_rng` with torch's RNG seeded from those three, so it neither reads nor advances
    the global RNG, does not depend on which process or dataloader worker decodes it, or on the batches
    before it, and a resumed run (even from the middle of an epoch) draws exactly what the uninterrupted run
    drew. The index comes from the `INDEX_COLUMN` of the split; `epoch` is set by `AugmentationEpochCallback`
    at the start of each epoch, before the dataloader's workers are started.
    """

    def __init__(self, image_transform, image_column: str, label_column: str, seed: int | None = None):
        self.image_transform, self.image_column, self.label_column = (
            image_transform,
            image_column,
            label_column,
        )
        self.seed = seed
        self.epoch = 0

    def __call__(self, batch: dict) -> dict:
        images = []
        for item in batch[self.image_column]:
            with _open(item) as image:
                image.load()
                images.append(to_rgb(image))
        if self.seed is None:
            pixels = list(self.image_transform(images))
        else:
            pixels = []
            for image, index in zip(images, batch[INDEX_COLUMN], strict=True):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(example_seed(self.seed, self.epoch, index))
                    pixels.append(self.image_transform([image])[0])
        return {"pixel_values": pixels, "labels": list(batch[self.label_column])}


def make_transform(
    image_transform: Callable[[list[Image.Image]], torch.Tensor], image_column: str, label_column: str
) -> ImageTransform:
    """The `with_transform` function of a split without random augmentation."""
    return ImageTransform(image_transform, image_column, label_column)


def set_transforms(
    data: ImageClassificationData,
    preprocessing: Preprocessing,
    augmentation: str,
    seed: int = 0,
    eval_resize: str = "checkpoint",
    crop_min_area: float = 0.08,
) -> ImageTransform:
    """Attach the lazy transforms to both splits and return the train one (its `epoch` is what
    `AugmentationEpochCallback` sets). Train: `augmentation`, seeded per example when random. Test: the
    checkpoint's resize + centre crop (`eval_resize="checkpoint"`) or the whole image resized (`"full"`)."""
    if eval_resize not in EVAL_RESIZES:
        raise DataError(f"unknown eval_resize {eval_resize!r}; choose one of {', '.join(EVAL_RESIZES)}.")
    columns = [data.image_column, data.label_column]
    random = augmentation != "none"
    train_fn = ImageTransform(
        train_augmentation(augmentation, preprocessing, crop_min_area), *columns, seed if random else None
    )
    if random:
        if INDEX_COLUMN not in data.train.column_names:
            data.train = data.train.add_column(INDEX_COLUMN, list(range(len(data.train))))
        columns_train = [*columns, INDEX_COLUMN]
    else:
        columns_train = columns
    data.train = data.train.with_transform(train_fn, columns=columns_train)
    evaluate = preprocessing.eval if eval_resize == "checkpoint" else full_resize(preprocessing)
    data.test = data.test.with_transform(make_transform(evaluate, *columns), columns=columns)
    return train_fn


class AugmentationEpochCallback(TrainerCallback):
    """Tells the train transform which epoch starts (the Trainer calls `on_epoch_begin` before it creates the
    epoch's dataloader iterator, so workers forked for the epoch see it). After a resume, `state.epoch` is the
    restored fractional epoch, whose integer part is the epoch being resumed."""

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.transform.epoch = int(math.floor(state.epoch + 1e-9)) if state.epoch else 0


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack `pixel_values`, tensorise `labels` (what every image-classification model's forward takes)."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }
