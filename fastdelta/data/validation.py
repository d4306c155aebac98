"""The validation set of a fit: a separate folder / arrays / Dataset (`val`), or a stratified, seeded part of
the training data held out before training (`val_fraction`); the attention and the training then use only
the rest. Model selection and early stopping read this set, never the test set."""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import numpy as np
import torch.utils.data

from .arrays import ArrayDataset
from .errors import DataError
from .folder import ImageListDataset
from .inputs import UserDatasetAdapter, _check_labels_fit, _dataset_labels, _describe, _resolve_split, _Split


def stratified_indices(labels: np.ndarray, fraction: float, seed: int):
    """(training indices, validation indices), both sorted: round(fraction x n) images held out, spread over
    the classes in proportion to their sizes (largest remainders first, ties by class), chosen at random
    within each class (seeded); every class keeps at least one training image."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    counts = np.bincount(labels) if n else np.zeros(0, dtype=np.int64)
    wanted = int(round(fraction * n))
    if wanted < 1:
        raise DataError(f"val_fraction={fraction}: holds out no image of the {n} training images (round({fraction} "
                        f"x {n}) = 0); use a larger val_fraction, or give a validation set with val")
    quota = counts * wanted / n
    take = np.minimum(np.floor(quota).astype(np.int64), np.maximum(counts - 1, 0))
    order = sorted(range(len(counts)), key=lambda c: (-(quota[c] - np.floor(quota[c])), c))
    while take.sum() < wanted:
        grown = False
        for c in order:
            if take.sum() < wanted and take[c] < counts[c] - 1:
                take[c] += 1
                grown = True
        if not grown:  # every class is down to one training image
            break
    if take.sum() == 0:
        raise DataError(f"val_fraction={fraction}: every class has a single training image, so none can be held out "
                        "for validation; give a validation set with val")
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(labels == c))[:take[c]] for c in range(len(counts))]
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    return train_idx, val_idx


class _HeldItems(torch.utils.data.Subset):
    """Some items of a user Dataset, fingerprinted as the whole set's fingerprint with the indices."""

    def fingerprint(self) -> dict:
        import hashlib
        from .fingerprint import dataset_fingerprint
        h = hashlib.sha256(dataset_fingerprint(self.dataset)["sha256"].encode())
        h.update(np.asarray(self.indices, dtype=np.int64).tobytes())
        return {"sha256": h.hexdigest(), "of": "the whole dataset's fingerprint and the indices taken from it"}


def subset(dataset, indices, transform: Optional[Callable]):
    """Items `indices` of a resolved split's dataset, of the same kind (an image folder's stays one: DALI and
    the resume check read its samples), with `transform`."""
    indices = [int(i) for i in indices]
    if isinstance(dataset, ImageListDataset):
        return ImageListDataset([dataset.samples[i] for i in indices], transform, root=dataset.root)
    if isinstance(dataset, ArrayDataset):
        out = copy.copy(dataset)
        out.images, out.targets = dataset.images[indices], dataset.targets[indices]
        out.transform, out._fingerprint = transform, None
        return out
    if isinstance(dataset, UserDatasetAdapter):
        out = UserDatasetAdapter(_HeldItems(dataset.dataset, indices), transform, dataset.split)
        out.num_classes, out.first_shape = dataset.num_classes, dataset.first_shape
        return out
    raise TypeError(f"cannot take a validation part of a {type(dataset).__name__}")


def validation_part(train_part: _Split, val, fraction: float, seed: int, classes: list, strict: bool,
                    center_tf: Callable, train_tf: Callable):
    """(the training part left for training, the validation part or None, its description or None)."""
    if val is not None:
        part = _resolve_split(val, "val", center_tf, classes, strict)
        _check_labels_fit(part, classes, "val")
        if isinstance(part.dataset, UserDatasetAdapter):
            part.dataset.num_classes = len(classes)
        return train_part, part, {**_describe(part, len(classes)), "source": "val"}
    if not fraction:
        return train_part, None, None
    labels = train_part.labels
    if labels is None:
        labels = train_part.labels = _dataset_labels(train_part.dataset.dataset, "train")
    train_idx, val_idx = stratified_indices(labels, fraction, seed)
    kept = _Split(subset(train_part.dataset, train_idx, train_tf), train_part.classes, labels[train_idx],
                  train_part.skipped, train_part.description)
    held = _Split(subset(train_part.dataset, val_idx, center_tf), train_part.classes, labels[val_idx], [],
                  {"kind": "split of the training data", "val_fraction": fraction, "seed": seed})
    description: dict[str, Any] = {**_describe(held, len(classes)), "source": "val_fraction",
                                   "train_images_left": len(train_idx)}
    return kept, held, description
