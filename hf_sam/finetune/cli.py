"""The finetuning recipe's configuration: a YAML recipe and command-line flags -> validated arguments.

`recipes/finetune.py` is the entry script; this module is everything it knows about its arguments: the
argument dataclasses (`ScriptArguments`, `ModelArguments`, `DataArguments`, next to
`hf_sam.SAMTrainingArguments`), `parse_config` (the YAML's flat keys are defaults, flags override them, a key
or flag that is no field is an error, with a suggestion), the global batch (`global_batch_size` ->
`gradient_accumulation_steps` for the launch's process count), the default `output_dir`, the checks made
before anything is loaded (configuration errors before environment errors such as bf16 without a bf16 GPU;
`check_local_paths` as the run starts), the resolved configuration written next to the model, and the script's one-line errors (`exit_on`).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field, fields

import torch
import yaml
from transformers import HfArgumentParser

from hf_sam.configs import SAMTrainingArguments
from hf_sam.finetune.checkpoints import checkpoints_newest_first, resolve_resume
from hf_sam.finetune.data import (
    EVAL_RESIZES,
    LABEL_NOISE_TYPES,
    TRAIN_AUGMENTATIONS,
    check_label_noise,
    check_source,
    resolve_spec,
)
from hf_sam.finetune.hub import missing_local_path
from hf_sam.finetune.models import HEAD_INITS, POS_EMBED_INTERPOLATIONS
from hf_sam.trainer import remove_if_created_empty


class ConfigError(ValueError):
    """A problem in the recipe or the flags; the message says what to change."""


@dataclass
class ScriptArguments:
    config: str | None = field(default=None, metadata={"help": "YAML recipe (flat keys); flags override it."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Delete the checkpoint-* folders of output_dir and start over (default: refuse)."},
    )
    check_config: bool = field(
        default=False,
        metadata={
            "help": "Validate the recipe and print it; load nothing, train nothing (a local model or dataset folder "
            "need not exist yet)."
        },
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
            "help": "Licence of the finetuned weights for the model card (e.g. the base checkpoint's); `other` "
            "needs license_name and license_link."
        },
    )
    license_name: str | None = field(
        default=None,
        metadata={"help": "With license: other, the licence's id on the card (the Hub asks for it)."},
    )
    license_link: str | None = field(
        default=None,
        metadata={"help": "With license: other, a URL to the licence's text (the Hub asks for it)."},
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
    head_init: str = field(
        default="default",
        metadata={
            "help": "How the new classifier head is drawn (hf_sam.finetune.models.HEAD_INITS): 'released' is the SAM authors' "
            "EfficientNet head, U(±1/sqrt(K)) for K classes, zero bias; 'zeros' the ViT paper's zero head; "
            "'default' what transformers / timm draw (N(0, 0.02) for a transformers model); 'checkpoint' keeps the "
            "checkpoint's own head (the paper's ImageNet runs; the dataset must have its classes, in its order).",
            "choices": list(HEAD_INITS),
        },
    )
    head_init_seed: int | None = field(
        default=None,
        metadata={
            "help": "Draw the new head (head_init released or zeros) from this seed, the same head whatever the run's "
            "seed, without advancing the run's random stream (the SAM authors' released code draws it from "
            "PRNGKey(0) for every run). Default: from the run's seed."
        },
    )
    pos_embed_interpolation: str = field(
        default="bicubic",
        metadata={
            "help": "With image_size: how the position embeddings are resampled to the new grid. 'bicubic': timm's "
            "resample_abs_pos_embed; 'bilinear': the ViT code's scipy.ndimage.zoom(order=1) (corners aligned).",
            "choices": list(POS_EMBED_INTERPOLATIONS),
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Finetune at this resolution (px) instead of the checkpoint's: timm ViT checkpoints only, their "
            "position embeddings resampled to the new grid (the ViT paper finetunes at 384). The preprocessing "
            "follows (same crop_pct, mean/std, interpolation). Default: the checkpoint's own resolution."
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
        metadata={"help": "A spec name (hf_sam.finetune.data.SPECS), a Hub dataset id or a local folder."},
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
            "help": "Train-time augmentation (hf_sam.finetune.data.train_augmentation): 'random-resized-crop' is the released "
            "code's ImageNet training crop + flip, 'cifar-autoaugment' its CIFAR pipeline. Random ones are a "
            "function of (seed, epoch, example index).",
            "choices": list(TRAIN_AUGMENTATIONS),
        },
    )
    crop_min_area: float = field(
        default=0.08,
        metadata={
            "help": "random-resized-crop: the smallest share of the image's area a training crop keeps, in (0, 1] "
            "(torchvision's default 0.08; the released SAM code keeps >= 0.1, the ViT code >= 0.05)."
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
            "help": "Label noise (paper, 3.3): this fraction of the train labels, after label_subset, is "
            "corrupted as `label_noise_type` says; the test split stays clean. 0 = clean."
        },
    )
    label_noise_type: str = field(
        default="symmetric",
        metadata={
            "help": "How a corrupted label is drawn: 'symmetric' (a uniformly drawn other class, the paper's) or "
            "'pair' (the next class, c -> c + 1 in label_subset's order: pair-flip, Han et al. 2018).",
            "choices": list(LABEL_NOISE_TYPES),
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
    processes: int = 1  # the process count gradient_accumulation_steps was derived for
    # What a launch would set where this --check_config run differs (use_cpu on a machine without a GPU).
    as_launched: dict = field(default_factory=dict)


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
    parser.set_defaults(**recipe)
    namespace, rest = parser.parse_known_args(args=argv)  # builds no dataclass yet: no machine check
    if rest:
        flags = [r for r in rest if r.startswith("-")] or rest
        raise ConfigError(f"unknown flag(s) {_with_suggestions([f.lstrip('-') for f in flags], dests)}.")
    values = vars(namespace)
    as_launched = {}
    if check_only and not torch.cuda.is_available():
        # TrainingArguments refuses bf16 without a GPU unless use_cpu: check a GPU recipe as if on CPU, but keep
        # what the launch itself would use (use_cpu also turns pin_memory off) for the printout.
        as_launched = {name: values[name] for name in ("use_cpu", "dataloader_pin_memory")}
        values["use_cpu"] = True
    script, model, data = (_build(group, values) for group in groups[:3])
    _check_batch(values, script.global_batch_size)
    explicit_output_dir = "output_dir" in recipe or any(a.split("=")[0] == "--output_dir" for a in argv)
    if known.config and not explicit_output_dir:
        values["output_dir"] = default_output_dir(
            known.config, values["seed"] if script.output_dir_per_seed else None
        )
    explicit_accumulation = "gradient_accumulation_steps" in recipe or any(
        a.split("=")[0] == "--gradient_accumulation_steps" for a in argv
    )
    processes = script.num_processes if check_only and script.num_processes else launch_world_size()
    if script.global_batch_size is not None:
        values["gradient_accumulation_steps"] = accumulation_steps(
            script.global_batch_size,
            values["per_device_train_batch_size"],
            processes,
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
    return Args(script, model, data, training, argv, processes, as_launched)


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


def _check_batch(values: dict, global_batch_size: int | None) -> None:
    """Batch sizes and accumulation are integers >= 1. transformers checks a batch size only when it builds its
    data loaders, after the data and the model are loaded (a traceback), and lets gradient_accumulation_steps -1
    train; a recipe's YAML value (2.5, true) reaches here unconverted."""
    names = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
    given = {name: values[name] for name in names}
    if global_batch_size is not None:
        given["global_batch_size"] = global_batch_size
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")


