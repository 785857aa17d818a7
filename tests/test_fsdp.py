"""`SAM` under FSDP2 on two gloo processes: the ε norm is the full-model gradient norm, the update is the
single-process global-ε reference, and each rank moved only its own shard."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from toy import loss_and_grads, make_model

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fsdp_sam.py")
LR, RHO = 0.1, 0.05


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29519",
        SCRIPT,
        str(out),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
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
