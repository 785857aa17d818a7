"""Every recipe parses with the real parser; sam/baseline pairs differ only in sam_*; accelerate configs."""

from __future__ import annotations

import glob
import json
import os

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from finetune_helpers import REPO, load_finetune

finetune = load_finetune()
RECIPES = sorted(glob.glob(os.path.join(REPO, "recipes", "*", "*", "*.yaml")))
TABLE_8 = {
    "flowers102": 0.2,
    "stanford_cars": 0.2,
    "oxford_pets": 0.1,
    "cifar10": 0.05,
    "cifar100": 0.02,
    "food101": 0.02,
}


def test_the_issue_grid_exists():
    pairs = {tuple(p.split(os.sep)[-3:-1]) for p in RECIPES if p.endswith("sam.yaml")}
    wanted = {(d, m) for d in TABLE_8 for m in ("efficientnet_b7", "vit_b16")}
    wanted |= {("cifar100", "efficientnet_l2"), ("food101", "efficientnet_l2")}
    assert wanted <= pairs
    for dataset, model in pairs:
        folder = os.path.join(REPO, "recipes", dataset, model)
        assert {"sam.yaml", "baseline.yaml", "README.md"} <= set(os.listdir(folder)), folder


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, REPO))
def test_recipe_parses_and_validates(path):
    args = finetune.parse_config(["--config", path, "--check_config", "true"])
    assert args.training.output_dir == os.path.join(
        "outputs", *os.path.relpath(path, os.path.join(REPO, "recipes"))[:-5].split(os.sep)
    )
    dataset = path.split(os.sep)[-3]
    if dataset in TABLE_8:
        t = args.training
        assert (t.optim.value, t.optim_args, t.lr_scheduler_type.value) == ("sgd", "momentum=0.9", "cosine")
        assert (t.weight_decay, t.max_grad_norm, args.model.freeze_batchnorm) == (1e-5, 0.0, True)
        assert args.data.train_augmentation == ("autoaugment" if dataset.startswith("cifar") else "none")
        if path.endswith("sam.yaml"):
            assert t.sam_rho == TABLE_8[dataset]  # paper, table 8


@pytest.mark.parametrize(
    "sam", [p for p in RECIPES if p.endswith("sam.yaml")], ids=lambda p: os.path.relpath(p, REPO)
)
def test_pair_differs_only_in_sam_keys(sam):
    with open(sam) as f:
        sam_keys = yaml.safe_load(f)
    with open(sam.replace("sam.yaml", "baseline.yaml")) as f:
        base_keys = yaml.safe_load(f)
    differing = {k for k in sam_keys.keys() | base_keys.keys() if sam_keys.get(k) != base_keys.get(k)}
    assert differing == {"sam_rho"} or (differing and all(k.startswith("sam_") for k in differing))
    assert sam_keys["sam_rho"] > 0 and base_keys["sam_rho"] == 0


def test_accelerate_configs():
    folder = os.path.join(REPO, "accelerate_configs")
    assert sorted(os.listdir(folder)) == [
        "cpu.yaml",
        "deepspeed_zero2.yaml",
        "fsdp.yaml",
        "multi_gpu.yaml",
        "multi_node.yaml",
        "single_gpu.yaml",
        "tpu.yaml",
    ]
    for name in os.listdir(folder):
        ClusterConfig.from_yaml_file(os.path.join(folder, name))  # accelerate can read it
        with open(os.path.join(folder, name)) as f:
            lines = [line for line in f if line.strip() and not line.startswith("#")]
        assert all("#" in line for line in lines), name  # a comment on every key
        assert "mixed_precision" not in "".join(lines)  # precision lives in the recipes
    cpu = ClusterConfig.from_yaml_file(os.path.join(folder, "cpu.yaml"))
    assert (cpu.distributed_type.value, cpu.num_processes, cpu.use_cpu) == ("MULTI_GPU", 2, False)
    fsdp = ClusterConfig.from_yaml_file(os.path.join(folder, "fsdp.yaml"))
    assert fsdp.distributed_type.value == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    zero2 = ClusterConfig.from_yaml_file(os.path.join(folder, "deepspeed_zero2.yaml"))
    assert zero2.distributed_type.value == "DEEPSPEED" and zero2.deepspeed_config["zero_stage"] == 2


def test_results_table_is_filled_only_from_runs(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "results_table", os.path.join(REPO, "recipes", "results_table.py")
    )
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    readme = tmp_path / "README.md"
    with open(os.path.join(REPO, "recipes", "README.md")) as f:
        readme.write_text(f.read())
    run = tmp_path / "outputs" / "cifar10" / "efficientnet_b7" / "sam"
    run.mkdir(parents=True)
    (run / "test_results.json").write_text(json.dumps({"test_top1": 0.9912}))
    results.update_readme(str(readme), os.path.join(REPO, "recipes"), str(tmp_path / "outputs"))
    rows = {
        line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line
        for line in readme.read_text().splitlines()
        if line.startswith("| [")
    }
    assert rows["[cifar10](cifar10/efficientnet_b7/README.md)/efficientnet_b7"].endswith(
        "| 0.88 | 0.95 | 0.88 |  |"
    )
    assert rows["[food101](food101/efficientnet_b7/README.md)/efficientnet_b7"].endswith(
        "| 7.02 | 7.17 |  |  |"
    )
    # the committed README holds no number of ours
    committed = open(os.path.join(REPO, "recipes", "README.md")).read()
    assert all(line.endswith("|  |  |") for line in committed.splitlines() if line.startswith("| ["))
