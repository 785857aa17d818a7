"""Checkpoint loading: new head sized to the dataset, label names, timm layout readable by timm and transformers."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from finetune_helpers import tiny_timm_checkpoint, tiny_vit_checkpoint
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

from hf_sam.finetune.models import ModelError, is_timm, load_model_and_processor, make_timm_loadable

NAMES = ["cat", "dog", "bird"]


def test_timm_checkpoint_gets_new_head_and_keeps_the_rest(tmp_path):
    ckpt = tiny_timm_checkpoint(str(tmp_path / "ckpt"), num_classes=7)
    model, processor = load_model_and_processor(ckpt, NAMES)
    assert model.timm_model.classifier.out_features == 3 and model.config.id2label == dict(enumerate(NAMES))
    saved = load_file(f"{ckpt}/model.safetensors")
    for name, tensor in model.timm_model.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(tensor, saved[name]), name
    assert processor.data_config["input_size"] == (3, 32, 32)


def test_same_size_head_is_reinitialised(tmp_path):
    ckpt = tiny_timm_checkpoint(str(tmp_path / "ckpt"), num_classes=3)
    model, _ = load_model_and_processor(ckpt, NAMES)
    assert not torch.equal(
        model.timm_model.classifier.weight, load_file(f"{ckpt}/model.safetensors")["classifier.weight"]
    )
    vit = tiny_vit_checkpoint(str(tmp_path / "vit"), num_classes=3)
    model, _ = load_model_and_processor(vit, NAMES)
    assert not torch.equal(
        model.classifier.weight, load_file(f"{vit}/model.safetensors")["classifier.weight"]
    )


def test_transformers_checkpoint_new_head(tmp_path):
    vit = tiny_vit_checkpoint(str(tmp_path / "vit"), num_classes=7)
    model, processor = load_model_and_processor(vit, NAMES)
    assert model.classifier.out_features == 3 and model.config.label2id == {n: i for i, n in enumerate(NAMES)}
    assert processor(images=[torch.zeros(3, 20, 24)], return_tensors="pt")["pixel_values"].shape[-2:] == (
        32,
        32,
    )


def test_finetuned_timm_model_loads_with_both_libraries(tmp_path):
    model, _ = load_model_and_processor(tiny_timm_checkpoint(str(tmp_path / "ckpt")), NAMES)
    model.save_pretrained(tmp_path / "out")
    make_timm_loadable(str(tmp_path / "out"))
    x = torch.randn(2, 3, 32, 32)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    by_timm_model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    # The weights come back bit for bit through both libraries...
    saved = {k.removeprefix("timm_model."): v for k, v in model.state_dict().items()}
    for loaded in (reloaded.state_dict(), by_timm_model.state_dict()):
        loaded = {k.removeprefix("timm_model."): v for k, v in loaded.items()}
        assert loaded.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(loaded[key], value), key
    with torch.no_grad():
        expected = model.eval()(pixel_values=x).logits
        by_transformers = reloaded(pixel_values=x).logits
        by_timm = by_timm_model(x)
    # ...and the logits within a few float32 ulps: two model objects may take differently blocked kernels (the
    # thread count decides, e.g. OMP_NUM_THREADS=1), which round differently.
    torch.testing.assert_close(by_transformers, expected, rtol=4e-7, atol=4e-7)
    torch.testing.assert_close(by_timm, expected, rtol=4e-7, atol=4e-7)


def test_make_timm_loadable_strips_the_wrapper_prefix(tmp_path):
    """A wrapper built from config saves `timm_model.`-prefixed keys and `model_args: null`; timm reads neither."""
    config = TimmWrapperConfig(architecture="test_efficientnet", num_labels=3)
    config.pretrained_cfg = timm.create_model("test_efficientnet").pretrained_cfg | {
        "input_size": [3, 32, 32]
    }
    model = TimmWrapperForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    assert any(k.startswith("timm_model.") for k in load_file(tmp_path / "model.safetensors"))
    with pytest.raises((AttributeError, RuntimeError, TypeError)):  # model_args None / prefixed keys
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    make_timm_loadable(str(tmp_path))
    make_timm_loadable(str(tmp_path))  # idempotent
    assert json.loads((tmp_path / "config.json").read_text())["model_args"] == {}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()(x),
            model(pixel_values=x).logits,
        )


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelError, match="model_name_or_path '.*nothing-here' does not exist"):
        load_model_and_processor(str(tmp_path / "nothing-here"), NAMES)


# ---------------------------------------------------------------------- the new head's initialisation (head_init)
MANY = [f"class_{i}" for i in range(200)]  # K = 200: enough weights (K x in_features) to test a distribution


def _head(model):
    return model.timm_model.classifier if is_timm(model) else model.classifier


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_released_head_init_is_uniform_one_over_sqrt_k(kind, tmp_path):
    """The released EfficientNet head: variance_scaling(1/3, 'fan_out', 'uniform'), i.e. U(±sqrt(3 x 1/3 / K))
    = U(±1/√K) with std 1/√(3K); flax's Dense bias is zeros. The body keeps the checkpoint's weights."""
    ckpt = (tiny_timm_checkpoint if kind == "timm" else tiny_vit_checkpoint)(str(tmp_path / "ckpt"))
    model, _ = load_model_and_processor(ckpt, MANY, head_init="released")
    head, k = _head(model), len(MANY)
    w = head.weight.detach().double().flatten()
    bound = 1 / math.sqrt(k)
    assert head.out_features == k and float(w.abs().max()) <= bound
    assert float(w.abs().max()) > 0.95 * bound  # fills the range
    assert abs(float(w.std()) / (1 / math.sqrt(3 * k)) - 1) < 0.05
    assert abs(float(w.mean())) < 0.1 * bound
    # uniform, not a normal of the same std (which would put 61% of the mass inside half the bound)
    assert abs(float((w.abs() < bound / 2).double().mean()) - 0.5) < 0.05
    assert torch.count_nonzero(head.bias) == 0
    _assert_body_untouched(model, ckpt)


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_zeros_head_init_and_default(kind, tmp_path):
    """zeros: the ViT paper's zero head (weights and bias). default: what transformers' resize draws, N(0, 0.02)
    for a transformers model (its initializer_range) and timm's own init for a timm one."""
    ckpt = (tiny_timm_checkpoint if kind == "timm" else tiny_vit_checkpoint)(str(tmp_path / "ckpt"))
    model, _ = load_model_and_processor(ckpt, MANY, head_init="zeros")
    assert torch.count_nonzero(_head(model).weight) == 0 and torch.count_nonzero(_head(model).bias) == 0
    _assert_body_untouched(model, ckpt)
    model, _ = load_model_and_processor(ckpt, MANY)  # head_init="default"
    std = float(_head(model).weight.detach().std())
    if kind == "transformers":
        assert abs(std / model.config.initializer_range - 1) < 0.1
    else:
        assert std > 0
    _assert_body_untouched(model, ckpt)


