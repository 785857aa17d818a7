"""recipes/finetune.py end to end on CPU: every dataset spec, the push folder, resume, bad input, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import pytest
import timm
import torch
import yaml
from finetune_helpers import (
    REPO,
    fake_image,
    fixture_for_spec,
    load_finetune,
    tiny_timm_checkpoint,
    tiny_vit_checkpoint,
)
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification
from two_processes import launch_recipe

import hf_sam.finetune.data
import hf_sam.finetune.hub
from hf_sam.finetune.cli import parse_config, steps_per_epoch
from hf_sam.finetune.data import SPECS

finetune = load_finetune()
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
        "--use_cpu", "true", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--learning_rate", "0.01", "--optim", "sgd", "--logging_steps", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def timm_ckpt(tmp_path_factory):
    return tiny_timm_checkpoint(str(tmp_path_factory.mktemp("timm_ckpt")))


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory):
    return tiny_vit_checkpoint(str(tmp_path_factory.mktemp("vit_ckpt")))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Route `load_dataset(<spec's Hub id>)` to a local fixture, checking the call the real Hub would get."""
    calls = []

    def install(spec):
        folder = fixture_for_spec(spec, str(tmp_path / f"hub_{spec.name}"))

        def fake_load_dataset(path, split, name=None, revision=None, data_files=None):
            assert (path, name, revision, data_files) == (
                spec.hub_id,
                spec.config_name,
                spec.revision,
                spec.data_files,
            )
            calls.append(split)
            disk = datasets.load_from_disk(folder)
            return datasets.concatenate_datasets([disk[s] for s in split.split("+")])

        monkeypatch.setattr(hf_sam.finetune.data, "load_dataset", fake_load_dataset)
        return calls

    return install


