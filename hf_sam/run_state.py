"""What `SAMMixin` keeps for one training loop (`RunState`): the perturbation plan and the per-parameter state that
follows it, the micro-batch's place in its window, the telemetry sums, the look-ahead guard and the one-pass point."""

from __future__ import annotations

import torch

from hf_sam import variants
from hf_sam.engines import Plan
from hf_sam.one_pass import OnePass
from hf_sam.telemetry import LookAheadGuard, SAMTelemetry


class RunState:
    """One training loop's state.

    The Trainer builds a new `TrainerState` at the start of every loop (each `train()`, each `model_init` /
    hyperparameter trial, a resume, an `auto_find_batch_size` retry), so a run is recognised by its state object
    and nothing carries over from one loop into the next: a cached parameter list of the previous model would be
    perturbed instead of the new one (ε = 0 on the model being trained), a half-filled window would leak.
    """

    def __init__(self, state, sam_mode: str) -> None:
        self.state = state
        self.plan: Plan | None = None
        self.window = variants.CleanGradientWindow()  # GSAM / LookSAM
        self.micro_batch = 0  # index of the micro-batch in its accumulation window (the ascent subset's draw)
        self.passes = 1.0  # forward+backward passes of the last micro-batch, example-weighted (total_flos)
        self.telemetry = SAMTelemetry(start_step=state.global_step)
        self.look_ahead = LookAheadGuard()
        self.one_pass = OnePass(sam_mode)  # the one-pass variants' direction and point

    def follow(self, plan: Plan, sam_state: dict) -> Plan:
        """Take the engine's plan for this micro-batch. Rebuilt mid-run (parameters frozen or unfrozen), the
        per-parameter state of GSAM, LookSAM and previous_gradient (in `sam_state`, the checkpointed variant state)
        follows its parameter: a newly perturbed one gets no g_v, and a zero previous gradient, as the previous step
        applied none to it."""
        previous, self.plan = self.plan, plan
        if previous is not None and plan is not previous:
            if self.window.clean is not None:
                self.window.clean = plan.carry(previous, self.window.clean, torch.zeros_like)
            for key, fill in (("looksam_gv", lambda p: None), ("previous_gradient", torch.zeros_like)):
                if key in sam_state:
                    sam_state[key] = plan.carry(previous, sam_state[key], fill)
        return plan
