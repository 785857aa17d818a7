"""Launches that would run something other than what they asked for are refused (or said) before training."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from two_processes import REPO, SCRIPTS

from hf_sam import setup_checks


@pytest.mark.multiprocess
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the launch runs two processes only on a machine without GPUs"
)
def test_cpu_config_without_use_cpu_is_refused_rather_than_two_independent_trainings(tmp_path):
    """accelerate_configs/cpu.yaml with a user's script that does not set use_cpu: each of the two processes would
    train alone into the same output_dir. Both stop before training with the line that names the fix."""
    command = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
               os.path.join(REPO, "accelerate_configs", "cpu.yaml"), "--main_process_port", "29541",
               os.path.join(SCRIPTS, "user_script.py"), str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "TRAINED" not in output
    assert "set use_cpu=True in the training arguments" in output
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def _trainer(num_processes=1, fsdp=False):
    accelerator = SimpleNamespace(num_processes=num_processes, distributed_type="NO")
    return SimpleNamespace(accelerator=accelerator, is_fsdp_enabled=fsdp, args=SimpleNamespace())


def test_several_processes_seen_by_the_environment_but_one_run_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2.*train independently"):
        setup_checks.check_launch(_trainer())
    setup_checks.check_launch(_trainer(num_processes=2))  # a real two-process run


def test_a_fsdp_launch_that_accelerate_did_not_enable_is_said(monkeypatch):
    warnings = []
    monkeypatch.setattr(setup_checks.logger, "warning_once", warnings.append)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    setup_checks.check_launch(_trainer(fsdp=True))
    assert warnings == []
    setup_checks.check_launch(_trainer(fsdp=False))
    assert len(warnings) == 1 and "asked for FSDP" in warnings[0] and "DDP's ε" in warnings[0]
