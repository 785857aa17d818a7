"""`SAM` under FSDP2 on two gloo processes: the ε norm is the full-model gradient norm, the update is the
single-process global-ε reference, and each rank moved only its own shard."""

import copy
import json
import os

import pytest
import torch
from toy import loss_and_grads, make_model
from two_processes import SCRIPTS, accelerate_launch, launch_recipe, torchrun

LR, RHO = 0.1, 0.05


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun("fsdp_sam.py", str(out), port=29519)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.multiprocess
def test_fsdp_epsilon_uses_the_full_model_gradient_norm(ranks):
    model = make_model()
    global_batch = {k: torch.cat([r["batch"][k] for r in ranks]) for k in ranks[0]["batch"]}
    _, g = loss_and_grads(model, global_batch)  # equal halves: mean of per-rank means = mean over all 8
    expected = float(torch.sqrt(sum((x**2).sum() for x in g)))
    for r in ranks:
        assert float(r["grad_norm"]) == pytest.approx(expected, rel=1e-6)  # not a shard's norm


@pytest.mark.multiprocess
def test_fsdp_update_equals_the_global_epsilon_reference(ranks):
    model = make_model()
    batches = [r["batch"] for r in ranks]
    global_batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    _, g = loss_and_grads(model, global_batch)
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for p, x in zip(perturbed.parameters(), g, strict=True):
            p += RHO * x / norm
    descent = [(a + b) / 2 for a, b in zip(*(loss_and_grads(perturbed, b)[1] for b in batches), strict=True)]
    expected = {
        n: p.detach() - LR * d for (n, p), d in zip(model.named_parameters(), descent, strict=True)
    }  # momentum's first step = SGD
    for r in ranks:
        for name, want in expected.items():
            torch.testing.assert_close(r["full"][name], want, atol=1e-6, rtol=0)
    for name in expected:
        assert torch.equal(ranks[0]["full"][name], ranks[1]["full"][name])  # consistent across ranks


@pytest.mark.multiprocess
def test_each_rank_holds_a_different_shard(ranks):
    shards = [torch.cat([t.flatten() for t in r["local"].values()]) for r in ranks]
    full = torch.cat([t.flatten() for t in ranks[0]["full"].values()])
    assert shards[0].numel() + shards[1].numel() >= full.numel() and not torch.equal(
        shards[0][:8], shards[1][:8]
    )


# ---------------------------------------------------------------------- SAMTrainer under Accelerate's FSDP2 plugin


@pytest.fixture(scope="module")
def trainer_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_trainer")
    torchrun("fsdp_trainer.py", str(out), port=29521)
    return {
        (run, rank): torch.load(out / f"{run}-rank{rank}.pt", weights_only=False)
        for run in ("straight", "resumed", "interval", "bf16", "variants")
        for rank in (0, 1)
    }


def _global(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum((t**2).sum() for t in tensors))


def _perturbed(model, eps: dict):
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in perturbed.named_parameters():
            if name in eps:
                p += eps[name]
    return perturbed


@pytest.mark.multiprocess
def test_fsdp_trainer_matches_the_global_epsilon_reference_with_accumulation(trainer_ranks):
    """Two steps × two micro-batches per rank: for each micro-batch, ε from the gradient of both ranks' examples
    (the full-model norm), the descent gradient at w + ε averaged over ranks, the micro-batches averaged, SGD with
    momentum. Written out by hand on one process, compared with the gathered FSDP weights after each step."""
    rank0, rank1 = trainer_ranks[("straight", 0)], trainer_ranks[("straight", 1)]
    assert rank0["world"] == 2 and len(rank0["batches"]) == 4
    assert not torch.equal(rank0["batches"][0]["features"], rank1["batches"][0]["features"])

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    names = [n for n, _ in model.named_parameters()]
    for step in range(2):
        step_grad = [torch.zeros_like(p) for p in model.parameters()]
        for micro in range(2):
            index = step * 2 + micro
            batch = _global([rank0["batches"][index], rank1["batches"][index]])
            _, g = loss_and_grads(model, batch)
            norm = _norm(g)
            for record in (rank0, rank1):  # every rank used the full-model norm, not its shard's
                assert record["grad_norms"][index] == pytest.approx(float(norm), rel=1e-6)
            eps = {n: RHO * x / norm for n, x in zip(names, g, strict=True)}
            _, descent = loss_and_grads(_perturbed(model, eps), batch)
            step_grad = [s + d / 2 for s, d in zip(step_grad, descent, strict=True)]
        for p, grad in zip(model.parameters(), step_grad, strict=True):
            p.grad = grad
        optimizer.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(rank0["full"][step][name], p.detach(), atol=1e-6, rtol=0)
            assert torch.equal(rank0["full"][step][name], rank1["full"][step][name])  # ranks agree


