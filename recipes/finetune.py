"""Finetune an image classifier with SAM (or the paired plain-SGD baseline) from a YAML recipe.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/finetune.py \
        --config recipes/cifar10/efficientnet_b7/sam.yaml [--any_field value]

The YAML's flat keys are defaults, command-line flags override them, and a key or flag that is not a field of
`ScriptArguments`, `ModelArguments`, `DataArguments` or `hf_sam.SAMTrainingArguments` is an error. Check a
recipe on any machine (no data, model or Hub access; a GPU-only setting such as `bf16` is checked as if on
CPU): `python recipes/finetune.py --config <recipe> --check_config true [--num_processes 8]`.

A recipe's `global_batch_size` fixes the examples per optimizer step: `gradient_accumulation_steps` is derived
from the launch's process count (`WORLD_SIZE`), with `per_device_train_batch_size` (SAM's m) kept; a count that
does not divide is refused. Configuration errors (unknown keys, bad values, output_dir conflicts) are reported
before environment errors (bf16 without a bf16 GPU).

Writes into `output_dir`: the model (safetensors + config with label names + preprocessing config; a timm
model in a layout both `transformers` and `timm.create_model` read), `test_results.json` (top-1 / top-5 on
the test split), `train_results.json`, `resolved_config.yaml` and a model card (`README.md`). With
`push_to_hub: true` and `hub_model_id`, the files a user loads (`PUSHED_FILES`: weights, configs, card, test
results, resolved recipe; no checkpoints, no `training_args.bin`) are uploaded at the end, to a private repository
with `hub_private_repo: true`.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import zipfile
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import yaml
from huggingface_hub import HfApi
from transformers import HfArgumentParser, set_seed

from hf_sam import SAMTrainer, SAMTrainingArguments
from hf_sam.batchnorm import freeze_batchnorm
from hf_sam.data import (
    EVAL_RESIZES,
    TRAIN_AUGMENTATIONS,
    AugmentationEpochCallback,
    DataError,
    add_label_noise,
    check_label_noise,
    collate,
    load_image_classification,
    preprocessing_from_processor,
    resolve_spec,
    set_transforms,
)
from hf_sam.model_card import finetuning_card
from hf_sam.models import TIMM_PREFIX, ModelError, is_timm, load_model_and_processor, make_timm_loadable

# What a user loads (weights, configs, card) and the run's record; never training_args.bin, checkpoints or logs.
# Top-level files only: upload_folder matches these against paths relative to output_dir.
PUSHED_FILES = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "config.json",
                "preprocessor_config.json", "README.md", "test_results.json", "resolved_config.yaml")  # fmt: skip
logger = logging.getLogger("finetune")


class ConfigError(ValueError):
    """A problem in the recipe or the flags; the message says what to change."""


# ====================================================================== args
@dataclass
class ScriptArguments:
    config: str | None = field(default=None, metadata={"help": "YAML recipe (flat keys); flags override it."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Delete the checkpoint-* folders of output_dir and start over (default: refuse)."},
    )
    check_config: bool = field(
        default=False, metadata={"help": "Validate the recipe and print it; load nothing, train nothing."}
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Examples per optimizer step over all processes. gradient_accumulation_steps is derived at "
            "launch: global_batch_size / (per_device_train_batch_size x processes), so per_device_train_batch_size "
            "(SAM's m) stays fixed for any GPU count; a count that does not divide is refused."
        },
    )
    num_processes: int | None = field(
        default=None,
        metadata={
            "help": "With check_config: check global_batch_size for this many processes (default: this launch's)."
        },
    )
    weight_decay_all_parameters: bool = field(
        default=False,
        metadata={
            "help": "Weight decay on every parameter, biases and norm layers included (the SAM authors' released "
            "code). Off: the Trainer's default, which exempts biases and LayerNorm weights."
        },
    )
    output_dir_per_seed: bool = field(
        default=False,
        metadata={
            "help": "Default output_dir outputs/<dataset>/<model>/<run>/seed-<seed>, one folder per seed (what "
            "recipes/results_table.py averages). Off: outputs/<dataset>/<model>/<run>."
        },
    )
    license: str | None = field(
        default=None,
        metadata={
            "help": "Licence of the finetuned weights for the model card (e.g. the base checkpoint's)."
        },
    )


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "transformers or timm checkpoint: Hub id or local folder."}
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "Branch, tag or commit of the checkpoint."}
    )
    freeze_batchnorm: bool = field(
        default=True,
        metadata={
            "help": "BatchNorm as at test time for the whole run (paper, C.2); gamma/beta still train."
        },
    )
    drop_rate: float | None = field(
        default=None,
        metadata={
            "help": "Dropout before the classifier (timm drop_rate; transformers: EfficientNet dropout_rate, ViT "
            "hidden_dropout_prob), active while finetuning. Default: the checkpoint's own."
        },
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata={
            "help": "Stochastic depth / drop-connect (timm drop_path_rate; transformers: EfficientNet "
            "drop_connect_rate), active while finetuning. Default: the checkpoint's own."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run Python code shipped in the model repository (auto_map). Off: such a checkpoint is "
            "refused. (Dataset repositories never run code: datasets >= 4 has no loading scripts.)"
        },
    )


@dataclass
class DataArguments:
    dataset: str | None = field(
        default=None,
        metadata={"help": "A spec name (hf_sam.data.SPECS), a Hub dataset id or a local folder."},
    )
    dataset_path: str | None = field(
        default=None, metadata={"help": "Read the spec's dataset from this local copy instead of the Hub."}
    )
    dataset_revision: str | None = field(
        default=None, metadata={"help": "Overrides the spec's pinned revision."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    image_column: str | None = field(default=None, metadata={"help": "Overrides the spec's image column."})
    label_column: str | None = field(default=None, metadata={"help": "Overrides the spec's label column."})
    train_split: str | None = field(
        default=None, metadata={"help": "Overrides the spec's train split ('a+b' joins)."}
    )
    test_split: str | None = field(default=None, metadata={"help": "Overrides the spec's test split."})
    num_labels: int | None = field(default=None, metadata={"help": "Expected number of classes (checked)."})
    label_subset: list[str] | None = field(
        default=None, metadata={"help": "Keep only these classes (by name), relabelled in this order."}
    )
    train_augmentation: str = field(
        default="none",
        metadata={
            "help": "Train-time augmentation (hf_sam.data.train_augmentation): 'random-resized-crop' is the released "
            "code's ImageNet training crop + flip, 'cifar-autoaugment' its CIFAR pipeline. Random ones are a "
            "function of (seed, epoch, example index).",
            "choices": list(TRAIN_AUGMENTATIONS),
        },
    )
    eval_resize: str = field(
        default="checkpoint",
        metadata={
            "help": "Test-time resize: 'checkpoint' (its resize + centre crop) or 'full' (the whole image resized "
            "to the model's resolution, the released code's CIFAR evaluation).",
            "choices": list(EVAL_RESIZES),
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the train split (debugging)."}
    )
    label_noise: float = field(
        default=0.0,
        metadata={
            "help": "Symmetric label noise (paper, 3.3): this fraction of the train labels, after label_subset, "
            "is replaced by a uniformly drawn other class; the test split stays clean. 0 = clean."
        },
    )
    label_noise_seed: int | None = field(
        default=None, metadata={"help": "Which labels are corrupted, and how (default: the run's `seed`)."}
    )
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Truncate the test split (debugging)."}
    )
    verify_images: bool = field(
        default=True,
        metadata={"help": "Open every image once before training; fail on the first unreadable one."},
    )


@dataclass
class Args:
    script: ScriptArguments
    model: ModelArguments
    data: DataArguments
    training: SAMTrainingArguments
    argv: list[str]


def parse_config(argv: list[str] | None = None) -> Args:
    """YAML defaults + flags -> validated arguments. Touches nothing but the recipe file and `output_dir`.

    Configuration errors come before environment errors: unknown keys and flags, bad values, the global batch
    and `output_dir` conflicts are checked with the precision flags (`bf16`, `fp16`, `tf32`) switched off, and
    only then are the arguments built as given, which is where transformers checks the machine.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.error = _raise_config_error  # argparse would print the usage of ~150 flags and exit 2
    pre.add_argument("--config")
    pre.add_argument("--check_config", nargs="?", const="true", default="false")
    known, _ = pre.parse_known_args(argv)
    groups = (ScriptArguments, ModelArguments, DataArguments, SAMTrainingArguments)
    parser = HfArgumentParser(groups)
    parser.error = _raise_config_error  # e.g. "argument --sam_interval: invalid int value: '2.5'"
    dests = {action.dest for action in parser._actions} - {"help"}
    recipe = _read_recipe(known.config) if known.config else {}
    unknown = sorted(set(recipe) - dests)
    if unknown:
        raise ConfigError(f"{known.config}: unknown key(s) {_with_suggestions(unknown, dests)}.")
    if "hub_token" in recipe or any(a.startswith("--hub_token") for a in argv):
        raise ConfigError(
            "hub_token is not accepted (it would be pickled into training_args.bin and checkpoints): log in with "
            "`hf auth login` or set HF_TOKEN instead."
        )
    check_only = str(known.check_config).lower() in ("true", "1", "yes")
    if check_only and not torch.cuda.is_available():
        # TrainingArguments refuses bf16 without a GPU unless use_cpu: check a GPU recipe as if on CPU.
        recipe = {**recipe, "use_cpu": True}
    parser.set_defaults(**recipe)
    namespace, rest = parser.parse_known_args(args=argv)  # builds no dataclass yet: no machine check
    if rest:
        flags = [r for r in rest if r.startswith("-")] or rest
        raise ConfigError(f"unknown flag(s) {_with_suggestions([f.lstrip('-') for f in flags], dests)}.")
    values = vars(namespace)
    script, model, data = (_build(group, values) for group in groups[:3])
    explicit_output_dir = "output_dir" in recipe or any(a.split("=")[0] == "--output_dir" for a in argv)
    if known.config and not explicit_output_dir:
        values["output_dir"] = default_output_dir(
            known.config, values["seed"] if script.output_dir_per_seed else None
        )
    explicit_accumulation = "gradient_accumulation_steps" in recipe or any(
        a.split("=")[0] == "--gradient_accumulation_steps" for a in argv
    )
    if script.global_batch_size is not None:
        values["gradient_accumulation_steps"] = accumulation_steps(
            script.global_batch_size,
            values["per_device_train_batch_size"],
            script.num_processes if check_only and script.num_processes else launch_world_size(),
            values["gradient_accumulation_steps"] if explicit_accumulation else None,
        )
    if script.num_processes is not None and not check_only and script.num_processes != launch_world_size():
        raise ConfigError(
            f"num_processes={script.num_processes} is for --check_config true only; this launch has "
            f"{launch_world_size()} process(es)."
        )
    # Configuration first: the precision flags off, so that a typo or a conflict is not hidden behind
    # transformers' "Your setup doesn't support bf16/gpu".
    precision = {"bf16": False, "fp16": False, "tf32": None, "bf16_full_eval": False, "fp16_full_eval": False}
    _check(script, model, data, _build(SAMTrainingArguments, {**values, **precision}))
    try:
        training = _build(SAMTrainingArguments, values)  # now transformers checks the machine
    except ValueError as err:
        raise ConfigError(_environment_message(err)) from None
    return Args(script, model, data, training, argv)


