"""A test set in any form fit takes one (an image folder, an (x, y) array pair, a torch Dataset), with
labels in the run's class order; classes the run does not know are a ClassMismatchError, not a wrong score."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch.utils.data

from ..data.arrays import ArrayDataset
from ..data.folder import ImageListDataset, scan_image_folder
from ..data.inputs import UserDatasetAdapter
from .errors import ClassMismatchError


def resolve_test_set(test, classes: list, transform: Callable, strict: bool = False):
    """(dataset of (transformed image, run label), description). A folder may hold a subset of the run's
    classes (their per-class accuracy is then None); its other folders are an error."""
    if isinstance(test, (str, os.PathLike)):
        return _folder(Path(test), classes, transform, strict)
    if isinstance(test, tuple):
        if len(test) != 2:
            raise ValueError(f"test: expected an (images, labels) pair, got a tuple of length {len(test)}")
        return ArrayDataset(*test, transform=transform, name="test"), {"kind": "arrays"}
    if isinstance(test, torch.utils.data.Dataset):
        declared = getattr(test, "classes", None)
        if declared is not None and [str(c) for c in declared] != classes:
            raise ClassMismatchError(f"the test {type(test).__name__} declares the classes {list(declared)}, the "
                                     f"run was fitted on {classes} (names and order must be the same)")
        return UserDatasetAdapter(test, transform, "test"), {"kind": "dataset", "type": type(test).__name__}
    raise ValueError(f"test: expected an image folder, an (images, labels) pair or a torch Dataset, got "
                     f"{type(test).__name__}")


def _folder(root: Path, classes: list, transform: Callable, strict: bool):
    """ROOT/<class>/<image>, indexed as fit indexes its test folder, labels mapped by class name."""
    index = scan_image_folder(root, strict=strict, role="test folder")
    unknown = [c for c in index.classes if c not in classes]
    if unknown:
        raise ClassMismatchError(f"test folder {root} has class folders {unknown} that the run was not fitted on; "
                                 f"its classes are {classes}", root)
    label_of = [classes.index(name) for name in index.classes]
    samples = [(path, label_of[label]) for path, label in index.samples]
    return (ImageListDataset(samples, transform, root=root),
            {"kind": "folder", "root": str(root.resolve()), "skipped": [list(s) for s in index.skipped]})
