"""The model card of a finetuning run, built with `huggingface_hub.ModelCard` (metadata the Hub indexes:
licence, base model, datasets, tags, metrics and a `model-index` with the test results). `write_model_card`
writes the one of a `recipes/finetune.py` run, from its arguments."""

from __future__ import annotations

import os

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_sam.finetune.cli import Args, command_line

# Never `sam`: on the Hub that tag means Segment Anything, and a baseline run is not SAM either.
CARD_TAGS = ("image-classification", "hf-sam")
SAM_TAG = "sharpness-aware-minimization"  # SAM runs only


def finetuning_card(
    *,
    title: str,
    repo_id: str | None,
    base_model: str,
    dataset_id: str | None,
    dataset_title: str,
    test_split: str,
    num_train: int,
    num_test: int,
    num_classes: int,
    metrics: dict[str, float],
    license: str | None,
    dataset_terms: str | None,
    sam: bool,
    license_name: str | None = None,
    license_link: str | None = None,
    dataset_revision: str | None = None,
    timm_model: bool,
    training_lines: list[str],
    command: str,
    architecture: str | None = None,
) -> ModelCard:
    """A card whose metadata and text say the same thing: the test top-1/top-5 on the split actually evaluated
    (`test_split`, e.g. Food-101's `validation`), how to load the model (transformers and, for timm models,
    timm), how it was trained, and the dataset's terms. `sam`: a SAM run (ρ > 0), tagged `SAM_TAG`;
    `dataset_revision`: the dataset commit evaluated (the model-index's `dataset.revision`); `architecture`: the
    model's (timm name or transformers model_type), which says what the settings follow (`conventions`)."""
    repo = repo_id or "<repo>"
    # A leaderboard groups results by (task, dataset, metric type): top-5 gets its own type and k, so that it is
    # not read as a second, better top-1.
    metric_kinds = {
        "test_top1": ("accuracy", "top-1 accuracy", None),
        "test_top5": ("top_k_accuracy", "top-5 accuracy", {"k": 5}),
    }
    results = [
        EvalResult(task_type="image-classification", task_name="Image classification",
                   dataset_type=dataset_id or dataset_title, dataset_name=dataset_title, dataset_split=test_split,
                   dataset_revision=dataset_revision, metric_type=kind, metric_name=name, metric_args=metric_args,
                   metric_value=float(metrics[key]))
        for key, (kind, name, metric_args) in metric_kinds.items() if key in metrics
    ]  # fmt: skip
    licence_fields = (
        {"license_name": license_name, "license_link": license_link} if license == "other" else {}
    )
    data = ModelCardData(
        license=license,
        **licence_fields,
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        tags=list(CARD_TAGS) + ([SAM_TAG] if sam else []),
        metrics=["accuracy"],
        library_name="timm" if timm_model else "transformers",
        pipeline_tag="image-classification",
        model_name=title,
        eval_results=results or None,
    )
    rows = "\n".join(
        f"| {name} | {100 * metrics[key]:.2f}% |"
        for key, name in (("test_top1", "top-1 accuracy"), ("test_top5", "top-5 accuracy"))
        if key in metrics
    )
    timm_use = (
        f"""
With timm:

```python
import timm
from PIL import Image

model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
logits = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))
label = model.pretrained_cfg["label_names"][logits.argmax(-1).item()]
```
"""
        if timm_model
        else ""
    )
    licence = (
        f"Licence of these weights: `{license}`"
        + (f" ({license_name}: {license_link})." if licence_fields else ".")
        if license
        else "No licence was set for these weights (`license`)."
    )
    terms = dataset_terms or "see the dataset's card"
    body = f"""
# {title}

`{base_model}` finetuned on {dataset_title} (`{dataset_id or dataset_title}`; {num_classes} classes,
{num_train:,} training images) with hf-sam (Sharpness-Aware Minimization in the
Hugging Face Trainer), {conventions(architecture or base_model)}

## Results

Split `{test_split}` ({num_test:,} images), evaluated once at the end of training:

| metric | value |
|---|---|
{rows}

## Use

With transformers:

```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{repo}")
model = AutoModelForImageClassification.from_pretrained("{repo}").eval()
inputs = processor(images=Image.open("image.jpg").convert("RGB"), return_tensors="pt")
label = model.config.id2label[model(**inputs).logits.argmax(-1).item()]
```
{timm_use}
## Training

{chr(10).join(f"- {line}" for line in training_lines)}

Command:

```bash
{command}
```

Full configuration: `resolved_config.yaml`; test metrics: `test_results.json`.

## Licence and dataset terms

{licence} Dataset terms ({dataset_title}): {terms}.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def conventions(architecture: str) -> str:
    """What the run's settings follow, from its architecture (a timm name, a transformers model_type or a
    checkpoint id): the SAM paper's C.2 for EfficientNets; for ViTs, which the SAM paper never finetunes, the ViT
    paper's finetuning conventions; for anything else, only the settings listed under Training."""
    name = os.path.basename(os.path.normpath(architecture)).lower()
    if "efficientnet" in name:
        return (
            "following the SAM paper's finetuning recipe (Foret et al. 2021, appendix C.2), with the authors' "
            "released code where C.2 is silent."
        )
    if "vit" in name:
        return (
            "following the ViT paper's finetuning conventions where hf-sam's ViT recipes take them (Dosovitskiy et "
            "al. 2021, table 4 and appendix B.1.1), with ρ from the SAM paper's table 8 (arXiv:2010.01412v2), which "
            "was tuned for EfficientNets. The SAM paper (Foret et al. 2021) has no ViT finetuning experiment, so this "
            "is not a reproduction of it; SAM's results on ViTs are in Chen, Hsieh & Gong, \"When Vision "
            'Transformers Outperform ResNets without Pretraining or Strong Data Augmentations" (ICLR 2022), whose '
            "tables this run does not reproduce either. The settings used are listed under Training."
        )
    return "with the settings listed under Training."


