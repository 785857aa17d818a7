"""Every recipe parses with the real parser; sam/baseline pairs differ only in sam_*; accelerate configs."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import warnings

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from finetune_helpers import REPO

import hf_sam.cli
from hf_sam.cli import ConfigError, parse_config, steps_per_epoch

RECIPES = sorted(glob.glob(os.path.join(REPO, "recipes", "*", "*", "*.yaml")))
TABLE_8 = {
    "flowers102": 0.2,
    "stanford_cars": 0.2,
    "oxford_pets": 0.1,
    "cifar10": 0.05,
    "cifar100": 0.02,
    "food101": 0.02,
}


# Train images per dataset (hub-ids.md, the dataset cards), for the batch arithmetic in the headers.
TRAIN_IMAGES = {"flowers102": 2040, "stanford_cars": 8144, "oxford_pets": 3680, "cifar10": 50000,
                "cifar100": 50000, "food101": 75750}  # fmt: skip
PAPER_RECIPES = [p for p in RECIPES if p.split(os.sep)[-3] in TABLE_8]


def test_the_issue_grid_exists():
    pairs = {tuple(p.split(os.sep)[-3:-1]) for p in RECIPES if p.endswith("sam.yaml")}
    wanted = {(d, m) for d in TABLE_8 for m in ("efficientnet_b7", "vit_b16")}
    wanted |= {("cifar100", "efficientnet_l2"), ("food101", "efficientnet_l2")}
    assert wanted <= pairs
    for dataset, model in pairs:
        folder = os.path.join(REPO, "recipes", dataset, model)
        assert {"sam.yaml", "baseline.yaml", "README.md"} <= set(os.listdir(folder)), folder
        if dataset in TABLE_8:  # and the compute-matched baseline (section 3.1)
            assert "baseline_2x.yaml" in os.listdir(folder), folder


@pytest.mark.parametrize(
    "base",
    [p for p in PAPER_RECIPES if p.endswith(os.sep + "baseline.yaml")],
    ids=lambda p: os.path.relpath(p, REPO),
)
def test_compute_matched_baseline_is_the_baseline_with_twice_the_steps(base):
    """Section 3.1 gives each non-SAM run twice the epochs (a SAM step is two passes); C.2 is silent. baseline.yaml
    keeps SAM's step count (equal steps), baseline_2x.yaml doubles it and changes nothing else."""
    with open(base) as f:
        equal = yaml.safe_load(f)
    with open(base.replace("baseline.yaml", "baseline_2x.yaml")) as f:
        doubled = yaml.safe_load(f)
    assert {k for k in equal.keys() | doubled.keys() if equal.get(k) != doubled.get(k)} == {"max_steps"}
    assert doubled["max_steps"] == 2 * equal["max_steps"] and doubled["sam_rho"] == 0
    comment = _comments(base.replace("baseline.yaml", "baseline_2x.yaml"))["max_steps"]
    assert "section 3.1" in comment and "C.2 is silent" in comment


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, REPO))
def test_recipe_parses_and_validates(path):
    args = parse_config(["--config", path, "--check_config", "true", "--num_processes", "8"])
    dataset, model = path.split(os.sep)[-3:-1]
    run_dir = os.path.join(
        "outputs", *os.path.relpath(path, os.path.join(REPO, "recipes"))[:-5].split(os.sep)
    )
    if dataset in TABLE_8:
        assert args.training.output_dir == os.path.join(run_dir, f"seed-{args.training.seed}")
    else:
        assert args.training.output_dir == run_dir
    if dataset in TABLE_8:
        t = args.training
        # paper C.2, and the released code (google-research/sam) where the paper is silent
        assert (t.optim.value, t.optim_args, t.lr_scheduler_type.value) == (
            "sgd",
            "momentum=0.9,nesterov=True",
            "cosine",
        )
        assert (t.weight_decay, t.max_grad_norm, args.model.freeze_batchnorm) == (1e-5, 5.0, True)
        assert args.script.weight_decay_all_parameters and (t.warmup_steps, t.label_smoothing_factor) == (
            0,
            0.0,
        )
        cifar = dataset.startswith("cifar")
        assert args.data.train_augmentation == ("cifar-autoaugment" if cifar else "random-resized-crop")
        assert args.data.eval_resize == ("full" if cifar else "checkpoint")
        released = (0.5, 0.2) if model.startswith("efficientnet") else (0.0, 0.0)
        assert (args.model.drop_rate, args.model.drop_path_rate) == released
        # released EfficientNet head U(±1/√K); the ViT paper's zero head (3.2)
        assert args.model.head_init == ("released" if model.startswith("efficientnet") else "zeros")
        global_batch, m = {"efficientnet_b7": (1024, 16), "efficientnet_l2": (512, 4), "vit_b16": (512, 64)}[
            model
        ]
        assert (args.script.global_batch_size, t.per_device_train_batch_size) == (global_batch, m)
        assert t.gradient_accumulation_steps == global_batch // (m * 8)  # derived for 8 processes
        assert args.script.license == ("other" if dataset == "stanford_cars" else "apache-2.0")
        if path.endswith("sam.yaml"):
            assert t.sam_rho == TABLE_8[dataset]  # paper, table 8


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=lambda p: os.path.relpath(p, REPO))
def test_recipe_header_states_the_true_batch_arithmetic(path):
    """The header's steps per epoch and epochs are transformers' (ceil of micro-batches / accumulation), for 8
    processes, computed here by hand from the dataset size and checked against the parsed recipe."""
    dataset = path.split(os.sep)[-3]
    args = parse_config(["--config", path, "--check_config", "true", "--num_processes", "8"])
    t = args.training
    header = open(path).read().split("\n\n")[0]
    match = re.search(
        r"([\d,]+) train images .*?on 8 GPUs: ([\d,]+) per process = ([\d,]+) micro-batches\s*#\s+-> (\d+) "
        r"optimizer steps/epoch \(transformers: ceil\(([\d,]+) / (\d+)\)\); ([\d,]+) steps = ([\d,.]+) epochs",
        header,
        re.S,
    )
    assert match, header
    images, per_process, micro, steps, _, accumulation, max_steps, epochs = (
        float(g.replace(",", "")) for g in match.groups()
    )
    assert images == TRAIN_IMAGES[dataset]
    assert per_process == math.ceil(images / 8) and micro == math.ceil(
        per_process / t.per_device_train_batch_size
    )
    assert accumulation == t.gradient_accumulation_steps and steps == math.ceil(micro / accumulation)
    assert steps == steps_per_epoch(int(images), t.per_device_train_batch_size, 8, int(accumulation))
    assert max_steps == t.max_steps and abs(epochs - max_steps / steps) < 0.05 + 1e-9
    assert (
        f"Global batch {args.script.global_batch_size} = {t.per_device_train_batch_size} per device" in header
    )


