"""Dataset specs, lazy RGB transforms with the checkpoint's preprocessing, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from finetune_helpers import fake_image, fixture_for_spec, tiny_timm_checkpoint, tiny_vit_checkpoint
from PIL import Image
from transformers import AutoImageProcessor

from hf_sam.finetune.data import (
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
    assert {s.num_classes for s in SPECS.values()} == {10, 100, 101, 37, 102, 196, 1000}
    # FGVC Aircraft: trainval / test, 100 variants, and its non-commercial terms (the card repeats them)
    aircraft = SPECS["fgvc_aircraft"]
    assert (aircraft.train_split, aircraft.test_split, aircraft.num_classes) == (
        "train+validation",
        "test",
        100,
    )
    assert "non-commercial research" in aircraft.terms


def test_imagenet_spec_takes_your_copy(tmp_path):
    """ImageNet-1k is gated and no Hub copy is recorded: the spec names none, and says to set dataset_path; given a
    local copy with `train` / `validation`, it loads 1000 classes and evaluates on `validation`."""
    spec = SPECS["imagenet"]
    assert (spec.hub_id, spec.test_split, spec.num_classes) == (None, "validation", 1000)
    assert "non-commercial research and educational" in spec.terms
    with pytest.raises(
        DataError, match="dataset 'imagenet' has no Hub id: set `dataset_path` to a local copy"
    ):
        load_image_classification(spec)
    folder = fixture_for_spec(spec, str(tmp_path / "imagenet"), per_split=2)
    data = load_image_classification(spec, local_path=folder)
    assert len(data.label_names) == 1000 and (len(data.train), len(data.test)) == (2, 2)
    assert data.source == folder  # no revision for a local copy


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


# ---------------------------------------------------------------------- the released code's augmentations
def _timm_preprocessing(tmp_path, size=32, crop_pct=0.875):
    """A timm checkpoint whose eval transform crops (crop_pct < 1), bicubic, non-trivial mean/std."""
    import timm

    from hf_sam.finetune.models import save_timm_checkpoint

    folder = str(tmp_path / f"timm_{size}_{crop_pct}")
    save_timm_checkpoint(timm.create_model("test_efficientnet", pretrained=False), folder,
                         input_size=(3, size, size), crop_pct=crop_pct, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3),
                         interpolation="bicubic")  # fmt: skip
    return preprocessing_from_processor(AutoImageProcessor.from_pretrained(folder))


def _reference_normalise(image: Image.Image, size, mean, std) -> torch.Tensor:
    """PIL resize of the whole image (bicubic) + normalisation, written out with numpy."""
    array = np.asarray(image.resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32) / 255.0
    array = (array - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def test_pad_and_random_crop_is_a_reflect_padded_crop():
    from hf_sam.finetune.data import PadAndRandomCrop

    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        top, left = (int(torch.randint(0, 9, ()).item()) for _ in range(2))
        padded = np.pad(array, ((4, 4), (4, 4), (0, 0)), mode="reflect")  # tf.pad(mode="REFLECT")
        torch.manual_seed(seed)
        out = np.asarray(PadAndRandomCrop(4)(Image.fromarray(array)))
        np.testing.assert_array_equal(out, padded[top : top + 32, left : left + 32])
        seen.add((top, left))
    assert len(seen) > 10  # offsets really vary over 0..8


def test_cifar_autoaugment_is_policy_then_flip_and_crop_then_whole_image_resize(tmp_path, monkeypatch):
    """The released CIFAR pipeline: AutoAugment on the 32x32 image, flip, pad 4 + crop, then the whole image
    resized (no centre crop) with the checkpoint's resolution, interpolation and mean/std."""
    from torchvision import transforms as T

    pre = _timm_preprocessing(tmp_path, size=64, crop_pct=0.875)
    assert (pre.size, pre.interpolation, pre.mean) == ((64, 64), "bicubic", (0.4, 0.5, 0.6))
    seen_sizes = []

    class RecordingPolicy:  # stands for AutoAugment: records what it is applied to, changes nothing
        def __init__(self, policy):
            assert policy == T.AutoAugmentPolicy.CIFAR10

        def __call__(self, image):
            seen_sizes.append(image.size)
            return image

    monkeypatch.setattr(T, "AutoAugment", RecordingPolicy)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    augment = train_augmentation("cifar-autoaugment", pre)
    for seed in range(6):
        torch.manual_seed(seed)  # the draws, in the pipeline's order: flip, then the crop offsets
        flip = bool(torch.rand(1) < 0.5)
        top, left = (int(torch.randint(0, 9, ()).item()) for _ in range(2))
        array = np.asarray(image)[:, ::-1] if flip else np.asarray(image)
        crop = np.pad(array, ((4, 4), (4, 4), (0, 0)), mode="reflect")[top : top + 32, left : left + 32]
        expected = _reference_normalise(
            Image.fromarray(np.ascontiguousarray(crop)), (64, 64), pre.mean, pre.std
        )
        torch.manual_seed(seed)
        torch.testing.assert_close(augment([image])[0], expected, atol=2e-2, rtol=0)
    assert seen_sizes == [(32, 32)] * 6