def run(tmp_path, *argv) -> dict:
    return finetune.main(["--output_dir", str(tmp_path / "out"), *FAST, *argv])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_dataset_spec_runs_two_steps(name, hub, timm_ckpt, tmp_path):
    spec = SPECS[name]
    calls = hub(spec) if spec.hub_id else None
    # a spec without Hub id or builder (ImageNet) reads the user's copy
    yours = (
        []
        if spec.hub_id or spec.builder
        else ["--dataset_path", fixture_for_spec(spec, str(tmp_path / "yours"))]
    )
    metrics = run(
        tmp_path,
        *yours,
        "--dataset",
        name,
        "--model_name_or_path",
        timm_ckpt,
        "--sam_rho",
        "0.1",
        "--max_train_samples",
        "8",
        "--max_test_samples",
        "8",
    )
    if calls is not None:
        assert calls == [
            spec.train_split,
            spec.test_split,
        ]  # only these splits (Cars: not the corruption ones)
    out = tmp_path / "out"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert any("sam/sharpness" in h for h in state["log_history"])
    assert 0.0 <= metrics["test_top1"] <= metrics["test_top5"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == spec.num_classes and config["label_names"][0] == (
        spec.first_label or "class_0"
    )
    from huggingface_hub import ModelCard

    card = ModelCard.load(str(out / "README.md"))
    assert {r.dataset_split for r in card.data.eval_results} == {spec.test_split}  # Food-101: `validation`
    assert f"Split `{spec.test_split}`" in card.text and card.data.model_name.startswith(spec.title)
    if spec.hub_id:
        assert card.data.datasets == [spec.hub_id]
    if spec.terms:
        assert spec.terms in card.text


@pytest.mark.parametrize("augmentation", ["autoaugment", "random-resized-crop", "cifar-autoaugment"])
def test_transformers_checkpoint_with_augmentation(augmentation, vit_ckpt, tmp_path):
    eval_resize = "full" if augmentation == "cifar-autoaugment" else "checkpoint"
    metrics = run(tmp_path, "--dataset", "digits", "--model_name_or_path", vit_ckpt,
                  "--train_augmentation", augmentation, "--eval_resize", eval_resize, "--max_test_samples", "8")  # fmt: skip
    assert "test_top1" in metrics
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"]["3"] == "3" and (tmp_path / "out" / "preprocessor_config.json").exists()


def test_push_folder_card_and_reload(timm_ckpt, tmp_path, monkeypatch):
    """What push_to_hub uploads: weights, label names, card; reloads with transformers and timm alike."""
    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok, private):
            uploads.append(("create", repo_id))

        def upload_folder(self, repo_id, folder_path, commit_message, allow_patterns):
            import fnmatch

            everything = [os.path.relpath(os.path.join(root, f), folder_path)
                          for root, _, files in os.walk(folder_path) for f in files]  # fmt: skip
            pushed = [f for f in everything if any(fnmatch.fnmatch(f, p) for p in allow_patterns)]
            uploads.append(("upload", repo_id, sorted(pushed), sorted(everything)))

    monkeypatch.setattr(hf_sam.finetune.hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtokenSHOULDNOTLEAK")
    metrics = run(tmp_path, "--dataset", "digits", "--model_name_or_path", timm_ckpt, "--sam_rho", "0.2",
                  "--push_to_hub", "true", "--hub_model_id", "me/digits-sam", "--label_subset", "3", "1", "4",
                  "--license", "mit", "--save_strategy", "steps", "--save_steps", "1")  # fmt: skip
    out = tmp_path / "out"
    assert uploads[0] == ("create", "me/digits-sam")
    kind, repo, files, everything = uploads[1]
    assert (kind, repo) == ("upload", "me/digits-sam")
    # Only what a user loads: no training_args.bin, trainer state or checkpoints (the run saved all of those).
    # (A timm model's preprocessing lives in config.json's pretrained_cfg: no preprocessor_config.json.)
    assert set(files) == {"model.safetensors", "config.json", "README.md", "test_results.json",
                          "resolved_config.yaml"}  # fmt: skip
    assert "training_args.bin" in everything and "trainer_state.json" in everything

    card = (out / "README.md").read_text()
    for needle in ("# scikit-learn digits x " + os.path.basename(timm_ckpt) + ", SAM (ρ = 0.2)", "ρ = 0.2",
                   "recipes/finetune.py --output_dir", f"| top-1 accuracy | {100 * metrics['test_top1']:.2f}% |",
                   "Split `test`", 'AutoModelForImageClassification.from_pretrained("me/digits-sam")',
                   'timm.create_model("hf-hub:me/digits-sam", pretrained=True)', "Licence of these weights: `mit`",
                   "per-process ε (m = 2)", "; single process; "):  # fmt: skip
        assert needle in card, needle
    from huggingface_hub import ModelCard

    data = ModelCard.load(str(out / "README.md")).data
    assert set(data.tags) >= {"sharpness-aware-minimization", "image-classification", "hf-sam"}
    assert "sam" not in data.tags and data.base_model == timm_ckpt  # `sam` is the Hub's Segment-Anything tag
    assert (data.license, data.library_name, data.model_name) == ("mit", "timm", "scikit-learn digits x "
                                                                  + os.path.basename(timm_ckpt) + ", SAM (ρ = 0.2)")  # fmt: skip
    top1 = next(r for r in data.eval_results if r.metric_name == "top-1 accuracy")
    assert (top1.metric_type, top1.dataset_split, top1.metric_value) == (
        "accuracy",
        "test",
        metrics["test_top1"],
    )
    for path in out.iterdir():
        if path.is_file() and path.suffix in (".md", ".json", ".yaml"):
            assert "SECRET" not in path.read_text(), path.name

    assert not any(k.startswith("timm_model.") for k in load_file(str(out / "model.safetensors")))
    hf_model = AutoModelForImageClassification.from_pretrained(str(out)).eval()
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert hf_model.config.id2label == {0: "3", 1: "1", 2: "4"}
    assert timm_model.pretrained_cfg["label_names"] == ["3", "1", "4"]
    # The pushed weights are the evaluated ones: re-evaluating the reloaded model gives the recorded top-1.
    data = hf_sam.finetune.data.load_image_classification(SPECS["digits"], label_subset=["3", "1", "4"])
    from transformers import AutoImageProcessor

    hf_sam.finetune.data.set_transforms(
        data,
        hf_sam.finetune.data.preprocessing_from_processor(AutoImageProcessor.from_pretrained(str(out))),
        "none",
    )
    batch = hf_sam.finetune.data.collate([data.test[i] for i in range(len(data.test))])
    with torch.no_grad():
        hf_logits = hf_model(pixel_values=batch["pixel_values"]).logits
        timm_logits = timm_model(batch["pixel_values"])
    torch.testing.assert_close(hf_logits, timm_logits, rtol=0, atol=0)
    correct = int((hf_logits.argmax(-1) == batch["labels"]).sum())
    assert correct / len(batch["labels"]) == metrics["test_top1"]


def test_resume_continues_and_guard_refuses_old_checkpoints(timm_ckpt, tmp_path):
    args = [
        "--dataset",
        "digits",
        "--model_name_or_path",
        timm_ckpt,
        "--max_train_samples",
        "8",
        "--max_test_samples",
        "4",
    ]
    run(tmp_path, *args, "--save_strategy", "steps", "--save_steps", "2")
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    with pytest.raises(SystemExit, match="checkpoint-2: continue with --resume_from_checkpoint true"):
        run(tmp_path, *args)
    run(tmp_path, *args, "--max_steps", "3", "--resume_from_checkpoint", "true")
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]
    run(tmp_path, *args, "--overwrite_output_dir", "true")  # starts over: old checkpoints deleted first
    assert not (tmp_path / "out" / "checkpoint-2").exists()