def test_pets_b7_header_numbers_from_the_issue():
    """The issue's worked example: 4 steps per epoch, 1,250 epochs (not 3.59 and 1,391)."""
    header = open(os.path.join(REPO, "recipes/oxford_pets/efficientnet_b7/sam.yaml")).read()
    assert "-> 4 optimizer steps/epoch" in header and "5,000 steps = 1,250 epochs" in header


def test_global_batch_gives_the_same_math_for_any_process_count(monkeypatch):
    recipe = os.path.join(REPO, "recipes/oxford_pets/efficientnet_b7/sam.yaml")
    for processes, accumulation in ((1, 64), (2, 32), (8, 8), (64, 1)):
        # What WORLD_SIZE would say:
        monkeypatch.setattr(hf_sam.cli, "launch_world_size", lambda n=processes: n)
        args = parse_config(["--config", recipe, "--check_config", "true"])
        t = args.training
        assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (16, accumulation)
        assert t.per_device_train_batch_size * processes * t.gradient_accumulation_steps == 1024
    for processes in (3, 128):
        monkeypatch.setattr(hf_sam.cli, "launch_world_size", lambda n=processes: n)
        with pytest.raises(ConfigError, match=f"x {processes} process\\(es\\).*divides 64"):
            parse_config(["--config", recipe, "--check_config", "true"])
    monkeypatch.setattr(hf_sam.cli, "launch_world_size", lambda: 8)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=4 contradicts global_batch_size"):
        parse_config(["--config", recipe, "--check_config", "true", "--gradient_accumulation_steps", "4"])
    args = parse_config(["--config", recipe, "--check_config", "true", "--gradient_accumulation_steps", "8"])
    assert args.training.gradient_accumulation_steps == 8  # consistent: accepted


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
    import statistics

    spec = importlib.util.spec_from_file_location(
        "results_table", os.path.join(REPO, "recipes", "results_table.py")
    )
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    readme = tmp_path / "README.md"
    with open(os.path.join(REPO, "recipes", "README.md")) as f:
        readme.write_text(f.read())
    outputs = tmp_path / "outputs"

    def finished(run: str, top1: float):
        (outputs / run).mkdir(parents=True)
        (outputs / run / "test_results.json").write_text(json.dumps({"test_top1": top1}))

    # CIFAR-10 B7: SAM with 3 seeds (one folder per seed, as output_dir_per_seed writes them), baseline with 1
    top1 = {0: 0.9912, 1: 0.9905, 2: 0.9920}
    for seed, value in top1.items():
        finished(f"cifar10/efficientnet_b7/sam/seed-{seed}", value)
    (outputs / "cifar10/efficientnet_b7/sam/seed-3").mkdir()  # started, not finished: not counted
    finished("cifar10/efficientnet_b7/baseline/seed-0", 0.9901)
    finished("oxford_pets/vit_b16/sam", 0.95)  # a run without seed folders counts as one seed
    results.update_readme(str(readme), os.path.join(REPO, "recipes"), str(outputs))

    def rows():
        return {
            line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line
            for line in readme.read_text().splitlines()
            if line.startswith("| [")
        }

    errors = [100 * (1 - v) for v in top1.values()]  # by hand: 0.88, 0.95, 0.80
    mean, std = statistics.mean(errors), statistics.stdev(errors)
    assert f"{mean:.2f} ± {std:.2f} (n=3)" == "0.88 ± 0.08 (n=3)"
    assert rows()["[cifar10](cifar10/efficientnet_b7/README.md)/efficientnet_b7"].endswith(
        "| 0.88 ± 0.02 | 0.95 ± 0.03 | 0.88 ± 0.08 (n=3) | 0.99 (n=1) |"
    )
    assert rows()["[food101](food101/efficientnet_b7/README.md)/efficientnet_b7"].endswith(
        "| 7.02 ± 0.02 | 7.17 ± 0.03 |  |  |"
    )
    assert rows()["[oxford_pets](oxford_pets/vit_b16/README.md)/vit_b16"].endswith(
        "| – | – | 5.00 (n=1) |  |"
    )
    results.update_readme(str(readme), os.path.join(REPO, "recipes"), str(outputs), seeds={0, 1})
    assert rows()["[cifar10](cifar10/efficientnet_b7/README.md)/efficientnet_b7"].endswith(
        f"| 0.88 ± 0.02 | 0.95 ± 0.03 | {statistics.mean(errors[:2]):.2f} ± {statistics.stdev(errors[:2]):.2f} (n=2) "
        "| 0.99 (n=1) |"
    )
    # the committed README holds no number of ours
    committed = open(os.path.join(REPO, "recipes", "README.md")).read()
    assert all(line.endswith("|  |  |") for line in committed.splitlines() if line.startswith("| ["))


