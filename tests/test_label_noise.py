"""Symmetric label noise (`label_noise` / `label_noise_seed` of the recipes' data arguments)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value
from finetune_helpers import REPO, load_finetune, tiny_timm_checkpoint

from hf_sam.finetune.cli import parse_config
from hf_sam.finetune.data import SPECS, DataError, add_label_noise, load_image_classification, resolve_spec
from hf_sam.finetune.model_card import write_model_card

finetune = load_finetune()
RECIPE = os.path.join(REPO, "recipes/digits/test_efficientnet/noisy_sam.yaml")


def labelled(labels: list[int], num_classes: int) -> Dataset:
    features = Features(
        {"x": Value("int64"), "label": ClassLabel(names=[str(i) for i in range(num_classes)])}
    )
    return Dataset.from_dict({"x": list(range(len(labels))), "label": labels}, features=features)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.4, 0.999])
def test_exact_fraction_flipped_to_another_class(fraction):
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 5, 723).tolist()
    noisy = add_label_noise(labelled(clean, 5), "label", fraction, seed=3, num_classes=5)
    changed = [i for i, (a, b) in enumerate(zip(clean, noisy["label"])) if a != b]
    # Every corrupted label is wrong (an "other" class), so the changed labels are exactly the corrupted ones.
    assert len(changed) == round(fraction * 723)
    assert noisy["x"] == list(range(723))  # the examples themselves (and their order) are untouched
    assert noisy.features == labelled(clean, 5).features
    assert set(noisy["label"]) <= set(range(5))


def test_replacement_class_is_uniform_over_the_other_classes():
    k, n = 5, 20_000
    clean = [i % k for i in range(n)]
    noisy = add_label_noise(labelled(clean, k), "label", 0.5, seed=0, num_classes=k)["label"]
    shifts = np.array([(b - a) % k for a, b in zip(clean, noisy) if a != b])
    counts = np.bincount(shifts, minlength=k)
    assert counts[0] == 0
    expected = len(shifts) / (k - 1)  # 2,500 each; binomial std ≈ 43: 5 std is a safe bound
    assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected))


def test_deterministic_for_a_seed():
    clean = labelled([i % 10 for i in range(500)], 10)
    a = add_label_noise(clean, "label", 0.4, seed=7, num_classes=10)["label"]
    b = add_label_noise(clean, "label", 0.4, seed=7, num_classes=10)["label"]
    c = add_label_noise(clean, "label", 0.4, seed=8, num_classes=10)["label"]
    assert a == b and a != c


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.4", True])
def test_out_of_range_is_refused(bad):
    clean = labelled([0, 1, 2], 3)
    with pytest.raises(DataError, match=r"label_noise must be a fraction in \[0, 1\)"):
        add_label_noise(clean, "label", bad, seed=0, num_classes=3)


@pytest.mark.parametrize("bad", ["1.0", "-0.2"])
def test_recipe_refuses_out_of_range_before_any_work(bad, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"^finetune.py: error: label_noise must be a fraction in \[0, 1\)"):
        finetune.main(["--config", RECIPE, "--label_noise", bad, "--output_dir", str(out)])
    assert not out.exists()


class _Stop(Exception):
    pass


def data_trained_on(monkeypatch, argv: list[str]):
    """The data `recipes/finetune.py main(argv)` would train on: captured where the transforms are set, then
    stopped (nothing is trained)."""
    seen = {}

    def capture(data, *args):
        seen["data"] = data
        raise _Stop

    monkeypatch.setattr(finetune, "set_transforms", capture)
    with pytest.raises(_Stop):
        finetune.main(argv)
    return seen["data"]


def test_recipe_corrupts_train_split_only(tmp_path, monkeypatch):
    """Through recipes/finetune.py: train labels noisy (after label_subset), test labels as loaded."""
    checkpoint = tiny_timm_checkpoint(str(tmp_path / "ckpt"), num_classes=5)
    argv = ["--config", RECIPE, "--model_name_or_path", checkpoint, "--output_dir", str(tmp_path / "o")]
    data = data_trained_on(monkeypatch, argv + ["--label_noise", "0.25", "--seed", "4"])
    clean = load_image_classification(SPECS["digits"], label_subset=["5", "6", "7", "8", "9"])
    flipped = sum(a != b for a, b in zip(clean.train["label"], data.train["label"]))
    assert len(data.train) == len(clean.train) and flipped == round(0.25 * len(clean.train))
    assert data.test["label"] == clean.test["label"]
    # label_noise_seed, not the run's seed, decides when given
    again = data_trained_on(
        monkeypatch, argv + ["--label_noise", "0.25", "--seed", "5", "--label_noise_seed", "4"]
    )
    assert again.train["label"] == data.train["label"]


def test_model_card_records_label_noise(tmp_path):
    for flags, line in [
        (["--label_noise", "0.4", "--seed", "2"], "- Label noise: 40% of the training labels replaced by "
         "another class (symmetric, seed 2); test labels clean"),
        (["--label_noise", "0"], "- Label noise: none (clean labels)"),
    ]:  # fmt: skip
        args = parse_config(["--config", RECIPE, "--output_dir", str(tmp_path), *flags])
        spec = resolve_spec("digits", None, None, None, None, None, None)
        card = write_model_card(
            args, spec, "digits", 722, 181, list("56789"), {"test_top1": 0.9}, True,
            engine="single process", global_epsilon=False,
        )  # fmt: skip
        assert line in card


def test_pair_noise_moves_exactly_the_fraction_to_the_next_class():
    rng = np.random.default_rng(2)
    clean = rng.integers(0, 5, 715).tolist()
    noisy = add_label_noise(labelled(clean, 5), "label", 0.3, seed=3, num_classes=5, kind="pair")["label"]
    shifts = [(b - a) % 5 for a, b in zip(clean, noisy) if a != b]
    assert len(shifts) == round(0.3 * 715) and set(shifts) == {1}  # c -> c + 1 (mod 5), never elsewhere


def test_pair_noise_is_the_draw_the_published_numbers_were_measured_with():
    """The recipes, the demo and benefit.py all draw pair noise through `noisy_labels`; against the draw written out
    by hand (the demo's and benefit.py's own functions before they shared it: randperm from a generator seeded
    10_000 + seed, the first round(rate * n) moved to the next class), so the README's numbers still reproduce."""
    import sys

    import torch

    sys.path.insert(0, os.path.join(REPO, "experiments"))
    from benefit import pair_noise

    clean = [i % 5 for i in range(400)]
    order = torch.randperm(400, generator=torch.Generator().manual_seed(10_006))
    expected = list(clean)
    for i in order[: round(0.3 * 400)].tolist():
        expected[i] = (expected[i] + 1) % 5
    assert pair_noise(torch.tensor(clean), 0.3, seed=6, classes=5).tolist() == expected
    noisy = add_label_noise(labelled(clean, 5), "label", 0.3, seed=10_006, num_classes=5, kind="pair")
    assert noisy["label"] == expected


