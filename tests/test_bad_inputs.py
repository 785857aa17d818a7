"""The bad-input matrix: every case fails before training, with one clear line and a non-zero exit (the
script) or a ValueError naming the field (the Python API), and leaves the files already in output_dir as they
were (same bytes, same mtime).

Cases already covered in tests/test_finetune.py and not repeated here: unknown dataset name, missing image
column, label-count mismatch, unknown local model, unknown YAML key / flag with suggestion, missing --config
file, hub_token refused, output_dir with checkpoints but no resume/overwrite, a non-image byte string in the
train split, Hub dataset / model / push offline.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from finetune_helpers import REPO, fake_image, load_finetune, tiny_timm_checkpoint, tiny_vit_checkpoint
from PIL import Image

from hf_sam import SAM, SAMTrainer, SAMTrainingArguments

finetune = load_finetune()
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
        "--use_cpu", "true", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--optim", "sgd", "--max_train_samples", "8", "--max_test_samples", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_timm_checkpoint(str(tmp_path_factory.mktemp("timm_ckpt")))


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return tiny_vit_checkpoint(str(tmp_path_factory.mktemp("vit_ckpt")))


def _snapshot(path) -> dict:
    """Every file and folder under `path` (or `path` itself): bytes and mtime."""
    out = {}
    if os.path.isfile(path):
        return {str(path): (open(path, "rb").read(), os.stat(path).st_mtime_ns)}
    for root, dirs, files in os.walk(path):
        out[root] = (tuple(sorted(dirs)), tuple(sorted(files)))
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[full] = (f.read(), os.stat(full).st_mtime_ns)
    return out


def _populated(folder) -> str:
    """An output_dir from an earlier, finished run (no checkpoints): these files must survive untouched."""
    (folder / "runs").mkdir(parents=True)
    (folder / "keep.txt").write_text("results of an earlier run")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    (folder / "runs" / "events.log").write_text("old log")
    os.utime(folder / "keep.txt", ns=(1_000_000_000, 1_000_000_000))
    return str(folder)


def fails(argv, message, out) -> str:
    """Run the script in-process; it must exit non-zero with one `finetune.py: error:` line holding `message`."""
    before = _snapshot(out) if os.path.exists(out) else None
    with pytest.raises(SystemExit) as err:
        finetune.main([*FAST, "--output_dir", str(out), *argv])
    code = err.value.code
    assert isinstance(code, str), f"exit code {code!r}: a string exits with status 1 and prints it"
    assert code.startswith("finetune.py: error: ") and "\n" not in code, code
    assert message in code, code
    after = _snapshot(out) if os.path.exists(out) else None
    assert after == before, "files in (or the absence of) output_dir changed"
    return code


# ---------------------------------------------------------------------- sam_* fields: types, ranges, conflicts
SAM_CASES = {
    "rho-negative": (["--sam_rho", "-1"], "sam_rho must be a finite number >= 0"),
    "rho-not-a-number": (["--sam_rho", "abc"], "argument --sam_rho/--sam-rho: invalid float value: 'abc'"),
    "rho-inf": (["--sam_rho", "inf"], "sam_rho must be a finite number"),
    "eta-negative": (["--sam_eta", "-0.5"], "sam_eta must be a finite number >= 0"),
    "norm-1": (["--sam_norm", "1"], "argument --sam_norm/--sam-norm: invalid choice: '1'"),
    "adaptive-not-bool": (["--sam_adaptive", "maybe"], "--sam_adaptive"),
    "sync-not-bool": (["--sam_sync_perturbation", "maybe"], "--sam_sync_perturbation"),
    "mode-unknown": (["--sam_mode", "LookSAM"], "argument --sam_mode/--sam-mode: invalid choice: 'LookSAM'"),
    "interval-0": (["--sam_interval", "0"], "sam_interval must be an integer >= 1"),
    "interval-float": (
        ["--sam_interval", "2.5"],
        "argument --sam_interval/--sam-interval: invalid int value: '2.5'",
    ),
    "start-above-1": (["--sam_start", "1.5"], "sam_start must be a fraction of training in [0, 1]"),
    "start-after-end": (["--sam_start", "0.6", "--sam_end", "0.5"], "must be smaller than sam_end"),
    "group-size-0": (["--sam_group_size", "0"], "sam_group_size must be a positive integer"),
    "ascent-steps-0": (["--sam_ascent_steps", "0"], "sam_ascent_steps must be an integer >= 1"),
    "rho-schedule-unknown": (
        ["--sam_rho_schedule", "cosine"],
        "argument --sam_rho_schedule/--sam-rho-schedule: invalid choice",
    ),
    "rho-min-above-rho": (["--sam_rho_min", "0.5"], "sam_rho_min must be a number in [0, sam_rho=0.05]"),
    "max-nonfinite-negative": (["--sam_max_nonfinite_steps", "-1"], "sam_max_nonfinite_steps must be"),
    "looksam-alpha-negative": (["--sam_looksam_alpha", "-1"], "sam_looksam_alpha must be a number >= 0"),
    "gsam-alpha-nan": (["--sam_gsam_alpha", "nan"], "sam_gsam_alpha must be a number >= 0"),
    "param-filter-bad-regex": (
        ["--sam_param_filter", "(conv"],
        "sam_param_filter must be a regular expression",
    ),
    "looksam+group-size": (
        ["--sam_mode", "looksam", "--sam_interval", "2", "--sam_group_size", "2"],
        "sam_mode='looksam' cannot be combined with sam_group_size=2",
    ),  # fmt: skip
    "looksam+interval-1": (["--sam_mode", "looksam"], "sam_mode='looksam' needs sam_interval >= 2"),
    "gsam+ascent-steps": (
        ["--sam_mode", "gsam", "--sam_ascent_steps", "2"],
        "sam_mode='gsam' cannot be combined with sam_ascent_steps=2",
    ),  # fmt: skip
    "group-size+sync": (
        ["--sam_group_size", "2", "--sam_sync_perturbation", "true"],
        "contradicts sam_sync_perturbation=True",
    ),  # fmt: skip
    "ascent-steps+inf-norm": (
        ["--sam_ascent_steps", "2", "--sam_norm", "inf"],
        "sam_ascent_steps > 1 projects",
    ),
    "ascent-steps+adaptive": (["--sam_ascent_steps", "2", "--sam_adaptive", "true"], "sam_ascent_steps > 1"),
    "fsdp+per-process-epsilon": (
        ["--sam_sync_perturbation", "false", "--fsdp"],
        "sam_sync_perturbation=False (one ε per process) is impossible under FSDP",
    ),  # fmt: skip
    "fsdp+gsam": (["--sam_mode", "gsam", "--fsdp"], "sam_mode='gsam' is not supported under FSDP"),
    "deepspeed-zero3+per-process-epsilon": (
        ["--deepspeed", '{"zero_optimization": {"stage": 3}}', "--sam_sync_perturbation", "false"],
        "sam_sync_perturbation=False (one ε per process) is impossible under DeepSpeed ZeRO-3",
    ),  # fmt: skip
    "augmentation-unknown": (
        ["--train_augmentation", "mixup"],
        "argument --train_augmentation/--train-augmentation: invalid choice",
    ),
}


@pytest.mark.parametrize("case", list(SAM_CASES))
def test_sam_field_bad_value(case, ckpt, tmp_path):
    argv, message = SAM_CASES[case]
    fails(["--dataset", "digits", "--model_name_or_path", ckpt, *argv], message, _populated(tmp_path / "out"))


YAML_CASES = {
    "float-for-int": (
        "sam_interval: 2.5\n",
        "sam_interval must be an integer >= 1 (1: SAM on every step), got 2.5",
    ),
    "int-for-bool": ("sam_adaptive: 1\n", "sam_adaptive must be True or False, got 1"),
    "string-for-float": ("sam_rho: 0.1x\n", "argument --sam_rho/--sam-rho: invalid float value: '0.1x'"),
    "list-for-float": ("sam_rho: [0.1, 0.2]\n", "sam_rho must be a finite number >= 0"),
    "typo-key": ("sam_rhoo: 0.1\n", "unknown key(s) 'sam_rhoo' (did you mean 'sam_rho'?)"),
    "nested": ("sam:\n  rho: 0.1\n", "a recipe is a flat mapping"),
    "global-batch-0": ("global_batch_size: 0\n", "global_batch_size must be an integer >= 1, got 0"),
    "accumulation-negative": (
        "gradient_accumulation_steps: -1\n",
        "gradient_accumulation_steps must be an integer >= 1, got -1",
    ),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_recipe_yaml_bad_value(case, ckpt, tmp_path):
    text, message = YAML_CASES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset: digits\nmodel_name_or_path: {ckpt}\n{text}")
    fails(["--config", str(recipe)], message, _populated(tmp_path / "out"))


@pytest.fixture
def no_loading(monkeypatch):
    """These refusals come from the argument checks: loading the data or the model is already too late."""

    def must_not_load(*args, **kwargs):
        raise AssertionError("the bad input was not refused before loading")

    for name in ("load_image_classification", "load_model_and_processor", "create_repo"):
        monkeypatch.setattr(finetune, name, must_not_load)


# What yaml reports on a hand-written recipe's usual slips; the line names the file, line, column and fix.
MALFORMED_YAML_CASES = {
    "tab-indent": (
        "seed: 1\n\tsam_rho: 0.1\n",
        "line 3, column 1: found character '\\t' that cannot start any token; use spaces, not tabs",
    ),
    "tab-after-colon": ("seed:\t1\n", "line 2, column 6: found character '\\t'"),
    "unclosed-bracket": (
        "label_subset: [a, b\nseed: 1\n",
        "line 3, column 5: expected ',' or ']', but got ':' (while parsing a flow sequence at line 2, column 15); "
        "close the bracket",
    ),
    "unclosed-brace": ("optim_args: {momentum: 0.9\n", "(while parsing a flow mapping at line 2, column 13)"),
    "unclosed-quote": ('optim_args: "momentum=0.9\nseed: 1\n', "close the quote"),
    "indented-key": ("seed: 1\n  sam_rho: 0.1\n", "line 3, column 10: mapping values are not allowed here"),
    "colon-in-value": ("optim_args: momentum: 0.9\n", "quote a value that holds ': '"),
    "undefined-alias": ("seed: *s\n", "line 2, column 7: found undefined alias 's'"),
}


@pytest.mark.parametrize("case", list(MALFORMED_YAML_CASES))
def test_recipe_yaml_malformed(case, tmp_path, no_loading):
    """yaml would raise a ScannerError / ParserError with a multi-line traceback."""
    text, message = MALFORMED_YAML_CASES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset: digits\n{text}")
    code = fails(["--config", str(recipe)], message, tmp_path / "out")
    assert code.startswith(f"finetune.py: error: {recipe}, line "), code
    fails(["--config", str(recipe)], message, _populated(tmp_path / "old"))


BATCH_CASES = {
    "train-0": ["--per_device_train_batch_size", "0"],
    "train-negative": ["--per_device_train_batch_size", "-2"],
    "eval-0": ["--per_device_eval_batch_size", "0"],
    "accumulation-0": ["--gradient_accumulation_steps", "0"],
    "global-0": ["--global_batch_size", "0"],
    "global-negative": ["--global_batch_size", "-8"],
    "global-0-and-train-0": ["--global_batch_size", "0", "--per_device_train_batch_size", "0"],
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_batch_size_not_positive(case, tmp_path, no_loading):
    """The Trainer only checks the batch size when it builds its data loader, after data and model are loaded
    (a traceback, and an output_dir created); gradient_accumulation_steps -1 is not checked at all."""
    argv = BATCH_CASES[case]
    name, value = argv[-2].lstrip("-"), argv[-1]
    for out in (tmp_path / "out", _populated(tmp_path / "old")):
        fails(["--dataset", "digits", "--model_name_or_path", "timm/test_efficientnet", *argv],
              f"{name} must be an integer >= 1, got {value}.", out)  # fmt: skip


# Paths that cannot be a Hub id (`name` or `owner/name`), relative to a fresh cwd and HOME.
LOCAL_PATH_CASES = ["/tmp/nonexistent_ckpt_of_hf_sam", "./does/not/exist", "../no_such_ckpt", "~/no_such_ckpt",
                    "outputs/cifar10/run", "ckpt/"]  # fmt: skip


@pytest.fixture
def fresh_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path


@pytest.mark.parametrize("path", LOCAL_PATH_CASES)
def test_local_model_path_that_does_not_exist(path, fresh_cwd, no_loading):
    """Was reported as "not found on the Hub or the Hub is unreachable", after loading the data."""
    text = fails(["--dataset", "digits", "--model_name_or_path", path],
                 f"model_name_or_path {path!r} does not exist (cwd: {os.getcwd()})", fresh_cwd / "out")  # fmt: skip
    assert "not a Hub id" in text and "Hub is unreachable" not in text, text


def test_local_model_path_in_the_recipe_and_tilde(fresh_cwd, no_loading):
    recipe = fresh_cwd / "recipe.yaml"
    recipe.write_text("dataset: digits\nmodel_name_or_path: /tmp/nonexistent_ckpt_of_hf_sam\n")
    fails(["--config", str(recipe)], "model_name_or_path '/tmp/nonexistent_ckpt_of_hf_sam' does not exist",
          _populated(fresh_cwd / "old"))  # fmt: skip
    # A recipe's `~` is not expanded (nor a flag's `--x=~/...`): say so, with the path meant.
    (fresh_cwd / "home" / "ckpt").mkdir()
    fails(["--dataset", "digits", "--model_name_or_path", "~/ckpt"],
          f"'~' is not expanded here: write {str(fresh_cwd / 'home' / 'ckpt')!r}", fresh_cwd / "out")  # fmt: skip


@pytest.mark.parametrize("path", ["./no_such_data", "/tmp/nonexistent_data_of_hf_sam", "data/cifar10/train"])
def test_local_dataset_path_that_does_not_exist(path, fresh_cwd, no_loading):
    text = fails(["--dataset", path, "--model_name_or_path", "timm/test_efficientnet"],
                 f"dataset {path!r} does not exist (cwd: {os.getcwd()})", fresh_cwd / "out")  # fmt: skip
    assert "Hub is unreachable" not in text, text


@pytest.mark.parametrize(
    "name, local",
    [("timm/tf_efficientnet_b7.ra_in1k", False), ("google/vit-base-patch16-224", False), ("bert-base-uncased", False),
     ("hf-hub:timm/vit_base_patch16_224.augreg_in21k", False), ("uoft-cs/cifar10", False), ("my.org/v1.0", False),
     ("/abs/ckpt", True), ("./ckpt", True), ("../ckpt", True), ("~/ckpt", True), (".", True), ("ckpt/", True),
     ("outputs/cifar10/run", True), ("a//b", True), ("C:\\ckpts\\b7", True)],
)  # fmt: skip
def test_what_counts_as_a_local_path(name, local):
    """Only what cannot be a Hub id is a local path; `owner/name` may be either, so it stays a Hub id (its
    error then says "not found on the Hub or the Hub is unreachable ... or point the recipe at a local copy")."""
    from hf_sam.finetune.hub import is_local_path

    assert is_local_path(name) is local


def test_a_hub_id_still_goes_to_the_hub(tmp_path):
    for hub_id in ("google/vit-base-patch16-224", "hf-hub:timm/vit_base_patch16_224.augreg_in21k"):
        fails(["--dataset", "digits", "--model_name_or_path", hub_id],
              f"cannot load model {hub_id!r}: the Hub is unreachable (offline mode)", tmp_path / "out")  # fmt: skip


def test_param_filter_matching_nothing_fails_after_loading_but_before_training(ckpt, tmp_path):
    """Needs the model's parameter names, so it fails in SAMTrainer's set-up; the output_dir it would have
    created is not left behind."""
    out = tmp_path / "fresh"
    fails(["--dataset", "digits", "--model_name_or_path", ckpt, "--sam_param_filter", "no_such_layer"],
          "sam_param_filter='no_such_layer' matches no trainable parameter", out)  # fmt: skip
    assert not out.exists()


def test_cli_exit_status_and_a_single_stderr_line(ckpt, tmp_path):
    """The real command line: status 1, one line on stderr (argparse would print ~150 flags of usage)."""
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "recipes/finetune.py", "--dataset", "digits", "--model_name_or_path",
                           ckpt, "--output_dir", str(tmp_path / "o"), "--sam_interval", "2.5"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "finetune.py: error: argument --sam_interval/--sam-interval: invalid int value: '2.5'"
    ], proc.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- data
def _local_dataset(folder, train_rows=6, test_rows=4, labels=None, test_labels=None, corrupt=None):
    """A save_to_disk dataset (image + ClassLabel a/b/c); `corrupt=(split, index, bytes)` plants bad bytes."""
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
    )
    splits = {}
    for split, n, forced in (("train", train_rows, labels), ("test", test_rows, test_labels)):
        rows = {"image": [fake_image(i, rng) for i in range(n)], "label": forced or [i % 3 for i in range(n)]}
        ds = datasets.Dataset.from_dict(rows, features=features)
        if corrupt and corrupt[0] == split:
            raw = ds.cast_column("image", datasets.Image(decode=False)).to_dict()
            raw["image"][corrupt[1]] = {"bytes": corrupt[2], "path": None}
            undecoded = features.copy()
            undecoded["image"] = datasets.Image(decode=False)
            ds = datasets.Dataset.from_dict(raw, features=undecoded).cast_column("image", datasets.Image())
        splits[split] = ds
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return str(folder)


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()[:60]  # a valid signature and header, then nothing


def test_empty_dataset(ckpt, tmp_path):
    data = _local_dataset(tmp_path / "d", train_rows=0)
    fails(["--dataset", data, "--model_name_or_path", ckpt], "split(s) train saved with no rows",
          _populated(tmp_path / "out"))  # fmt: skip


def test_zero_train_samples(ckpt, tmp_path):
    fails(["--dataset", "digits", "--model_name_or_path", ckpt, "--max_train_samples", "0"],
          "the train split of digits is empty", _populated(tmp_path / "out"))  # fmt: skip


def test_split_that_does_not_exist(ckpt, tmp_path):
    fails(["--dataset", "digits", "--model_name_or_path", ckpt, "--test_split", "validation"],
          "split 'validation' not found in digits; splits are train, test", _populated(tmp_path / "out"))  # fmt: skip


def test_label_column_that_holds_images(ckpt, tmp_path):
    fails(["--dataset", "digits", "--model_name_or_path", ckpt, "--label_column", "image"],
          "label column 'image' of digits holds Image", _populated(tmp_path / "out"))  # fmt: skip


def test_image_column_that_holds_labels(ckpt, tmp_path):
    fails(["--dataset", "digits", "--model_name_or_path", ckpt, "--image_column", "label"],
          "column 'label' of digits holds ClassLabel", _populated(tmp_path / "out"))  # fmt: skip


def test_truncated_image_in_the_test_split(ckpt, tmp_path):
    data = _local_dataset(tmp_path / "d", corrupt=("test", 3, _truncated_png()))
    fails(["--dataset", data, "--model_name_or_path", ckpt],
          "image 3 of the test split (test) cannot be read", _populated(tmp_path / "out"))  # fmt: skip


def test_label_minus_one(ckpt, tmp_path):
    """datasets' ClassLabel accepts -1 ("no label"); cross-entropy would fail on it at the first batch."""
    data = _local_dataset(tmp_path / "d", test_labels=[0, -1, 2, 1])
    text = fails(["--dataset", data, "--model_name_or_path", ckpt],
                 "label -1 of example 1 of the test split (test) of", _populated(tmp_path / "out"))  # fmt: skip
    assert "3 classes, so labels 0..2" in text and "'no label'" in text


