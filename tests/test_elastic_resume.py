"""A process killed under torchrun: the restarted run resumes and ends exactly as an uninterrupted one."""

import os
import sys

import pytest
import torch
from two_processes import SCRIPTS, _run


def elastic(out, mode: str) -> dict:
    # `--standalone` (a c10d rendezvous on a free port): with torchrun's default static rendezvous the restarted
    # workers read the dead workers' gloo addresses from the store and fail to connect (torch 2.14).
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "--max-restarts", "1", os.path.join(SCRIPTS, "elastic_resume.py"), str(out), mode])  # fmt: skip
    return torch.load(os.path.join(out, "result.pt"), weights_only=False)


@pytest.mark.multiprocess
def test_rank_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    straight = elastic(tmp_path / "straight", "none")
    faulted = elastic(tmp_path / "faulted", "kill")
    assert straight["restarts"] == 0 and straight["resumed_from"] is None
    assert faulted["restarts"] == 1 and faulted["resumed_from"].endswith("checkpoint-2")
    for name, value in straight["weights"].items():
        assert torch.equal(value, faulted["weights"][name]), name
    for key, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], faulted["optimizer"]["state"][key]["momentum_buffer"])
    # Every logged value of every step (loss and sam/*) as the uninterrupted run logged it.
    strip = [{k: v for k, v in e.items() if k != "epoch"} for e in straight["logs"]]
    assert [{k: v for k, v in e.items() if k != "epoch"} for e in faulted["logs"]] == strip
    assert len(strip) == 4
