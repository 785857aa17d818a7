"""Two gloo processes on CPU (torchrun): ε per rank, identical parameters, the mean of per-rank SAM gradients."""

import pytest
import torch
from toy import loss_and_grads, make_model, reference_sam_gradient, stack, tiny_bert
from two_processes import torchrun

from hf_sam.variants import ascent_subset, subset_generator

LR, RHO = 0.1, 0.05


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun("ddp_sam.py", str(out), port=29517)
    results = {
        (sync, rank): torch.load(out / f"sync{sync}-rank{rank}.pt", weights_only=False)
        for sync in (0, 1)
        for rank in (0, 1)
    }
    results["fraction"] = [torch.load(out / f"fraction-rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    results["items"] = [torch.load(out / f"items-rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    results["bert"] = [torch.load(out / f"bert-rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    results["momentum"] = [torch.load(out / f"momentum-rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    return results


@pytest.mark.multiprocess
def test_local_epsilon_differs_per_rank_and_update_is_mean_of_per_rank_sam_gradients(ddp_results):
    rank0, rank1 = ddp_results[(0, 0)], ddp_results[(0, 1)]
    assert rank0["world"] == 2
    assert not torch.equal(rank0["batch"]["features"], rank1["batch"]["features"])  # each rank its own data

    model = make_model()
    references = [reference_sam_gradient(model, r["batch"], rho=RHO) for r in (rank0, rank1)]
    for record, (_, eps) in zip((rank0, rank1), references, strict=True):
        for got, want in zip(record["eps"], eps, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # ε from this rank's gradient alone
    assert any(not torch.allclose(a, b) for a, b in zip(rank0["eps"], rank1["eps"], strict=True))

    expected = [
        p.detach() - LR * (a + b) / 2
        for p, a, b in zip(model.parameters(), references[0][0], references[1][0], strict=True)
    ]
    for p0, p1, want in zip(rank0["params"], rank1["params"], expected, strict=True):
        assert torch.equal(p0, p1)  # replicas stay identical (restore by copy, synced descent gradient)
        torch.testing.assert_close(p0, want, atol=1e-6, rtol=0)


@pytest.mark.multiprocess
def test_sync_perturbation_uses_one_global_epsilon(ddp_results):
    rank0, rank1 = ddp_results[(1, 0)], ddp_results[(1, 1)]
    model = make_model()
    batches = [rank0["batch"], rank1["batch"]]
    # Global ε: from the mean of the per-rank ascent gradients.
    grads = [loss_and_grads(model, b)[1] for b in batches]
    mean_grad = [(a + b) / 2 for a, b in zip(*grads, strict=True)]
    norm = torch.sqrt(sum((g**2).sum() for g in mean_grad))
    eps = [RHO * g / norm for g in mean_grad]
    for record in (rank0, rank1):
        for got, want in zip(record["eps"], eps, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

    perturbed = make_model()
    with torch.no_grad():
        for p, e in zip(perturbed.parameters(), eps, strict=True):
            p += e
    descent = [loss_and_grads(perturbed, b)[1] for b in batches]
    expected = [p.detach() - LR * (a + b) / 2 for p, a, b in zip(model.parameters(), *descent, strict=True)]
    for p0, p1, want in zip(rank0["params"], rank1["params"], expected, strict=True):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(p0, want, atol=1e-6, rtol=0)


@pytest.mark.multiprocess
def test_ascent_fraction_takes_each_ranks_subset_of_its_own_micro_batch(ddp_results):
    """Each rank draws its own subset (the draw is seeded by the process index too)."""
    ranks = ddp_results["fraction"]
    model = make_model()
    descent = []
    for rank, r in enumerate(ranks):
        subset, full = r["calls"][0], r["calls"][1]  # the ascent pass, then the descent pass
        # the rows this rank draws at step 0 (seed 42, the TrainingArguments default)
        rows = ascent_subset({"row": torch.arange(4)}, 0.5, subset_generator(42, 0, 0, rank))[0]["row"]
        assert len(subset["target"]) == 2 and torch.equal(subset["features"], full["features"][rows])
        _, g = loss_and_grads(model, subset)
        norm = torch.sqrt(sum((x**2).sum() for x in g))
        eps = [RHO * x / norm for x in g]
        for got, want in zip(r["eps"], eps, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # this rank's subset alone
        perturbed = make_model()
        with torch.no_grad():
            for p, e in zip(perturbed.parameters(), eps, strict=True):
                p += e
        descent.append(loss_and_grads(perturbed, full)[1])
    expected = [p.detach() - LR * (a + b) / 2 for p, a, b in zip(model.parameters(), *descent, strict=True)]
    for p0, p1, want in zip(ranks[0]["params"], ranks[1]["params"], expected, strict=True):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(p0, want, atol=1e-6, rtol=0)


@pytest.mark.multiprocess
def test_logged_grad_norm_is_the_mean_loss_norm_under_token_averaging_across_processes(ddp_results):
    """A loss normalised by the items of both processes and multiplied by the process count
    (average_tokens_across_devices): the log still shows ‖∇L‖ of each micro-batch's own mean loss."""
    ranks = ddp_results["items"]
    assert all(r["average"] for r in ranks)
    counted = [int((r["batch"]["labels"] != -100).sum()) for r in ranks]
    assert counted[0] != counted[1]  # otherwise the normalisation would cancel by itself
    norms = []
    for r in ranks:
        batch = {"features": r["batch"]["features"], "target": r["batch"]["labels"]}
        _, g = loss_and_grads(
            make_model(), batch
        )  # mean over the counted labels (cross_entropy ignores -100)
        norms.append(float(torch.sqrt(sum((x**2).sum() for x in g))))
    for r in ranks:
        assert r["grad_norm"][0] == pytest.approx(sum(norms) / 2, rel=1e-5)


@pytest.mark.multiprocess
def test_momentum_sam_looks_ahead_to_the_same_point_on_every_rank(ddp_results):
    """Three Momentum-SAM steps on two ranks equal the paper's algorithm on the two ranks' batches together (the
    mean of two equal-sized mean losses), and the replicas stay identical bit for bit."""
    from test_momentum_sam import hand_msam_sgd

    ranks = ddp_results["momentum"]
    windows = [
        [{k: torch.cat([a[k], b[k]]) for k in a}]
        for a, b in zip(ranks[0]["calls"], ranks[1]["calls"], strict=True)
    ]
    assert len(windows) == 3
    expected, _ = hand_msam_sgd(make_model(), windows, rho=RHO, lr=LR)
    for p0, p1, want in zip(ranks[0]["params"], ranks[1]["params"], expected[-1], strict=True):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(p0, want, atol=1e-6, rtol=0)


def test_reference_batches_cover_the_dataset(ddp_results):
    """Guard on the harness itself: the two ranks together saw the 8 rows once each."""
    from toy import make_rows

    seen = torch.cat([ddp_results[(0, r)]["batch"]["features"] for r in (0, 1)])
    assert torch.equal(seen.sort(dim=0).values, stack(make_rows(8))["features"].sort(dim=0).values)


@pytest.mark.multiprocess
def test_bert_step_is_the_mean_of_every_micro_batch_sam_gradient_across_processes(ddp_results):
    """A BERT classifier (its loss ignores num_items_in_batch) on 2 processes x 2 accumulated micro-batches, with
    average_tokens_across_devices: w − lr·mean of the 4 hand SAM gradients (ε per micro-batch), and sam/grad_norm
    the mean of their ‖∇L‖; not 2x (accumulation) or 4x (accumulation and processes)."""
    ranks = ddp_results["bert"]
    model = tiny_bert()
    micro_batches = [m for r in ranks for m in r["micro_batches"]]
    assert len(micro_batches) == 4
    references = [reference_sam_gradient(model, m, rho=RHO) for m in micro_batches]
    norms = [torch.sqrt(sum((g**2).sum() for g in loss_and_grads(model, m)[1])) for m in micro_batches]
    for i, p in enumerate(model.parameters()):
        want = p.detach() - LR * sum(ref[0][i] for ref in references) / 4
        for r in ranks:
            torch.testing.assert_close(r["params"][i], want, atol=2e-6, rtol=1e-4)
    for r in ranks:
        assert r["grad_norm"][0] == pytest.approx(float(sum(norms) / 4), rel=1e-4)
