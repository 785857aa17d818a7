"""The pieces the redesign made testable without a Trainer: the variants' policy (`hf_sam.variants`), the ρ
schedule and the one ε path (`hf_sam.sam.perturb_`), each against a hand-written reference."""

import math

import pytest
import torch

from hf_sam import variants
from hf_sam.sam import PerturbationGroup, WeightBackup, perturb_, perturbation_settings, scheduled_rho


# ---------------------------------------------------------------------- which step is which
def kinds(max_steps=10, start=0.0, end=1.0, interval=1, mode="sam", stored=True):
    return [
        variants.step_kind(step, max_steps, start, end, interval, mode, has_stored_direction=stored)
        for step in range(max_steps)
    ]


def test_every_step_is_sam_by_default():
    assert kinds() == [variants.SAM_STEP] * 10


def test_interval_and_late_phase_window():
    # Window [0.3, 0.8) of 10 steps: steps 3..7; every 2nd from the window's first step.
    expected = ["plain"] * 3 + ["sam", "plain", "sam", "plain", "sam"] + ["plain"] * 2
    assert kinds(start=0.3, end=0.8, interval=2) == expected


def test_window_start_rounds_up_to_a_whole_step():
    # 0.25 of 10 steps is 2.5: the first SAM step is step 3 (ceil), and the interval counts from there.
    assert kinds(start=0.25, interval=3).index("sam") == 3
    assert [i for i, k in enumerate(kinds(start=0.25, interval=3)) if k == "sam"] == [3, 6, 9]


def test_looksam_reuses_between_sam_steps_and_takes_a_sam_step_without_a_stored_direction():
    assert kinds(max_steps=6, interval=3, mode="looksam") == ["sam", "looksam_reuse", "looksam_reuse"] * 2
    assert kinds(max_steps=6, interval=3, mode="looksam", stored=False) == ["sam"] * 6


def test_unknown_max_steps_counts_as_one_step():
    assert variants.step_kind(0, 0, 0.0, 1.0, 1, "sam", False) == variants.SAM_STEP


# ---------------------------------------------------------------------- which examples each pass sees
def batch(n=5):
    return {
        "x": torch.arange(n * 2.0).view(n, 2),
        "labels": torch.arange(n),
        "targets": list(range(n)),
        "flag": 7,
    }


def test_chunks_cut_tensors_and_lists_and_pass_other_values_on():
    pieces = variants.chunks(batch(5), 2)
    assert [share for _, share in pieces] == [0.4, 0.4, 0.2]
    assert [p["labels"].tolist() for p, _ in pieces] == [[0, 1], [2, 3], [4]]
    assert [p["targets"] for p, _ in pieces] == [[0, 1], [2, 3], [4]]
    assert all(p["flag"] == 7 for p, _ in pieces)


def test_no_group_or_a_group_as_large_as_the_batch_is_the_batch():
    whole = batch(4)
    assert variants.chunks(whole, None) == [(whole, 1.0)]
    assert variants.chunks(whole, 4) == [(whole, 1.0)]


def test_ascent_subset_takes_ceil_f_b_examples_in_batch_order_with_their_lists():
    """Which ⌈f·B⌉ is drawn uniformly (tests/test_ascent_fraction.py::test_the_subset_is_uniform_over_positions);
    here: how many, in which order, and that tensors and per-example lists are cut alike."""
    subset, share = variants.ascent_subset(batch(5), 0.5, torch.Generator().manual_seed(0))
    rows = subset["labels"].tolist()
    assert len(rows) == 3 and share == 0.6 and rows == sorted(set(rows)) and set(rows) <= set(range(5))
    assert subset["targets"] == rows and subset["flag"] == 7
    assert variants.ascent_subset(batch(5), 0.2, min_examples=2)[0]["labels"].numel() == 2
    whole = batch(5)
    assert variants.ascent_subset(whole, 1.0) == (whole, 1.0)


def test_a_setting_that_cuts_the_batch_refuses_a_batch_without_tensors():
    with pytest.raises(ValueError, match="sam_group_size=2 cuts each micro-batch"):
        variants.chunks({"text": "abc"}, 2)


# ---------------------------------------------------------------------- GSAM and LookSAM's window
def params_with_grads(grads):
    params = [torch.zeros_like(g if g is not None else torch.zeros(1), requires_grad=True) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone() if g is not None else None
    return params


def test_gsam_window_rewrites_the_sam_gradient_as_the_authors_formula():
    clean_parts = [
        [torch.tensor([1.0, 0.0]), torch.tensor([2.0])],
        [torch.tensor([0.0, 1.0]), torch.tensor([0.0])],
    ]
    g_s = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0])]
    params = params_with_grads(g_s)
    window = variants.CleanGradientWindow()
    for part in clean_parts:
        window.add(part, 0.5)  # two micro-batches, each 1/2 of the step
    alpha = 0.3
    assert window.finish_(params, "gsam", alpha, average_over_processes=False) is None
    g = torch.cat([0.5 * (a + b) for a, b in zip(*clean_parts, strict=True)])  # the step's clean gradient
    s = torch.cat(g_s)
    unit = s / s.norm()
    expected = s - alpha * (g - (g @ unit) * unit)  # Zhuang et al.: descend with g's part orthogonal to g_s
    assert torch.allclose(torch.cat([p.grad for p in params]), expected, atol=1e-6)
    assert all(t.abs().sum() == 0 for t in window.clean)  # the window starts afresh


