"""`SAMTrainer` under DeepSpeed ZeRO-3 on two gloo processes (DeepSpeed's CPU accelerator).

ZeRO-3 partitions the weights themselves: each process holds a flat slice of every parameter and the engine gathers
the full weights inside its forward. So ε is one for all processes, as under FSDP2: from the gradient of the global
micro-batch (both processes' examples), with the full-model norm, added to each process's own partition. Every
number is compared with a single-process reference written out by hand (`test_deepspeed.reference` with the
averaged gradient), both with ZeRO-3's small "persistent" parameters (kept gathered between forwards) and with
every parameter partitioned (the path of a large model).
"""

import copy
import math

import pytest
import torch
from test_deepspeed import LR, RHO, assert_bf16_within_rounding, reference
from toy import loss_and_grads, make_model, reference_sam_gradient
from two_processes import torchrun

pytest.importorskip("deepspeed")

RUNS = ("persistent", "partitioned", "resumed", "stock", "rho0", "variants", "bf16", "adaptive")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    torchrun("deepspeed_zero3_trainer.py", str(out), port=29535)
    return out


@pytest.fixture(scope="module")
def runs(out):
    return {
        (run, rank): torch.load(out / f"{run}-rank{rank}.pt", weights_only=False)
        for run in RUNS
        for rank in (0, 1)
    }


def _ranks(runs, run):
    return [runs[(run, 0)], runs[(run, 1)]]


@pytest.mark.multiprocess
@pytest.mark.parametrize("run", ["persistent", "partitioned"])
def test_zero3_matches_the_global_epsilon_reference(runs, run):
    """Two steps × two accumulated micro-batches: weights within 1e-6 of the reference, equal across processes bit
    for bit, and the norm of ε's gradient is the full-model gradient norm of the global micro-batch."""
    ranks = _ranks(runs, run)
    assert ranks[0]["engine"] == ("DeepSpeedEngine", 3, "DeepSpeedZeRO3") and ranks[0]["world"] == 2
    assert ranks[0]["name"] == "DeepSpeed ZeRO-3"
    assert all(ranks[0]["persistent"]) if run == "persistent" else not any(ranks[0]["persistent"])
    assert not torch.equal(ranks[0]["batches"][0]["features"], ranks[1]["batches"][0]["features"])
    norms, weights = reference(ranks, sync=True)
    for record in ranks:
        assert record["grad_norms"] == pytest.approx(norms[0], rel=1e-6)  # not a partition's norm
        for step, expected in enumerate(weights):
            for name, want in expected.items():
                torch.testing.assert_close(record["full"][step][name], want, atol=1e-6, rtol=0)
                assert torch.equal(record["full"][step][name], ranks[0]["full"][step][name])


@pytest.mark.multiprocess
def test_zero3_sam_memory_is_one_partition(runs):
    """SAM's copy of w is this process's partition of the weights, nothing unsharded; with accumulation the
    window's gradient partition is set aside during an ascent (as FSDP2 keeps its sharded `.grad` aside)."""
    ranks = _ranks(runs, "partitioned")
    full = sum(t.numel() for t in ranks[0]["full"][-1].values())
    for record in ranks:
        assert record["backup_numel"] == record["partition_numel"] < full
        local = sum(t.numel() for t in record["local"][-1].values())
        assert (
            record["partition_numel"] == local <= math.ceil(full / 2) + len(record["full"][-1])
        )  # + padding
        # The first micro-batch of a window has nothing to set aside; the second sets aside one partition.
        assert record["accumulated_numel"] == [0, local, 0, local]
    assert sum(r["partition_numel"] for r in ranks) >= full


@pytest.mark.multiprocess
def test_zero3_resume_from_a_checkpoint_is_exact(runs):
    for rank in (0, 1):
        straight, resumed = runs[("partitioned", rank)], runs[("resumed", rank)]
        assert resumed["grad_norms"] == straight["grad_norms"][2:]
        for name, want in straight["full"][-1].items():
            assert torch.equal(resumed["full"][-1][name], want)


