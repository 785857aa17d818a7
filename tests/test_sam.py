"""The torch-only math and the `SAM` optimizer wrapper, against hand computations."""

import copy

import pytest
import torch
from toy import make_model, make_rows, reference_sam_gradient, stack

from hf_sam import SAM
from hf_sam.sam import PerturbationGroup, WeightBackup, compute_perturbation_


def _one_wrapper_step(model, batch, sam):
    model(**batch)["loss"].backward()
    sam.ascent_step()
    sam.zero_grad()
    model(**batch)["loss"].backward()
    sam.descent_step()
    sam.zero_grad()


@pytest.mark.parametrize("norm", ["2", "inf"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_wrapper_step_matches_hand_computed_update(norm, adaptive):
    model, batch = make_model(), stack(make_rows(8))
    reference = copy.deepcopy(model)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, norm=norm, adaptive=adaptive, eta=0.01)
    _one_wrapper_step(model, batch, sam)

    g_sam, _ = reference_sam_gradient(reference, batch, rho=0.05, norm=norm, adaptive=adaptive, eta=0.01)
    with torch.no_grad():
        for p, g in zip(reference.parameters(), g_sam, strict=True):
            p -= 0.1 * g
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_l2_perturbation_has_norm_rho_and_points_along_gradient():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    params = [torch.zeros(2), torch.zeros(1, 1)]
    eps = [t.clone() for t in g]
    norm = compute_perturbation_([PerturbationGroup(params, eps, rho=0.5)])
    assert norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(eps[0], torch.tensor([0.3, 0.0]))  # 0.5 * 3 / 5
    torch.testing.assert_close(eps[1], torch.tensor([[0.4]]))


def test_zero_gradient_gives_zero_perturbation_not_nan():
    eps = [torch.zeros(3)]
    norm = compute_perturbation_([PerturbationGroup([torch.ones(3)], eps, rho=0.05)])
    assert norm.item() == 0.0
    assert torch.equal(eps[0], torch.zeros(3))


def test_per_group_rho_norm_runs_over_perturbed_groups_only():
    body, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    base = torch.optim.SGD([{"params": [body]}, {"params": [head], "rho": 0.0}], lr=1.0)
    sam = SAM(base, rho=1.0)
    body.grad, head.grad = torch.tensor([3.0, 4.0]), torch.tensor([100.0, 0.0])
    grad_norm = sam.ascent_step()
    assert grad_norm.item() == pytest.approx(5.0)  # the head's gradient does not enter ‖g‖
    torch.testing.assert_close(body.detach(), torch.tensor([0.6, 0.8]))
    assert torch.equal(head.detach(), torch.zeros(2))
    assert body.grad is None and head.grad is None  # ascent consumes the gradients
    sam.descent_step()
    torch.testing.assert_close(body.detach(), torch.zeros(2), atol=0, rtol=0)


def test_non_finite_gradient_skips_the_perturbation():
    w = torch.nn.Parameter(torch.ones(2))
    sam = SAM(torch.optim.SGD([w], lr=1.0), rho=1.0)
    w.grad = torch.tensor([float("nan"), 1.0])
    sam.ascent_step()
    assert sam.skipped_ascents == 1
    assert torch.equal(w.detach(), torch.ones(2))


def test_restore_is_an_exact_copy_into_the_same_storage():
    w = torch.nn.Parameter(torch.randn(1000) * 1e3)
    original, storage = w.detach().clone(), w.data_ptr()
    backup = WeightBackup()
    backup.perturb_([w], [torch.randn(1000) * 1e-7])  # w + ε - ε would not round-trip exactly
    backup.restore_()
    assert torch.equal(w.detach(), original) and w.data_ptr() == storage


def test_weight_decay_belongs_to_the_base_optimizer_not_to_epsilon():
    model, batch = make_model(), stack(make_rows(8))
    reference = copy.deepcopy(model)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5), rho=0.05)
    _one_wrapper_step(model, batch, sam)
    g_sam, _ = reference_sam_gradient(reference, batch, rho=0.05)  # ε from the loss gradient alone
    with torch.no_grad():
        for p, g in zip(reference.parameters(), g_sam, strict=True):
            p -= 0.1 * (g + 0.5 * p)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_schedulers_and_state_dict_act_on_the_base_optimizer():
    model, batch = make_model(), stack(make_rows(8))
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    _one_wrapper_step(model, batch, sam)
    scheduler.step()
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)

    state = sam.state_dict()
    assert all("momentum_buffer" in s for s in state["state"].values())  # momentum survives a checkpoint
    assert state["param_groups"][0]["rho"] == 0.05

    # Round trip: a fresh wrapper loaded from the state continues in lockstep with the original.
    clone = copy.deepcopy(model)
    sam2 = SAM(torch.optim.SGD(clone.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    sam2.load_state_dict(copy.deepcopy(state))
    _one_wrapper_step(model, batch, sam)
    _one_wrapper_step(clone, batch, sam2)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


def test_closure_step_equals_explicit_steps():
    model, batch = make_model(), stack(make_rows(8))
    other = copy.deepcopy(model)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    _one_wrapper_step(model, batch, sam)

    sam2 = SAM(torch.optim.SGD(other.parameters(), lr=0.1), rho=0.05)

    def closure():
        sam2.zero_grad()
        loss = other(**batch)["loss"]
        loss.backward()
        return loss

    closure()
    sam2.step(closure)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rho": -0.1}, "rho"),
        ({"norm": "1"}, "norm"),
        ({"eta": -1.0}, "eta"),
        ({"adaptive": "yes"}, "adaptive"),
    ],
)
def test_invalid_hyperparameters_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SAM(torch.optim.SGD(make_model().parameters(), lr=0.1), **kwargs)


def test_wrapping_something_else_than_an_optimizer_is_a_type_error():
    with pytest.raises(TypeError, match="optimizer instance"):
        SAM(make_model().parameters())
