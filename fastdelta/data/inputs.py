"""Turn whatever the user passed as train/test data into Datasets with one class mapping.

Accepted forms for each split: a folder path, a torch Dataset, or an (x, y)
tuple of arrays. Everything is resolved and validated here, before training
starts, so mistakes surface as a clear DataError rather than mid-epoch.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from tqdm import tqdm

from .arrays import ArrayDataset
from .errors import DataError
from .fingerprint import LISTING_LIMIT, dataset_fingerprint
from .folder import ImageListDataset, scan_image_folder, to_rgb
from .overlap import check_overlap, find_overlap
from .transforms import build_center_transform, build_transforms


def fingerprint_of(source) -> dict:
    """The fingerprint fit records for `source` given as an (x, y) tuple or a Dataset."""
    if isinstance(source, tuple):
        return ArrayDataset(*source).fingerprint()
    return dataset_fingerprint(source)


@dataclass
class DataBundle:
    """Ready-to-use datasets plus what a run log needs to describe them."""

    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset | None
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    description: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable
    train_eval: torch.utils.data.Dataset | None = None  # training images, one centre crop each (attention)
    # per split, an image folder's [[path, label, size, mtime_ns]] (None: not a folder, or too many files):
    # kept with checkpoints so that a resume can name the files that changed
    listings: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Split:
    """One resolved split before the class mapping is settled."""

    dataset: torch.utils.data.Dataset
    classes: list[str] | None  # names the source itself declares, if any
    labels: np.ndarray | None  # known without decoding images, if cheap
    skipped: list[tuple[str, str]]
    description: dict[str, Any]


class UserDatasetAdapter(torch.utils.data.Dataset):
    """Wrap a user Dataset: PIL images get the split's transform, CHW tensors pass through.

    Tensors are assumed to be already preprocessed by the user, so they are
    not transformed a second time.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, transform: Callable | None, split: str):
        self.dataset = dataset
        self.transform = transform
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self) -> dict:
        return dataset_fingerprint(self.dataset)

    def __getitem__(self, index: int):
        img, label = _unpack_item(self.dataset[index], self.split, index)
        if isinstance(img, Image.Image):
            img = to_rgb(img)  # ImageNet-pretrained models expect 3 channels
            if self.transform is not None:
                img = self.transform(img)
        elif not (isinstance(img, torch.Tensor) and img.dim() == 3):
            shape = f" of shape {tuple(img.shape)}" if isinstance(img, torch.Tensor) else ""
            raise DataError(
                f"{self.split} dataset item {index}: expected a PIL image or a CHW tensor, "
                f"got {type(img).__name__}{shape}"
            )
        elif img.is_floating_point() and not _finite(img):
            # checked as read: a NaN input would otherwise surface as a non-finite loss, i.e. as a
            # divergence of the training
            raise DataError(f"{self.split} dataset item {index}: the image tensor holds NaN or infinite values "
                            "(bad input data, not a divergence of the training)")
        return img, int(label)


def _finite(t: torch.Tensor) -> bool:
    """Whether every value is finite: the sum is (one pass, ~10x faster than isfinite().all() on an
    image); only a sum that overflows from finite values needs the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _unpack_item(item, split: str, index: int):
    try:
        img, label = item
    except (TypeError, ValueError):
        raise DataError(f"{split} dataset item {index}: expected an (image, label) pair, got {type(item).__name__}") from None
    return img, label


def _dataset_labels(dataset: torch.utils.data.Dataset, split: str) -> np.ndarray:
    """Labels of a generic Dataset: its `targets` if present, else one pass over the items."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
    labels = [
        int(_unpack_item(dataset[i], split, i)[1])
        for i in tqdm(range(len(dataset)), desc=f"reading {split} labels", disable=True if len(dataset) < 500 else None)
    ]
    return np.asarray(labels, dtype=np.int64)


