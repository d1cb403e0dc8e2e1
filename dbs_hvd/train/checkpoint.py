"""Checkpoints: written atomically on rank 0, refused when they do not fit the run.

A checkpoint holds everything the next epoch depends on: model, optimizer
(momentum buffers), sampler (epoch, position, plan), policy state (smoothing
history), RNG state and the run's configuration. It is written to a temporary
file in the same folder, flushed to disk, then renamed over the final name:
a crash during the write leaves the previous checkpoint intact, and a reader
never sees half a file under a checkpoint's name. The last ``keep`` are kept.

Loading uses ``torch.load(weights_only=True)``: a checkpoint is data (tensors,
numbers, strings, lists, dicts), never code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..options import CONFIG_KEYS  # the rebalance options under dbs-train's names

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{6})\.pt$")

# Settings that may change between a run and its resumption without changing
# what is computed (or that are the resumption itself).
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "log",
        "rebalance_log",
        "checkpoint_dir",
        "resume",
        "keep_checkpoints",
        "progress",
        "workers",
        "threads",
        "device",
        # When plans change, not what is computed: the update is the global-batch
        # one whatever the plan (invariant 3). Also lets a checkpoint written before
        # a schedule setting existed resume (rebalance_min_seconds is newer).
        *CONFIG_KEYS.values(),
        "warmup_steps",
        "max_deadband",
        "plan_for",
        "spread_steps",
    }
)


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or from a different configuration."""


def checkpoint_path(directory: str | Path, epoch: int) -> Path:
    return Path(directory) / f"ckpt-{epoch:06d}.pt"


def save(directory: str | Path, epoch: int, payload: Mapping[str, Any], keep: int = 3) -> Path:
    """Write ``payload`` as the checkpoint of ``epoch``, atomically; prune to the last ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, epoch)
    temporary = final.with_suffix(".pt.tmp")
    with open(temporary, "wb") as fh:
        torch.save({"format": FORMAT, **payload}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, final)
    _fsync_directory(directory)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary files excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load(path: str | Path) -> dict:
    """Read a checkpoint; a damaged or foreign file is a CheckpointError saying so."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged file
        raise CheckpointError(
            f"{path} cannot be read as a dbs_hvd checkpoint ({type(error).__name__}: {error}). "
            "It may be damaged (a crash mid-copy?) or not a checkpoint: delete it to resume "
            "from the previous one"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a dbs_hvd checkpoint of format {FORMAT} "
            f"(found format {payload.get('format') if isinstance(payload, dict) else None!r})"
        )
    return payload


def load_latest(directory: str | Path) -> dict:
    """The newest complete checkpoint in ``directory``."""
    found = list_checkpoints(directory)
    if not found:
        raise CheckpointError(
            f"--resume found no checkpoint in {directory}: run without --resume to start "
            "a new run, or point --checkpoint-dir at the folder of the run to continue"
        )
    return load(found[-1])


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to resume a run whose configuration changes what is computed."""
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    differing = sorted(k for k in keys if saved.get(k) != current.get(k))
    if differing:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differing)
        raise CheckpointError(
            f"the checkpoint is from a different configuration ({detail}); resume with the "
            "same settings, or start a new run in another --checkpoint-dir"
        )