def _build(group, values: dict):
    return group(**{f.name: values[f.name] for f in fields(group) if f.init and f.name in values})


def _environment_message(err: ValueError) -> str:
    text = str(err)
    if "bf16/gpu" in text:
        return (
            "bf16: true needs a GPU with bfloat16 support, and this machine has none: add --bf16 false to run in "
            "fp32 here (or --check_config true to validate the recipe without running it)."
        )
    return text


def launch_world_size() -> int:
    """Processes of this launch, from the launcher's environment (accelerate launch and torchrun set it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def accumulation_steps(
    global_batch: int, per_device: int, processes: int, explicit: int | None = None
) -> int:
    """gradient_accumulation_steps that make `global_batch` from `per_device` x `processes`; refuse the rest."""
    if global_batch < 1 or per_device < 1:
        raise ConfigError(
            f"global_batch_size ({global_batch}) and per_device_train_batch_size ({per_device}) must be >= 1."
        )
    per_step = per_device * processes
    if global_batch % per_step:
        counts = [
            n for n in range(1, global_batch // per_device + 1) if (global_batch // per_device) % n == 0
        ]
        hint = (
            f"launch with a process count that divides {global_batch // per_device} ({', '.join(map(str, counts))})"
            if global_batch % per_device == 0
            else "choose a per_device_train_batch_size that divides it"
        )
        raise ConfigError(
            f"global_batch_size {global_batch} is not a multiple of per_device_train_batch_size {per_device} x "
            f"{processes} process(es) = {per_step}: {hint}; per_device_train_batch_size is SAM's m, keep it."
        )
    steps = global_batch // per_step
    if explicit is not None and explicit != steps:
        raise ConfigError(
            f"gradient_accumulation_steps={explicit} contradicts global_batch_size {global_batch} = "
            f"{per_device} per device x {processes} process(es) x {steps}: drop gradient_accumulation_steps "
            "(it is derived), or drop global_batch_size."
        )
    return steps


def steps_per_epoch(num_train: int, per_device: int, processes: int, accumulation: int) -> int:
    """Optimizer steps per epoch as transformers counts them: each process gets ceil(N / processes) examples
    (the distributed sampler pads), in ceil(. / per_device) micro-batches; an epoch is
    ceil(micro-batches / accumulation) steps, the last one shorter when it does not divide."""
    micro_batches = math.ceil(math.ceil(num_train / processes) / per_device)
    return math.ceil(micro_batches / accumulation)


def _raise_config_error(message: str):
    raise ConfigError(message)


def default_output_dir(config_path: str, seed: int | None = None) -> str:
    """recipes/<dataset>/<model>/sam.yaml -> outputs/<dataset>/<model>/sam (+ /seed-<seed> with
    output_dir_per_seed), so a sam/baseline pair needs no output_dir key of its own (the pair then differs only
    in sam_* keys) and runs of several seeds do not overwrite each other."""
    path = os.path.splitext(os.path.normpath(config_path))[0]
    parts = path.split(os.sep)
    tail = parts[len(parts) - parts[::-1].index("recipes") :] if "recipes" in parts else parts[-1:]
    return os.path.join("outputs", *tail, *([f"seed-{seed}"] if seed is not None else []))


def _read_recipe(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(
            f"config file {path!r} not found (cwd: {os.getcwd()}); pass --config <path to a YAML>."
        )
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict) or any(isinstance(v, dict) for v in recipe.values()):
        raise ConfigError(f"{path}: a recipe is a flat mapping of field: value (no nesting).")
    return recipe


def _with_suggestions(names: list[str], dests: set[str]) -> str:
    out = []
    for name in names:
        close = difflib.get_close_matches(name, dests, n=1)
        out.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(out) + "; see `recipes/finetune.py --help` for the fields"


def _check(
    script: ScriptArguments, model: ModelArguments, data: DataArguments, training: SAMTrainingArguments
):
    if not model.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a Hub id or a local checkpoint folder).")
    if not data.dataset:
        raise ConfigError("dataset is required (a spec name, a Hub dataset id or a local folder).")
    resolve_spec(data.dataset)  # unknown dataset name: fails here, before any loading
    if data.dataset_path and not os.path.exists(data.dataset_path):
        raise ConfigError(f"dataset_path {data.dataset_path!r} does not exist (cwd: {os.getcwd()}).")
    check_label_noise(data.label_noise)
    if data.num_labels is not None and data.num_labels < 1:
        raise ConfigError(f"num_labels must be >= 1, got {data.num_labels}.")
    for name in ("drop_rate", "drop_path_rate"):
        value = getattr(model, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1) (a probability), got {value}.")
    if data.train_augmentation != "none" and training.dataloader_persistent_workers:
        raise ConfigError(
            "dataloader_persistent_workers keeps the first epoch's workers, and with them its epoch number: a "
            f"random train_augmentation ({data.train_augmentation}) would repeat that epoch's draws. Set it to false."
        )
    if not training.output_dir:
        raise ConfigError("output_dir is required.")
    _check_output_dir(training.output_dir)
    if training.push_to_hub and not training.hub_model_id:
        raise ConfigError("push_to_hub needs hub_model_id (e.g. 'your-name/cifar10-effnet-b7-sam').")
    resume = training.resume_from_checkpoint
    checkpoints = checkpoints_newest_first(training.output_dir)
    if resume:
        resolve_resume(resume, training.output_dir, not training.save_only_model, warn=False)
    elif checkpoints and not script.overwrite_output_dir:
        raise ConfigError(
            f"output_dir {training.output_dir} already holds {os.path.basename(checkpoints[0])}: continue with "
            "--resume_from_checkpoint true, or start over with --overwrite_output_dir true (deletes its checkpoints)."
        )


def _check_output_dir(output_dir: str) -> None:
    """A file, or a folder that cannot be created or written: fail now, not at the first checkpoint."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"output_dir {output_dir!r} is a file, not a folder; choose another output_dir.")
    ancestor = os.path.abspath(output_dir)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(
            f"output_dir {output_dir!r} cannot be created: {ancestor!r} is a file, not a folder."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {output_dir!r} is not writable (no write permission on {ancestor!r}).")


# ====================================================================== checkpoints
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_newest_first(output_dir: str) -> list[str]:
    """The checkpoint-<step> folders of output_dir, highest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def checkpoint_problem(folder: str, with_optimizer: bool = True) -> str | None:
    """Why `folder` cannot be resumed from, or None when it is complete.

    `Trainer._save_checkpoint` (transformers 5) writes in place, with no temporary folder and no rename: config
    and weights, then optimizer.pt, scheduler.pt, rng_state*.pth, and trainer_state.json last. A process
    killed while saving leaves a checkpoint-N folder that `get_last_checkpoint` would pick (it only looks at
    names): resuming from it would lose the optimizer state, or crash. Complete means: trainer_state.json parses,
    every safetensors file is as long as its header says, and the torch pickles (zip archives, whose directory
    is written at the end) are whole.
    """
    state_path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(state_path):
        return "no trainer_state.json (the save was interrupted; it is written last)"
    try:
        with open(state_path) as f:
            int(json.load(f)["global_step"])
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json is truncated"
    names = os.listdir(folder)
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights and not any(n.endswith(".bin") and n != "training_args.bin" for n in names):
        return "no model weights"
    for name in weights:
        if not _safetensors_complete(os.path.join(folder, name)):
            return f"{name} is truncated"
    needed = ["optimizer.pt", "scheduler.pt"] if with_optimizer else []
    needed += sorted(n for n in names if n.startswith("rng_state") and n.endswith(".pth"))
    for name in needed:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"no {name}"
        if not zipfile.is_zipfile(path):
            return f"{name} is truncated"
    return None


def _safetensors_complete(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return os.path.getsize(path) == 8 + header_size + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


def resolve_resume(resume: str | None, output_dir: str, with_optimizer: bool, warn: bool) -> str | None:
    """`resume_from_checkpoint` as a folder: 'true'/'last' is the newest *complete* checkpoint of output_dir
    (newer incomplete ones are skipped with a warning); an explicit folder must be complete."""
    if not resume:
        return None
    if resume.lower() in ("true", "last"):
        candidates = checkpoints_newest_first(output_dir)
        if not candidates:
            raise ConfigError(f"resume_from_checkpoint={resume}: no checkpoint-* in {output_dir} to resume.")
        skipped = []
        for path in candidates:
            problem = checkpoint_problem(path, with_optimizer)
            if problem is None:
                for old, why in skipped:
                    if warn:
                        logger.warning(
                            f"finetune.py: warning: skipping {old}: incomplete ({why}); resuming from "
                            f"{os.path.basename(path)}."
                        )
                return path
            skipped.append((os.path.basename(path), problem))
        raise ConfigError(
            f"resume_from_checkpoint={resume}: no complete checkpoint in {output_dir} ("
            + "; ".join(f"{name}: {why}" for name, why in skipped)
            + "). Start over with --overwrite_output_dir true."
        )
    if not os.path.isdir(resume):
        raise ConfigError(
            f"resume_from_checkpoint={resume!r} is not a folder; give a checkpoint-* path or 'true'."
        )
    problem = checkpoint_problem(resume, with_optimizer)
    if problem is not None:
        raise ConfigError(
            f"resume_from_checkpoint={resume!r} is incomplete ({problem}); give an older checkpoint, or 'true' for "
            "the newest complete one."
        )
    return resume


def _check_checkpoint_fits(model, checkpoint: str) -> None:
    """The checkpoint to resume holds this model's tensors (same names, same shapes): transformers would load
    another architecture's checkpoint with a warning and train from the freshly loaded weights instead."""
    path = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(path):
        return  # sharded or adapter checkpoints: left to the Trainer
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    # transformers saves a timm model without the wrapper's `timm_model.` prefix (and adds it back on load).
    saved = {k.removeprefix(TIMM_PREFIX): tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    expected = {k.removeprefix(TIMM_PREFIX): tuple(v.shape) for k, v in model.state_dict().items()}
    differ = sorted(k for k in expected if saved.get(k) != expected[k]) + sorted(set(saved) - set(expected))
    if differ:
        raise ConfigError(
            f"resume_from_checkpoint {checkpoint} holds another model's weights: {len(differ)} of {len(expected)} "
            f"tensors differ in name or shape (e.g. {', '.join(differ[:3])}). Resume with the run's own "
            "model_name_or_path and dataset, or from that run's output_dir."
        )


# ====================================================================== main
def main(argv: list[str] | None = None, callbacks: list | None = None) -> dict[str, float]:
    """Run a recipe; recipe, data, model and Hub problems exit with one `error:` line, before any training.
    `callbacks`: extra `TrainerCallback`s (e.g. the demo's progress bar)."""
    try:
        args = parse_config(argv)
    except ValueError as err:  # ours and SAMTrainingArguments' (invalid sam_* values, bf16 without GPU, ...)
        raise SystemExit(_one_line(err)) from None
    if args.script.check_config:
        print(yaml.safe_dump(resolved_config(args), sort_keys=False))
        print(f"{args.script.config or 'flags'}: OK")
        return {}
    output_dir = args.training.output_dir
    existed = os.path.exists(output_dir)
    try:
        return run(args, callbacks)
    except (DataError, ModelError, ConfigError) as err:
        if not existed and os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)  # made by Trainer.__init__ before a set-up check failed: leave no trace
        raise SystemExit(_one_line(err)) from None


def _one_line(err: Exception) -> str:
    return "finetune.py: error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def run(args: Args, callbacks: list | None = None) -> dict[str, float]:
    training = args.training
    set_seed(training.seed)
    push_to_hub, training.push_to_hub = training.push_to_hub, False  # we push once, at the end, with the card
    if push_to_hub and training.process_index == 0:
        _create_repo(training.hub_model_id, training.hub_private_repo)

    # ------------------------------------------------------------------ data
    spec = resolve_spec(
        args.data.dataset, args.data.image_column, args.data.label_column, args.data.train_split,
        args.data.test_split, args.data.dataset_revision, args.data.dataset_config,
    )  # fmt: skip
    with training.main_process_first(desc="loading the dataset"):
        data = load_image_classification(
            spec, args.data.dataset_path, args.data.num_labels, args.data.label_subset,
            args.data.max_train_samples, args.data.max_test_samples, args.data.verify_images,
        )  # fmt: skip
    if args.data.label_noise:
        noise_seed = training.seed if args.data.label_noise_seed is None else args.data.label_noise_seed
        data.train = add_label_noise(
            data.train, data.label_column, args.data.label_noise, noise_seed, len(data.label_names)
        )
    resume = resolve_resume(
        training.resume_from_checkpoint, training.output_dir, not training.save_only_model, warn=True
    )

    # ------------------------------------------------------------------ model
    model, processor = load_model_and_processor(
        args.model.model_name_or_path,
        data.label_names,
        args.model.model_revision,
        args.model.trust_remote_code,
        drop_rate=args.model.drop_rate,
        drop_path_rate=args.model.drop_path_rate,
    )
    if resume:
        _check_checkpoint_fits(model, resume)
    if args.model.freeze_batchnorm:
        frozen = freeze_batchnorm(model)
        print(
            f"freeze_batchnorm: {frozen} BatchNorm layers use their pretrained statistics for the whole run"
        )
    train_transform = set_transforms(
        data, preprocessing_from_processor(processor), args.data.train_augmentation, training.seed,
        args.data.eval_resize,
    )  # fmt: skip

    # ------------------------------------------------------------------ trainer
    training.remove_unused_columns = False  # the lazy transform needs the raw image and label columns
    try:
        trainer = RecipeTrainer(
            model=model, args=training, train_dataset=data.train, eval_dataset=data.test,
            data_collator=collate, processing_class=processor, compute_metrics=top_k_accuracy,
            weight_decay_all_parameters=args.script.weight_decay_all_parameters, callbacks=callbacks,
        )  # fmt: skip
    except ValueError as err:  # set-up checks that need the model (e.g. a sam_param_filter matching nothing)
        raise ConfigError(str(err)) from None

    if train_transform.seed is not None:
        trainer.add_callback(AugmentationEpochCallback(train_transform))

    # ------------------------------------------------------------------ train
    if not resume and args.script.overwrite_output_dir and trainer.is_world_process_zero():
        for old in glob.glob(os.path.join(training.output_dir, "checkpoint-*")):
            shutil.rmtree(old)  # starting over: the old run's checkpoints would be "the last checkpoint"
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    # ------------------------------------------------------------------ evaluate
    metrics = trainer.evaluate(data.test, metric_key_prefix="test")
    trainer.log_metrics("test", metrics)
    trainer.save_metrics("test", metrics)

    # ------------------------------------------------------------------ save
    trainer.save_model(training.output_dir)
    if trainer.is_world_process_zero():
        make_timm_loadable(training.output_dir)
        with open(os.path.join(training.output_dir, "resolved_config.yaml"), "w") as f:
            yaml.safe_dump(resolved_config(args), f, sort_keys=False)
        write_model_card(args, spec, data.source, len(data.train), len(data.test), data.label_names, metrics,
                         is_timm(model))  # fmt: skip

    # ------------------------------------------------------------------ push
    if push_to_hub and trainer.is_world_process_zero():
        _upload(training.output_dir, training.hub_model_id)
    return metrics


# ====================================================================== helpers
class RecipeTrainer(SAMTrainer):
    """`SAMTrainer` with the released code's weight-decay scope as an option (`weight_decay_all_parameters`)."""

    def __init__(self, *args, weight_decay_all_parameters: bool = False, **kwargs):
        self.weight_decay_all_parameters = weight_decay_all_parameters
        super().__init__(*args, **kwargs)

    def get_decay_parameter_names(self, model) -> list[str]:
        if self.weight_decay_all_parameters:
            # The released code adds 0.5 * wd * ||w||^2 over *all* parameters (biases and BatchNorm included).
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)