def run_title(args: Args, spec) -> str:
    """'<dataset> x <base model>, SAM (rho = ...)' or '..., baseline (plain optimizer)'."""
    base = os.path.basename(os.path.normpath(args.model.model_name_or_path))
    t = args.training
    run = f"SAM (ρ = {t.sam_rho})" if t.sam_rho > 0 else "baseline (plain optimizer, ρ = 0)"
    return f"{spec.title or spec.name} x {base}, {run}"


def write_model_card(
    args: Args, spec, source: str, num_train: int, num_test: int, label_names: list[str],
    metrics: dict[str, float], timm_model: bool, *, engine: str, global_epsilon: bool,
    architecture: str | None = None, batchnorm: bool = True,
) -> str:  # fmt: skip
    """`README.md` in `output_dir` for a finished run of `args` on the dataset `spec` (loaded from `source`);
    `engine` and `global_epsilon` as the trainer ran (`trainer.sam_engine.name`, `.global_epsilon`);
    `architecture` as `hf_sam.finetune.models.architecture` names it (default: read from `model_name_or_path`);
    `batchnorm`: whether the model has BatchNorm layers (the card states whether their statistics were frozen only
    then: a ViT has none)."""
    t, m = args.training, args.model
    global_batch = t.per_device_train_batch_size * t.world_size * t.gradient_accumulation_steps
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
    head = (
        "the checkpoint's own classifier head (head_init checkpoint)"
        if m.head_init == "checkpoint"
        else f"new classifier head ({m.head_init} init)"
    )
    resolution = f"{m.image_size} px (position embeddings resampled)" if m.image_size else "the checkpoint's"
    length = f"max_steps {t.max_steps}" if t.max_steps > 0 else f"{t.num_train_epochs:g} epochs"
    training_lines = [
        f"Base checkpoint: `{m.model_name_or_path}`{f' @ {m.model_revision}' if m.model_revision else ''}; "
        f"{head}; {f'BatchNorm statistics frozen: {m.freeze_batchnorm}; ' if batchnorm else ''}"
        f"resolution {resolution}",
        f"Dropout {m.drop_rate if m.drop_rate is not None else 'as the checkpoint'}, stochastic depth "
        f"{m.drop_path_rate if m.drop_path_rate is not None else 'as the checkpoint'}",
        f"Dataset: `{source}`; train augmentation: {args.data.train_augmentation}; test resize: {args.data.eval_resize}",
        label_noise_line(args),
        f"SAM: {sam}",
        f"Optimizer: {optim} ({t.optim_args or 'defaults'}), lr {t.learning_rate}, {schedule} schedule, "
        f"{t.warmup_steps} warm-up steps, weight decay {t.weight_decay} on {decay_scope}, gradient clipping "
        f"{t.max_grad_norm or 'none'}, label smoothing {t.label_smoothing_factor}",
        f"Global batch {global_batch} = {t.per_device_train_batch_size} per device x {t.world_size} processes x "
        f"{t.gradient_accumulation_steps} accumulation; {length}; {engine}; "
        f"{'bf16' if t.bf16 else 'fp16' if t.fp16 else 'fp32'}; seed {t.seed}",
    ]
    from_hub = spec.hub_id and not os.path.exists(source)
    dataset_id, _, revision = source.partition("@")  # the loader names what it loaded "<id>@<revision>"
    # Read from the Hub: the id loaded. A local copy of a spec that names the Hub id of its data (ImageNet): that id.
    card_id = dataset_id if from_hub else (spec.card_id if not spec.hub_id else None)
    card = finetuning_card(
        title=run_title(args, spec),
        repo_id=t.hub_model_id,
        base_model=m.model_name_or_path,
        dataset_id=card_id,
        dataset_revision=(revision or None) if from_hub else None,
        dataset_title=spec.title or spec.name,
        test_split=spec.test_split,
        num_train=num_train,
        num_test=num_test,
        num_classes=len(label_names),
        metrics=metrics,
        license=args.script.license,
        license_name=args.script.license_name,
        license_link=args.script.license_link,
        dataset_terms=spec.terms,
        sam=t.sam_rho > 0,
        timm_model=timm_model,
        training_lines=training_lines,
        command=command_line(args),
        architecture=architecture or m.model_name_or_path,
    )
    card.save(os.path.join(t.output_dir, "README.md"))
    return str(card)


def label_noise_line(args) -> str:
    d = args.data
    if not d.label_noise:
        return "Label noise: none (clean labels)"
    seed = args.training.seed if d.label_noise_seed is None else d.label_noise_seed
    how = "another class (symmetric" if d.label_noise_type == "symmetric" else "the next class (pair-flip"
    return f"Label noise: {100 * d.label_noise:g}% of the training labels replaced by {how}, seed {seed}); test labels clean"
