"""Run by tests/test_trainer_ddp.py under `torchrun --nproc_per_node 2` (gloo on CPU).

Each rank trains one SAM step on its half of the data and saves: its micro-batch, the ε it applied, and the weights
after the step. The parent test compares them with a single-process reference.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toy import CountingNet, make_model, make_rows, text_rows, tiny_bert  # noqa: E402

from hf_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402
from hf_sam.finetune.cli import end_distributed_run  # noqa: E402


class RecordingSAMTrainer(SAMTrainer):
    """Records this rank's micro-batch and the ε in the weights during the descent pass."""

    record: dict = {}

    def compute_loss(self, model, inputs, *args, **kwargs):
        if (
            not torch.is_grad_enabled()
        ):  # a forward-only check (loss units, the look-ahead guard): no training pass
            return super().compute_loss(model, inputs, *args, **kwargs)
        self.record.setdefault("batch", {k: v.clone() for k, v in inputs.items()})
        self.record.setdefault("calls", []).append({k: v.clone() for k, v in inputs.items()})
        if self._sam_backup.perturbed:
            names = {id(p): n for n, p in self.model.named_parameters()}
            eps = {
                names[id(p)]: p.detach() - b
                for p, b in zip(self._sam_backup._params, self._sam_backup._backup)
            }
            self.record["eps"] = [eps[n] for n, _ in self.model.named_parameters()]  # model order
        return super().compute_loss(model, inputs, *args, **kwargs)


class MicroBatchRecording(SAMTrainer):
    """Records the micro-batches this rank trains on, in order."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.record.setdefault("micro_batches", []).append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def arguments(out_dir: str, run: str, **overrides) -> SAMTrainingArguments:
    """One SGD step per run, sequential data (the parent test replays it), no checkpoint."""
    settings = dict(
        output_dir=os.path.join(out_dir, run),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        sam_rho=0.05,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return SAMTrainingArguments(**{**settings, **overrides})


def main(out_dir: str) -> None:
    rows = make_rows(8)
    for sync in (False, True):
        model = make_model()
        args = arguments(out_dir, f"run-{sync}", sam_sync_perturbation=sync)
        trainer = RecordingSAMTrainer(model=model, args=args, train_dataset=rows)
        trainer.record = {}
        trainer.train()
        rank = trainer.args.process_index
        torch.save(
            {
                **trainer.record,
                "params": [p.detach() for p in model.parameters()],
                "world": trainer.args.world_size,
            },
            os.path.join(out_dir, f"sync{int(sync)}-rank{rank}.pt"),
        )

    # sam_ascent_fraction=0.5: each rank's ε from a half of its own micro-batch (its own draw), the descent over all of it.
    args = arguments(out_dir, "run-fraction", sam_ascent_fraction=0.5)
    model = make_model()
    trainer = RecordingSAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.record = {}
    trainer.train()
    torch.save(
        {**trainer.record, "params": [p.detach() for p in model.parameters()]},
        os.path.join(out_dir, f"fraction-rank{trainer.args.process_index}.pt"),
    )

    # sam_mode="momentum": v is replicated, so every rank looks ahead to the same w − ρ·v/‖v‖ (no communication).
    args = arguments(out_dir, "run-momentum", sam_mode="momentum", optim_args="momentum=0.9", max_steps=3)
    model = make_model()
    trainer = RecordingSAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.record = {}
    trainer.train()
    torch.save(
        {"calls": trainer.record["calls"], "params": [p.detach() for p in model.parameters()]},
        os.path.join(out_dir, f"momentum-rank{trainer.args.process_index}.pt"),
    )

    # sam/grad_norm in mean-loss units under DDP: a loss normalised by the items of both processes (times the process
    # count, average_tokens_across_devices), with an unequal number of counted labels on the two ranks.
    rows = [
        {"features": r["features"], "labels": r["target"] if i >= 3 else torch.tensor(-100)}
        for i, r in enumerate(rows)
    ]
    torch.manual_seed(0)
    args = arguments(out_dir, "run-items", average_tokens_across_devices=True, logging_steps=1)
    trainer = RecordingSAMTrainer(model=CountingNet(), args=args, train_dataset=rows)
    trainer.record = {}
    trainer.train()
    logged = [e["sam/grad_norm"] for e in trainer.state.log_history if "sam/grad_norm" in e]
    torch.save(
        {
            "batch": trainer.record["batch"],
            "grad_norm": logged,
            "average": args.average_tokens_across_devices,
        },
        os.path.join(out_dir, f"items-rank{trainer.args.process_index}.pt"),
    )

    # A BERT (its loss a per-batch mean, forward(**kwargs)) at GA 2 with token averaging across the processes:
    # the step is the mean of the 4 micro-batches' SAM gradients, not the process count times the accumulation.
    args = arguments(
        out_dir, "run-bert", per_device_train_batch_size=2, gradient_accumulation_steps=2,
        average_tokens_across_devices=True, logging_steps=1,
    )  # fmt: skip
    model = tiny_bert()
    trainer = MicroBatchRecording(model=model, args=args, train_dataset=text_rows(8))
    trainer.record = {}
    trainer.train()
    torch.save(
        {
            "micro_batches": trainer.record["micro_batches"],
            "params": [p.detach() for p in model.parameters()],
            "grad_norm": [e["sam/grad_norm"] for e in trainer.state.log_history if "sam/grad_norm" in e],
        },
        os.path.join(out_dir, f"bert-rank{trainer.args.process_index}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed_run()  # leave together, tear the group down, exit without finalizers