# ---------------------------------------------------------------------- bad input
def _fails(tmp_path, argv, message, capsys=None):
    out = tmp_path / "out"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    with pytest.raises(SystemExit) as err:
        finetune.main(["--output_dir", str(out), *FAST, *argv])
    text = str(err.value.code)
    assert text.startswith("finetune.py: error: ") and "\n" not in text, text
    assert message in text, text
    after = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert after == before, "nothing may be written before the error"
    return text


def test_unknown_dataset_name(tmp_path, timm_ckpt):
    text = _fails(
        tmp_path, ["--dataset", "cifar11", "--model_name_or_path", timm_ckpt], "unknown dataset 'cifar11'"
    )
    assert "cifar10" in text  # lists the names that exist


def test_wrong_column_lists_existing_columns(tmp_path, timm_ckpt):
    _fails(tmp_path, ["--dataset", "digits", "--image_column", "img", "--model_name_or_path", timm_ckpt],
           "image column 'img' not found in digits (train split); columns are image, label")  # fmt: skip


def test_label_count_mismatch(tmp_path, timm_ckpt):
    _fails(tmp_path, ["--dataset", "digits", "--num_labels", "9", "--model_name_or_path", timm_ckpt],
           "has 10 classes in column 'label', but num_labels says 9")  # fmt: skip


def test_unknown_local_model(tmp_path):
    missing = str(tmp_path / "no_such_model")
    _fails(tmp_path, ["--dataset", "digits", "--model_name_or_path", missing],
           f"model_name_or_path {missing!r} does not exist")  # fmt: skip


def test_unknown_yaml_key_and_flag(tmp_path, timm_ckpt):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"dataset: digits\nmodel_name_or_path: {timm_ckpt}\nlearning_rat: 0.1\n")
    _fails(
        tmp_path, ["--config", str(recipe)], "unknown key(s) 'learning_rat' (did you mean 'learning_rate'?)"
    )
    _fails(tmp_path, ["--dataset", "digits", "--model_name_or_path", timm_ckpt, "--sam_roh", "0.1"],
           "unknown flag(s) 'sam_roh' (did you mean 'sam_rho'?)")  # fmt: skip


def test_missing_config_file_names_its_path(tmp_path):
    _fails(tmp_path, ["--config", "recipes/nope/sam.yaml"], "config file 'recipes/nope/sam.yaml' not found")


def test_invalid_sam_value(tmp_path, timm_ckpt):
    _fails(
        tmp_path,
        ["--dataset", "digits", "--model_name_or_path", timm_ckpt, "--sam_rho", "-1"],
        "sam_rho must be",
    )


def test_hub_token_is_refused(tmp_path, timm_ckpt):
    _fails(
        tmp_path,
        ["--dataset", "digits", "--model_name_or_path", timm_ckpt, "--hub_token", "hf_x"],
        "hf auth login",
    )


def test_output_dir_with_checkpoint_is_refused(tmp_path, timm_ckpt):
    (tmp_path / "out" / "checkpoint-500").mkdir(parents=True)
    (tmp_path / "out" / "keep.txt").write_text("x")
    _fails(
        tmp_path, ["--dataset", "digits", "--model_name_or_path", timm_ckpt], "--overwrite_output_dir true"
    )
    assert (tmp_path / "out" / "checkpoint-500").is_dir()


