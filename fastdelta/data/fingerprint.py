"""Fingerprints of what a run reads: SHA-256 digests that tell a resumed run, or a result about to be
reused, whether the data and the source weights are still the ones it was made with.

- image folders: each accepted file's path (relative to the root), label, size and mtime; the pixels
  are not read again, so a scan stays cheap and an edited file still shows (its size or mtime moves);
- arrays (numpy or torch): the images' bytes, shape and dtype, and the labels;
- another torch Dataset: its own `fingerprint()` when it has one, else only its type, length and
  labels (`targets`): its images are not read, so an edit that keeps them goes unseen.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

import numpy as np
import torch

# files per split whose (path, label, size, mtime) a checkpoint keeps, to name what changed on resume
LISTING_LIMIT = 20_000


def folder_listing(samples, root: Optional[str] = None) -> list:
    """[[path relative to root (absolute without one), label, size, mtime_ns]] of (path, label) samples."""
    listing = []
    for path, label in samples:
        st = os.stat(path)
        name = os.path.relpath(path, root) if root is not None else os.path.abspath(path)
        listing.append([name, int(label), st.st_size, st.st_mtime_ns])
    return listing


def listing_fingerprint(listing: list) -> dict:
    h = hashlib.sha256()
    for name, label, size, mtime in listing:
        h.update(f"{name}\0{label}\0{size}\0{mtime}\n".encode())
    return {"sha256": h.hexdigest(), "of": f"path, label, size and mtime of {len(listing)} files"}


def array_fingerprint(images: np.ndarray, labels: np.ndarray) -> dict:
    h = hashlib.sha256()
    h.update(repr((tuple(images.shape), str(images.dtype))).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return {"sha256": h.hexdigest(),
            "of": f"bytes, shape {tuple(images.shape)} and dtype {images.dtype} of the images, and the labels"}


def dataset_fingerprint(dataset) -> dict:
    """The dataset's own fingerprint(), else its type, length and labels (`targets`, if it has them)."""
    own = getattr(dataset, "fingerprint", None)
    if callable(own):
        return own()
    h = hashlib.sha256(f"{type(dataset).__qualname__}\0{len(dataset)}\0".encode())
    h.update(repr(getattr(dataset, "classes", None)).encode())
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        targets = targets.cpu() if isinstance(targets, torch.Tensor) else targets
        h.update(np.asarray(targets, dtype=np.int64).tobytes())
    labels = "labels (targets)" if targets is not None else "no labels (no targets attribute)"
    return {"sha256": h.hexdigest(), "of": f"type {type(dataset).__name__}, length {len(dataset)} and {labels}; "
                                         "the images of a Dataset are not read, so changes to them go unseen"}


def state_sha256(module: torch.nn.Module) -> str:
    """A digest of a network's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def describe_listing_change(then: list, now: list, shown: int = 3) -> str:
    """What differs between two folder listings, e.g. "1 file changed: a/3.png (size 1234 -> 1300)"."""
    old = {name: rest for name, *rest in then}
    new = {name: rest for name, *rest in now}
    changed = [f"{n} ({_difference(old[n], new[n])})" for n in sorted(old.keys() & new.keys()) if old[n] != new[n]]
    parts = [(changed, "changed"), (sorted(new.keys() - old.keys()), "added"),
             (sorted(old.keys() - new.keys()), "removed")]
    return "; ".join(f"{len(names)} file{'s' if len(names) > 1 else ''} {what}: "
                     + ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")
                     for names, what in parts if names)


def _difference(a: list, b: list) -> str:
    (la, sa, _), (lb, sb, _) = a, b
    if la != lb:
        return f"label {la} -> {lb}"
    if sa != sb:
        return f"size {sa} -> {sb}"
    return "modified: mtime changed"