@pytest.mark.parametrize(
    "sam", [p for p in PAPER_RECIPES if p.endswith("sam.yaml")], ids=lambda p: os.path.relpath(p, REPO)
)
def test_recipe_readme_matches_the_recipe(sam):
    """The README states the recipe's batch arithmetic, settings and the estimates of benchmarks/recipe_estimates.py."""
    folder = os.path.dirname(sam)
    model = folder.split(os.sep)[-1]
    readme = open(os.path.join(folder, "README.md")).read()
    args = parse_config(["--config", sam, "--check_config", "true", "--num_processes", "8"])
    t, dataset = args.training, folder.split(os.sep)[-2]
    spe = steps_per_epoch(
        TRAIN_IMAGES[dataset], t.per_device_train_batch_size, 8, t.gradient_accumulation_steps
    )
    for needle in (f"`global_batch_size: {args.script.global_batch_size}`", f"so an epoch is {spe} optimizer steps",
                   f"ρ = {t.sam_rho}", f"`{args.data.train_augmentation}`", "## Departures from the paper and the released code",
                   "**Estimates, not measurements"):  # fmt: skip
        assert needle in readme, needle
    with open(os.path.join(REPO, "benchmarks", "results", "recipe_estimates.json")) as f:
        estimate = json.load(f)[model]
    assert (
        f"| memory (estimate) | ~{estimate['memory_gb_sam']:.0f} GB | ~{estimate['memory_gb_baseline']:.0f} GB |"
        in readme
    )
    low, high = estimate["hours_8xA100_sam"]
    assert f"| {low:.1f}-{high:.1f} h |" in readme
    assert "Departures from the paper: none" not in readme