def test_unreadable_image_fails_with_its_index(tmp_path, timm_ckpt):
    rng = __import__("numpy").random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"image": [fake_image(i, rng) for i in range(4)], "label": [0, 1, 0, 1]}
    ds = datasets.Dataset.from_dict(rows, features=features).cast_column(
        "image", datasets.Image(decode=False)
    )
    broken = ds.to_dict()
    broken["image"][2] = {"bytes": b"not an image at all", "path": None}
    bad = datasets.Dataset.from_dict(broken, features=ds.features).cast_column("image", datasets.Image())
    datasets.DatasetDict(train=bad, test=bad).save_to_disk(str(tmp_path / "local"))
    _fails(tmp_path, ["--dataset", str(tmp_path / "local"), "--model_name_or_path", timm_ckpt],
           "image 2 of the train split (train) cannot be read")  # fmt: skip


def _offline_subprocess(argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "recipes/finetune.py", *FAST, *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_hub_dataset_offline_is_one_line(tmp_path, timm_ckpt):
    proc = _offline_subprocess(
        ["--dataset", "cifar10", "--model_name_or_path", timm_ckpt, "--output_dir", str(tmp_path / "o")]
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("finetune.py: error: cannot load dataset 'uoft-cs/cifar10'") and "offline" in last
    ), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_hub_model_offline_is_one_line(tmp_path):
    proc = _offline_subprocess(["--dataset", "digits", "--model_name_or_path", "timm/no-such-model",
                                "--output_dir", str(tmp_path / "o"), "--verify_images", "false"])  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("finetune.py: error: cannot load model 'timm/no-such-model'") and "offline" in last
    ), proc.stderr
    assert "Traceback" not in proc.stderr


def test_push_offline_fails_before_training(tmp_path, timm_ckpt, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _fails(tmp_path, ["--dataset", "digits", "--model_name_or_path", timm_ckpt, "--push_to_hub", "true",
                      "--hub_model_id", "me/x"], "push_to_hub: cannot create 'me/x': the Hub is unreachable (offline")  # fmt: skip


def test_gpu_recipe_validates_on_cpu_but_does_not_run(tmp_path):
    recipe = "recipes/cifar10/efficientnet_b7/sam.yaml"
    args = parse_config(["--config", os.path.join(REPO, recipe), "--check_config", "true"])
    assert args.training.bf16 and args.training.sam_rho == 0.05
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="bf16"):
            finetune.main(["--config", os.path.join(REPO, recipe), "--output_dir", str(tmp_path / "o")])


@pytest.mark.multiprocess
def test_two_process_launch_with_cpu_config(tmp_path, timm_ckpt):
    out = tmp_path / "ddp"
    launch_recipe("cpu.yaml", out, timm_ckpt, "--global_batch_size", "8", port=29535)  # WORLD_SIZE=2: 2 steps
    card = (out / "README.md").read_text()
    assert (
        "2 per device x 2 processes x 2 accumulation" in card
        and "accelerate launch --num_processes 2" in card
        and "; DDP; " in card
        and "per-process ε (m = 2)" in card
    )
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("sam/sharpness" in h for h in state["log_history"])


# ---------------------------------------------------------------------- the released code's settings
def test_steps_per_epoch_is_what_the_trainer_takes(timm_ckpt, tmp_path):
    """10 images, 2 per device, global batch 4 (accumulation 2): 5 micro-batches -> ceil(5 / 2) = 3 steps in
    one epoch (not 10 / 4 = 2.5), as the recipe headers count them."""
    assert steps_per_epoch(10, 2, 1, 2) == 3
    fast = FAST[2:]  # without --max_steps 2: train by epochs instead
    assert FAST[:2] == ["--max_steps", "2"]
    finetune.main(["--output_dir", str(tmp_path / "out"), *fast, "--num_train_epochs", "1", "--dataset", "digits",
                   "--model_name_or_path", timm_ckpt, "--max_train_samples", "10", "--max_test_samples", "4",
                   "--global_batch_size", "4"])  # fmt: skip
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    config = yaml.safe_load((tmp_path / "out" / "resolved_config.yaml").read_text())
    assert config["global_batch_size"] == 4 and "gradient_accumulation_steps" not in config