def test_label_above_the_class_count(ckpt, tmp_path):
    """A label >= the number of classes: a parquet copy whose ClassLabel metadata lists fewer names than the
    data holds (hand-edited or written by another tool; datasets does not check it when reading)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "parquet"
    folder.mkdir()
    ds = datasets.load_from_disk(_local_dataset(tmp_path / "d"))
    for split in ("train", "test"):
        table = ds[split].with_format("arrow")[:]
        if split == "train":
            labels = table.column("label").to_pylist()
            labels[4] = 7
            table = table.set_column(
                table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64())
            )
        meta = {"info": {"features": json.loads(json.dumps(ds[split].features.to_dict()))}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    fails(["--dataset", str(folder), "--model_name_or_path", ckpt],
          "label 7 of example 4 of the train split (train) of", _populated(tmp_path / "out"))  # fmt: skip


def test_label_subset_with_an_unknown_class(ckpt, tmp_path):
    fails(["--dataset", "digits", "--model_name_or_path", ckpt, "--label_subset", "3", "eleven"],
          "label_subset names ['eleven'] are not classes", _populated(tmp_path / "out"))  # fmt: skip


def test_dataset_path_that_does_not_exist(ckpt, tmp_path):
    fails(["--dataset", "cifar10", "--dataset_path", str(tmp_path / "nope"), "--model_name_or_path", ckpt],
          "dataset_path", _populated(tmp_path / "out"))  # fmt: skip


# ---------------------------------------------------------------------- models
def test_text_model_checkpoint(tmp_path):
    from transformers import BertConfig

    BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(tmp_path / "bert")
    fails(["--dataset", "digits", "--model_name_or_path", str(tmp_path / "bert")],
          "is not an image-classification checkpoint (BertConfig, model_type 'bert')", _populated(tmp_path / "out"))  # fmt: skip


def test_weights_of_another_architecture(vit, ckpt, tmp_path):
    """config.json says ViT, model.safetensors holds the timm EfficientNet: transformers would initialise the
    whole ViT at random with a warning and the run would finetune noise."""
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(vit, folder)
    shutil.copy(os.path.join(ckpt, "model.safetensors"), folder / "model.safetensors")
    fails(["--dataset", "digits", "--model_name_or_path", str(folder)],
          "are missing from the checkpoint or have another shape", _populated(tmp_path / "out"))  # fmt: skip


def test_checkpoint_without_image_processor(vit, tmp_path):
    import shutil

    folder = tmp_path / "noproc"
    shutil.copytree(vit, folder)
    os.remove(folder / "preprocessor_config.json")
    fails(["--dataset", "digits", "--model_name_or_path", str(folder)], "has no image processor",
          _populated(tmp_path / "out"))  # fmt: skip


def test_resume_from_a_checkpoint_of_another_model(ckpt, vit, tmp_path):
    """A timm run's checkpoint resumed with a ViT: the Trainer would load it with a warning and go on."""
    out = tmp_path / "run"
    finetune.main([*FAST, "--output_dir", str(out), "--dataset", "digits", "--model_name_or_path", ckpt,
                   "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1"])  # fmt: skip
    fails(["--dataset", "digits", "--model_name_or_path", vit, "--resume_from_checkpoint", "true"],
          "checkpoint-1 holds another model's weights", out)  # fmt: skip


