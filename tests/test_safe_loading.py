"""Safe loading: safetensors in and out, no repository code without `trust_remote_code: true`, no Hub token in
any output file or log line."""

from __future__ import annotations

import json
import os

import pytest
import torch
from finetune_helpers import load_finetune, tiny_timm_checkpoint

import hf_sam.finetune.hub
import hf_sam.finetune.models

finetune = load_finetune()
FAST = ["--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--use_cpu", "true",
        "--report_to", "none", "--disable_tqdm", "true", "--optim", "sgd", "--optim_args", "momentum=0.9",
        "--max_train_samples", "8", "--max_test_samples", "4", "--dataset", "digits", "--logging_steps", "1"]  # fmt: skip
TOKEN = "hf_PLANTEDfakeTOKENdoNotLeak1234567890"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_timm_checkpoint(str(tmp_path_factory.mktemp("timm_ckpt")))


def test_checkpoints_are_safetensors_and_resume_unpickles_nothing(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = [*FAST, "--model_name_or_path", ckpt, "--output_dir", str(out), "--save_strategy", "steps",
            "--save_steps", "1"]  # fmt: skip
    finetune.main([*args, "--max_steps", "2"])
    folders = [out, out / "checkpoint-1", out / "checkpoint-2"]
    for folder in folders:
        names = set(os.listdir(folder))
        assert "model.safetensors" in names, folder
        assert not names & {"pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json"}, folder
        assert not [n for n in names if n.endswith((".bin", ".pth", ".pt")) and n not in
                    {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}], folder  # fmt: skip

    loads = []
    real_load = torch.load

    def recording_load(*a, **kw):
        loads.append((os.path.basename(str(a[0])), kw.get("weights_only")))
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", recording_load)
    finetune.main([*args, "--max_steps", "3", "--resume_from_checkpoint", "true"])
    # Weights come from model.safetensors; the optimizer, scheduler and RNG pickles are read with weights_only.
    assert {name for name, _ in loads} == {"optimizer.pt", "scheduler.pt", "rng_state.pth"}, loads
    assert all(weights_only is True for _, weights_only in loads), loads


def test_trust_remote_code_is_passed_explicitly_to_every_loader(ckpt, tmp_path, monkeypatch):
    calls = []
    for name in ("AutoConfig", "AutoModelForImageClassification", "AutoImageProcessor"):
        cls = getattr(hf_sam.finetune.models, name)

        class Recording(cls):  # same behaviour, records the keyword arguments
            @classmethod
            def from_pretrained(inner, *a, _name=name, _cls=cls, **kw):
                calls.append((_name, kw.get("trust_remote_code", "<not passed>")))
                return _cls.from_pretrained(*a, **kw)

        monkeypatch.setattr(hf_sam.finetune.models, name, Recording)
    finetune.main([*FAST, "--model_name_or_path", ckpt, "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
                   "--save_strategy", "no"])  # fmt: skip
    assert {n for n, _ in calls} == {"AutoConfig", "AutoModelForImageClassification", "AutoImageProcessor"}
    assert all(flag is False for _, flag in calls), calls
    calls.clear()
    hf_sam.finetune.models.load_model_and_processor(ckpt, ["a", "b"], trust_remote_code=True)
    assert calls and all(flag is True for _, flag in calls), calls


def _checkpoint_with_code(folder, marker) -> str:
    """A checkpoint whose config.json points at a Python file of its own (auto_map), which writes `marker`."""
    os.makedirs(folder)
    with open(os.path.join(folder, "configuration_evil.py"), "w") as f:
        f.write(
            f"open({str(marker)!r}, 'w').write('ran')\n"
            "from transformers import PretrainedConfig\n"
            "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
        )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}, f)
    return str(folder)


def test_repository_code_runs_only_with_trust_remote_code(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    folder = _checkpoint_with_code(tmp_path / "evil", marker)
    argv = [*FAST, "--model_name_or_path", folder, "--output_dir", str(tmp_path / "o"), "--max_steps", "1"]
    with pytest.raises(SystemExit) as err:
        finetune.main(argv)
    assert "ships its own Python code" in str(err.value.code) and "trust_remote_code: true" in str(
        err.value.code
    )
    assert "\n" not in str(err.value.code) and not marker.exists()
    # Opting in runs it (then fails cleanly: this config has no image-classification model).
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    with pytest.raises(SystemExit) as err:
        finetune.main([*argv, "--trust_remote_code", "true"])
    assert marker.exists() and str(err.value.code).startswith("finetune.py: error: ")


def test_dataset_folder_code_is_never_run(ckpt, tmp_path):
    """A local dataset folder with a loading script: read as images (imagefolder), the script is not imported."""
    from PIL import Image

    marker = tmp_path / "script_ran"
    folder = tmp_path / "ds"
    for split in ("train", "test"):
        for label in ("a", "b"):
            os.makedirs(folder / split / label)
            for i in range(2):
                Image.new("RGB", (16, 16), (i * 90, 20, 30)).save(folder / split / label / f"{i}.png")
    (folder / "ds.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    finetune.main([*FAST, "--dataset", str(folder), "--model_name_or_path", ckpt, "--output_dir",
                   str(tmp_path / "o"), "--max_steps", "1", "--save_strategy", "no"])  # fmt: skip
    assert not marker.exists()


def test_hub_token_never_reaches_logs_cards_configs_or_checkpoints(ckpt, tmp_path, monkeypatch, capfd):
    """A token planted in HF_TOKEN: a full run with checkpoints and the push folder; grep every byte."""
    import transformers

    uploads = []

    class FakeApi:  # the Hub is unreachable here; HfApi would read HF_TOKEN itself
        def create_repo(self, repo_id, exist_ok, private):
            uploads.append(repo_id)

        def upload_folder(self, repo_id, folder_path, commit_message, allow_patterns):
            uploads.append(folder_path)

    monkeypatch.setattr(hf_sam.finetune.hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", TOKEN)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()  # the most talkative setting a user would run with
    try:
        out = tmp_path / "out"
        finetune.main([*FAST, "--model_name_or_path", ckpt, "--output_dir", str(out), "--max_steps", "2",
                       "--save_strategy", "steps", "--save_steps", "1", "--push_to_hub", "true",
                       "--hub_model_id", "me/digits-sam"])  # fmt: skip
    finally:
        transformers.logging.set_verbosity(verbosity)
    assert uploads == ["me/digits-sam", str(out)]
    captured = capfd.readouterr()
    log = captured.out + captured.err
    assert "Training" in log or "train" in log  # the log was captured
    assert TOKEN not in log
    files = [os.path.join(root, name) for root, _, names in os.walk(out) for name in names]
    assert {"README.md", "resolved_config.yaml", "training_args.bin", "config.json"} <= {
        os.path.basename(f) for f in files
    }
    assert any("checkpoint-2" in f for f in files)
    needle = TOKEN.encode()
    for path in files:
        with open(path, "rb") as f:
            assert needle not in f.read(), path
    args = torch.load(out / "training_args.bin", weights_only=False)  # our own file, just written
    assert not args.hub_token and not getattr(args, "push_to_hub_token", None)