def test_dropout_rates_reach_the_timm_model(timm_ckpt):
    from hf_sam.finetune.models import load_model_and_processor

    model, _ = load_model_and_processor(
        timm_ckpt, [str(i) for i in range(5)], drop_rate=0.5, drop_path_rate=0.2
    )
    net = model.timm_model
    assert net.drop_rate == 0.5
    drop_probs = [m.drop_prob for m in net.modules() if type(m).__name__ == "DropPath"]
    # timm scales stochastic depth linearly over the blocks, up to the rate (as the TF original's drop-connect).
    assert drop_probs and max(drop_probs) <= 0.2 and max(drop_probs) > 0.1
    x = torch.randn(2, 3, 32, 32)
    model.train()
    torch.manual_seed(0)
    a = model(pixel_values=x).logits
    b = model(pixel_values=x).logits
    assert not torch.equal(a, b)  # active in training mode
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, model(pixel_values=x).logits)
    plain, _ = load_model_and_processor(timm_ckpt, [str(i) for i in range(5)])
    assert plain.timm_model.drop_rate == 0.0  # unset: the checkpoint's own (0 for this one)


def test_dropout_rates_reach_transformers_models(tmp_path, vit_ckpt):
    from transformers import EfficientNetConfig, EfficientNetForImageClassification, ViTImageProcessor

    from hf_sam.finetune.models import ModelError, load_model_and_processor

    config = EfficientNetConfig(image_size=32, width_coefficient=0.1, depth_coefficient=0.1, num_labels=3,
                                hidden_dim=64)  # fmt: skip
    folder = str(tmp_path / "effnet")
    EfficientNetForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    model, _ = load_model_and_processor(folder, ["a", "b"], drop_rate=0.5, drop_path_rate=0.2)
    assert (model.config.dropout_rate, model.config.drop_connect_rate) == (0.5, 0.2)
    assert model.dropout.p == 0.5
    vit, _ = load_model_and_processor(vit_ckpt, ["a", "b"], drop_rate=0.1)
    assert vit.config.hidden_dropout_prob == 0.1
    with pytest.raises(ModelError, match="drop_path_rate cannot be set"):
        load_model_and_processor(vit_ckpt, ["a", "b"], drop_path_rate=0.1)


def test_optimizer_follows_the_released_code(timm_ckpt, tmp_path):
    """Nesterov from optim_args; weight decay on every parameter with weight_decay_all_parameters (the released
    code), on all but biases and norms without it (the Trainer's default)."""
    groups = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        finetune.main(["--output_dir", str(out), *FAST, "--dataset", "digits", "--model_name_or_path", timm_ckpt,
                       "--max_train_samples", "8", "--max_test_samples", "4", "--save_strategy", "steps",
                       "--save_steps", "2", "--optim_args", "momentum=0.9,nesterov=True", "--weight_decay", "1e-5",
                       "--weight_decay_all_parameters", flag])  # fmt: skip
        groups[flag] = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)["param_groups"]
    model = AutoModelForImageClassification.from_pretrained(str(tmp_path / "true"))
    num_params = len(list(model.parameters()))
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in groups["true"] + groups["false"])
    decayed = {
        flag: sum(len(g["params"]) for g in gs if g["weight_decay"] == 1e-5) for flag, gs in groups.items()
    }
    assert decayed["true"] == num_params
    assert 0 < decayed["false"] < num_params