def test_looksam_window_returns_the_orthogonal_component_and_keeps_unused_parameters_without():
    g_s = [torch.tensor([3.0, 4.0]), None]
    params = params_with_grads(g_s)
    window = variants.CleanGradientWindow()
    window.add([torch.tensor([1.0, 0.0]), torch.tensor([5.0])], 1.0)
    stored = window.finish_(params, "looksam", 0.7, average_over_processes=False)
    assert stored[1] is None  # unused by the forward: no stored direction
    assert torch.allclose(stored[0], torch.tensor([0.0, 4.0]))  # g_s minus its projection on g = (1, 0)
    assert params[0].grad.tolist() == [3.0, 4.0]  # LookSAM leaves the SAM step's gradient as it is


def test_looksam_window_keeps_no_direction_from_a_non_finite_step():
    params = params_with_grads([torch.tensor([math.nan, 1.0])])
    window = variants.CleanGradientWindow()
    window.add([torch.tensor([1.0, 0.0])], 1.0)
    assert window.finish_(params, "looksam", 0.7, average_over_processes=False) is None


# ---------------------------------------------------------------------- the ρ schedule
def test_rho_schedule_follows_the_learning_rate():
    assert scheduled_rho(0.1, "constant", 0.0, lr=0.01, peak_lr=0.1) == 0.1
    assert scheduled_rho(0.1, "linear_with_lr", 0.02, lr=0.05, peak_lr=0.1) == pytest.approx(0.06)
    assert scheduled_rho(0.1, "linear_with_lr", 0.02, lr=0.0, peak_lr=0.1) == pytest.approx(0.02)
    assert scheduled_rho(0.1, "linear_with_lr", 0.02, lr=0.2, peak_lr=0.1) == pytest.approx(
        0.1
    )  # clipped at 1


# ---------------------------------------------------------------------- the one ε path
def test_the_uniform_l2_shortcut_and_the_general_form_give_the_same_weights():
    torch.manual_seed(0)
    w = [torch.randn(3, 2), torch.randn(4)]
    g = [torch.randn(3, 2), torch.randn(4)]
    rho = 0.3
    shortcut = [t.clone() for t in w]
    perturb_(WeightBackup(), [PerturbationGroup(shortcut, [t.clone() for t in g], rho)])
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    for moved, start, grad in zip(shortcut, w, g, strict=True):
        assert torch.allclose(moved, start + rho * grad / norm, atol=1e-6)
    # Two groups with different ρ take the general form: each its own size, one shared ‖g‖.
    general = [t.clone() for t in w]
    perturb_(WeightBackup(), [PerturbationGroup([general[0]], [g[0].clone()], rho),
                              PerturbationGroup([general[1]], [g[1].clone()], 2 * rho)])  # fmt: skip
    assert torch.allclose(general[0], w[0] + rho * g[0] / norm, atol=1e-6)
    assert torch.allclose(general[1], w[1] + 2 * rho * g[1] / norm, atol=1e-6)


def test_a_non_finite_gradient_leaves_the_weights_at_w():
    w = [torch.ones(3)]
    backup = WeightBackup()
    norm = perturb_(backup, [PerturbationGroup(w, [torch.tensor([1.0, math.inf, 0.0])], 0.1)])
    assert not torch.isfinite(norm) and not backup.perturbed and w[0].tolist() == [1.0, 1.0, 1.0]


def test_projected_ascent_on_a_quadratic_matches_the_hand_iteration():
    # L(w) = ½ wᵀAw: ∇L(w + ε) = A(w + ε). Hand iteration: ε_{k+1} = Π_ρ(ε_k + ρ·ĝ(w + ε_k)).
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    w0, rho, steps = torch.tensor([1.0, -0.5]), 0.4, 3
    w = [w0.clone()]

    def gradient_at():
        return [A @ w[0]]

    perturb_(WeightBackup(), [PerturbationGroup(w, [A @ w0], rho)], steps, rho, gradient_at)
    eps = torch.zeros(2)
    for _ in range(steps):
        g = A @ (w0 + eps)
        eps = eps + rho * g / g.norm()
        eps = eps * min(1.0, rho / float(eps.norm()))
    assert torch.allclose(w[0], w0 + eps, atol=1e-6)
    assert float((w[0] - w0).norm()) <= rho + 1e-6


def test_perturbation_settings_are_the_keys_the_wrapper_stores():
    from hf_sam import SAM

    sam = SAM(torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1), rho=0.2, norm="inf")
    group = sam.param_groups[0]
    assert {k: group[k] for k in perturbation_settings()} == perturbation_settings(0.2, False, 0.01, "inf")
    sam.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    assert sam.param_groups[1]["rho"] == 0.2 and sam.param_groups[1]["sam_norm"] == "inf"
