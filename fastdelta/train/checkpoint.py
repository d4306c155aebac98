"""Crash-safe checkpoints: one self-verifying file per save, the last two kept.

File layout: MAGIC (8 bytes) | sha256 of the payload (32 bytes) | payload (torch.save bytes).
A torn write (truncated file) or a flipped byte fails the checksum, and `load_latest` falls
back to the previous checkpoint with a warning. Files are written atomically (temp + fsync +
rename + fsync of the folder).
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import re
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..ioutil import atomic_write

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


def save_checkpoint(directory, iteration: int, payload: dict) -> Path:
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path = Path(directory) / f"ckpt-{iteration:08d}.pt"

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(MAGIC + hashlib.sha256(data).digest() + data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
    _fsync_dir(path.parent)
    for old in checkpoint_files(directory)[:-KEEP]:
        old.unlink()
    return path


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
