"""`SAMTrainer` under DeepSpeed ZeRO-1 and ZeRO-2 on two gloo processes (DeepSpeed's CPU accelerator).

ZeRO-1/2 keep the full weights on every process (they partition optimizer state and gradients), so SAM's
semantics are DDP's: each process takes the ascent gradient of its own micro-batch on the module (outside the
engine, whose hooks would start ZeRO's reduction), ε per process or global with sam_sync_perturbation, and the
descent through the engine. Every number is compared with a single-process reference written out by hand.
"""

import copy

import pytest
import torch
from toy import loss_and_grads, make_model
from two_processes import launch_recipe, torchrun

pytest.importorskip("deepspeed")  # installed by `pip install -e '.[dev]'`, so make test always runs these

LR, RHO = 0.1, 0.05
RUNS = ("zero1", "zero2", "zero2-sync", "zero2-resumed", "zero2-bf16", "zero2-variants")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    torchrun("deepspeed_trainer.py", str(out), port=29529)
    return {
        (run, rank): torch.load(out / f"{run}-rank{rank}.pt", weights_only=False)
        for run in RUNS
        for rank in (0, 1)
    }


def reference(ranks: list[dict], sync: bool):
    """Two steps × two micro-batches × two processes, SGD with momentum 0.9: per micro-batch and process
    ε = ρ·g/‖g‖ from that process's gradient (or from the gradient averaged over processes with sync), the descent
    gradient at w + ε, all of them averaged (the Trainer's accumulation and ZeRO's reduction)."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    norms, weights = [[], []], []
    for step in range(2):
        step_grad = [torch.zeros_like(p) for p in model.parameters()]
        for micro in range(2):
            batches = [r["batches"][step * 2 + micro] for r in ranks]
            grads = [loss_and_grads(model, b)[1] for b in batches]
            if sync:
                grads = [[(a + b) / 2 for a, b in zip(*grads, strict=True)]] * 2
            for rank, (batch, g) in enumerate(zip(batches, grads, strict=True)):
                norm = torch.sqrt(sum((x**2).sum() for x in g))
                norms[rank].append(float(norm))
                perturbed = copy.deepcopy(model)
                with torch.no_grad():
                    for p, x in zip(perturbed.parameters(), g, strict=True):
                        p += RHO * x / norm
                descent = loss_and_grads(perturbed, batch)[1]
                step_grad = [s + d / 4 for s, d in zip(step_grad, descent, strict=True)]
        for p, grad in zip(model.parameters(), step_grad, strict=True):
            p.grad = grad
        optimizer.step()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return norms, weights


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "run,stage,sync", [("zero1", 1, False), ("zero2", 2, False), ("zero2-sync", 2, True)]
)
def test_deepspeed_matches_the_hand_reference(runs, run, stage, sync):
    ranks = [runs[(run, 0)], runs[(run, 1)]]
    assert ranks[0]["engine"] == ("DeepSpeedEngine", stage) and ranks[0]["world"] == 2
    assert not torch.equal(ranks[0]["batches"][0]["features"], ranks[1]["batches"][0]["features"])
    norms, weights = reference(ranks, sync)
    for rank, record in enumerate(ranks):
        assert record["grad_norms"] == pytest.approx(
            norms[rank], rel=1e-6
        )  # the full-model norm, not a partition's
        for step, expected in enumerate(weights):
            for name, want in expected.items():
                torch.testing.assert_close(record["full"][step][name], want, atol=1e-6, rtol=0)
                assert torch.equal(record["full"][step][name], ranks[0]["full"][step][name])
    if not sync:
        assert ranks[0]["grad_norms"] != ranks[1]["grad_norms"]  # ε per process: each rank its own norm
    for record in ranks:  # SAM's copy of w: the full trainable weights (ZeRO-1/2 keep them on every process)
        assert record["backup_numel"] == sum(t.numel() for t in record["full"][-1].values())


@pytest.mark.multiprocess
def test_deepspeed_resume_from_a_checkpoint_is_exact(runs):
    for rank in (0, 1):
        straight, resumed = runs[("zero2", rank)], runs[("zero2-resumed", rank)]
        assert resumed["grad_norms"] == straight["grad_norms"][2:]
        for name, want in straight["full"][-1].items():
            assert torch.equal(resumed["full"][-1][name], want)


@pytest.mark.multiprocess
def test_deepspeed_bf16_runs_within_bf16_rounding_of_fp32(runs):
    """DeepSpeed bf16 (the module in bf16, fp32 master weights in ZeRO): the ascent runs on the bf16 module with the
    inputs the Trainer cast to bf16; norms, the loss increase at w + ε (so ε was applied) and weights agree with
    the fp32 run to bf16 precision."""
    assert_bf16_within_rounding(
        [runs[("zero2-bf16", r)] for r in (0, 1)], [runs[("zero2", r)] for r in (0, 1)]
    )


def assert_bf16_within_rounding(bf16_ranks: list[dict], fp32_ranks: list[dict]) -> None:
    """Each rank's bf16 run against its fp32 run: ascent norms, the loss increase at w + ε (so ε was applied) and the
    final weights within bf16 rounding; the bf16 weights equal across ranks."""
    for bf16, fp32 in zip(bf16_ranks, fp32_ranks, strict=True):
        assert bf16["grad_norms"] == pytest.approx(fp32["grad_norms"], rel=2e-2)
        sharpness = [[e["sam/sharpness"] for e in r["log_history"] if "loss" in e] for r in (bf16, fp32)]
        assert len(sharpness[0]) == 2 and min(sharpness[1]) > 0.01
        assert sharpness[0] == pytest.approx(sharpness[1], rel=0.1)
        for name, weight in bf16["full"][-1].items():
            assert weight.dtype == torch.bfloat16
            torch.testing.assert_close(weight.float(), fp32["full"][-1][name], atol=4e-3, rtol=1e-2)
            assert torch.equal(weight, bf16_ranks[0]["full"][-1][name])


@pytest.mark.multiprocess
def test_deepspeed_rho_schedule_and_parameter_filter(runs):
    """Cosine LR over 2 steps (LR, then LR/2), ρ_t = ρ_min + (ρ − ρ_min)·lr_t/LR, ε on fc2 only, per process; the
    rates reach the module through ZeRO's optimizer groups."""
    ranks = [runs[("zero2-variants", 0)], runs[("zero2-variants", 1)]]
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    head = [n.startswith("fc2.") for n, _ in model.named_parameters()]
    for step, lr in enumerate((LR, LR / 2)):
        rho = 0.02 + (RHO - 0.02) * lr / LR
        step_grad = [torch.zeros_like(p) for p in model.parameters()]
        for record in ranks:
            batch = record["batches"][step]
            g = loss_and_grads(model, batch)[1]
            norm = torch.sqrt(sum((x**2).sum() for x, h in zip(g, head, strict=True) if h))
            assert record["grad_norms"][step] == pytest.approx(float(norm), rel=1e-6)
            perturbed = copy.deepcopy(model)
            with torch.no_grad():
                for p, x, h in zip(perturbed.parameters(), g, head, strict=True):
                    if h:
                        p += rho * x / norm
            descent = loss_and_grads(perturbed, batch)[1]
            step_grad = [s + d / 2 for s, d in zip(step_grad, descent, strict=True)]
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, grad in zip(model.parameters(), step_grad, strict=True):
            p.grad = grad
        optimizer.step()
        for name, p in model.named_parameters():
            for record in ranks:
                torch.testing.assert_close(record["full"][step][name], p.detach(), atol=1e-6, rtol=0)


@pytest.mark.multiprocess
def test_recipe_under_deepspeed_config_equals_ddp(tmp_path):
    """`accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/finetune.py` on a tiny
    timm EfficientNet: ZeRO-2 keeps DDP's per-process ε, so the saved weights equal the DDP recipe's."""
    from finetune_helpers import tiny_timm_checkpoint
    from safetensors.torch import load_file

    checkpoint = tiny_timm_checkpoint(str(tmp_path / "ckpt"))
    output = launch_recipe("deepspeed_zero2.yaml", tmp_path / "zero2", checkpoint, port=29531)
    assert "You are using ZeRO" in output  # DeepSpeed's engine ran (Accelerate did not fall back to DDP)
    launch_recipe("cpu.yaml", tmp_path / "ddp", checkpoint, port=29533)
    zero2, ddp = (load_file(tmp_path / run / "model.safetensors") for run in ("zero2", "ddp"))
    assert zero2.keys() == ddp.keys()
    for name, weight in zero2.items():
        torch.testing.assert_close(weight, ddp[name], atol=1e-6, rtol=0)
    card = (tmp_path / "zero2" / "README.md").read_text()
    assert "per-process ε (m = 2)" in card and "; DeepSpeed ZeRO-2" in card
