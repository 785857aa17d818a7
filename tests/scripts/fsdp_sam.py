"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2` (gloo on CPU): the `SAM` wrapper in a custom
loop around an FSDP2 (`fully_shard`) model. Each rank saves its batch, the ascent norm SAM used, its local
shards and the gathered full weights after one step."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toy import make_model, make_rows, stack  # noqa: E402

from hf_sam import SAM  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_model()
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    rows = make_rows(8)
    batch = stack(rows[rank * 4 : (rank + 1) * 4])

    model(**batch)[
        "loss"
    ].backward()  # FSDP reduce-scatters: each rank holds its shard of the global gradient
    grad_norm = sam.ascent_step()
    model(**batch)["loss"].backward()  # at w + ε (all-gathered from the perturbed shards)
    sam.descent_step()
    sam.zero_grad()

    full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    local = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    torch.save(
        {"batch": batch, "grad_norm": grad_norm, "full": full, "local": local},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
