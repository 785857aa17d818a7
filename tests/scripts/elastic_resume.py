"""Run by tests/test_elastic_resume.py under `torchrun --standalone --nproc_per_node 2` (gloo on CPU).

Four SAM steps on two processes, a checkpoint every two. Modes: `none` trains straight through; `kill` makes rank 1
kill itself (SIGKILL) after step 3, which ends the launch; `resume` is the relaunch, which resumes from the newest
checkpoint (step 2) as a user's script does with `resume_from_checkpoint=True`. Rank 0 saves what the parent test
compares.
"""

import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toy import make_model, make_rows  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from hf_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402
from hf_sam.finetune.cli import end_distributed_run  # noqa: E402


class KillRankOneAfterStep3(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if args.process_index == 1 and state.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # checkpoint-2 is complete: step 3 needed both ranks past it


def main(out_dir: str, mode: str) -> None:
    args = SAMTrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=0.1,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="cosine",
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        sam_rho=0.05,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    model = make_model(dropout=0.2)
    trainer = SAMTrainer(
        model=model,
        args=args,
        train_dataset=make_rows(16),
        callbacks=[KillRankOneAfterStep3()] if mode == "kill" else [],
    )
    resume = get_last_checkpoint(out_dir) if mode == "resume" else None
    trainer.train(resume_from_checkpoint=resume)
    if trainer.args.process_index == 0:
        torch.save(
            {
                "weights": model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "logs": [e for e in trainer.state.log_history if "loss" in e],
                "resumed_from": resume,
            },
            os.path.join(out_dir, "result.pt"),
        )


if __name__ == "__main__":
    main(sys.argv[1], mode=sys.argv[2])
    end_distributed_run()  # leave together, tear the group down, exit without finalizers
