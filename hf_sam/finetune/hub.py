"""The Hub as the finetuning recipe meets it: one line for any failure to reach it (loading a dataset or a
model, pushing a run), what is a local path rather than a Hub id, and the push of a run (the repository created
before training, the files a user loads uploaded after it)."""

from __future__ import annotations

import os

from huggingface_hub import HfApi

# What a user loads (weights, configs, card) and the run's record; never training_args.bin, checkpoints or logs.
# Top-level files only: upload_folder matches these against paths relative to output_dir.
PUSHED_FILES = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "config.json",
                "preprocessor_config.json", "README.md", "test_results.json", "resolved_config.yaml")  # fmt: skip


class HubError(ValueError):
    """push_to_hub cannot create or upload to its repository; the message says what to change."""


def hub_failure(failed: str, err: Exception, not_found: str, advice: str) -> str:
    """One line for any failure to reach the Hub (offline, not found, gated, network: they surface as
    different types): what `failed`, why (offline mode, else `not_found`), the error's first line, `advice`."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or (
        "offline" in f"{type(err).__name__} {err}".lower()
    )
    why = "the Hub is unreachable (offline mode)" if offline else not_found
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return f"{failed}: {why} ({type(err).__name__}: {detail}). {advice}"


def is_local_path(name: str) -> bool:
    """Whether `name` can only be a file-system path: a Hub id is `name` or `owner/name` (word characters, '-' and
    '.', none leading), so '/x', './x', '../x', '~/x', 'a/b/c', 'x/' and 'C:\\x' are paths. `owner/name` itself
    may be either (transformers and datasets try the folder first), so it is not one; nor timm's
    `hf-hub:owner/name`."""
    parts = name.split("/")
    return name.startswith((".", "~")) or os.path.isabs(name) or "\\" in name or len(parts) > 2 or "" in parts


def missing_local_path(field: str, value: str) -> str | None:
    """The error line for a `field` naming a local path that does not exist, else None. Without it, the loaders
    send the mistyped path to the Hub, and the user reads "not found on the Hub or the Hub is unreachable"."""
    # (A YAML recipe may give a number: not a path.)
    if not isinstance(value, str) or not is_local_path(value) or os.path.exists(value):
        return None
    expanded = os.path.expanduser(value)  # a shell expands `~`; a recipe, `--flag=~/x` and the loaders do not
    fix = f"'~' is not expanded here: write {expanded!r}" if os.path.exists(expanded) else "check the path"
    return f"{field} {value!r} does not exist (cwd: {os.getcwd()}): a local path, not a Hub id (owner/name); {fix}."


def load_failure(what: str, source: str, err: Exception) -> str:
    """`what` ("dataset", "model") named `source` could not be fetched."""
    return hub_failure(
        f"cannot load {what} {source!r}", err, "not found on the Hub or the Hub is unreachable",
        "Check the id and your connection / `hf auth login`, or point the recipe at a local copy.",
    )  # fmt: skip


def _push_failure(action: str, err: Exception) -> HubError:
    return HubError(hub_failure(
        f"push_to_hub: cannot {action}", err, "not found / not allowed on the Hub",
        "Check hub_model_id, your connection and `hf auth login`, or set push_to_hub false.",
    ))  # fmt: skip


def create_repo(repo_id: str, private: bool | None) -> None:
    """Before training: a run that cannot push should fail now, not after hours on GPUs."""
    try:
        HfApi().create_repo(repo_id, exist_ok=True, private=private)
    except Exception as err:
        raise _push_failure(f"create {repo_id!r}", err) from None


def upload_run(folder: str, repo_id: str) -> None:
    """The `PUSHED_FILES` of a finished run's `folder`, in one commit."""
    try:
        HfApi().upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message="hf-sam finetuning run",
            allow_patterns=list(PUSHED_FILES),
        )  # fmt: skip
    except Exception as err:
        raise _push_failure(f"upload to {repo_id!r}", err) from None