def test_unknown_head_init_is_refused(tmp_path):
    with pytest.raises(ModelError, match="head_init must be one of"):
        load_model_and_processor(tiny_vit_checkpoint(str(tmp_path / "vit")), NAMES, head_init="xavier")


def _assert_body_untouched(model, ckpt):
    """Every tensor but the head's equals the checkpoint's, as transformers itself loads it (its key names)."""
    saved = AutoModelForImageClassification.from_pretrained(ckpt).state_dict()
    head = "timm_model.classifier." if is_timm(model) else "classifier."
    body = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(head)}
    assert body and set(body) == {name for name in saved if not name.startswith(head)}
    for name, tensor in body.items():
        assert torch.equal(tensor, saved[name]), name


def test_checkpoint_head_init_keeps_the_checkpoints_head(tmp_path):
    """head_init: checkpoint (C.2's ImageNet runs: "use the weights included in the checkpoint"): the head keeps the
    checkpoint's weights, for a timm and a transformers checkpoint; a dataset with another class count is refused."""
    timm_ckpt = tiny_timm_checkpoint(str(tmp_path / "timm"), num_classes=3)
    model, _ = load_model_and_processor(timm_ckpt, NAMES, head_init="checkpoint")
    saved = load_file(f"{timm_ckpt}/model.safetensors")
    assert torch.equal(model.timm_model.classifier.weight, saved["classifier.weight"])
    assert torch.equal(model.timm_model.classifier.bias, saved["classifier.bias"])
    assert model.config.id2label == dict(enumerate(NAMES))
    vit = tiny_vit_checkpoint(str(tmp_path / "vit"), num_classes=3)
    model, _ = load_model_and_processor(vit, NAMES, head_init="checkpoint")
    assert torch.equal(model.classifier.weight, load_file(f"{vit}/model.safetensors")["classifier.weight"])
    for ckpt in (timm_ckpt, vit):
        with pytest.raises(
            ModelError, match="head_init: checkpoint keeps .*own classifier, but the dataset has 200"
        ):
            load_model_and_processor(ckpt, MANY, head_init="checkpoint")


