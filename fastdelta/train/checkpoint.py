"""Crash-safe checkpoints: one self-verifying file per save, the last two kept.

File layout: MAGIC (8 bytes) | sha256 of the payload (32 bytes) | payload (torch.save bytes).
A torn write (truncated file) or a flipped byte fails the checksum, and `load_latest` falls
back to the previous checkpoint with a warning. Files are written atomically (temp + fsync +
rename + fsync of the folder); a failed write leaves no temp file and is an OutputError that names
the checkpoint the run can be resumed from.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shlex
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..output_files import OutputError, atomic_write, reason

MAGIC = b"FDCKPT01"
KEEP = 2
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupt, or belongs to a different run."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_files(directory) -> list:
    """Checkpoint paths in `directory`, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def checkpoint_path(directory, iteration: int) -> Path:
    return Path(directory) / f"ckpt-{iteration:08d}.pt"


def state_bytes(model: nn.Module) -> int:
    """The size of the model's parameters and buffers (of model.pt)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def checkpoint_bytes(model: nn.Module) -> int:
    """About one checkpoint's size: the model's tensors, as much again for SGD's momentum buffers,
    and once more as a margin (RNG states, history, attention, pickling)."""
    return 3 * state_bytes(model)


def resume_command(run_dir) -> str:
    """The command that continues the run in `run_dir`, quoted for a shell (a path may hold spaces)."""
    return f"fastdelta fit --resume {shlex.quote(str(run_dir))}"


def resume_hint(checkpoint_dir) -> str:
    """Where a stopped run continues from: its newest checkpoint (each one is renamed into place whole),
    or that there is none yet."""
    files = checkpoint_files(checkpoint_dir) if checkpoint_dir is not None else []
    if files:
        return (f"the run can be resumed from its last complete checkpoint {files[-1]} with resume=True "
                f"(CLI: {resume_command(Path(checkpoint_dir).parent)})")
    return "there is no complete checkpoint to resume from: start the run anew"


def write_failed(what: str, error: OSError, checkpoint_dir) -> OutputError:
    """The OutputError for a write that failed during a run: what, why, and where the run continues from."""
    return OutputError(f"could not write {what}: {reason(error)}; {resume_hint(checkpoint_dir)} once the folder "
                       "takes files again", error.errno)


def save_checkpoint(directory, iteration: int, payload: dict) -> Path:
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path = checkpoint_path(directory, iteration)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(MAGIC + hashlib.sha256(data).digest() + data)
            f.flush()
            os.fsync(f.fileno())

    try:
        atomic_write(path, write)
        _fsync_dir(path.parent)
        _prune(directory, iteration)
    except OSError as e:
        raise write_failed(f"checkpoint {path}", e, directory) from e
    return path


def _prune(directory, iteration: int) -> None:
    """Keep the checkpoint just written and the KEEP - 1 before it. One numbered later is of a timeline
    this run left (it resumed from an earlier one because that one failed its checksum): removed too,
    so the newest file is always this run's."""
    others = [p for p in checkpoint_files(directory) if _iteration_of(p) != iteration]
    older = [p for p in others if _iteration_of(p) < iteration]
    later = [p for p in others if _iteration_of(p) > iteration]
    for old in older[:max(0, len(older) - (KEEP - 1))] + later:
        old.unlink()


def _iteration_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path) -> dict:
    raw = Path(path).read_bytes()
    if len(raw) < len(MAGIC) + 32 or not raw.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path} is truncated or not a fastdelta checkpoint")
    digest, data = raw[len(MAGIC):len(MAGIC) + 32], raw[len(MAGIC) + 32:]
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def load_latest(directory) -> Optional[dict]:
    """The newest checkpoint that verifies; older ones are tried after a warning. None if none exist."""
    files = checkpoint_files(directory)
    for path in reversed(files):
        try:
            return read_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"fastdelta: {e}; trying the previous checkpoint", UserWarning, stacklevel=2)
    if files:
        raise CheckpointError(f"no valid checkpoint in {directory} (all {len(files)} failed their checksum)")
    return None
