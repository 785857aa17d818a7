"""Every paper recipe end to end with its real shapes, on CPU: the recipe's real architecture built from config
(timm's registry entry for its Hub checkpoint: no weights), at its real resolution, fed a local stand-in dataset with
the real dataset's columns, label feature and image sizes, through `recipes/finetune.py` with the recipe's own
settings (augmentation, dropout, drop-connect, Nesterov, clipping, weight-decay scope, gradient checkpointing, the
ViT recipes' 384 px, ImageNet's kept head), for two SAM steps at batch 1. Only what a CPU cannot do is overridden: bf16 (off), the batch (1, with
global_batch_size 1), the steps (2), checkpoints and dataloader workers (none).

Slow (`make test-slow`): EfficientNet-L2 at 475 px is 480M parameters. One recipe folder at a time:
`-m slow -k fgvc_aircraft` (the ids are the folders, e.g. `recipes/fgvc_aircraft/efficientnet_b7`).
"""

from __future__ import annotations

import glob
import json
import os

import pytest
from finetune_helpers import REPO, load_finetune, real_architecture_checkpoint, real_size_fixture_for_spec

from hf_sam.finetune.cli import parse_config
from hf_sam.finetune.data import SPECS

finetune = load_finetune()
SAM_RECIPES = sorted(
    p
    for p in glob.glob(os.path.join(REPO, "recipes", "*", "*", "sam.yaml"))
    if "digits" not in p.split(os.sep)
)
_CHECKPOINTS: dict[str, str] = {}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One randomly initialised checkpoint per architecture, built on first use and shared by the recipes."""

    def get(hub_id: str) -> str:
        if hub_id not in _CHECKPOINTS:
            _CHECKPOINTS[hub_id] = real_architecture_checkpoint(hub_id, str(tmp_path_factory.mktemp("ckpt")))
        return _CHECKPOINTS[hub_id]

    yield get
    _CHECKPOINTS.clear()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", SAM_RECIPES, ids=lambda p: os.path.relpath(os.path.dirname(p), REPO))
def test_recipe_runs_two_sam_steps_with_its_real_shapes(recipe, checkpoints, tmp_path, monkeypatch):
    dataset = recipe.split(os.sep)[-3]
    data = real_size_fixture_for_spec(SPECS[dataset], str(tmp_path / "data"))
    parsed = parse_config(["--config", recipe, "--check_config", "true", "--dataset_path", data])
    checkpoint = checkpoints(parsed.model.model_name_or_path)
    shapes = []
    collate = finetune.collate

    def recording_collate(examples):
        batch = collate(examples)
        shapes.append(tuple(batch["pixel_values"].shape))
        return batch

    monkeypatch.setattr(finetune, "collate", recording_collate)
    transforms = []  # what the run's data pipeline was built with (train crop, test resize)
    set_transforms = finetune.set_transforms

    def recording_set_transforms(*args):
        transforms.append(args[2:])  # (augmentation, seed, eval_resize, crop_min_area)
        return set_transforms(*args)

    monkeypatch.setattr(finetune, "set_transforms", recording_set_transforms)
    out = tmp_path / "out"
    metrics = finetune.main([
        "--config", recipe, "--model_name_or_path", checkpoint, "--dataset_path", data, "--output_dir", str(out),
        "--bf16", "false", "--use_cpu", "true", "--global_batch_size", "1", "--per_device_train_batch_size", "1",
        "--per_device_eval_batch_size", "1", "--max_steps", "2", "--save_strategy", "no",
        "--dataloader_num_workers", "0", "--max_test_samples", "1", "--logging_steps", "1", "--disable_tqdm", "true",
    ])  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    sharpness = [h["sam/sharpness"] for h in state["log_history"] if "sam/sharpness" in h]
    assert len(sharpness) == 2 and all(abs(s) < 1e3 for s in sharpness)  # two real SAM steps, finite
    config = json.loads((out / "config.json").read_text())
    resolution = tuple(config["pretrained_cfg"]["input_size"][1:])
    # the checkpoint's resolution; the ViT recipes finetune at 384 px (ViT paper, B.1.1), and the saved model says so
    expected = {"efficientnet_b7": (600, 600), "efficientnet_l2": (475, 475), "vit_b16": (384, 384)}
    assert resolution == expected[recipe.split(os.sep)[-2]]
    if parsed.model.image_size:
        assert config["model_args"]["img_size"] == parsed.model.image_size
    assert shapes and all(s == (1, 3, *resolution) for s in shapes), (
        shapes
    )  # train and test at full resolution
    assert config["num_classes"] == SPECS[dataset].num_classes and 0.0 <= metrics["test_top1"] <= 1.0
    rates = {k: config["model_args"].get(k, 0.0) for k in ("drop_rate", "drop_path_rate")}
    assert rates == {"drop_rate": parsed.model.drop_rate, "drop_path_rate": parsed.model.drop_path_rate}
    if (
        parsed.model.head_init == "checkpoint"
    ):  # ImageNet (C.2): the checkpoint's own head, trained on, not redrawn
        from safetensors.torch import load_file

        head = {
            k: v
            for k, v in load_file(os.path.join(checkpoint, "model.safetensors")).items()
            if k.startswith("classifier.")
        }
        saved = load_file(str(out / "model.safetensors"))
        assert head and all(saved[k].shape == v.shape for k, v in head.items())
    d = (
        parsed.data
    )  # the recipe's crop and test resize reach the pipeline (ViT: the ViT code's 5-100% crop, no test crop)
    assert transforms == [(d.train_augmentation, parsed.training.seed, d.eval_resize, d.crop_min_area)]
    # the warm-up (ViT: the ViT code's 500 or 100 steps): with 2 steps run, the lr has not left its linear ramp
    rates = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    warmup, lr = parsed.training.warmup_steps, parsed.training.learning_rate
    assert rates and all(r <= lr * min(1.0, 2 / warmup) + 1e-12 for r in rates) if warmup else True
    card = (out / "README.md").read_text()
    if spec_terms := SPECS[dataset].terms:
        assert spec_terms in card