def top_k_accuracy(eval_pred) -> dict[str, float]:
    """Top-1 and top-5 accuracy computed locally (`evaluate.load` needs the Hub)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    k = min(5, logits.shape[-1])
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return {
        "top1": float(np.mean(top[:, 0] == labels)),
        "top5": float(np.mean((top == labels[:, None]).any(axis=-1))),
    }


def resolved_config(args: Args) -> dict:
    """Every field as used (flat, re-usable as a recipe); never a token."""
    out = {}
    for group in (args.model, args.data):
        out.update(asdict(group))
    script = asdict(args.script)
    for name in ("overwrite_output_dir", "global_batch_size", "weight_decay_all_parameters", "output_dir_per_seed",
                 "license"):  # fmt: skip
        out[name] = script[name]
    training = args.training.to_dict()  # masks *_token fields
    init_fields = {f.name for f in fields(args.training) if f.init}
    out.update({k: v for k, v in training.items() if k in init_fields and not k.endswith("_token")})
    if args.script.global_batch_size is not None:
        del out[
            "gradient_accumulation_steps"
        ]  # derived from global_batch_size for each launch's process count
    return {
        k: v if isinstance(v, (str, int, float, bool, list, type(None))) else str(v) for k, v in out.items()
    }


def command_line(args: Args) -> str:
    world = args.training.world_size
    launcher = f"accelerate launch --num_processes {world} " if world > 1 else "python "
    return launcher + "recipes/finetune.py " + shlex.join(args.argv)


def distributed_engine(training) -> str:
    """How the run was distributed, from the arguments or from `accelerate launch`'s environment."""
    if training.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP2"
    if training.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if getattr(training, "hf_deepspeed_config", None) is not None:
            stage = training.hf_deepspeed_config.get_value("zero_optimization.stage", stage)
        return f"DeepSpeed ZeRO-{stage}" if stage is not None else "DeepSpeed"
    return "DDP" if training.world_size > 1 else "single process"