def test_full_resize_evaluates_the_whole_image(tmp_path):
    from hf_sam.finetune.data import full_resize

    pre = _timm_preprocessing(tmp_path, size=64, crop_pct=0.875)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    expected = _reference_normalise(image, (64, 64), pre.mean, pre.std)
    torch.testing.assert_close(full_resize(pre)([image])[0], expected, atol=2e-2, rtol=0)
    assert not torch.allclose(
        pre.eval([image])[0], expected, atol=2e-2
    )  # the checkpoint's centre crop differs


def test_random_resized_crop_takes_the_checkpoint_resolution_and_varies(tmp_path):
    pre = _timm_preprocessing(tmp_path, size=48, crop_pct=0.9)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    augment = train_augmentation("random-resized-crop", pre)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(augment([image])[0])
    assert (
        outs[0].shape == (3, 48, 48) and torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    )


def test_random_resized_crop_takes_its_smallest_area(tmp_path):
    """`crop_min_area`: the smallest share of the image a training crop keeps (torchvision's default 0.08; the ViT
    code's inception crop, area_range=(0.05, 1.0), is 0.05); anything outside (0, 1] is refused."""
    from hf_sam.finetune.data import DataError, random_resized_crop

    pre = _timm_preprocessing(tmp_path, size=48, crop_pct=0.9)
    assert random_resized_crop(pre).transforms[0].scale == (0.08, 1.0)
    assert random_resized_crop(pre, 0.05).transforms[0].scale == (0.05, 1.0)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    torch.manual_seed(0)
    assert train_augmentation("random-resized-crop", pre, crop_min_area=0.05)([image])[0].shape == (3, 48, 48)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(DataError, match="crop_min_area must be in \\(0, 1\\]"):
            random_resized_crop(pre, bad)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    """Each example's random augmentation depends on (seed, epoch, index) only: not on the order or batch it is
    read in, not on the global RNG (which it leaves untouched), and it changes with the epoch and the seed."""
    from hf_sam.finetune.data import INDEX_COLUMN

    spec = SPECS["cifar10"]
    folder = fixture_for_spec(spec, str(tmp_path / "c"), per_split=6)
    pre = _timm_preprocessing(tmp_path)

    def loaded(seed):
        data = load_image_classification(spec, local_path=folder)
        return data, set_transforms(data, pre, "cifar-autoaugment", seed=seed, eval_resize="full")

    data, transform = loaded(seed=5)
    assert INDEX_COLUMN in data.train.column_names
    state = torch.get_rng_state()
    one_by_one = [data.train[i]["pixel_values"] for i in range(6)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither read nor advanced
    torch.manual_seed(123)  # a different global state changes nothing
    reversed_batch = data.train[[5, 4, 3, 2, 1, 0]]["pixel_values"]
    assert all(torch.equal(a, b) for a, b in zip(one_by_one, reversed_batch[::-1]))
    assert len({tuple(x.flatten()[:50].tolist()) for x in one_by_one}) == 6
    transform.epoch = 1
    assert not any(torch.equal(data.train[i]["pixel_values"], one_by_one[i]) for i in range(6))
    other, _ = loaded(seed=6)
    assert not torch.equal(other.train[0]["pixel_values"], one_by_one[0])
    assert set(data.test[0]) == {"pixel_values", "labels"} and INDEX_COLUMN not in data.test.column_names


def test_dataloader_workers_see_the_epoch_set_before_the_iterator(tmp_path):
    """With dataloader workers (the recipes use 8), an example decoded in a worker gets the same augmentation as in
    the main process, for the epoch set before the epoch's iterator is created (what AugmentationEpochCallback
    does: the Trainer calls on_epoch_begin before iter(dataloader))."""
    from torch.utils.data import DataLoader

    spec = SPECS["cifar10"]
    data = load_image_classification(
        spec, local_path=fixture_for_spec(spec, str(tmp_path / "c"), per_split=4)
    )
    transform = set_transforms(data, _timm_preprocessing(tmp_path), "random-resized-crop", seed=3)
    for epoch in (0, 2):
        transform.epoch = epoch
        expected = [data.train[i]["pixel_values"] for i in range(4)]
        loader = DataLoader(data.train, batch_size=2, num_workers=2, collate_fn=collate)
        got = torch.cat([batch["pixel_values"] for batch in loader])
        assert torch.equal(got, torch.stack(expected)), epoch
