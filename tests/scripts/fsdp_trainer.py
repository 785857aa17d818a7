r"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2` (gloo on CPU): `SAMTrainer` under Accelerate's
FSDP2 plugin (`fsdp=True`, `fsdp_config={"version": 2}`), two steps of two accumulated micro-batches each.
(`fsdp_on_cpu.enable_fsdp_on_cpu` lets Accelerate use FSDP without GPUs.)

Each rank saves its micro-batches, the ascent norms SAMTrainer used, its local shards and the gathered
weights after every step; the parent test compares them with a single-process reference.

Runs: "straight" (2 steps, a checkpoint after each), "resumed" (from the straight run's checkpoint-1) and
"interval" (sam_interval=2: a SAM step, then a plain one with FSDP's deferred reduce-scatter), "bf16" (FSDP2's
MixedPrecisionPolicy: bf16 compute and reduction, fp32 sharded weights) and "variants" (one
step of one micro-batch: 2-step projected ascent on the parameters matching `^fc2\.` only).
"""

import os
import sys

from accelerate import PartialState
from accelerate.utils import DistributedType

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.fsdp_on_cpu import enable_fsdp_on_cpu  # noqa: E402
from scripts.recording import save_record, toy_arguments, toy_trainer  # noqa: E402

from hf_sam.finetune.cli import end_distributed_run  # noqa: E402


def run(out_dir: str, name: str, resume_from: str | None = None, **overrides) -> None:
    settings = {"fsdp": True, "fsdp_config": {"version": 2}, "save_only_model": False, **overrides}
    trainer = toy_trainer(toy_arguments(os.path.join(out_dir, name), **settings))
    assert trainer.accelerator.distributed_type == DistributedType.FSDP and trainer.accelerator.is_fsdp2
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.record["mixed_precision"] = repr(trainer.accelerator.state.fsdp_plugin.mixed_precision_policy)
    save_record(trainer)


def launched(out_dir: str) -> None:
    """Under `accelerate launch --config_file accelerate_configs/fsdp.yaml`: the FSDP plugin comes from the
    launcher's environment, not from `args.fsdp`. One step (as "straight"'s first), and the refusal of a
    per-process ε, which only the Trainer can notice here."""
    try:
        run(out_dir, "refused", fsdp=None, fsdp_config=None, sam_sync_perturbation=False)
    except ValueError as error:
        message = str(error)
    else:
        raise AssertionError("sam_sync_perturbation=False was accepted under FSDP")
    run(out_dir, "launched", fsdp=None, fsdp_config=None, max_steps=1)
    if PartialState().is_main_process:
        with open(os.path.join(out_dir, "refused.txt"), "w") as f:
            f.write(message)


def main(out_dir: str) -> None:
    run(out_dir, "straight")
    run(out_dir, "resumed", resume_from=os.path.join(out_dir, "straight", "checkpoint-1"))
    run(out_dir, "interval", sam_interval=2)
    run(out_dir, "bf16", bf16=True)
    run(
        out_dir,
        "variants",
        max_steps=1,
        gradient_accumulation_steps=1,
        per_device_train_batch_size=4,
        sam_ascent_steps=2,
        sam_param_filter=r"^fc2\.",
    )


if __name__ == "__main__":
    enable_fsdp_on_cpu()
    launched(sys.argv[1]) if "--launched" in sys.argv else main(sys.argv[1])
    end_distributed_run()  # leave together, tear the group down, exit without finalizers
