"""Norms and reductions over lists of tensors, wherever their elements live (torch only).

One fused norm per tensor in float32 at least; FSDP2's DTensor shards and DeepSpeed ZeRO-3's partitions
(`mark_partitioned`) counted once over their process group, so every rank gets the full-model norm; a model
spread over devices (device_map) gathered on one. `dot`, `local_tensors` and `all_reduce_mean_` are the other
list helpers the math uses.
"""

from __future__ import annotations

import torch

# Weights in these dtypes cannot hold w + ε exactly (8 or 11 significant bits): `WeightBackup` measures what is kept.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """<a, b> over lists of tensors, accumulated in float32 at least (no elementwise product is materialised)."""

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1) if x.dtype in (torch.float32, torch.float64) else x.reshape(-1).float()

    return sum(
        (torch.dot(flat(x), flat(y)) for x, y in zip(a, b, strict=True)), torch.zeros((), device=a[0].device)
    )


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """FSDP2 parameters and gradients are DTensors: their local shards (views sharing storage), for in-place ops."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


# The attribute that marks a tensor as this process's flat partition of a larger one (DeepSpeed ZeRO-3's working
# weights and gradient partitions): its value is the process group the partitions are spread over.
PARTITION_GROUP = "_sam_partition_group"


def mark_partitioned(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Mark `tensors` as this process's partitions of tensors spread over `group` (ZeRO-3), so that `global_norm`
    counts each element once over the group (its squares are all-reduced) instead of taking the local norm."""
    for t in tensors:
        setattr(t, PARTITION_GROUP, group)
    return tensors


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖x‖₂ over a list of tensors (one fused norm per tensor, then the norm of the norms), in float32 at least.

    Sharded tensors (FSDP2's DTensors on a 1-D mesh) and partitions (`mark_partitioned`, ZeRO-3) count once: the
    squared norms of the local parts are all-reduced over their process group, so every rank gets the full-model
    norm, not its own part's.
    """
    split, group, replicated = [], None, []
    for t in tensors:
        if is_dtensor(t):
            mesh = t.device_mesh
            if mesh.ndim != 1 or not all(p.is_shard() for p in t.placements):
                unsupported_layout()
            part_group, local = mesh.get_group(), t.to_local()
        elif (part_group := getattr(t, PARTITION_GROUP, None)) is not None:
            local = t
        else:
            replicated.append(t)
            continue
        if group is None:
            group = part_group
        elif part_group is not group:
            unsupported_layout()
        split.append(local)
    if not split:
        norms = _norms(tensors)
        device = norms[0].device  # a model spread over devices (device_map): gather the norms on one
        return torch.linalg.vector_norm(
            torch.stack([n.to(device, torch.promote_types(n.dtype, torch.float32)) for n in norms])
        )

    def squares(group: list[torch.Tensor]) -> torch.Tensor:
        norms = _norms(group) if group else []
        return torch.stack([n.float() ** 2 for n in norms]).sum() if norms else torch.zeros(())

    split_squares = squares(split)
    torch.distributed.all_reduce(split_squares, group=group)  # the all-reduce of squared local norms
    total = split_squares + (squares(replicated).to(split_squares.device) if replicated else 0.0)
    return total.sqrt()


def unsupported_layout():
    raise NotImplementedError(
        "SAM supports sharded parameters on one 1-D device mesh (FSDP2 `fully_shard`) or one ZeRO-3 partition group; "
        "HSDP and tensor parallel layouts are not supported yet."
    )


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """‖t‖₂ of each tensor, fused (grouped by device and dtype internally), in float32 at least: torch's fused norm
    returns a bf16/fp16 tensor's norm rounded to its own dtype (0.2% off in bf16), so those get dtype=float32."""
    if {t.dtype for t in tensors}.isdisjoint(LOW_PRECISION):
        return torch._foreach_norm(tensors)  # float32: one set of dtypes more (~3% of the norm's host time)
    low = [t for t in tensors if t.dtype in LOW_PRECISION]
    rest = [t for t in tensors if t.dtype not in LOW_PRECISION]
    return [*torch._foreach_norm(low, 2, dtype=torch.float32), *(torch._foreach_norm(rest) if rest else ())]


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over the processes of the default group, in place, in one collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    chunks = flat.split([t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(chunks, tensors, strict=True)])