def test_configuration_errors_come_before_the_bf16_check(tmp_path):
    """A GPU (bf16) recipe on this CPU machine, as a user would launch it (no --use_cpu): the typo and the
    checkpoint conflict are reported, not the environment; the environment error names the fix."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a bf16 GPU")
    recipe = os.path.join(REPO, "recipes/oxford_pets/efficientnet_b7/sam.yaml")
    out = tmp_path / "o"

    def error(*argv) -> str:
        with pytest.raises(SystemExit) as err:
            finetune.main(["--config", recipe, *argv])
        text = str(err.value.code)
        assert text.startswith("finetune.py: error: ") and "\n" not in text, text
        return text

    text = error("--output_dir", str(out), "--sam_rhoo", "0.1")
    assert "unknown flag(s) 'sam_rhoo' (did you mean 'sam_rho'?)" in text and "bf16" not in text
    assert "drop_rate must be in [0, 1)" in error("--output_dir", str(out), "--drop_rate", "1.5")
    (out / "checkpoint-100").mkdir(parents=True)
    text = error("--output_dir", str(out))
    assert "already holds checkpoint-100" in text and "bf16" not in text
    text = error("--output_dir", str(tmp_path / "new"))
    assert "--bf16 false" in text and not (tmp_path / "new").exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-100"]


def test_hub_private_repo_is_respected_and_documented(timm_ckpt, tmp_path, monkeypatch, capsys):
    created = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok, private):
            created.append(private)

        def upload_folder(self, **kwargs):
            pass

    monkeypatch.setattr(hf_sam.finetune.hub, "HfApi", FakeApi)
    run(tmp_path, "--dataset", "digits", "--model_name_or_path", timm_ckpt, "--max_train_samples", "4",
        "--max_test_samples", "4", "--push_to_hub", "true", "--hub_model_id", "me/x", "--hub_private_repo", "true")  # fmt: skip
    assert created == [True]
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    assert "--hub_private_repo" in capsys.readouterr().out


# ---------------------------------------------------------------------- the card as the Hub reads it
def _recipe_card(tmp_path, recipe: str, source: str, architecture: str | None = None, **flags):
    """The card `write_model_card` writes for `recipe` (parsed as on 8 GPUs; nothing trained), reloaded by
    huggingface_hub; `architecture` as `hf_sam.finetune.models.architecture` would name the model (default: from the id)."""
    from huggingface_hub import ModelCard

    from hf_sam.finetune.model_card import write_model_card

    argv = ["--config", os.path.join(REPO, recipe), "--check_config", "true", "--num_processes", "8",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    args = parse_config(argv)
    os.makedirs(args.training.output_dir)
    spec = SPECS[recipe.split("/")[1]]
    metrics = {"test_top1": 0.9, "test_top5": 0.99}
    write_model_card(args, spec, source, 8144, 8041, [f"c{i}" for i in range(spec.num_classes)], metrics, True,
                     engine="DDP", global_epsilon=False, architecture=architecture)  # fmt: skip
    return ModelCard.load(str(tmp_path / "out" / "README.md"))


def test_card_metadata_as_the_hub_reads_it(tmp_path):
    """license other + license_name/link; top-5 not a second plain accuracy; the dataset revision; the model-index
    round trip of huggingface_hub itself; SAM tagged sharpness-aware-minimization, never `sam` (Segment Anything)."""
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    spec = SPECS["stanford_cars"]
    card = _recipe_card(
        tmp_path, "recipes/stanford_cars/efficientnet_b7/sam.yaml", f"{spec.hub_id}@{spec.revision}"
    )
    data, meta = card.data, card.data.to_dict()
    assert meta["license"] == "other" and meta["license_name"] and meta["license_link"].startswith("https://")
    assert {"sharpness-aware-minimization", "hf-sam", "image-classification"} <= set(data.tags)
    assert "sam" not in data.tags
    top1, top5 = (next(r for r in data.eval_results if r.metric_name == f"top-{k} accuracy") for k in (1, 5))
    assert top1.metric_type == "accuracy" and top5.metric_type != "accuracy" and top5.metric_args == {"k": 5}
    assert {(r.metric_type, str(r.metric_args)) for r in data.eval_results} == {
        (top1.metric_type, str(top1.metric_args)), (top5.metric_type, str(top5.metric_args))}  # fmt: skip
    assert all(r.dataset_revision == spec.revision for r in data.eval_results)
    assert all((r.dataset_type, r.dataset_split) == (spec.hub_id, "test") for r in data.eval_results)
    # huggingface_hub's own parser: model-index -> results -> model-index gives the same thing back
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == data.model_name and results == data.eval_results
    assert eval_results_to_model_index(name, results) == meta["model-index"]
    assert meta["model-index"][0]["results"][0]["dataset"]["revision"] == spec.revision


def test_baseline_card_has_no_sam_tag_and_unpinned_revision_is_absent(tmp_path):
    card = _recipe_card(tmp_path, "recipes/cifar10/efficientnet_b7/baseline.yaml", "uoft-cs/cifar10")
    assert "sam" not in card.data.tags and "sharpness-aware-minimization" not in card.data.tags
    assert "hf-sam" in card.data.tags and card.data.to_dict()["license"] == "apache-2.0"
    assert "license_name" not in card.data.to_dict()
    assert all(r.dataset_revision is None for r in card.data.eval_results)


def test_card_says_what_the_run_followed(tmp_path):
    """An EfficientNet run followed the SAM paper's C.2; a ViT run did not (the SAM paper has no ViT experiment): its
    card names the ViT paper's conventions, cites Chen, Hsieh & Gong for SAM on ViTs, and says it reproduces neither;
    the architecture decides, also for a local checkpoint folder whose name says nothing."""
    efficientnet = _recipe_card(
        tmp_path / "b7", "recipes/oxford_pets/efficientnet_b7/sam.yaml", "timm/oxford-iiit-pet"
    )
    assert (
        "following the SAM paper's finetuning recipe (Foret et al. 2021, appendix C.2)" in efficientnet.text
    )
    vit = _recipe_card(tmp_path / "vit", "recipes/oxford_pets/vit_b16/sam.yaml", "timm/oxford-iiit-pet")
    text = " ".join(vit.text.split())
    assert "appendix C.2" not in text and "SAM paper's finetuning recipe" not in text
    assert (
        "the ViT paper's finetuning conventions" in text
        and "Dosovitskiy et al. 2021, table 4 and appendix B.1.1" in text
    )
    assert "has no ViT finetuning experiment, so this is not a reproduction of it" in text
    assert (
        'Chen, Hsieh & Gong, "When Vision Transformers Outperform ResNets without Pretraining or Strong Data Augmentations" (ICLR 2022)'
        in text
    )
    assert (
        "resolution 384 px (position embeddings resampled)" in text
        and "new classifier head (zeros init)" in text
    )
    local = _recipe_card(tmp_path / "local", "recipes/oxford_pets/vit_b16/sam.yaml", "timm/oxford-iiit-pet",
                         architecture="vit_base_patch16_224", model_name_or_path=str(tmp_path))  # fmt: skip
    assert "the ViT paper's finetuning conventions" in " ".join(local.text.split())
    other = _recipe_card(tmp_path / "other", "recipes/oxford_pets/vit_b16/sam.yaml", "timm/oxford-iiit-pet",
                         architecture="resnet50", model_name_or_path=str(tmp_path))  # fmt: skip
    assert "C.2" not in other.text and "ViT paper" not in other.text
    assert "with the settings listed under Training." in other.text


def test_non_commercial_dataset_cards_name_their_terms(tmp_path):
    """FGVC Aircraft (like Stanford Cars) and ImageNet: license other with a name and a link, and the terms in the text."""
    for recipe, source in (("recipes/fgvc_aircraft/efficientnet_l2/sam.yaml", "dpdl-benchmark/fgvc_aircraft"),
                           ("recipes/imagenet/efficientnet_b7/baseline.yaml", "/data/imagenet")):  # fmt: skip
        # the ImageNet recipe names no copy; its launch (and check) needs one: any existing folder stands for it
        copy = {"dataset_path": str(tmp_path)} if "imagenet" in recipe else {}
        card = _recipe_card(tmp_path / recipe.split("/")[1], recipe, source, **copy)
        meta, spec = card.data.to_dict(), SPECS[recipe.split("/")[1]]
        assert (
            meta["license"] == "other"
            and meta["license_name"]
            and meta["license_link"].startswith("https://")
        )
        assert spec.terms in card.text and "non-commercial research" in spec.terms
    assert (
        "the checkpoint's own classifier head (head_init checkpoint)" in card.text
        and "; 10 epochs;" in card.text
    )


def test_imagenet_card_names_the_hub_dataset_it_describes(tmp_path):
    """A local ImageNet copy (the spec has no Hub id to load from): the card's model-index and `datasets:` name the
    Hub id of the data, `ILSVRC/imagenet-1k`, not the title "ImageNet-1k" (a dataset the Hub does not have), with
    no revision (none was loaded); huggingface_hub parses it back unchanged."""
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    card = _recipe_card(
        tmp_path, "recipes/imagenet/efficientnet_l2/sam.yaml", str(tmp_path), dataset_path=str(tmp_path)
    )
    data, meta = card.data, card.data.to_dict()
    assert data.datasets == meta["datasets"] == ["ILSVRC/imagenet-1k"]
    assert data.eval_results and all(
        (r.dataset_type, r.dataset_name, r.dataset_split, r.dataset_revision)
        == ("ILSVRC/imagenet-1k", "ImageNet-1k", "validation", None)
        for r in data.eval_results
    )
    name, results = model_index_to_eval_results(meta["model-index"])
    assert results == data.eval_results and eval_results_to_model_index(name, results) == meta["model-index"]
    assert "(`ILSVRC/imagenet-1k`; 1000 classes" in " ".join(card.text.split())


def test_card_names_batchnorm_only_for_models_that_have_it(tmp_path, timm_ckpt):
    """ "BatchNorm statistics frozen" is a fact about a model with BatchNorm: an EfficientNet's card states it, a
    ViT's (no BatchNorm layer) says nothing about BatchNorm."""
    from hf_sam.finetune.models import save_timm_checkpoint

    torch.manual_seed(0)
    vit = str(tmp_path / "vit")
    save_timm_checkpoint(timm.create_model("test_vit", pretrained=False, num_classes=5), vit, crop_pct=0.9,
                         mean=(0.5,) * 3, std=(0.5,) * 3)  # fmt: skip
    for folder, checkpoint in (("vit_run", vit), ("efficientnet_run", timm_ckpt)):
        run(tmp_path / folder, "--dataset", "digits", "--model_name_or_path", checkpoint, "--max_train_samples", "4",
            "--max_test_samples", "4")  # fmt: skip
    assert "BatchNorm" not in (tmp_path / "vit_run" / "out" / "README.md").read_text()
    assert (
        "BatchNorm statistics frozen: True"
        in (tmp_path / "efficientnet_run" / "out" / "README.md").read_text()
    )


