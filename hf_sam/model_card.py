"""The model card of a finetuning run, built with `huggingface_hub.ModelCard` (metadata the Hub indexes:
licence, base model, datasets, tags, metrics and a `model-index` with the test results)."""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CARD_TAGS = ("sam", "image-classification", "hf-sam")


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
    timm_model: bool,
    training_lines: list[str],
    command: str,
) -> ModelCard:
    """A card whose metadata and text say the same thing: the test top-1/top-5 on the split actually evaluated
    (`test_split`, e.g. Food-101's `validation`), how to load the model (transformers and, for timm models,
    timm), how it was trained, and the dataset's terms."""
    repo = repo_id or "<repo>"
    results = [
        EvalResult(task_type="image-classification", task_name="Image classification",
                   dataset_type=dataset_id or dataset_title, dataset_name=dataset_title, dataset_split=test_split,
                   metric_type="accuracy", metric_name=name, metric_value=float(metrics[key]))
        for key, name in (("test_top1", "top-1 accuracy"), ("test_top5", "top-5 accuracy")) if key in metrics
    ]  # fmt: skip
    data = ModelCardData(
        license=license,
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        tags=list(CARD_TAGS),
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
        f"Licence of these weights: `{license}`."
        if license
        else "No licence was set for these weights (`license`)."
    )
    terms = dataset_terms or "see the dataset's card"
    body = f"""
# {title}

`{base_model}` finetuned on {dataset_title} (`{dataset_id or dataset_title}`; {num_classes} classes,
{num_train:,} training images) with hf-sam (Sharpness-Aware Minimization in the
Hugging Face Trainer), following the SAM paper's finetuning recipe (Foret et al. 2021, appendix C.2).

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
