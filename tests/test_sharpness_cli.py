"""`python -m hf_sam.sharpness_cli` on tiny saved checkpoints and tiny local datasets."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from hf_sam.sharpness import hessian_eigenvalues
from hf_sam.sharpness_cli import main

NUM_LABELS = 3


def save_checkpoint(path, seed, num_labels=NUM_LABELS):
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=num_labels,
    )
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return str(path)


def images_and_labels(n=12):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L") for _ in range(n)]
    return images, [i % NUM_LABELS for i in range(n)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    images, labels = images_and_labels()
    # Odd column names, as Hub datasets have (CIFAR's `img`): found through their Image / ClassLabel features.
    features = datasets.Features(
        {"img": datasets.Image(), "fine": datasets.ClassLabel(num_classes=NUM_LABELS)}
    )
    train = datasets.Dataset.from_dict({"img": images, "fine": labels}, features=features)
    datasets.DatasetDict({"train": train}).save_to_disk(str(root / "data"))
    return {
        "root": root,
        "data": str(root / "data"),
        "a": save_checkpoint(root / "model_a", seed=0),
        "b": save_checkpoint(root / "model_b", seed=1),
    }


def test_compares_two_checkpoints_on_the_same_examples(workdir, capsys):
    common = [
        "--dataset",
        workdir["data"],
        "--batch-size",
        "5",
        "--m",
        "4",
        "--top-k",
        "2",
        "--num-examples",
        "64",
    ]
    results = main(["--model", workdir["a"], "--model", workdir["b"], *common, "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in printed] == [workdir["a"], workdir["b"]] and printed == results

    # Independent recomputation: the examples preprocessed here in one batch, in dataset order. The Hessian of
    # the mean loss does not depend on how the CLI shuffled and batched them (3 batches of 5, 5, 2).
    images, labels = images_and_labels()
    for result, name in zip(results, ("a", "b"), strict=True):
        model = ViTForImageClassification.from_pretrained(workdir[name], attn_implementation="eager")
        pixels = ViTImageProcessor.from_pretrained(workdir[name])(
            images=[i.convert("RGB") for i in images], return_tensors="pt"
        )["pixel_values"]
        batch = {"pixel_values": pixels, "labels": torch.tensor(labels)}
        spectrum = hessian_eigenvalues(model, [batch], top_k=2, max_iter=30, tol=1e-6)
        with torch.no_grad():
            out = model.eval()(**batch)
        assert result["examples"] == 12
        assert result["lambda_max"] == pytest.approx(spectrum.lambda_max, rel=1e-3)
        assert result["eigenvalues"][1] == pytest.approx(spectrum.eigenvalues[1], rel=1e-3)
        # m=4 chunks out of batches of 5, 5, 2: the loss is the mean over the 2 chunks kept, so compare accuracy.
        assert result["accuracy"] == pytest.approx(
            (out.logits.argmax(-1) == batch["labels"]).float().mean().item()
        )
        assert result["m_sharpness"] > 0
    assert results[0]["lambda_max"] != results[1]["lambda_max"]  # two different checkpoints were measured

    main(["--model", workdir["a"], *common])
    table = capsys.readouterr().out
    assert "| metric | model_a |" in table and "λmax/λ2" in table and "m-sharpness (m=4" in table


def test_image_folder_dataset_with_explicit_columns(workdir, capsys):
    folder = workdir["root"] / "folder"
    images, labels = images_and_labels(6)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
        image.save(folder / f"class_{label}" / f"{i}.png")
    args = [
        "--model",
        workdir["a"],
        "--dataset",
        str(folder),
        "--image-column",
        "image",
        "--label-column",
        "label",
    ]
    (result,) = main([*args, "--batch-size", "3", "--top-k", "1", "--json"])
    assert result["examples"] == 6 and np.isfinite(result["lambda_max"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "{root}/no_such_model"], "no such checkpoint directory"),
        (
            ["--model", "{a}", "--label-column", "nope"],
            "--label-column 'nope' not in the dataset's columns: img, fine",
        ),
        (["--model", "{a}", "--split", "test"], "split 'test' not in"),
        (["--model", "{two_labels}"], "the model has 2 labels but column 'fine' holds values in [0, 2]"),
        (["--model", "{a}", "--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_input_is_one_clear_line(workdir, capsys, extra, message):
    if "{two_labels}" in extra:
        workdir.setdefault(
            "two_labels", save_checkpoint(workdir["root"] / "two_labels", seed=0, num_labels=2)
        )
    extra = [e.format(**workdir) for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset", workdir["data"], *extra])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("sharpness_cli: error: ") and message in errors[0]


def test_a_text_checkpoint_or_dataset_is_told_image_classifiers_only(workdir, capsys):
    """The first error on a BERT checkpoint or a text dataset says what the command measures and what to use."""
    from transformers import BertConfig, BertForSequenceClassification

    bert = str(workdir["root"] / "bert")
    BertForSequenceClassification(
        BertConfig(
            vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
        )
    ).save_pretrained(bert)
    text = str(workdir["root"] / "text")
    datasets.Dataset.from_dict({"sentence": ["a b", "c d"], "label": [0, 1]}).save_to_disk(text)
    for args in (
        ["--model", bert, "--dataset", workdir["data"]],
        ["--model", workdir["a"], "--dataset", text],
    ):
        with pytest.raises(SystemExit):
            main(args)
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "measures image classifiers" in errors[0], errors
        assert "hessian_eigenvalues and m_sharpness" in errors[0]


def test_column_headers_are_the_checkpoints_short_names_unless_two_read_the_same():
    from hf_sam.sharpness_cli import column_names

    assert column_names(["runs/baseline/", "runs/sam"]) == ["baseline", "sam"]
    assert column_names(["a/final", "b/final"]) == ["a/final", "b/final"]
