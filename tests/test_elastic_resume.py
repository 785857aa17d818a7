"""A rank killed under torchrun: the relaunched run resumes and ends exactly as an uninterrupted one."""

import os
import subprocess
import sys

import pytest
import torch
from two_processes import REPO, SCRIPTS, _run


def _command(out, mode: str) -> list[str]:
    # `--standalone`: a fresh c10d rendezvous on a free port for every launch.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(SCRIPTS, "elastic_resume.py"), str(out), mode]  # fmt: skip


def _result(out) -> dict:
    return torch.load(os.path.join(out, "result.pt"), weights_only=False)


def _killed_launch(out) -> None:
    """The first launch, whose rank 1 SIGKILLs itself after step 3. The job is relaunched by hand rather than by
    `--max-restarts`: torchrun's in-place restart re-runs the gloo rendezvous while the dead round's addresses can
    still be read from the store, which fails to connect now and then (torch 2.14). A relaunch is what a
    scheduler does after a node failure, and SAM resumes the same way in both."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    result = subprocess.run(
        _command(out, "kill"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0, "the killed launch ended normally: the kill did not happen"
    assert "SIGKILL" in result.stdout + result.stderr, result.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "result.pt")), "the killed launch finished training"


@pytest.mark.multiprocess
def test_rank_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    _run(_command(tmp_path / "straight", "none"))
    straight = _result(tmp_path / "straight")
    _killed_launch(tmp_path / "faulted")
    _run(_command(tmp_path / "faulted", "resume"))
    faulted = _result(tmp_path / "faulted")
    assert straight["resumed_from"] is None
    assert faulted["resumed_from"].endswith("checkpoint-2")
    for name, value in straight["weights"].items():
        assert torch.equal(value, faulted["weights"][name]), name
    for key, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], faulted["optimizer"]["state"][key]["momentum_buffer"])
    # Every logged value of every step (loss and sam/*) as the uninterrupted run logged it.
    strip = [{k: v for k, v in e.items() if k != "epoch"} for e in straight["logs"]]
    assert [{k: v for k, v in e.items() if k != "epoch"} for e in faulted["logs"]] == strip
    assert len(strip) == 4
