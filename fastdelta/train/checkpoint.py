"""Crash-safe checkpoints: one self-verifying file per save, the last two kept.

File layout: MAGIC (8 bytes) | sha256 of the payload (32 bytes) | payload (torch.save bytes).
A torn write (truncated file) or a flipped byte fails the checksum, and `load_latest` falls
back to the previous checkpoint with a warning.

Reading never runs code from the file: the payload holds only tensors, numbers, strings, lists,
tuples and dicts (the numpy RNG state is stored as a list of ints), and it is read with torch's
allow-list unpickler (`weights_only=True`). The checksum is no defence here (anyone who can write the
file can write a matching digest); the allow-list is. A file that names any other global is refused
as unsafe, never fallen back from silently. Files are written atomically (temp + fsync +
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
from ..safe_load import UnsafeFileError, load_tensors

MAGIC = b"FDCKPT02"
# written before the numpy RNG state was stored as ints; read with the numpy array globals allowed
LEGACY_MAGIC = b"FDCKPT01"
KEEP = 2
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupt, or belongs to a different run."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose payload asks the unpickler for a global outside the allow-list: a crafted
    file (or one no fastdelta wrote). Refused outright rather than skipped for an older one."""


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))  # no ndarray: nothing to unpickle
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
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
    magic = raw[:len(MAGIC)]
    if len(raw) < len(MAGIC) + 32 or magic not in (MAGIC, LEGACY_MAGIC):
        raise CheckpointError(f"checkpoint {path} is truncated or not a fastdelta checkpoint")
    digest, data = raw[len(MAGIC):len(MAGIC) + 32], raw[len(MAGIC) + 32:]
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    allowed = _LEGACY_NUMPY_GLOBALS if magic == LEGACY_MAGIC else []
    try:
        return load_tensors(data, f"checkpoint {path}", allowed)
    except UnsafeFileError as e:
        raise UnsafeCheckpointError(
            f"{e}; fastdelta never writes such a file. Do not resume from this folder: start the run anew "
            "(fastdelta fit ... --overwrite), or resume from a copy of the run you trust") from e
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from e


def _legacy_numpy_globals() -> list:
    """What an FDCKPT01 file's numpy RNG state (a uint32 array) needs: the array's reconstructor, its
    type and its dtype, nothing that can call anything else."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_LEGACY_NUMPY_GLOBALS = _legacy_numpy_globals()


def load_latest(directory) -> Optional[dict]:
    """The newest checkpoint that verifies; older ones are tried after a warning. None if none exist."""
    files = checkpoint_files(directory)
    for path in reversed(files):
        try:
            return read_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            warnings.warn(f"fastdelta: {e}; trying the previous checkpoint", UserWarning, stacklevel=2)
    if files:
        raise CheckpointError(f"no valid checkpoint in {directory} (all {len(files)} failed their checksum)")
    return None
