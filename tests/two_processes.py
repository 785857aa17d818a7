"""Launch two gloo processes on CPU for the multi-process tests (torchrun, or `accelerate launch` for a recipe)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tests", "scripts")

# Two processes on CPU, 2 steps of 2 examples each, the digits demo data: enough to compare engines' weights.
RECIPE_ARGS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
               "--use_cpu", "true", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
               "--learning_rate", "0.01", "--optim", "sgd", "--logging_steps", "1", "--dataset", "digits",
               "--sam_rho", "0.05", "--max_test_samples", "8"]  # fmt: skip


def _run(command: list[str]) -> str:
    # PYTHONFAULTHANDLER: a rank that dies by a signal prints every thread's Python stack (where it happened).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "PYTHONFAULTHANDLER": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def torchrun(script: str, *args: str, port: int) -> str:
    """`torchrun --nproc_per_node 2 tests/scripts/<script> ARGS`; returns stdout + stderr."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                 str(port), os.path.join(SCRIPTS, script), *args])  # fmt: skip


def accelerate_launch(config: str, script: str, *args: str, port: int) -> str:
    """`accelerate launch --config_file accelerate_configs/<config> --num_processes 2 SCRIPT ARGS`. Under
    fsdp.yaml the script runs through tests/scripts/fsdp_on_cpu.py, which lets Accelerate use FSDP without GPUs."""
    command = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
               os.path.join(REPO, "accelerate_configs", config), "--num_processes", "2", "--main_process_port",
               str(port)]  # fmt: skip
    if config == "fsdp.yaml":
        command.append(os.path.join(SCRIPTS, "fsdp_on_cpu.py"))
    return _run([*command, script, *args])


def launch_recipe(config: str, out, checkpoint: str, *extra: str, port: int) -> str:
    """recipes/finetune.py on two processes with RECIPE_ARGS, a checkpoint and an output folder."""
    return accelerate_launch(config, "recipes/finetune.py", *RECIPE_ARGS, "--model_name_or_path", checkpoint,
                             "--output_dir", str(out), *extra, port=port)  # fmt: skip