def run_title(args: Args, spec) -> str:
    """'<dataset> x <base model>, SAM (rho = ...)' or '..., baseline (plain optimizer)'."""
    base = os.path.basename(os.path.normpath(args.model.model_name_or_path))
    t = args.training
    run = f"SAM (ρ = {t.sam_rho})" if t.sam_rho > 0 else "baseline (plain optimizer, ρ = 0)"
    return f"{spec.title or spec.name} x {base}, {run}"


def write_model_card(args, spec, source, num_train, num_test, label_names, metrics, timm_model) -> str:
    t, m = args.training, args.model
    global_batch = t.per_device_train_batch_size * t.world_size * t.gradient_accumulation_steps
    engine = distributed_engine(t)
    global_epsilon = t.sam_sync_perturbation or (engine == "FSDP2" and t.sam_sync_perturbation is None)
    scope = (
        f"one ε over the {t.per_device_train_batch_size * t.world_size} examples of each micro-batch of all processes"
        if global_epsilon and t.world_size > 1
        else f"per-process ε (m = {t.per_device_train_batch_size})"
    )
    sam = (
        f"ρ = {t.sam_rho}, norm = {t.sam_norm}, adaptive = {t.sam_adaptive} (η = {t.sam_eta}), {scope}"
        if t.sam_rho > 0
        else "none (ρ = 0: the paired baseline, plain optimizer)"
    )
    optim = t.optim.value if hasattr(t.optim, "value") else t.optim
    schedule = t.lr_scheduler_type.value if hasattr(t.lr_scheduler_type, "value") else t.lr_scheduler_type
    decay_scope = "every parameter" if args.script.weight_decay_all_parameters else "all but biases and norms"
    training_lines = [
        f"Base checkpoint: `{m.model_name_or_path}`{f' @ {m.model_revision}' if m.model_revision else ''}; new "
        f"classifier head; BatchNorm statistics frozen: {m.freeze_batchnorm}",
        f"Dropout {m.drop_rate if m.drop_rate is not None else 'as the checkpoint'}, stochastic depth "
        f"{m.drop_path_rate if m.drop_path_rate is not None else 'as the checkpoint'}",
        f"Dataset: `{source}`; train augmentation: {args.data.train_augmentation}; test resize: {args.data.eval_resize}",
        label_noise_line(args),
        f"SAM: {sam}",
        f"Optimizer: {optim} ({t.optim_args or 'defaults'}), lr {t.learning_rate}, {schedule} schedule, "
        f"{t.warmup_steps} warm-up steps, weight decay {t.weight_decay} on {decay_scope}, gradient clipping "
        f"{t.max_grad_norm or 'none'}, label smoothing {t.label_smoothing_factor}",
        f"Global batch {global_batch} = {t.per_device_train_batch_size} per device x {t.world_size} processes x "
        f"{t.gradient_accumulation_steps} accumulation; max_steps {t.max_steps}; {engine}; "
        f"{'bf16' if t.bf16 else 'fp16' if t.fp16 else 'fp32'}; seed {t.seed}",
    ]
    card = finetuning_card(
        title=run_title(args, spec),
        repo_id=t.hub_model_id,
        base_model=m.model_name_or_path,
        dataset_id=source.split("@")[0] if spec.hub_id and not os.path.exists(source) else None,
        dataset_title=spec.title or spec.name,
        test_split=spec.test_split,
        num_train=num_train,
        num_test=num_test,
        num_classes=len(label_names),
        metrics=metrics,
        license=args.script.license,
        dataset_terms=spec.terms,
        timm_model=timm_model,
        training_lines=training_lines,
        command=command_line(args),
    )
    card.save(os.path.join(t.output_dir, "README.md"))
    return str(card)