def _folder_split(root, split, transform, classes, strict) -> _Split:
    index = scan_image_folder(root, classes=classes, strict=strict, role=f"{split} folder")
    labels = np.asarray([label for _, label in index.samples], dtype=np.int64)
    return _Split(
        dataset=ImageListDataset(index.samples, transform, root=root),
        classes=index.classes,
        labels=labels,
        skipped=index.skipped,
        description={"kind": "folder", "root": str(Path(root).resolve())},
    )


def _array_split(source: tuple, split, transform) -> _Split:
    if len(source) != 2:
        raise DataError(f"{split}: expected an (x, y) tuple of arrays, got a tuple of length {len(source)}")
    dataset = ArrayDataset(*source, transform=transform, name=split)
    return _Split(dataset, None, dataset.targets, [], {"kind": "arrays"})


def _dataset_split(dataset, split, transform) -> _Split:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise DataError(f"{split}: IterableDataset is not supported; pass a map-style Dataset with __len__ and __getitem__")
    if len(dataset) == 0:
        raise DataError(f"{split}: the {type(dataset).__name__} dataset is empty")
    adapter = UserDatasetAdapter(dataset, transform, split)
    adapter[0]  # fail now, not inside a DataLoader worker, if items have the wrong form
    names = getattr(dataset, "classes", None)
    targets = getattr(dataset, "targets", None)
    return _Split(
        dataset=adapter,
        classes=[str(c) for c in names] if names is not None else None,
        labels=_dataset_labels(dataset, split) if targets is not None else None,
        skipped=[],
        description={"kind": "dataset", "type": type(dataset).__name__},
    )


def _resolve_split(source, split: str, transform, classes: list[str] | None, strict: bool) -> _Split:
    if isinstance(source, (str, os.PathLike)):
        return _folder_split(source, split, transform, classes, strict)
    if isinstance(source, tuple):
        return _array_split(source, split, transform)
    if isinstance(source, torch.utils.data.Dataset):
        return _dataset_split(source, split, transform)
    raise DataError(
        f"{split}: expected a folder path, a torch Dataset or an (x, y) tuple of arrays, got {type(source).__name__}"
    )


def _split_dataset_root(train) -> tuple[Any, Path | None]:
    """ROOT with train/ (and maybe test/) subfolders -> (ROOT/train, ROOT/test or None)."""
    if isinstance(train, (str, os.PathLike)) and (Path(train) / "train").is_dir():
        test_dir = Path(train) / "test"
        return Path(train) / "train", test_dir if test_dir.is_dir() else None
    return train, None


def _train_classes(part: _Split) -> list[str]:
    """Class names: declared by the source, else "0".."max_label" from the labels."""
    if part.classes is not None:
        return part.classes
    if part.labels is None:
        part.labels = _dataset_labels(part.dataset.dataset, "train")
    _check_no_label_gaps(part.labels)
    return [str(i) for i in range(int(part.labels.max()) + 1)]


def _check_no_label_gaps(labels: np.ndarray) -> None:
    """Every index in 0..max(label) needs a training sample, as the folder loader requires of every
    class folder: an index without one would get an output unit that is never trained."""
    if not len(labels) or labels.min() < 0:
        return  # empty or negative labels are reported by _check_labels_fit / the dataset itself
    missing = np.flatnonzero(np.bincount(labels, minlength=int(labels.max()) + 1) == 0).tolist()
    if missing:
        shown = f"{missing[:10]}" + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        raise DataError(
            f"train labels have no sample for label(s) {shown} in 0..{int(labels.max())}, so those classes "
            f"would never be trained; relabel the classes to 0..K-1 "
            f"(e.g. y = np.unique(y, return_inverse=True)[1])"
        )


