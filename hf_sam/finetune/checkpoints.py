"""Checkpoints of a finetuning run: which `checkpoint-<step>` folders it can resume from, and whether one fits
the model. `Trainer._save_checkpoint` writes in place, so a process killed while saving leaves a folder that
`transformers.trainer_utils.get_last_checkpoint` would pick (it only looks at names); here a checkpoint counts
only when it is complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile

from hf_sam.finetune.models import TIMM_PREFIX

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, or holds another model; the message says what to change."""


_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_newest_first(output_dir: str) -> list[str]:
    """The checkpoint-<step> folders of output_dir, highest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def checkpoint_problem(folder: str, with_optimizer: bool = True) -> str | None:
    """Why `folder` cannot be resumed from, or None when it is complete.

    `Trainer._save_checkpoint` (transformers 5) writes in place, with no temporary folder and no rename: config
    and weights, then optimizer.pt, scheduler.pt, rng_state*.pth, and trainer_state.json last. A process
    killed while saving leaves a checkpoint-N folder that `get_last_checkpoint` would pick (it only looks at
    names): resuming from it would lose the optimizer state, or crash. Complete means: trainer_state.json parses,
    every safetensors file is as long as its header says, and the torch pickles (zip archives, whose directory
    is written at the end) are whole.
    """
    state_path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(state_path):
        return "no trainer_state.json (the save was interrupted; it is written last)"
    try:
        with open(state_path) as f:
            int(json.load(f)["global_step"])
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json is truncated"
    names = os.listdir(folder)
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights and not any(n.endswith(".bin") and n != "training_args.bin" for n in names):
        return "no model weights"
    for name in weights:
        if not _safetensors_complete(os.path.join(folder, name)):
            return f"{name} is truncated"
    needed = ["optimizer.pt", "scheduler.pt"] if with_optimizer else []
    needed += sorted(n for n in names if n.startswith("rng_state") and n.endswith(".pth"))
    for name in needed:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"no {name}"
        if not zipfile.is_zipfile(path):
            return f"{name} is truncated"
    return None


def _safetensors_header(path: str) -> tuple[int, dict]:
    """(header size, {tensor name: dtype, shape, data_offsets}) of a safetensors file, which opens with the
    header's length (8 bytes) and the header (JSON)."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    return header_size, {k: v for k, v in header.items() if k != "__metadata__"}


def _safetensors_complete(path: str) -> bool:
    try:
        header_size, tensors = _safetensors_header(path)
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        return os.path.getsize(path) == 8 + header_size + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


def resolve_resume(resume: str | None, output_dir: str, with_optimizer: bool, warn: bool) -> str | None:
    """`resume_from_checkpoint` as a folder: 'true'/'last' is the newest *complete* checkpoint of output_dir
    (newer incomplete ones are skipped with a warning); an explicit folder must be complete."""
    if not resume:
        return None
    if resume.lower() in ("true", "last"):
        candidates = checkpoints_newest_first(output_dir)
        if not candidates:
            raise CheckpointError(
                f"resume_from_checkpoint={resume}: no checkpoint-* in {output_dir} to resume."
            )
        skipped = []
        for path in candidates:
            problem = checkpoint_problem(path, with_optimizer)
            if problem is None:
                for old, why in skipped:
                    if warn:
                        logger.warning(
                            f"finetune.py: warning: skipping {old}: incomplete ({why}); resuming from "
                            f"{os.path.basename(path)}."
                        )
                return path
            skipped.append((os.path.basename(path), problem))
        raise CheckpointError(
            f"resume_from_checkpoint={resume}: no complete checkpoint in {output_dir} ("
            + "; ".join(f"{name}: {why}" for name, why in skipped)
            + "). Start over with --overwrite_output_dir true."
        )
    if not os.path.isdir(resume):
        raise CheckpointError(
            f"resume_from_checkpoint={resume!r} is not a folder; give a checkpoint-* path or 'true'."
        )
    problem = checkpoint_problem(resume, with_optimizer)
    if problem is not None:
        raise CheckpointError(
            f"resume_from_checkpoint={resume!r} is incomplete ({problem}); give an older checkpoint, or 'true' for "
            "the newest complete one."
        )
    return resume


def check_checkpoint_fits(model, checkpoint: str) -> None:
    """The checkpoint to resume holds this model's tensors (same names, same shapes): transformers would load
    another architecture's checkpoint with a warning and train from the freshly loaded weights instead."""
    path = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(path):
        return  # sharded or adapter checkpoints: left to the Trainer
    _, tensors = _safetensors_header(path)
    # transformers saves a timm model without the wrapper's `timm_model.` prefix (and adds it back on load).
    saved = {k.removeprefix(TIMM_PREFIX): tuple(v["shape"]) for k, v in tensors.items()}
    expected = {k.removeprefix(TIMM_PREFIX): tuple(v.shape) for k, v in model.state_dict().items()}
    differ = sorted(k for k in expected if saved.get(k) != expected[k]) + sorted(set(saved) - set(expected))
    if differ:
        raise CheckpointError(
            f"resume_from_checkpoint {checkpoint} holds another model's weights: {len(differ)} of {len(expected)} "
            f"tensors differ in name or shape (e.g. {', '.join(differ[:3])}). Resume with the run's own "
            "model_name_or_path and dataset, or from that run's output_dir."
        )