def label_noise_line(args) -> str:
    d = args.data
    if not d.label_noise:
        return "Label noise: none (clean labels)"
    seed = args.training.seed if d.label_noise_seed is None else d.label_noise_seed
    return (
        f"Label noise: {100 * d.label_noise:g}% of the training labels replaced by another class (symmetric, "
        f"seed {seed}); test labels clean"
    )


def _hub_error(action: str, err: Exception) -> ConfigError:
    offline = "offline" in f"{type(err).__name__} {err}".lower() or os.environ.get("HF_HUB_OFFLINE") == "1"
    why = "the Hub is unreachable (offline mode)" if offline else "not found / not allowed on the Hub"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return ConfigError(f"push_to_hub: cannot {action}: {why} ({type(err).__name__}: {first}). Check hub_model_id, "
                       "your connection and `hf auth login`, or set push_to_hub false.")  # fmt: skip


def _create_repo(repo_id: str, private: bool | None) -> None:
    """Before training: a run that cannot push should fail now, not after hours on GPUs."""
    try:
        HfApi().create_repo(repo_id, exist_ok=True, private=private)
    except Exception as err:
        raise _hub_error(f"create {repo_id!r}", err) from None


def _upload(folder: str, repo_id: str) -> None:
    try:
        HfApi().upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message="hf-sam finetuning run",
            allow_patterns=list(PUSHED_FILES),
        )  # fmt: skip
    except Exception as err:
        raise _hub_error(f"upload to {repo_id!r}", err) from None


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # a multi-process launch: leave together, then tear the group down
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