def launch_world_size() -> int:
    """Processes of this launch, from the launcher's environment (accelerate launch and torchrun set it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def end_distributed_run() -> None:
    """End a finished process of a multi-process launch (no-op in a single process): free the cyclic garbage of the
    run (a DeepSpeed or FSDP engine's hooks and gathered partitions) while the group is up, leave together, tear
    the process group down, flush, and exit at once with status 0.

    Exiting through `os._exit` skips the interpreter's finalization. On a busy machine one launch in some tens of
    a finished ZeRO-3 or FSDP2 run aborted there, on rank 1, after its work was done and saved ("terminate called
    without an active exception", SIGABRT): the launcher then reports the whole job failed. The cause was not found
    (not reproduced in isolation); an exit that runs no finalizer cannot abort in one."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    import gc

    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
        try:
            recipe = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except _DuplicateKey as err:
            raise ConfigError(f"{path}, {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(_yaml_error(path, err)) from None
    if not isinstance(recipe, dict) or any(isinstance(v, dict) for v in recipe.values()):
        raise ConfigError(f"{path}: a recipe is a flat mapping of field: value (no nesting).")
    return recipe


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice is an error: yaml keeps the last one silently, so a recipe
    that sets `seed` twice would train with whichever came last."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in first:
                raise _DuplicateKey(
                    f"line {line}: {key} is set twice (first on line {first[key]}); keep one."
                )
            first[key] = line
        return super().construct_mapping(node, deep=deep)


# yaml says what it met, not how to fix it: the fix of a hand-written recipe's usual slips, by yaml's wording.
_YAML_FIXES = {
    "'\\t'": "use spaces, not tabs (YAML does not allow tab characters)",
    "flow": "close the bracket, or quote a value that starts with [ or {",
    "quoted scalar": "close the quote",
    "mapping values": "start every key at column 1 (a recipe is flat), and quote a value that holds ': '",
}


def _yaml_error(path: str, err: yaml.YAMLError) -> str:
    """yaml's several lines (marks counted from 0) -> one: the file, line and column, the problem, the fix."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:  # a ReaderError (a control character): no problem/mark split
        return f"{path}: not valid YAML: {' '.join(str(err).split())}."
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}"
    problem, opened = err.problem, err.context_mark
    if err.context and opened:  # e.g. where the unclosed bracket was opened
        problem += f" ({err.context} at line {opened.line + 1}, column {opened.column + 1})"
    text = f"{err.context or ''} {err.problem}"
    fix = next((fix for key, fix in _YAML_FIXES.items() if key in text), "a recipe is `field: value` lines")
    return f"{where}: {problem}; {fix}."


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
    # an unknown dataset name, or a spec with nothing to load from (ImageNet without dataset_path): the launch's
    # own line, here, before any loading (and so also under --check_config)
    check_source(resolve_spec(data.dataset), data.dataset_path)
    if data.dataset_path and not os.path.exists(data.dataset_path):
        raise ConfigError(f"dataset_path {data.dataset_path!r} does not exist (cwd: {os.getcwd()}).")
    check_label_noise(data.label_noise, data.label_noise_type)
    if isinstance(data.crop_min_area, bool) or not 0 < data.crop_min_area <= 1:
        raise ConfigError(
            f"crop_min_area must be in (0, 1] (the smallest share of the image's area a training crop keeps), got "
            f"{data.crop_min_area!r}. Set e.g. `crop_min_area: 0.08` (torchvision's default)."
        )
    if data.num_labels is not None and data.num_labels < 1:
        raise ConfigError(f"num_labels must be >= 1, got {data.num_labels}.")
    for name in ("drop_rate", "drop_path_rate"):
        value = getattr(model, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1) (a probability), got {value}.")
    if model.image_size is not None and (isinstance(model.image_size, bool) or model.image_size < 1):
        raise ConfigError(f"image_size must be a positive number of pixels, got {model.image_size!r}.")
    if data.train_augmentation != "none" and training.dataloader_persistent_workers:
        raise ConfigError(
            "dataloader_persistent_workers keeps the first epoch's workers, and with them its epoch number: a "
            f"random train_augmentation ({data.train_augmentation}) would repeat that epoch's draws. Set it to false."
        )
    # The Hub's model-card spec: `license: other` comes with `license_name` and `license_link`, and only then.
    named = bool(script.license_name) and bool(script.license_link)
    if script.license == "other" and not named:
        raise ConfigError(
            "license: other needs license_name and license_link (the Hub's model-card metadata names and links a "
            "licence that is not on its list)."
        )
    if script.license != "other" and (script.license_name or script.license_link):
        raise ConfigError(
            "license_name / license_link go with license: other only; drop them or set license: other."
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


def check_local_paths(args: Args) -> None:
    """A model or dataset that can only be a local path (`hf_sam.finetune.hub.is_local_path`) must exist: the loaders take
    a mistyped one for a Hub id ("the Hub is unreachable"), the model's only after loading the data. Checked as the
    run starts, not by `parse_config`: a recipe may name a folder that an earlier step writes (the demo's
    pretrained checkpoint), and `--check_config` validates a recipe on any machine."""
    given = {"model_name_or_path": args.model.model_name_or_path, "dataset": args.data.dataset}
    for name, value in given.items():
        if message := missing_local_path(name, value):
            raise ConfigError(message)


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


def resolved_config(args: Args) -> dict:
    """Every field as used (flat, re-usable as a recipe); never a token."""
    out = {}
    for group in (args.model, args.data):
        out.update(asdict(group))
    script = asdict(args.script)
    for name in ("overwrite_output_dir", "global_batch_size", "weight_decay_all_parameters", "output_dir_per_seed",
                 "license", "license_name", "license_link"):  # fmt: skip
        out[name] = script[name]
    training = args.training.to_dict()  # masks *_token fields
    init_fields = {f.name for f in fields(args.training) if f.init}
    out.update({k: v for k, v in training.items() if k in init_fields and not k.endswith("_token")})
    # transformers 5 mirrors activation_checkpointing* into these deprecated aliases; a recipe re-using this file
    # should not carry the old names.
    for alias in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):
        out.pop(alias, None)
    if args.script.global_batch_size is not None:  # derived from it, for each launch's process count
        del out["gradient_accumulation_steps"]
    # The run's length is max_steps when it is set (transformers then ignores num_train_epochs), else the epochs:
    # the other one is not what the run uses, and a printed `num_train_epochs: 3.0` would say it was.
    del out["num_train_epochs" if args.training.max_steps > 0 else "max_steps"]
    # Likewise keys that act only with another: the crop's smallest area, the position-embedding resampling.
    if args.data.train_augmentation != "random-resized-crop":
        del out["crop_min_area"]
    if args.model.image_size is None:
        del out["pos_embed_interpolation"]
    return {
        k: v if isinstance(v, (str, int, float, bool, list, type(None))) else str(v) for k, v in out.items()
    }


def check_report(args: Args) -> str:
    """What `--check_config` prints: the resolved recipe as a launch on `args.processes` processes would run it
    (the accumulation derived for that count; not the CPU stand-in this check ran with), the batch arithmetic."""
    config = {**resolved_config(args), **args.as_launched}
    t = args.training
    config["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    where = f"--num_processes {args.processes}" if args.script.num_processes else "this launch's WORLD_SIZE"
    batch = t.per_device_train_batch_size * args.processes * t.gradient_accumulation_steps
    return (
        yaml.safe_dump(config, sort_keys=False)
        + f"\n# checked for {args.processes} process(es) ({where}): global batch {batch} = "
        f"{t.per_device_train_batch_size} per device x {args.processes} process(es) x "
        f"{t.gradient_accumulation_steps} accumulation step(s)\n{args.script.config or 'flags'}: OK"
    )


def command_line(args: Args) -> str:
    world = args.training.world_size
    launcher = f"accelerate launch --num_processes {world} " if world > 1 else "python "
    return launcher + "recipes/finetune.py " + shlex.join(args.argv)


def one_line(err: Exception) -> str:
    """The script's error line: `finetune.py: error: ` and the message, its lines joined."""
    return "finetune.py: error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip())


@contextlib.contextmanager
def exit_on(errors: type[Exception] | tuple[type[Exception], ...], output_dir: str | None = None):
    """`errors` raised in the block exit with one `finetune.py: error:` line; an `output_dir` that the block
    created and left empty (`Trainer.__init__` makes it before its set-up checks) is removed first."""
    existed = output_dir is not None and os.path.exists(output_dir)
    try:
        yield
    except errors as err:
        remove_if_created_empty(output_dir, existed)
        raise SystemExit(one_line(err)) from None