def test_vit_image_size_runs_end_to_end(tmp_path):
    """`image_size` through recipes/finetune.py: the model trains and evaluates at that size, and the saved config
    (what transformers and timm rebuild from) records it."""
    from hf_sam.finetune.models import save_timm_checkpoint

    torch.manual_seed(0)
    ckpt = str(tmp_path / "vit")
    save_timm_checkpoint(timm.create_model("test_vit", pretrained=False, num_classes=5), ckpt, crop_pct=0.9,
                         mean=(0.5,) * 3, std=(0.5,) * 3)  # fmt: skip
    metrics = run(tmp_path, "--dataset", "digits", "--model_name_or_path", ckpt, "--image_size", "48",
                  "--head_init", "zeros", "--train_augmentation", "random-resized-crop", "--max_test_samples", "4")  # fmt: skip
    assert 0.0 <= metrics["test_top1"] <= 1.0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 48, 48] and config["model_args"]["img_size"] == 48
    assert timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).pos_embed.shape[1] == 1 + 3 * 3


def test_license_other_needs_its_name_and_link(tmp_path):
    with pytest.raises(ValueError, match="license: other needs license_name and license_link"):
        parse_config(["--config", os.path.join(REPO, "recipes/stanford_cars/efficientnet_b7/sam.yaml"),
                      "--check_config", "true", "--num_processes", "8", "--license_link", ""])  # fmt: skip


def test_every_hub_dataset_spec_is_pinned_or_says_why_not():
    """A pinned revision is a full commit hash (the Hub does not resolve short ones); a spec whose hash is not
    known here is listed in UNPINNED_REVISIONS with the reason, and docs/recipes.md names it."""
    docs = open(os.path.join(REPO, "docs", "recipes.md")).read()
    for spec in SPECS.values():
        if spec.hub_id is None:
            continue
        if spec.revision is not None:
            assert len(spec.revision) == 40 and all(c in "0123456789abcdef" for c in spec.revision), spec.name
            assert spec.name not in hf_sam.finetune.data.UNPINNED_REVISIONS
        else:
            assert hf_sam.finetune.data.UNPINNED_REVISIONS.get(spec.name), spec.name
            assert f"`{spec.name}`" in docs, spec.name
