"""What the multi-process scripts record on each rank, for the parent test to compare with a hand reference."""

import torch
from transformers import TrainerCallback

from hf_sam import SAMTrainer


class RecordingSAMTrainer(SAMTrainer):
    """Records this rank's micro-batches (in order, from each ascent pass) and every ascent norm in `record`."""

    record: dict

    def compute_loss(self, model, inputs, *args, **kwargs):
        if not self._sam_backup.perturbed and torch.is_grad_enabled():  # the ascent pass of each micro-batch
            self.record["batches"].append({k: v.clone() for k, v in inputs.items()})
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _record_ascent(self, grad_norm, ascent_is_finite, rho):
        self.record["grad_norms"].append(float(grad_norm))
        super()._record_ascent(grad_norm, ascent_is_finite, rho)


class RecordWeights(TrainerCallback):
    """After every optimizer step: the full weights in `record["full"]` (gathered from FSDP2 shards: a collective,
    every rank runs it) and this rank's own part in `record["local"]` (the shard; the whole tensor otherwise)."""

    def __init__(self, record: dict):
        self.record = record

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = list(model.named_parameters())
        self.record["full"].append({n: _full(p).detach().clone() for n, p in params})
        self.record["local"].append({n: _local(p).detach().clone() for n, p in params})


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def new_record() -> dict:
    return {"batches": [], "grad_norms": [], "full": [], "local": []}
