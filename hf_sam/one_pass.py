"""The one-pass variants' home (torch only): the direction they look ahead along, and the point itself.

`sam_mode="momentum"` (Momentum-SAM, Becker, Altrock & Risse 2024) looks ahead to w − ρ·v/‖v‖, v the base
optimizer's momentum (its own state tensors, no copy); `sam_mode="adam_update"` to w − ρ·u/‖u‖, u = m̂/(√v̂+ε)
the update Adam(W) takes next (one buffer the size of the weights while a step's passes run);
`sam_mode="previous_gradient"` to w + ρ·g/‖g‖, g the
gradient the previous optimizer step applied, kept in the `SAM` wrapper's `sam_state` so checkpoints carry it. The
point is `hf_sam.sam.LookAhead`: fixed once per optimizer step, entered for each micro-batch's forward+backward and
left right after, without a copy of the weights. `SAMMixin` decides when; this module says where.
"""

from __future__ import annotations

import contextlib

import torch

from hf_sam.sam import SAM, LookAhead, adam_update_direction, global_norm, momentum_direction

# The modes that take one forward+backward per step, at a point fixed without an ascent gradient.
ONE_PASS_MODES = ("momentum", "adam_update", "previous_gradient")


class OnePass:
    """One training loop's one-pass state: the mode, and the look-ahead point of the current optimizer step."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        # v and u are descent directions (w moves by −lr·v, −lr·u): look ahead along −v, −u. The previous gradient
        # is an ascent direction: along +g.
        self.sign = 1.0 if mode == "previous_gradient" else -1.0
        self.point = LookAhead()

    def direction(self, wrapper: SAM, params: list[torch.Tensor], state: dict) -> list[torch.Tensor] | None:
        """The direction for `params`, None before the first optimizer step (no momentum, no previous gradient)."""
        if self.mode == "momentum":
            return momentum_direction(wrapper.base_optimizer, params, wrapper.momentum_key)
        if self.mode == "adam_update":
            return adam_update_direction(wrapper.base_optimizer, params)
        # Kept in the plan's order: `SAMMixin._perturbation_plan` carries it to each parameter when the plan is rebuilt
        # (parameters frozen or unfrozen mid-run). A length that differs all the same (a checkpoint of another set-up)
        # gives no direction.
        stored = state.get("previous_gradient")
        if stored is None or len(stored) != len(params):
            return None
        # A checkpoint may have loaded it onto another device.
        return [g.to(p.device) for g, p in zip(stored, params, strict=True)]

    def set_point(self, groups: list[tuple[list[torch.Tensor], list[torch.Tensor], float]]) -> torch.Tensor:
        """The point of this optimizer step: `groups` of (params, direction, ρ), one per parameter group. Returns
        ‖direction‖ (one norm over all groups); a zero or non-finite one sets no point."""
        return self.point.set_([(params, d, self.sign * rho) for params, d, rho in groups])

    @contextlib.contextmanager
    def at_point(self):
        """The weights at the look-ahead point for the block, and back at w after it, however it ends."""
        self.point.enter_()
        try:
            yield
        finally:
            self.point.leave_()

    @staticmethod
    @torch.no_grad()
    def remember_gradient(params: list[torch.Tensor], state: dict) -> None:
        """sam_mode='previous_gradient', after a window's last backward: `.grad` holds the step's whole gradient
        (synced under DDP, before clipping); keep it for the next step's direction (a non-finite one is not kept)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if not torch.isfinite(global_norm(grads)):
            return
        stored = state.get("previous_gradient")
        if stored is None or len(stored) != len(params):
            state["previous_gradient"] = [g.detach().clone() for g in grads]
        else:
            torch._foreach_copy_(stored, grads)