@pytest.mark.multiprocess
def test_fsdp_trainer_interval_alternates_sam_and_plain_steps(trainer_ranks):
    """sam_interval=2: step 0 is the SAM step of the reference above; step 1 a plain step, whose micro-batches
    FSDP accumulates unsharded and reduce-scatters once (the stock path), must not disturb anything."""
    rank0, rank1 = trainer_ranks[("interval", 0)], trainer_ranks[("interval", 1)]
    straight = trainer_ranks[("straight", 0)]
    assert len(rank0["grad_norms"]) == 2  # ascents on step 0's two micro-batches only
    for name, want in straight["full"][0].items():
        assert torch.equal(rank0["full"][0][name], want)
    model = make_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(rank0["full"][0][name])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    # Momentum after step 0: its buffer is step 0's gradient = (w_0 - w_1) / LR.
    first = {n: (p.detach() - rank0["full"][0][n]) / LR for n, p in make_model().named_parameters()}
    for p, (name, _) in zip(model.parameters(), model.named_parameters(), strict=True):
        optimizer.state[p]["momentum_buffer"] = first[name].clone()
    step_grad = [torch.zeros_like(p) for p in model.parameters()]
    for micro in (2, 3):  # step 1's micro-batches (the sampler order is the same in every run)
        batch = _global([straight["batches"][micro], trainer_ranks[("straight", 1)]["batches"][micro]])
        _, g = loss_and_grads(model, batch)
        step_grad = [s + x / 2 for s, x in zip(step_grad, g, strict=True)]
    for p, grad in zip(model.parameters(), step_grad, strict=True):
        p.grad = grad
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(rank0["full"][1][name], p.detach(), atol=1e-6, rtol=0)
        assert torch.equal(rank0["full"][1][name], rank1["full"][1][name])


@pytest.mark.multiprocess
def test_fsdp_trainer_bf16_mixed_precision_stays_within_bf16_error_of_fp32(trainer_ranks):
    """bf16=True under FSDP2 (Accelerate's MixedPrecisionPolicy: bf16 all-gather, compute and reduce-scatter, fp32
    shards): same batches as the fp32 run, its ascent norms within bf16 rounding, and its weights much closer to
    the fp32 SAM run than SAM is to plain SGD, so the perturbation survives the low precision."""
    bf16, fp32 = trainer_ranks[("bf16", 0)], trainer_ranks[("straight", 0)]
    assert "bfloat16" in bf16["mixed_precision"]
    assert bf16["grad_norms"] == pytest.approx(fp32["grad_norms"], rel=2e-2)
    model = make_model()  # plain SGD with momentum on the same micro-batches, no ε
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for step in range(2):
        step_grad = [torch.zeros_like(p) for p in model.parameters()]
        for micro in range(2):
            batches = [trainer_ranks[("straight", r)]["batches"][step * 2 + micro] for r in (0, 1)]
            step_grad = [
                s + g / 2 for s, g in zip(step_grad, loss_and_grads(model, _global(batches))[1], strict=True)
            ]
        for p, grad in zip(model.parameters(), step_grad, strict=True):
            p.grad = grad
        optimizer.step()
    final = dict(model.named_parameters())
    sam_effect = max(float((fp32["full"][-1][n] - final[n].detach()).abs().max()) for n in final)
    bf16_error = max(float((bf16["full"][-1][n] - fp32["full"][-1][n]).abs().max()) for n in final)
    assert all(torch.isfinite(t).all() for t in bf16["full"][-1].values())
    assert bf16_error < 0.25 * sam_effect, (bf16_error, sam_effect)
    for name, weight in bf16["full"][-1].items():
        assert torch.equal(weight, trainer_ranks[("bf16", 1)]["full"][-1][name])


@pytest.mark.multiprocess
def test_fsdp_trainer_keeps_the_weights_sharded(trainer_ranks):
    rank0, rank1 = trainer_ranks[("straight", 0)], trainer_ranks[("straight", 1)]
    for name, full in rank0["full"][-1].items():
        shards = [rank0["local"][-1][name], rank1["local"][-1][name]]
        assert shards[0].shape[0] < full.shape[0]  # each rank holds part of the rows
        torch.testing.assert_close(torch.cat(shards), full, atol=0, rtol=0)
    for record in (rank0, rank1):  # SAM's copy of w is this rank's shard, not the model
        assert record["backup_numel"] == sum(t.numel() for t in record["local"][-1].values())
    assert sum(r["backup_numel"] for r in (rank0, rank1)) == sum(
        t.numel() for t in rank0["full"][-1].values()
    )


@pytest.mark.multiprocess
def test_fsdp_trainer_resume_from_a_checkpoint_is_exact(trainer_ranks):
    straight, resumed = trainer_ranks[("straight", 0)], trainer_ranks[("resumed", 0)]
    assert resumed["grad_norms"] == straight["grad_norms"][2:]  # the second step's micro-batches, same norms
    for name, want in straight["full"][-1].items():
        assert torch.equal(resumed["full"][-1][name], want)


