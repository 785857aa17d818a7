"""Checkpoint loading for finetuning: transformers or timm, with a new classifier head sized to the dataset.

Both kinds load through `AutoModelForImageClassification`; timm checkpoints (`timm/...`, or any folder whose
`config.json` holds a timm `pretrained_cfg`) come in as transformers' `TimmWrapperForImageClassification`, so
the Trainer, `save_pretrained` and `push_to_hub` treat them like any transformers model.

A finetuned timm model must also load with timm itself (`timm.create_model("hf-hub:<repo>")`, offline
`timm.create_model("local-dir:<folder>")`). `make_timm_loadable` writes the saved folder in the layout both
libraries read: weights without the wrapper's `timm_model.` prefix (transformers adds it back on load, as it
does for every `timm/` Hub checkpoint) and a `config.json` holding timm's `pretrained_cfg` and a `model_args`
dict (timm cannot parse the `null` the wrapper writes by default).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

from hf_sam.finetune.hub import load_failure, missing_local_path

TIMM_PREFIX = "timm_model."


class ModelError(ValueError):
    """A problem with the checkpoint named by the recipe; the message says what to change."""


def is_timm(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) == "timm_wrapper"


def architecture(model_or_config) -> str:
    """The architecture's name: timm's (`vit_base_patch16_224`, `tf_efficientnet_b7`) or transformers' model_type
    (`vit`, `efficientnet`); the model card says from it which finetuning conventions the run follows."""
    config = getattr(model_or_config, "config", model_or_config)
    if is_timm(config):
        return str(getattr(config, "architecture", None) or "timm")
    return str(getattr(config, "model_type", None) or type(model_or_config).__name__)


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether `model` has a BatchNorm layer (any torch flavour, timm's BatchNormAct2d included): the model card
    states whether BatchNorm statistics were frozen only for such a model (a ViT has none)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def load_model_and_processor(
    model_name_or_path: str,
    label_names: list[str],
    revision: str | None = None,
    trust_remote_code: bool = False,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    head_init: str = "default",
    image_size: int | None = None,
    head_init_seed: int | None = None,
    pos_embed_interpolation: str = "bicubic",
) -> tuple[PreTrainedModel, object]:
    """The checkpoint's weights with a new, randomly initialised head of `len(label_names)` classes.

    The head is new even when the checkpoint's head has the same size (paper, appendix C.2: "except the last
    dense layer ... that is randomly initialized"), unless `head_init="checkpoint"`, which keeps the checkpoint's
    own head (C.2's ImageNet runs) and refuses a dataset with another number of classes; the label names go into
    the config (`id2label`, and `label_names` for timm).

    Code shipped with a checkpoint (`auto_map` in its config.json) runs only with `trust_remote_code=True`;
    the flag is passed explicitly to every loader, so transformers never prompts and never falls back to a default.
    `drop_rate` / `drop_path_rate` (None: the checkpoint's own) set the dropout before the classifier and the
    stochastic depth (drop-connect) of the model that is built, active in training mode: see `set_dropout`.
    `head_init` draws the new head (`HEAD_INITS`, `init_head`), from the run's random stream or, with
    `head_init_seed`, the same head whatever the run's seed (the released code draws it from PRNGKey(0)).
    `image_size` finetunes at another resolution than the checkpoint's (`set_image_size`: timm ViTs, whose position
    embeddings are resampled as `pos_embed_interpolation` says), and the returned processor resizes to it.
    The checkpoint's weights must fit the architecture of its config: apart from the classifier head, every
    tensor must be in the checkpoint with its shape (otherwise transformers would silently initialise the rest
    at random, and the run would "finetune" an untrained network).
    """
    if head_init not in HEAD_INITS:
        raise ModelError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}.")
    if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
        raise ModelError(
            f"pos_embed_interpolation must be one of {', '.join(POS_EMBED_INTERPOLATIONS)}, got "
            f"{pos_embed_interpolation!r}."
        )
    # A mistyped local folder would otherwise be reported as a Hub failure.
    if message := missing_local_path("model_name_or_path", model_name_or_path):
        raise ModelError(message)
    trust_remote_code = bool(trust_remote_code)
    num_labels = len(label_names)
    id2label = dict(enumerate(label_names))
    label2id = {name: i for i, name in id2label.items()} if len(set(label_names)) == num_labels else None
    kwargs = {"revision": revision} if revision else {}
    kwargs["trust_remote_code"] = trust_remote_code
    try:
        config = AutoConfig.from_pretrained(
            model_name_or_path, num_labels=num_labels, id2label=id2label, label2id=label2id, **kwargs
        )
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and "trust_remote_code" in str(err):
            raise ModelError(_remote_code_refused(model_name_or_path)) from None
        if isinstance(err, ValueError) and "Unrecognized model" in str(err):
            raise ModelError(
                f"{model_name_or_path!r} has a config.json that transformers does not recognise ({err}). "
                "Use a transformers image-classification checkpoint or a timm checkpoint."
            ) from None
        raise ModelError(load_failure("model", model_name_or_path, err)) from None
    if is_timm(config):
        # The wrapper passes num_classes itself; timm needs a dict here, not the wrapper's default None.
        config.model_args = {k: v for k, v in (config.model_args or {}).items() if k != "num_classes"}
    set_dropout(config, drop_rate, drop_path_rate, model_name_or_path)
    try:
        with _loaded_whole():
            model, info = AutoModelForImageClassification.from_pretrained(
                model_name_or_path,
                config=config,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                **kwargs,
            )
    except ValueError as err:  # e.g. a text model's config: no image-classification class for it
        if "trust_remote_code" in str(err):
            raise ModelError(_remote_code_refused(model_name_or_path)) from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ModelError(
            f"{model_name_or_path!r} is not an image-classification checkpoint "
            f"({type(config).__name__}, model_type {getattr(config, 'model_type', None)!r}): {first}"
        ) from None
    except OSError as err:
        raise ModelError(load_failure("model", model_name_or_path, err)) from None
    _check_weights_fit(model, info, model_name_or_path)
    if head_init == "checkpoint":
        _check_head_kept(model, info, num_labels, model_name_or_path)
    else:
        _ensure_new_head(model, info, num_labels)
        init_head(model, head_init, head_init_seed)
    try:
        processor = AutoImageProcessor.from_pretrained(model_name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and "trust_remote_code" in str(err):
            raise ModelError(_remote_code_refused(model_name_or_path)) from None
        raise ModelError(
            f"{model_name_or_path!r} has no image processor / preprocessing config ({type(err).__name__}); "
            "save one next to the weights (`image_processor.save_pretrained(folder)`)."
        ) from None
    if image_size is not None:
        processor = set_image_size(model, processor, image_size, model_name_or_path, pos_embed_interpolation)
    return model, processor


@contextlib.contextmanager
def _loaded_whole():
    """Load the checkpoint whole, even when a DeepSpeed ZeRO-3 launch is set up. transformers then builds every
    `from_pretrained` model partitioned (`deepspeed.zero.Init`), and a partitioned parameter holds no weights: timm's
    init divides by a fan-in of 0, the resized head cannot be drawn, and the loading checks read nothing. Loaded
    whole (as under DDP), the model is partitioned by DeepSpeed when the Trainer starts its engine; the cost is one
    full copy per process while loading."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref()  # the TrainingArguments' config object
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(registered)


def set_image_size(
    model: PreTrainedModel,
    processor,
    image_size: int,
    model_name_or_path: str,
    interpolation: str = "bicubic",
):
    """Finetune a timm ViT at `image_size` px (the ViT paper, appendix B.1.1, finetunes at 384): timm's
    `set_input_size` resamples the pretrained position embeddings to the new patch grid (bicubic; the ViT paper,
    section 3.2, interpolates them in 2D; `interpolation="bilinear"` redoes it as the ViT code does,
    `_resample_pos_embed_bilinear`), and the config records the size (`model_args.img_size`, which rebuilds
    the model at that size when transformers or timm reload it; `pretrained_cfg.input_size`, which the
    preprocessing reads). Returns the processor for the new size: the checkpoint's interpolation, mean/std and
    `crop_pct`, so the test images are resized to image_size / crop_pct and centre-cropped to image_size."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ModelError(f"image_size must be a positive number of pixels, got {image_size!r}.")
    timm_model = getattr(model, "timm_model", None)
    if not is_timm(model) or not hasattr(timm_model, "set_input_size"):
        raise ModelError(
            f"image_size is supported for timm ViT checkpoints (timm `set_input_size`), not for {model_name_or_path!r} "
            f"({type(timm_model or model).__name__}); leave image_size unset to use the checkpoint's resolution."
        )
    patch = getattr(getattr(timm_model, "patch_embed", None), "patch_size", (1, 1))
    if image_size % patch[0] or image_size % patch[1]:
        raise ModelError(f"image_size {image_size} is not a multiple of the patch size {tuple(patch)}.")
    old_pos_embed, old_grid = _pos_embed_and_grid(timm_model)
    timm_model.set_input_size(img_size=(image_size, image_size))  # timm: bicubic (resample_abs_pos_embed)
    if interpolation == "bilinear" and old_pos_embed is not None:
        _resample_pos_embed_bilinear(timm_model, old_pos_embed, old_grid)
    config = model.config
    config.model_args = {**(config.model_args or {}), "img_size": image_size}
    config.pretrained_cfg = {**config.pretrained_cfg, "input_size": [3, image_size, image_size]}
    timm_model.pretrained_cfg = {**timm_model.pretrained_cfg, "input_size": (3, image_size, image_size)}
    return type(processor)(
        pretrained_cfg=config.pretrained_cfg, architecture=getattr(config, "architecture", None)
    )


def _pos_embed_and_grid(timm_model) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
    pos_embed = getattr(timm_model, "pos_embed", None)
    if pos_embed is None:
        return None, None
    return pos_embed.detach().clone(), tuple(timm_model.patch_embed.grid_size)


def _resample_pos_embed_bilinear(timm_model, old: torch.Tensor, old_grid: tuple[int, int]) -> None:
    """The ViT code's resampling (checkpoint.py, `scipy.ndimage.zoom(posemb_grid, zoom, order=1)`): the grid of
    position embeddings interpolated bilinearly with the corner positions aligned (zoom's default `grid_mode=False`,
    i.e. torch's `align_corners=True`); the class token's embedding is kept as it is."""
    prefix = 0 if getattr(timm_model, "no_embed_class", False) else timm_model.num_prefix_tokens
    new_grid = tuple(timm_model.patch_embed.grid_size)
    tokens, grid = old[:, :prefix], old[:, prefix:]
    grid = grid.reshape(1, *old_grid, -1).permute(0, 3, 1, 2).double()
    grid = torch.nn.functional.interpolate(grid, size=new_grid, mode="bilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(old.dtype)
    with torch.no_grad():
        timm_model.pos_embed.copy_(torch.cat([tokens, grid], dim=1))


# transformers config attributes that hold (drop_rate, drop_path_rate), per model_type; None: no such layer.
_DROPOUT_ATTRIBUTES = {
    "efficientnet": ("dropout_rate", "drop_connect_rate"),
    "vit": ("hidden_dropout_prob", None),
}


def set_dropout(
    config, drop_rate: float | None, drop_path_rate: float | None, model_name_or_path: str
) -> None:
    """Write the dropout rates into the config the model is built from (before building it).

    timm: `drop_rate` (dropout before the classifier) and `drop_path_rate` (stochastic depth, which timm's
    EfficientNet scales linearly from 0 at the first block to the rate at the last, as the TF original's
    drop-connect) go to `timm.create_model` through the wrapper's `model_args`. transformers: EfficientNet's
    `dropout_rate` / `drop_connect_rate`, ViT's `hidden_dropout_prob` (it has no stochastic depth).
    """
    for name, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if value is not None and not 0.0 <= value < 1.0:
            raise ModelError(f"{name} must be in [0, 1), got {value!r}.")
    if drop_rate is None and drop_path_rate is None:
        return
    if is_timm(config):
        rates = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate}
        config.model_args = {**config.model_args, **{k: v for k, v in rates.items() if v is not None}}
        return
    model_type = getattr(config, "model_type", None)
    attributes = _DROPOUT_ATTRIBUTES.get(model_type)
    for index, (name, value) in enumerate((("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate))):
        if value is None:
            continue
        attribute = attributes[index] if attributes else None
        if attribute is None:
            raise ModelError(
                f"{name} cannot be set for {model_name_or_path!r} (transformers model_type {model_type!r} has no "
                f"such setting known to hf-sam); leave {name} unset, or use the timm checkpoint of the architecture."
            )
        setattr(config, attribute, value)


def _remote_code_refused(model_name_or_path: str) -> str:
    return (
        f"{model_name_or_path!r} ships its own Python code (auto_map in its config), which is never run unless "
        "you set `trust_remote_code: true`; read that code first, or use a checkpoint of a built-in architecture."
    )


def _check_weights_fit(model: PreTrainedModel, info: dict, model_name_or_path: str) -> None:
    """Refuse a checkpoint whose weights belong to another architecture than its config (head excepted)."""
    prefix, _ = _head_prefix(model)
    absent = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(prefix))
    reshaped = sorted(k for k, *_ in info.get("mismatched_keys", ()) if not k.startswith(prefix))
    # BatchNorm's step counter is not saved by every converter (TF ports); it carries no learned value.
    wrong = [k for k in absent + reshaped if not k.endswith("num_batches_tracked")]
    if wrong:
        total = sum(1 for k in model.state_dict() if not k.startswith(prefix))
        raise ModelError(
            f"{model_name_or_path!r}: {len(wrong)} of the {total} weight tensors of {type(model).__name__} (head "
            f"excluded) are missing from the checkpoint or have another shape (e.g. {', '.join(wrong[:3])}): its "
            "weights belong to another architecture than its config.json. Use a checkpoint saved from the model "
            "its config describes."
        )


def _head_prefix(model: PreTrainedModel) -> tuple[str, torch.nn.Module]:
    if is_timm(model):
        name = model.timm_model.pretrained_cfg.get("classifier", "classifier")
        return f"{TIMM_PREFIX}{name}", model.timm_model.get_submodule(name)
    if not hasattr(model, "classifier"):
        raise ModelError(f"{type(model).__name__} has no `classifier` head to replace.")
    return "classifier", model.classifier


def _check_head_kept(model: PreTrainedModel, info: dict, num_labels: int, model_name_or_path: str) -> None:
    """`head_init: checkpoint`: the head must be the checkpoint's own, loaded with its weights."""
    prefix, head = _head_prefix(model)
    fresh = {key for key, *_ in info.get("mismatched_keys", [])} | set(info.get("missing_keys", []))
    if any(key.startswith(prefix) for key in fresh):
        sizes = [m.out_features for m in head.modules() if isinstance(m, torch.nn.Linear)]
        saved = next(
            (shapes[0] for key, *shapes in info.get("mismatched_keys", []) if key.startswith(prefix)), None
        )
        raise ModelError(
            f"head_init: checkpoint keeps {model_name_or_path!r}'s own classifier, but the dataset has {num_labels} "
            f"classes (head {tuple(saved) if saved is not None else 'not in the checkpoint'}; built: {sizes}). Use a "
            "dataset with the checkpoint's classes, in its order, or another head_init."
        )


def _ensure_new_head(model: PreTrainedModel, info: dict, num_labels: int) -> None:
    """Re-initialise the head if it was loaded from the checkpoint (same number of classes)."""
    prefix, head = _head_prefix(model)
    fresh = {key for key, *_ in info.get("mismatched_keys", [])} | set(info.get("missing_keys", []))
    if any(key.startswith(prefix) for key in fresh):
        return  # transformers already built a new head of the new size with the model's own init
    if is_timm(model):
        model.timm_model.reset_classifier(num_labels)
    else:
        for module in head.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


# How the new head is drawn. C.2 says only "randomly initialized"; the papers' own code decides:
# - released: the SAM authors' EfficientNet (sam_jax/efficientnet/efficientnet.py, `dense_kernel_init_fn`):
#   variance_scaling(1/3, 'fan_out', 'uniform') = U(±sqrt(3 * (1/3) / K)) = U(±1/√K) for K classes (std
#   1/√(3K): 0.18 at K = 10, 9x transformers' 0.02), flax Dense's default zero bias.
# - zeros: the ViT paper (Dosovitskiy et al. 2021, section 3.2) attaches a zero-initialised head.
# - default: whatever the loader drew (transformers' `_init_weights`, N(0, initializer_range); timm's own).
# - checkpoint: no new head: the checkpoint's own classifier and its weights (C.2's ImageNet runs: "We do not
#   randomly initialize the last layer ... but instead use the weights included in the checkpoint").
HEAD_INITS = ("released", "zeros", "default", "checkpoint")
# How `image_size` resamples a ViT's position embeddings: timm's bicubic `resample_abs_pos_embed`, or the ViT code's
# `scipy.ndimage.zoom(grid, zoom, order=1)` (checkpoint.py), a bilinear interpolation with the corner patches aligned.
POS_EMBED_INTERPOLATIONS = ("bicubic", "bilinear")


def init_head(model: PreTrainedModel, head_init: str, seed: int | None = None) -> None:
    """Draw the classifier head's Linear layer(s) as `head_init` says: from torch's global generator (the run's
    seed), or with `seed` from a generator of that seed, so that every run starts from the same head (the released
    code's `get_model` draws it from `PRNGKey(0)` whatever the run's seed) and the run's own stream is not advanced."""
    if head_init in ("default", "checkpoint"):
        return
    _, head = _head_prefix(model)
    fixed = contextlib.nullcontext() if seed is None else torch.random.fork_rng(devices=[])
    with fixed:
        if seed is not None:
            torch.manual_seed(seed)
        _draw_head(head, head_init)


def _draw_head(head: torch.nn.Module, head_init: str) -> None:
    for layer in (m for m in head.modules() if isinstance(m, torch.nn.Linear)):
        with torch.no_grad():
            if head_init == "released":
                bound = 1 / layer.out_features**0.5  # fan_out of the dense kernel = the number of classes
                layer.weight.uniform_(-bound, bound)
            else:
                layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()


def make_timm_loadable(folder: str) -> None:
    """Rewrite a saved TimmWrapper folder so that timm reads it too (no-op for other models). Idempotent."""
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("model_type") != "timm_wrapper":
        return
    if "pretrained_cfg" not in config:
        raise ModelError(
            f"{config_path} has no timm `pretrained_cfg`, so timm cannot rebuild the model; finetune from a timm "
            "checkpoint (its config.json holds one)."
        )
    if not isinstance(config.get("model_args"), dict):
        config["model_args"] = {}
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    weights_path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights_path):
        raise ModelError(
            f"{folder} has no single model.safetensors (sharded weights?), which timm needs: save with a larger "
            "`max_shard_size`."
        )
    state = load_file(weights_path)
    if any(key.startswith(TIMM_PREFIX) for key in state):
        state = {key.removeprefix(TIMM_PREFIX): value for key, value in state.items()}
        save_file(state, weights_path, metadata={"format": "pt"})


def save_timm_checkpoint(timm_model: torch.nn.Module, folder: str, **pretrained_cfg) -> None:
    """Write a timm model as the Hub's `timm/...` repos hold it (config.json + model.safetensors).

    For checkpoints made locally (the demo, tests): they then load exactly like a Hub timm checkpoint.
    `pretrained_cfg` entries (e.g. `input_size=(3, 32, 32)`, `crop_pct=1.0`, `mean`, `std`) override the
    architecture's preprocessing defaults.
    """
    from timm.models import save_for_hf

    timm_model.pretrained_cfg = {**timm_model.pretrained_cfg, **pretrained_cfg}
    save_for_hf(timm_model, folder, safe_serialization=True)
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    # Hub timm configs carry no `model_args.num_classes` (transformers' wrapper passes num_classes itself).
    config["model_args"] = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
