"""The comparison's data: its test split, its training root, and the validation data the search carves
from the training set (one stratified holdout, or K stratified folds), never from the test set."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ...data.errors import DataError
from ...data.fingerprint import dataset_fingerprint
from ...settings import SettingsError
from .compare_settings import CompareSettings

def stratified_split(labels: np.ndarray, fraction: float, seed: int):
    """(fit indices, validation indices): `fraction` of each class (at least one image, and at least
    one left to train on) goes to validation."""
    rng = np.random.default_rng(seed)
    fit_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < 2:
            raise DataError(f"class {c} has {len(idx)} training image(s); the validation split needs at least 2 "
                            "per class (or use search='none')")
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        val_idx += idx[:k].tolist()
        fit_idx += idx[k:].tolist()
    return np.sort(fit_idx), np.sort(val_idx)


class LabelledSubset(torch.utils.data.Dataset):
    """Part of the raw training data, keeping class names and labels so fit sees the same classes."""

    def __init__(self, base, indices, classes, labels):
        self.base, self.indices, self.classes = base, list(indices), list(classes)
        self.targets = [int(labels[i]) for i in self.indices]
        self._fingerprint = None

    def fingerprint(self) -> dict:
        """The base data's fingerprint with the indices and labels taken from it (computed once)."""
        if self._fingerprint is None:
            base = dataset_fingerprint(self.base)
            h = hashlib.sha256(base["sha256"].encode())
            h.update(np.asarray(self.indices, dtype=np.int64).tobytes())
            h.update(np.asarray(self.targets, dtype=np.int64).tobytes())
            self._fingerprint = {"sha256": h.hexdigest(), "of": f"{len(self)} items of: {base['of']}"}
        return self._fingerprint

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


def stratified_folds(labels: np.ndarray, folds: int, seed: int):
    """[(fit indices, validation indices)] for K-fold cross-validation: each class's images, shuffled
    with `seed`, are dealt into K parts of near-equal size; fold k validates on part k of every class."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(folds)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < folds:
            raise DataError(f"class {c} has {len(idx)} training image(s); {folds}-fold cross-validation needs at "
                            f"least {folds} per class (use fewer folds or search='none')")
        for k, chunk in enumerate(np.array_split(idx, folds)):
            parts[k] += chunk.tolist()
    everything = np.arange(len(labels))
    return [(np.setdiff1d(everything, part), np.sort(part)) for part in parts]


def raw_train(train):
    """The user's training data as (raw dataset or arrays, labels, class names), untransformed."""
    if isinstance(train, tuple):
        x, y = train
        y = np.asarray(y, dtype=np.int64)
        return train, y, [str(i) for i in range(int(y.max()) + 1)]
    from ...data.folder import ImageListDataset, scan_image_folder
    from ...data.inputs import _dataset_labels, _split_dataset_root
    if isinstance(train, (str, os.PathLike)):
        root, _ = _split_dataset_root(train)
        index = scan_image_folder(root, role="train folder")
        ds = ImageListDataset(index.samples, None)
        return ds, np.asarray(ds.targets, dtype=np.int64), index.classes
    labels = _dataset_labels(train, "train")
    names = getattr(train, "classes", None)
    return train, labels, [str(c) for c in names] if names is not None else [str(i) for i in range(labels.max() + 1)]


def parts_of(raw, labels, classes, fit_idx, val_idx):
    if isinstance(raw, tuple):
        x, _ = raw
        return (x[fit_idx], labels[fit_idx]), (x[val_idx], labels[val_idx])
    return LabelledSubset(raw, fit_idx, classes, labels), LabelledSubset(raw, val_idx, classes, labels)


def validation_split(train, fraction: float, seed: int):
    """(fit part, validation part) of the training data, stratified per class."""
    raw, labels, classes = raw_train(train)
    return parts_of(raw, labels, classes, *stratified_split(labels, fraction, seed))


def validation_splits(train, cs: CompareSettings, seed: int):
    """The search's (fit part, validation part) pairs: one holdout, or cs.folds cross-validation folds."""
    raw, labels, classes = raw_train(train)
    if cs.folds == 1:
        return [parts_of(raw, labels, classes, *stratified_split(labels, cs.val_fraction, seed))]
    return [parts_of(raw, labels, classes, f, v) for f, v in stratified_folds(labels, cs.folds, seed)]


def split_size(part) -> int:
    return len(part[1]) if isinstance(part, tuple) else len(part)


def test_data(train, test):
    """The test split compare evaluates on: `test`, or DATA/test for a folder with train/ and test/."""
    if test is not None:
        return test
    if isinstance(train, (str, os.PathLike)) and (Path(train) / "test").is_dir():
        return Path(train) / "test"
    raise SettingsError("compare needs a test set (test=..., or a DATA folder with train/ and test/)")


def train_root(train):
    if isinstance(train, (str, os.PathLike)) and (Path(train) / "train").is_dir():
        return Path(train) / "train"
    return train
