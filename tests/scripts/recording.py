"""What the multi-process scripts record on each rank, for the parent test to compare with a hand reference."""

import os

import torch
from toy import make_model, make_rows
from transformers import TrainerCallback

from hf_sam import SAMTrainer, SAMTrainingArguments


class RecordingSAMTrainer(SAMTrainer):
    """Records this rank's micro-batches (in order, from each ascent pass) and every ascent norm in `record`."""

    record: dict

    def compute_loss(self, model, inputs, *args, **kwargs):
        if not self._sam_backup.perturbed and torch.is_grad_enabled():  # the ascent pass of each micro-batch
            self.record["batches"].append({k: v.clone() for k, v in inputs.items()})
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _current_run(self):
        run = super()._current_run()
        telemetry = run.telemetry
        if not getattr(
            telemetry, "recorded", False
        ):  # each run's telemetry reports its ascent norms here too
            record_ascent, record = telemetry.record_ascent, self.record

            def recorded(grad_norm, finite, rho):
                record["grad_norms"].append(float(grad_norm))
                record_ascent(grad_norm, finite, rho)

            telemetry.record_ascent, telemetry.recorded = recorded, True
        return run


class RecordWeights(TrainerCallback):
    """After every optimizer step: the full weights in `record["full"]` (gathered from FSDP2 shards or ZeRO-3
    partitions: a collective, every rank runs it) and this rank's own part in `record["local"]` (the shard or the
    partition; the whole tensor otherwise)."""

    def __init__(self, record: dict):
        self.record = record

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = list(model.named_parameters())
        if any(
            hasattr(p, "ds_id") for _, p in params
        ):  # DeepSpeed ZeRO-3: gather the partitions (a collective)
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in params]):
                self.record["full"].append({n: p.detach().clone() for n, p in params})
            self.record["local"].append({n: p.ds_tensor.detach().clone() for n, p in params})
            return
        self.record["full"].append({n: _full(p).detach().clone() for n, p in params})
        self.record["local"].append({n: _local(p).detach().clone() for n, p in params})


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def new_record() -> dict:
    return {"batches": [], "grad_norms": [], "full": [], "local": []}


def toy_arguments(output_dir: str, **overrides) -> SAMTrainingArguments:
    """2 steps × 2 accumulated micro-batches of 2 rows per process, SGD with momentum 0.9, ρ = 0.05, in the data
    order the hand references replay; a checkpoint after every step."""
    settings = {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 2,
        "lr_scheduler_type": "constant",
        "save_strategy": "steps",
        "save_steps": 1,
        "sam_rho": 0.05,
        **overrides,
    }
    return SAMTrainingArguments(
        output_dir=output_dir,
        learning_rate=0.1,
        optim="sgd",
        optim_args="momentum=0.9",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        **settings,
    )


def toy_trainer(args: SAMTrainingArguments, trainer_class: type = RecordingSAMTrainer) -> RecordingSAMTrainer:
    """The toy model on 16 rows, recording into `trainer.record` (`trainer_class`: the stock Trainer for the ρ = 0
    comparisons; it records the weights only)."""
    record = new_record()
    trainer = trainer_class(
        model=make_model(), args=args, train_dataset=make_rows(16), callbacks=[RecordWeights(record)]
    )
    trainer.record = record
    return trainer


def save_record(trainer: RecordingSAMTrainer) -> None:
    """After training: this rank's record, as `<output_dir>-rank<r>.pt` next to the run's output folder."""
    record = trainer.record
    record["world"] = trainer.args.world_size
    backup = getattr(trainer, "_sam_backup", None)
    record["backup_numel"] = sum(b.numel() for b in backup._backup) if backup else 0  # SAM's extra copy of w
    record["log_history"] = trainer.state.log_history
    torch.save(record, f"{os.path.normpath(trainer.args.output_dir)}-rank{trainer.args.process_index}.pt")
