"""A user's own SAMTrainer script, as the README shows it, with no `use_cpu`: tests/test_launch.py launches it
with accelerate_configs/cpu.yaml on a machine without GPUs."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toy import make_model, make_rows  # noqa: E402

from hf_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402

args = SAMTrainingArguments(
    output_dir=sys.argv[1], max_steps=1, per_device_train_batch_size=4, report_to=[], sam_rho=0.05,
    save_strategy="no", disable_tqdm=True,
)  # fmt: skip
trainer = SAMTrainer(model=make_model(), args=args, train_dataset=make_rows(8))
trainer.train()
print(f"TRAINED rank {trainer.args.process_index} of {trainer.args.world_size}")
