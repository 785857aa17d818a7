r"""Run by tests/test_deepspeed.py under `torchrun --nproc_per_node 2` (gloo on CPU): `SAMTrainer` under DeepSpeed
ZeRO-1 and ZeRO-2 (DeepSpeed's CPU accelerator; `use_cpu=True` lets Accelerate see both processes), two steps of
two accumulated micro-batches each.

Each rank saves its micro-batches, the ascent norms, and the full weights after every step. Runs: "zero1",
"zero2", "zero2-sync" (sam_sync_perturbation=True), "zero2-resumed" (from zero2's checkpoint-1), "zero2-bf16" (DeepSpeed's
bf16: bf16 module, fp32 master weights) and "zero2-variants" (one
micro-batch per step, cosine LR, ρ following it, only `^fc2\.` perturbed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.recording import save_record, toy_arguments, toy_trainer  # noqa: E402

from hf_sam.finetune.cli import end_distributed_run  # noqa: E402


def run(out_dir: str, name: str, stage: int, resume_from: str | None = None, **overrides) -> None:
    deepspeed = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": "auto"},
    }
    trainer = toy_trainer(toy_arguments(os.path.join(out_dir, name), deepspeed=deepspeed, **overrides))
    trainer.train(resume_from_checkpoint=resume_from)
    engine = trainer.model_wrapped
    trainer.record["engine"] = (type(engine).__name__, engine.zero_optimization_stage())
    save_record(trainer)


def main(out_dir: str) -> None:
    run(out_dir, "zero1", stage=1)
    run(out_dir, "zero2", stage=2)
    run(out_dir, "zero2-sync", stage=2, sam_sync_perturbation=True)
    run(out_dir, "zero2-resumed", stage=2, resume_from=os.path.join(out_dir, "zero2", "checkpoint-1"))
    run(out_dir, "zero2-bf16", stage=2, bf16=True, save_strategy="no")
    run(
        out_dir,
        "zero2-variants",
        stage=2,
        gradient_accumulation_steps=1,
        lr_scheduler_type="cosine",
        sam_rho_schedule="linear_with_lr",
        sam_rho_min=0.02,
        sam_param_filter=r"^fc2\.",
        save_strategy="no",
    )


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed_run()  # leave together, tear the group down, exit without finalizers