@pytest.mark.multiprocess
def test_zero3_rho_zero_is_the_stock_trainer(runs):
    for rank in (0, 1):
        stock, ours = runs[("stock", rank)], runs[("rho0", rank)]
        for step in range(2):
            for name, want in stock["full"][step].items():
                assert torch.equal(ours["full"][step][name], want)
        logged = [
            {k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
            for e in stock["log_history"]
        ]
        assert [
            {k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
            for e in ours["log_history"]
        ] == logged


@pytest.mark.multiprocess
def test_zero3_interval_and_rho_schedule(runs):
    """sam_interval=2 over three steps of one micro-batch (SAM, plain, SAM), cosine LR, ρ_t = ρ_min + (ρ − ρ_min)·lr_t/LR:
    the plain step's stock backward and the SAM steps' engine backwards share ZeRO-3's gradient partitions."""
    ranks = _ranks(runs, "variants")
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    ascents = 0
    for step in range(3):
        lr = LR * 0.5 * (1 + math.cos(math.pi * step / 3))
        batches = [r["batches"][step] for r in ranks]
        grads = [loss_and_grads(model, b)[1] for b in batches]
        g = [(a + b) / 2 for a, b in zip(*grads, strict=True)]
        if step % 2 == 0:
            rho = 0.02 + (RHO - 0.02) * lr / LR
            norm = torch.sqrt(sum((x**2).sum() for x in g))
            for record in ranks:
                assert record["grad_norms"][ascents] == pytest.approx(float(norm), rel=1e-6)
            ascents += 1
            perturbed = copy.deepcopy(model)
            with torch.no_grad():
                for p, x in zip(perturbed.parameters(), g, strict=True):
                    p += rho * x / norm
            descents = [loss_and_grads(perturbed, b)[1] for b in batches]
            g = [(a + b) / 2 for a, b in zip(*descents, strict=True)]
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, grad in zip(model.parameters(), g, strict=True):
            p.grad = grad
        optimizer.step()
        for name, p in model.named_parameters():
            for record in ranks:
                torch.testing.assert_close(record["full"][step][name], p.detach(), atol=1e-6, rtol=0)
    assert ascents == len(ranks[0]["grad_norms"]) == 2


@pytest.mark.multiprocess
def test_zero3_adaptive_sam_is_taken_on_the_partitions(runs):
    """ASAM's T = |w| + η multiplies each partition by its own slice of w: the global micro-batch's hand ASAM step."""
    ranks = _ranks(runs, "adaptive")
    model = make_model()
    batch = {k: torch.cat([r["batches"][0][k] for r in ranks]) for k in ranks[0]["batches"][0]}
    g_sam, _ = reference_sam_gradient(model, batch, rho=RHO, adaptive=True, eta=0.01)
    for (name, p), g in zip(model.named_parameters(), g_sam, strict=True):
        for record in ranks:  # momentum's first step is SGD's
            torch.testing.assert_close(record["full"][0][name], p.detach() - LR * g, atol=1e-6, rtol=0)


@pytest.mark.multiprocess
def test_zero3_bf16_runs_within_bf16_rounding_of_fp32(runs):
    """bf16 working weights (what the forward gathers and SAM perturbs) over fp32 master weights in the engine."""
    assert_bf16_within_rounding(_ranks(runs, "bf16"), _ranks(runs, "partitioned"))


@pytest.mark.multiprocess
def test_zero3_refuses_a_per_process_epsilon(out):
    message = (out / "refused.txt").read_text()
    assert "sam_sync_perturbation=False" in message and "DeepSpeed ZeRO-3" in message and "DDP" in message


@pytest.mark.multiprocess
def test_zero3_sft_trainer_with_the_mixin_is_the_hand_sft_sam_step(out, tmp_path):
    """`class SAMSFTTrainer(SAMMixin, SFTTrainer)` under ZeRO-3 at ρ > 0: two steps of one micro-batch of two rows
    per process equal the hand SFT SAM step on the global micro-batch of four rows (ε from its gradient, the
    loss normalised by its token count, as `average_tokens_across_devices` does)."""
    from test_mixin import hand_sft_sam_steps

    record = torch.load(out / "sft.pt", weights_only=False)
    assert record["engine"] == "DeepSpeed ZeRO-3"
    assert [e["sam/fraction_sam_steps"] for e in record["log_history"] if "loss" in e] == [1.0, 1.0]
    expected = hand_sft_sam_steps(tmp_path, micro_batches_per_step=1, steps=2)
    for name, want in expected.state_dict().items():
        torch.testing.assert_close(record["weights"][name], want, atol=1e-5, rtol=0, msg=name)


@pytest.mark.multiprocess
def test_recipe_under_the_zero3_config_equals_ddp_with_a_global_epsilon(tmp_path):
    """`accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/finetune.py` on a tiny timm
    EfficientNet (the L2 recipes' kind of checkpoint, loaded whole and partitioned by the engine): ZeRO-3's ε is the
    global one, so the saved weights equal the DDP recipe's with sam_sync_perturbation=True."""
    from finetune_helpers import tiny_timm_checkpoint
    from safetensors.torch import load_file
    from two_processes import launch_recipe

    checkpoint = tiny_timm_checkpoint(str(tmp_path / "ckpt"))
    output = launch_recipe("deepspeed_zero3.yaml", tmp_path / "zero3", checkpoint, port=29537)
    assert "You are using ZeRO" in output  # DeepSpeed's engine ran (Accelerate did not fall back to DDP)
    launch_recipe("cpu.yaml", tmp_path / "ddp", checkpoint, "--sam_sync_perturbation", "true", port=29539)
    zero3, ddp = (load_file(tmp_path / run / "model.safetensors") for run in ("zero3", "ddp"))
    assert zero3.keys() == ddp.keys()
    for name, weight in zero3.items():
        torch.testing.assert_close(weight, ddp[name], atol=1e-6, rtol=0)
    card = (tmp_path / "zero3" / "README.md").read_text()
    assert "DeepSpeed ZeRO-3" in card