# ---------------------------------------------------------------------- output_dir
def test_output_dir_is_a_file(ckpt, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    fails(["--dataset", "digits", "--model_name_or_path", ckpt], "is a file, not a folder", target)


def test_output_dir_under_a_file(ckpt, tmp_path):
    (tmp_path / "results.txt").write_text("not a folder")
    fails(["--dataset", "digits", "--model_name_or_path", ckpt], "cannot be created: ",
          tmp_path / "results.txt" / "out")  # fmt: skip
    assert (tmp_path / "results.txt").read_text() == "not a folder"


def test_output_dir_not_writable(ckpt, tmp_path):
    """Tests run as root, which ignores permission bits; the immutable attribute stops root too."""
    locked = tmp_path / "locked"
    _populated(locked)
    if os.geteuid() != 0:
        os.chmod(locked, 0o555)
    elif subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: no honest way to deny writing")
    try:
        fails(["--dataset", "digits", "--model_name_or_path", ckpt], "is not writable", locked)
        fails(["--dataset", "digits", "--model_name_or_path", ckpt], "is not writable", locked / "sub")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        else:
            os.chmod(locked, 0o755)


def test_resume_from_a_path_that_is_not_a_checkpoint(ckpt, tmp_path):
    fails(["--dataset", "digits", "--model_name_or_path", ckpt, "--resume_from_checkpoint", str(tmp_path / "x")],
          "is not a folder", _populated(tmp_path / "out"))  # fmt: skip


# ---------------------------------------------------------------------- Python API
API_ARGS_CASES = {
    "rho-string": ({"sam_rho": "0.1"}, "sam_rho must be a finite number >= 0"),
    "rho-bool": ({"sam_rho": True}, "sam_rho must be a finite number >= 0"),
    "rho-nan": ({"sam_rho": float("nan")}, "sam_rho must be a finite number >= 0"),
    "adaptive-string": ({"sam_adaptive": "yes"}, "sam_adaptive must be True or False"),
    "eta-none": ({"sam_eta": None}, "sam_eta must be a finite number"),
    "norm-1": ({"sam_norm": 1}, "sam_norm must be one of '2', 'inf'"),
    "sync-int": ({"sam_sync_perturbation": 1}, "sam_sync_perturbation must be True, False or None"),
    "mode-none": ({"sam_mode": None}, "sam_mode must be one of"),
    "interval-float": ({"sam_interval": 2.0}, "sam_interval must be an integer >= 1"),
    "interval-bool": ({"sam_interval": True}, "sam_interval must be an integer >= 1"),
    "end-none": ({"sam_end": None}, "sam_end must be a fraction"),
    "group-size-float": ({"sam_group_size": 2.5}, "sam_group_size must be a positive integer"),
    "ascent-steps-string": ({"sam_ascent_steps": "2"}, "sam_ascent_steps must be an integer"),
    "rho-schedule-none": ({"sam_rho_schedule": None}, "sam_rho_schedule must be one of"),
    "rho-min-negative": ({"sam_rho_min": -0.1}, "sam_rho_min must be a number in"),
    "max-nonfinite-float": ({"sam_max_nonfinite_steps": 1.5}, "sam_max_nonfinite_steps must be an integer"),
    "looksam-alpha-string": ({"sam_looksam_alpha": "0.7"}, "sam_looksam_alpha must be a number"),
    "param-filter-int": ({"sam_param_filter": 5}, "sam_param_filter must be a regular expression"),
    "gsam+param-filter": ({"sam_mode": "gsam", "sam_param_filter": "norm"}, "cannot be combined"),
    "lomo-optimizer": ({"optim": "lomo"}, "updates the weights during backward"),
}


@pytest.mark.parametrize("case", list(API_ARGS_CASES))
def test_api_training_arguments(case, tmp_path):
    kwargs, message = API_ARGS_CASES[case]
    with pytest.raises(ValueError, match=_escape(message)):
        SAMTrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", **kwargs)
    assert not (tmp_path / "o").exists()


def test_api_trainer_rejects_plain_arguments_and_a_filter_matching_nothing(tmp_path):
    from transformers import TrainingArguments

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="SAMTrainer needs SAMTrainingArguments"):
        SAMTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True))
    args = SAMTrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none",
                                sam_param_filter="bias_of_nothing")  # fmt: skip
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        SAMTrainer(model=model, args=args)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"rho": -0.1}, "rho must be a finite number >= 0"), ({"norm": "1"}, "norm must be one of"),
     ({"adaptive": "yes"}, "adaptive must be True or False"), ({"eta": float("inf")}, "eta must be a finite")],
)  # fmt: skip
def test_api_sam_optimizer(kwargs, message):
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match=_escape(message)):
        SAM(torch.optim.SGD(params, lr=0.1), **kwargs)
    with pytest.raises(TypeError, match="SAM wraps an optimizer instance"):
        SAM(params, rho=0.05)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_recipe_yaml_duplicate_key(tmp_path, no_loading):
    """yaml.safe_load keeps the last of two `seed:` lines silently: a recipe that says two things is refused."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset: digits\nseed: 1\nsam_rho: 0.1\nseed: 2\n")
    code = fails(
        ["--config", str(recipe)], "line 4: seed is set twice (first on line 2); keep one", tmp_path / "out"
    )
    assert code.startswith(f"finetune.py: error: {recipe}, line 4"), code


def test_a_refused_zero3_config_leaves_no_global_zero3_state(tmp_path):
    """TrainingArguments registers a DeepSpeed config globally (transformers' `is_deepspeed_zero3_enabled`), so a
    ZeRO-3 config refused by SAM must not go on making every later `from_pretrained` build under zero.Init."""
    import gc

    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from hf_sam import SAMTrainingArguments

    errors = []
    try:
        SAMTrainingArguments(
            output_dir=str(tmp_path), sam_rho=0.05, use_cpu=True, report_to=[],
            deepspeed={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1},
            sam_group_size=2,
        )  # fmt: skip
    except ValueError as error:
        errors.append(error)  # kept alive, as a caller's handler may keep it
    assert errors and "ZeRO-3" in str(errors[0])
    gc.collect()
    assert not is_deepspeed_zero3_enabled()