@pytest.mark.multiprocess
def test_fsdp_trainer_multi_step_ascent_on_filtered_parameters(trainer_ranks):
    """sam_ascent_steps=2 and sam_param_filter='^fc2\\.' under FSDP: ε lives on fc2 only, moved twice and projected
    onto the ρ-ball; fc1 is trained with the descent gradient alone (the ascent's backward leaves no trace in it)."""
    rank0, rank1 = trainer_ranks[("variants", 0)], trainer_ranks[("variants", 1)]
    batch = _global([rank0["batches"][0], rank1["batches"][0]])
    model = make_model()
    head = [n for n, _ in model.named_parameters() if n.startswith("fc2.")]

    def head_gradient(eps):
        _, g = loss_and_grads(_perturbed(model, eps), batch)
        return {n: x for (n, _), x in zip(model.named_parameters(), g, strict=True) if n in head}

    g = head_gradient({})
    eps = {n: RHO * g[n] / _norm(g.values()) for n in head}
    g = head_gradient(eps)
    eps = {n: eps[n] + RHO * g[n] / _norm(g.values()) for n in head}
    scale = min(1.0, RHO / float(_norm(eps.values())))
    eps = {n: e * scale for n, e in eps.items()}
    assert float(_norm(eps.values())) == pytest.approx(RHO, rel=1e-5)
    _, descent = loss_and_grads(_perturbed(model, eps), batch)
    for (name, p), d in zip(model.named_parameters(), descent, strict=True):
        torch.testing.assert_close(rank0["full"][0][name], p.detach() - LR * d, atol=1e-6, rtol=0)
        assert torch.equal(rank0["full"][0][name], rank1["full"][0][name])


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """`accelerate launch --config_file accelerate_configs/fsdp.yaml`: the FSDP plugin comes from the launcher."""
    out = tmp_path_factory.mktemp("fsdp_launched")
    accelerate_launch(
        "fsdp.yaml", os.path.join(SCRIPTS, "fsdp_trainer.py"), str(out), "--launched", port=29523
    )
    return out


@pytest.mark.multiprocess
def test_fsdp_config_launch_takes_the_same_step(launched, trainer_ranks):
    for rank in (0, 1):
        record = torch.load(launched / f"launched-rank{rank}.pt", weights_only=False)
        straight = trainer_ranks[("straight", rank)]
        assert record["grad_norms"] == straight["grad_norms"][:2]
        for name, want in straight["full"][0].items():
            assert torch.equal(record["full"][0][name], want)
            assert torch.equal(record["local"][0][name], straight["local"][0][name])


@pytest.mark.multiprocess
def test_fsdp_config_launch_refuses_a_per_process_epsilon(launched):
    assert not (launched / "refused").exists()  # the output folder Trainer.__init__ had made is gone again
    message = (launched / "refused.txt").read_text()
    assert message.startswith("sam_sync_perturbation=False (one ε per process) is impossible under FSDP")
    assert "train with DDP" in message


# ---------------------------------------------------------------------- the recipe under accelerate_configs/fsdp.yaml
@pytest.mark.multiprocess
def test_recipe_under_fsdp_config_equals_ddp_with_one_global_epsilon(tmp_path):
    """`accelerate launch --config_file accelerate_configs/fsdp.yaml recipes/finetune.py` on a tiny timm
    EfficientNet (frozen BatchNorm): the saved full weights equal those of the same recipe under DDP with
    sam_sync_perturbation=True (the same global ε, computed from replicated instead of sharded gradients)."""
    from finetune_helpers import tiny_timm_checkpoint
    from safetensors.torch import load_file

    checkpoint = tiny_timm_checkpoint(str(tmp_path / "ckpt"))
    launch_recipe("fsdp.yaml", tmp_path / "fsdp", checkpoint, port=29525)
    launch_recipe("cpu.yaml", tmp_path / "ddp", checkpoint, "--sam_sync_perturbation", "true", port=29527)
    sharded, replicated = (load_file(tmp_path / run / "model.safetensors") for run in ("fsdp", "ddp"))
    initial = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert sharded.keys() == replicated.keys()
    for name, weight in sharded.items():
        torch.testing.assert_close(weight, replicated[name], atol=1e-6, rtol=0)
    assert any(not torch.equal(sharded[n], initial[n]) for n in initial if n in sharded)  # it trained
    logs = json.loads((tmp_path / "fsdp" / "trainer_state.json").read_text())["log_history"]
    assert all(entry["sam/sharpness"] != 0 for entry in logs if "loss" in entry)
    card = (tmp_path / "fsdp" / "README.md").read_text()
    assert "one ε over the 4 examples of each micro-batch of all processes" in card and "; FSDP2" in card
