"""Dataset specs, lazy RGB transforms with the checkpoint's preprocessing, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from finetune_helpers import fake_image, fixture_for_spec, tiny_timm_checkpoint, tiny_vit_checkpoint
from PIL import Image
from transformers import AutoImageProcessor

from hf_sam.data import (
    SPECS,
    TRAIN_AUGMENTATIONS,
    DataError,
    collate,
    load_image_classification,
    preprocessing_from_processor,
    resolve_spec,
    set_transforms,
    to_rgb,
    train_augmentation,
)


def test_specs_hold_the_hub_facts():
    """The traps listed in shared/hub-ids.md, kept in one place."""
    assert (SPECS["cifar10"].image_column, SPECS["cifar100"].label_column) == ("img", "fine_label")
    assert SPECS["food101"].test_split == "validation"
    assert SPECS["fgvc_aircraft"].label_column == "variant"
    assert SPECS["stanford_cars"].data_files == {
        "train": "data/train-*.parquet",
        "test": "data/test-*.parquet",
    }
    assert SPECS["flowers102"].hub_id == "dpdl-benchmark/oxford_flowers102"
    assert {s.num_classes for s in SPECS.values()} == {10, 100, 101, 37, 102, 196}


def test_digits_builtin():
    data = load_image_classification(SPECS["digits"])
    assert (len(data.train), len(data.test), data.label_names) == (1433, 364, [str(d) for d in range(10)])
    test_counts = np.bincount(data.test["label"], minlength=10)
    assert test_counts.min() >= 35 and test_counts.max() <= 37  # stratified: a fifth of each class
    with Image.open(__import__("io").BytesIO(data.train[0]["image"]["bytes"])) as image:
        assert (image.mode, image.size) == ("L", (8, 8))


def test_label_subset_relabels_in_given_order():
    data = load_image_classification(SPECS["digits"], label_subset=["7", "2"])
    assert data.label_names == ["7", "2"] and set(data.train["label"]) == {0, 1}
    assert len(data.test) == 36 + 36  # a fifth of the 179 sevens and of the 177 twos, rounded up


def test_local_folder_and_unknown_names(tmp_path):
    folder = fixture_for_spec(SPECS["oxford_pets"], str(tmp_path / "pets"))
    spec = resolve_spec(folder)
    data = load_image_classification(spec)
    assert data.label_names[0] == "abyssinian" and len(data.train) == 4
    with pytest.raises(DataError, match="unknown dataset 'pets'.*cifar10"):
        resolve_spec("pets")
    with pytest.raises(DataError, match="split 'val' not found in .*; splits are"):
        load_image_classification(resolve_spec(folder, test_split="val"))
    with pytest.raises(
        DataError, match="label column 'labels' not found .*columns are image, label, image_id, label_cat_dog"
    ):
        load_image_classification(resolve_spec(folder, label_column="labels"))
    with pytest.raises(DataError, match="column 'image_id' .* not images"):
        load_image_classification(resolve_spec(folder, image_column="image_id"))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "RGB"])
def test_to_rgb(mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (5, 6, 3), dtype=np.uint8)).convert(
        mode if mode != "I;16" else "L"
    )
    if mode == "I;16":
        image = image.convert("I;16")
    assert to_rgb(image).mode == "RGB" and to_rgb(image).size == (6, 5)


def test_eval_transform_is_the_checkpoints_own(tmp_path):
    rng = np.random.default_rng(0)
    images = [fake_image(0, rng) for _ in range(3)]
    for ckpt in (tiny_vit_checkpoint(str(tmp_path / "vit")), tiny_timm_checkpoint(str(tmp_path / "timm"))):
        processor = AutoImageProcessor.from_pretrained(ckpt)
        pre = preprocessing_from_processor(processor)
        assert pre.size == (32, 32)
        torch.testing.assert_close(pre.eval(images), processor(images, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("name", TRAIN_AUGMENTATIONS)
def test_train_augmentations_give_model_sized_tensors(tmp_path, name):
    pre = preprocessing_from_processor(
        AutoImageProcessor.from_pretrained(tiny_timm_checkpoint(str(tmp_path / "t")))
    )
    rng = np.random.default_rng(0)
    out = train_augmentation(name, pre)([to_rgb(fake_image(i, rng)) for i in range(5)])
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    with pytest.raises(DataError, match="choose one of"):
        train_augmentation("mixup", pre)


def test_lazy_transform_and_collator_on_every_image_mode(tmp_path):
    spec = SPECS["cifar100"]
    data = load_image_classification(
        spec, local_path=fixture_for_spec(spec, str(tmp_path / "c"), per_split=5)
    )
    pre = preprocessing_from_processor(
        AutoImageProcessor.from_pretrained(tiny_timm_checkpoint(str(tmp_path / "t")))
    )
    set_transforms(data, pre, "autoaugment")
    batch = collate([data.train[i] for i in range(5)])  # RGB, L, RGBA, P with transparency, CMYK
    assert batch["pixel_values"].shape == (5, 3, 32, 32) and batch["labels"].tolist() == [0, 1, 2, 3, 4]
    assert set(data.test[0]) == {"pixel_values", "labels"}  # decoded on access, other columns not touched


def test_first_label_pins_the_order(tmp_path):
    spec = SPECS["flowers102"]
    folder = fixture_for_spec(spec.__class__(**{**spec.__dict__, "first_label": "1"}), str(tmp_path / "f"))
    with pytest.raises(DataError, match="class 0 is '1', expected 'pink primrose'"):
        load_image_classification(spec, local_path=folder)