# ---------------------------------------------------------------------- image_size (the ViT recipes' 384 px)
def _tiny_timm_vit(folder: str) -> str:
    """timm's test_vit (patch 16, 160 px), saved in the Hub's timm layout with ViT's preprocessing."""
    from hf_sam.finetune.models import save_timm_checkpoint

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5)
    save_timm_checkpoint(model, folder, crop_pct=0.9, mean=(0.5,) * 3, std=(0.5,) * 3)
    return folder


def test_image_size_resamples_the_position_embeddings_and_reloads_at_that_size(tmp_path):
    """image_size: the pretrained position embeddings resampled to the new patch grid (timm's resample_abs_pos_embed,
    the ViT paper's 2D interpolation), the processor at the new size with the checkpoint's crop_pct and mean/std, and a
    saved model that transformers and timm both rebuild at that size, giving the same logits."""
    from timm.layers import resample_abs_pos_embed

    ckpt = _tiny_timm_vit(str(tmp_path / "ckpt"))
    model, processor = load_model_and_processor(ckpt, NAMES, head_init="zeros", image_size=64)
    saved = load_file(f"{ckpt}/model.safetensors")
    assert saved["pos_embed"].shape == (1, 1 + 10 * 10, 64)  # 160 px / 16 = 10 x 10 patches + the class token
    expected = resample_abs_pos_embed(
        saved["pos_embed"], new_size=(4, 4), old_size=(10, 10), num_prefix_tokens=1
    )
    torch.testing.assert_close(model.timm_model.pos_embed.detach(), expected, rtol=0, atol=0)
    for name, tensor in model.timm_model.state_dict().items():  # nothing else changed
        if name != "pos_embed" and not name.startswith("head."):
            assert torch.equal(tensor, saved[name]), name
    assert (processor.data_config["input_size"], processor.data_config["crop_pct"]) == ((3, 64, 64), 0.9)
    assert processor.data_config["mean"] == (0.5,) * 3
    pixels = processor(images=[torch.zeros(3, 90, 120)], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64) and model(pixel_values=pixels).logits.shape == (1, 3)
    model.save_pretrained(tmp_path / "out")
    make_timm_loadable(str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_args"]["img_size"] == 64 and config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected_logits = model.eval()(pixel_values=x).logits
        by_transformers = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()(
            pixel_values=x
        )
        by_timm = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()(x)
    torch.testing.assert_close(by_transformers.logits, expected_logits, rtol=0, atol=0)
    torch.testing.assert_close(by_timm, expected_logits, rtol=0, atol=0)


def test_bilinear_pos_embed_resampling_is_the_vit_codes_zoom(tmp_path):
    """`pos_embed_interpolation: bilinear` resamples the grid as the ViT code does (checkpoint.py:
    `scipy.ndimage.zoom(posemb_grid, zoom, order=1)`, corner-aligned bilinear), the class token untouched; the
    default stays timm's bicubic."""
    import numpy as np
    import scipy.ndimage

    ckpt = _tiny_timm_vit(str(tmp_path / "ckpt"))
    saved = load_file(f"{ckpt}/model.safetensors")["pos_embed"]
    model, _ = load_model_and_processor(ckpt, NAMES, head_init="zeros", image_size=64,
                                        pos_embed_interpolation="bilinear")  # fmt: skip
    grid = saved[0, 1:].reshape(10, 10, -1).double().numpy()
    zoomed = scipy.ndimage.zoom(grid, (4 / 10, 4 / 10, 1), order=1).reshape(1, 16, -1)
    expected = torch.from_numpy(np.concatenate([saved[:, :1].double().numpy(), zoomed], axis=1)).float()
    torch.testing.assert_close(model.timm_model.pos_embed.detach(), expected, rtol=0, atol=1e-6)
    bicubic, _ = load_model_and_processor(ckpt, NAMES, head_init="zeros", image_size=64)
    assert not torch.allclose(bicubic.timm_model.pos_embed, model.timm_model.pos_embed)
    with pytest.raises(ModelError, match="pos_embed_interpolation must be one of bicubic, bilinear"):
        load_model_and_processor(ckpt, NAMES, image_size=64, pos_embed_interpolation="nearest")


def test_head_init_seed_draws_the_same_head_whatever_the_run_seed(tmp_path):
    """The released code draws every run's new head from PRNGKey(0) (load_model.py): `head_init_seed` fixes the
    draw the same way (a torch draw, not JAX's numbers), leaves the run's own random stream where it was, and
    without it the head follows the run's seed."""
    ckpt = tiny_timm_checkpoint(str(tmp_path / "ckpt"))
    heads, after = [], []
    for run_seed in (1, 2):
        torch.manual_seed(run_seed)
        model, _ = load_model_and_processor(ckpt, MANY, head_init="released", head_init_seed=0)
        heads.append(_head(model).weight.detach().clone())
        after.append(torch.rand(3))
    assert torch.equal(heads[0], heads[1]) and not torch.equal(after[0], after[1])
    torch.manual_seed(1)
    load_model_and_processor(
        ckpt, MANY, head_init="zeros"
    )  # loading draws what it draws; a zero head nothing
    expected = torch.rand(3)
    torch.manual_seed(1)
    load_model_and_processor(ckpt, MANY, head_init="released", head_init_seed=0)
    assert torch.equal(torch.rand(3), expected)  # the run's stream is not advanced by the fixed draw
    seeded = []
    for run_seed in (1, 2):
        torch.manual_seed(run_seed)
        model, _ = load_model_and_processor(ckpt, MANY, head_init="released")
        seeded.append(_head(model).weight.detach().clone())
    assert not torch.equal(seeded[0], seeded[1])


def test_image_size_is_refused_where_it_cannot_be_honoured(tmp_path):
    with pytest.raises(ModelError, match="image_size is supported for timm ViT checkpoints"):
        load_model_and_processor(tiny_timm_checkpoint(str(tmp_path / "cnn")), NAMES, image_size=64)
    with pytest.raises(ModelError, match="image_size is supported for timm ViT checkpoints"):
        load_model_and_processor(tiny_vit_checkpoint(str(tmp_path / "hf_vit")), NAMES, image_size=64)
    with pytest.raises(ModelError, match="not a multiple of the patch size"):
        load_model_and_processor(_tiny_timm_vit(str(tmp_path / "vit")), NAMES, image_size=70)


def test_a_zero3_launch_loads_the_checkpoint_whole_and_keeps_its_config(tmp_path):
    """Under a ZeRO-3 launch transformers would build the checkpoint partitioned (zero.Init), where timm's init divides
    by a fan-in of 0 and the new head cannot be drawn; the recipe loads it whole, and the registered ZeRO-3 config
    is back afterwards for the Trainer (the launch itself: tests/test_deepspeed_zero3.py)."""
    pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    checkpoint = tiny_timm_checkpoint(str(tmp_path / "ckpt"))
    registered = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        model, _ = load_model_and_processor(checkpoint, [str(i) for i in range(4)], head_init="released")
        assert is_deepspeed_zero3_enabled()  # the Trainer still sees the launch's ZeRO-3 config
    finally:
        unset_hf_deepspeed_config()
    assert not any(hasattr(p, "ds_id") for p in model.parameters())  # whole, not partitioned
    head = model.timm_model.get_classifier().weight.detach()
    assert head.shape == (4, head.shape[1]) and float(head.abs().max()) <= 0.5 + 1e-6  # U(±1/√K), K = 4
    del registered  # kept alive until here: the registry holds a weak reference
