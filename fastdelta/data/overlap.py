"""Test images that are also training images: they inflate test accuracy without a word.

Found between two image folders (the same real file: one path, a hard link or a symlink, seen by
device and inode; or the same bytes: files of equal size are hashed, each once) and between two
arrays (identical images). Other pairs (a Dataset on either side, a folder against arrays) are not
checked, and the record says so. Of files of equal size only the first 4 KiB are read, unless those
agree too: a folder of JPEGs, where sizes often collide, is not read whole.
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from typing import Optional

import numpy as np

from .arrays import ArrayDataset
from .errors import DataError
from .folder import ImageListDataset

SHOWN = 3  # overlapping pairs named in the error


def find_overlap(train, test) -> dict:
    """{"images": test items that are training items too (None: not checked), "how", "pairs": a few
    (train, test) names}."""
    if isinstance(train, ImageListDataset) and isinstance(test, ImageListDataset):
        pairs = _folder_pairs([p for p, _ in train.samples], [p for p, _ in test.samples])
        how = "same file (inode) or same bytes"
    elif isinstance(train, ArrayDataset) and isinstance(test, ArrayDataset):
        pairs = _array_pairs(train.images, test.images)
        how = "identical images"
    else:
        return {"images": None, "how": f"not checked: a {_kind(train)} and a {_kind(test)}"}
    return {"images": len(pairs), "how": how, "pairs": pairs[:SHOWN]}


def _kind(dataset) -> str:
    return type(getattr(dataset, "dataset", dataset)).__name__  # the user's Dataset, not its adapter


def check_overlap(overlap: dict, allow: bool) -> None:
    n = overlap["images"]
    if not n or allow:
        return
    shown = "; ".join(f"train {a} = test {b}" for a, b in overlap["pairs"])
    raise DataError(f"{n} test image{'s are' if n > 1 else ' is'} also in the training set ({overlap['how']}), "
                    f"e.g. {shown}{' ...' if n > len(overlap['pairs']) else ''}; that inflates the test accuracy: "
                    "remove them from one side, or pass allow_overlap=True (CLI: --allow-overlap) to go on")


def _folder_pairs(train_paths: list, test_paths: list) -> list:
    by_inode, by_size = {}, defaultdict(list)
    for path in train_paths:
        st = os.stat(path)
        by_inode.setdefault((st.st_dev, st.st_ino), path)
        by_size[st.st_size].append(path)
    digests = _Digests()
    pairs = []
    for path in test_paths:
        st = os.stat(path)
        same = by_inode.get((st.st_dev, st.st_ino))
        if same is None and st.st_size in by_size:  # sizes first: only equal sizes are read
            same = digests.match(path, by_size[st.st_size])
        if same is not None:
            pairs.append((same, path))
    return pairs


class _Digests:
    """SHA-256 of file bytes, each file read at most once: first of its first 4 KiB, then, only when
    those match another file's, of all of it."""

    HEAD = 4096

    def __init__(self):
        self.heads: dict = {}
        self.wholes: dict = {}

    def _digest(self, path: str, limit: Optional[int]) -> bytes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if limit is not None:
                h.update(f.read(limit))
            else:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return h.digest()

    def head(self, path: str) -> bytes:
        if path not in self.heads:
            self.heads[path] = self._digest(path, self.HEAD)
        return self.heads[path]

    def whole(self, path: str) -> bytes:
        if path not in self.wholes:
            self.wholes[path] = self._digest(path, None)
        return self.wholes[path]

    def match(self, path: str, candidates: list) -> Optional[str]:
        """The first candidate (all of the same size as `path`) with the same bytes, if any."""
        same_start = [c for c in candidates if self.head(c) == self.head(path)]
        if not same_start or os.path.getsize(path) <= self.HEAD:
            return same_start[0] if same_start else None
        return next((c for c in same_start if self.whole(c) == self.whole(path)), None)


def _array_pairs(train: np.ndarray, test: np.ndarray) -> list:
    """(train index, test index) of identical images (same shape and bytes)."""
    seen = {}
    for i, img in enumerate(train):
        seen.setdefault(hashlib.blake2b(img.tobytes(), digest_size=16).digest(), i)
    pairs = []
    for j, img in enumerate(test):
        i = seen.get(hashlib.blake2b(img.tobytes(), digest_size=16).digest())
        if i is not None and train[i].shape == img.shape and np.array_equal(train[i], img):
            pairs.append((f"image {i}", f"image {j}"))
    return pairs