def _check_labels_fit(part: _Split, classes: list[str], split: str) -> None:
    if part.classes is not None and part.classes != classes:
        raise DataError(f"{split} classes {part.classes} differ from the training classes {classes}")
    if part.labels is not None and len(part.labels) and (part.labels.min() < 0 or part.labels.max() >= len(classes)):
        raise DataError(
            f"{split} labels range over [{int(part.labels.min())}, {int(part.labels.max())}] "
            f"but there are {len(classes)} classes {classes}"
        )
    _check_every_class(part, classes, split)


def _check_every_class(part: _Split, classes: list[str], split: str) -> None:
    """The image folder's rule for every form of data whose labels are known: each class has images
    (a class never trained gets an output unit at chance; one never tested is missing from the accuracy)."""
    if part.labels is None or not len(part.labels):
        return
    present = np.bincount(part.labels, minlength=len(classes)) > 0
    missing = [c for c, there in zip(classes, present) if not there]
    if missing:
        shown = f"{missing[:10]}" + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        raise DataError(f"{split} labels ({part.description['kind']}) have no images for classes {shown}; every "
                        f"class needs {split} images, as every class folder of an image folder does")


def _describe(part: _Split, num_classes: int) -> dict[str, Any]:
    info = dict(part.description, num_samples=len(part.dataset), num_skipped=len(part.skipped))
    if part.labels is not None:
        info["class_counts"] = np.bincount(part.labels, minlength=num_classes).tolist()
    info["fingerprint"] = dataset_fingerprint(part.dataset)
    return info


def _listing(part: _Split | None):
    ok = part is not None and isinstance(part.dataset, ImageListDataset) and len(part.dataset) <= LISTING_LIMIT
    return part.dataset.listing() if ok else None


def _overlap(train: _Split, test: _Split | None, allow: bool) -> dict[str, Any] | None:
    """Test items that are training items too; a DataError unless `allow`."""
    if test is None:
        return None
    overlap = find_overlap(train.dataset, test.dataset)
    check_overlap(overlap, allow)
    return {**overlap, "pairs": [list(p) for p in overlap.get("pairs", [])]}


def resolve_data(
    train,
    test=None,
    *,
    augmentation: str = "default",
    resize: int = 256,
    crop: int = 224,
    strict: bool = False,
    allow_overlap: bool = False,
) -> DataBundle:
    """Resolve the train/test inputs into datasets with the train/eval transforms applied.

    `train` may be a folder of class folders, a folder with train/ (and
    optionally test/, used when `test` is None), a torch Dataset, or an (x, y)
    tuple. `test` takes the same forms; a test folder is indexed with the
    training class mapping so labels agree. Test images that are training images too are a
    DataError unless `allow_overlap` (data/overlap.py); the description counts them either way.
    """
    train_tf, eval_tf = build_transforms(augmentation, resize, crop)  # validates sizes before any scanning
    train, default_test = _split_dataset_root(train)
    if test is None:
        test = default_test

    train_part = _resolve_split(train, "train", train_tf, None, strict)
    classes = _train_classes(train_part)
    _check_labels_fit(train_part, classes, "train")

    test_part = None
    if test is not None:
        test_part = _resolve_split(test, "test", eval_tf, classes, strict)
        _check_labels_fit(test_part, classes, "test")
    overlap = _overlap(train_part, test_part, allow_overlap)

    skipped = train_part.skipped + (test_part.skipped if test_part else [])
    train_eval = copy.copy(train_part.dataset)  # same images and labels, deterministic view
    train_eval.transform = build_center_transform(augmentation, resize, crop)
    return DataBundle(
        train_eval=train_eval,
        train=train_part.dataset,
        test=test_part.dataset if test_part else None,
        classes=classes,
        skipped=skipped,
        listings={"train": _listing(train_part), "test": _listing(test_part)},
        description={
            "train": _describe(train_part, len(classes)),
            "test": _describe(test_part, len(classes)) if test_part else None,
            "classes": classes,
            "num_classes": len(classes),
            "num_skipped": len(skipped),
            "overlap": overlap,
            "augmentation": augmentation,
            "resize": resize,
            "crop": crop,
        },
    )