def _comments(path: str) -> dict[str, str]:
    """Each key's inline comment (the recipe's cited source)."""
    out = {}
    for line in open(path):
        if re.match(r"^[a-z_0-9]+:", line):
            key, _, rest = line.partition(":")
            out[key] = rest.partition("#")[2].strip()
    return out


C2_AUGMENTATION = (
    '"We do not use data augmentation for the other datasets, applying the same preprocessing as for the '
    'Imagenet experiments"'
)


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=lambda p: os.path.relpath(p, REPO))
def test_recipe_comments_cite_the_right_source(path):
    """C.2 is silent on label smoothing and warm-up (the released flag defaults decide), table 8 is the arXiv v2
    table, C.2 has no ViT recipe and ViT has no BatchNorm, and the crop's ranges are stated where it is set."""
    model = path.split(os.sep)[-2]
    comments, text = _comments(path), re.sub(r"\n#\s+", " ", open(path).read())  # comment lines joined
    assert "arXiv:2010.01412v2" in text
    if path.endswith("sam.yaml"):
        assert 'arXiv:2010.01412v2, table 8 "ρ used for the finetuning experiments"' in comments["sam_rho"]
    for key in ("label_smoothing_factor", "warmup_steps"):
        assert "states none" not in comments[key] and comments[key].startswith(
            "C.2 is silent; released code"
        ), key
    assert (
        "published finetuning command" in comments["label_smoothing_factor"]
        and "0.1" in comments["label_smoothing_factor"]
    )
    assert "1.0" in comments["max_grad_norm"]  # the published command's clipping, beside the flag default
    if model == "vit_b16":
        assert (
            not comments["global_batch_size"].startswith("paper")
            and "no ViT recipe" in comments["global_batch_size"]
        )
        assert "BN and biases" not in comments["weight_decay_all_parameters"]
        assert "no ViT recipe" in comments["weight_decay"]
    if "random-resized-crop" in text:
        assert C2_AUGMENTATION in text and "preprocess_for_train" in text
        crop = comments["train_augmentation"]
        assert "10-100%" in crop and "8-100%" in crop and "log-uniform" in crop, crop


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, REPO))
def test_recipe_uses_no_deprecated_argument(path):
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing: the old name warns on every check."""
    assert "gradient_checkpointing" not in yaml.safe_load(open(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        parse_config(["--config", path, "--check_config", "true", "--num_processes", "8"])


def test_check_config_prints_what_a_launch_on_the_named_processes_would_use(capsys, monkeypatch):
    """Checked on a laptop: the printout is the launch's (no use_cpu stand-in), with the accumulation it derives
    and the process count it was derived for (recipes/README.md promises both)."""
    from finetune_helpers import load_finetune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = os.path.join(REPO, "recipes/cifar100/efficientnet_l2/sam.yaml")
    finetune = load_finetune()
    for argv, processes, accumulation, where in (
        (["--num_processes", "8"], 8, 16, "--num_processes 8"),
        ([], 1, 128, "this launch's WORLD_SIZE"),
    ):
        finetune.main(["--config", recipe, "--check_config", "true", *argv])
        out = capsys.readouterr().out
        config_text, _, summary = out.partition("\n# checked for")
        printed = yaml.safe_load(config_text)
        # the GPU launch's values, not the CPU stand-in the check ran with
        assert printed["use_cpu"] is False and printed["dataloader_pin_memory"] is True
        assert printed["gradient_accumulation_steps"] == accumulation and printed["global_batch_size"] == 512
        assert printed["activation_checkpointing"] is True and "gradient_checkpointing" not in printed
        assert summary.startswith(
            f" {processes} process(es) ({where}): global batch 512 = 4 per device x {processes} process(es) x "
            f"{accumulation} accumulation step(s)"
        ), summary
        assert out.rstrip().endswith(f"{recipe}: OK")