def test_unknown_noise_kind_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(
        SystemExit, match=r"^finetune.py: error: argument --label_noise_type.*invalid choice: 'pairs'"
    ):
        finetune.main(["--config", RECIPE, "--label_noise_type", "pairs", "--output_dir", str(out)])
    recipe = (
        tmp_path / "recipe.yaml"
    )  # from a recipe file, argparse's choices are not consulted: ours says it
    recipe.write_text(open(RECIPE).read() + "\nlabel_noise_type: pairs\n")
    with pytest.raises(
        SystemExit, match=r"^finetune.py: error: label_noise_type must be 'symmetric' or 'pair'"
    ):
        finetune.main(["--config", str(recipe), "--output_dir", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("name", ["pair_baseline.yaml", "pair_sam.yaml", "pair_momentum_sam.yaml"])
def test_pair_recipes_train_on_noisy_labels_without_a_prepared_copy(name, tmp_path, monkeypatch):
    """The demo's pair-flip recipes, run by hand as their header shows but without --dataset_path, trained on clean
    labels (the noise lived only in the demo's data copy): now the recipe itself carries the noise."""
    checkpoint = tiny_timm_checkpoint(str(tmp_path / "ckpt"), num_classes=5)
    recipe = os.path.join(REPO, "recipes/digits/test_efficientnet", name)
    argv = ["--config", recipe, "--model_name_or_path", checkpoint, "--output_dir", str(tmp_path / "o")]
    data = data_trained_on(monkeypatch, argv)
    clean = load_image_classification(SPECS["digits"], label_subset=["5", "6", "7", "8", "9"])
    shifts = [(b - a) % 5 for a, b in zip(clean.train["label"], data.train["label"]) if a != b]
    assert len(shifts) == round(0.3 * len(clean.train)) and set(shifts) == {1}
    assert data.test["label"] == clean.test["label"]
