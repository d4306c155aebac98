"""Reading tensors from files a user hands in without running code from them.

Every `.pt` file fastdelta reads (checkpoints, `--weights`, the shipped source weights) goes through
`load_tensors`: torch's allow-list unpickler (`weights_only=True`), which builds tensors, numbers,
strings and containers and refuses any other global (`os.system`, a class's constructor, ...). Every
other file fastdelta reads is JSON. The SHA-256 a checkpoint carries is an integrity check, not a
defence against a crafted file; this is.
"""
from __future__ import annotations

import io
import pickle
from typing import Sequence, Union

import torch


class UnsafeFileError(ValueError):
    """A file asks the unpickler for a global outside the allow-list: reading it could run code."""


def load_tensors(source: Union[str, bytes, "os.PathLike"], what: str, allowed: Sequence = ()):
    """torch.load of `source` (a path, or the bytes of a payload) with the allow-list unpickler and
    `allowed` extra globals. A refused global is an UnsafeFileError naming `what` and the reason."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in unpickler_reason(e).lower():  # not a refused global: a damaged or foreign file
            raise
        raise UnsafeFileError(f"{what} was refused: it holds objects other than tensors, numbers, strings and "
                              f"containers ({unpickler_reason(e)}), so reading it could run code") from e


def unpickler_reason(e: Exception) -> str:
    """The line of a torch.load error that names the problem. Its weights_only errors open with advice
    to retry with weights_only=False (the one thing not to do with a file from someone else); the
    unpickler's own reason follows a 'WeightsUnpickler error:' marker."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
