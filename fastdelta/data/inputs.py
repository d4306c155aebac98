"""Turn whatever the user passed as train/test data into Datasets with one class mapping.

Accepted forms for each split: a folder path, a torch Dataset, or an (x, y)
tuple of arrays. Everything is resolved and validated here, before training
starts, so mistakes surface as a clear DataError rather than mid-epoch.
"""

from __future__ import annotations

import copy
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from tqdm import tqdm

from ..output_files import RUN_MARKER, OutputError
from .arrays import ArrayDataset
from .errors import DataError
from .fingerprint import LISTING_LIMIT, dataset_fingerprint
from .folder import ImageListDataset, is_image_file, scan_image_folder, to_rgb
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
    # the validation set (centre crop): `val`, or the part of the training data `val_fraction` held out
    val: torch.utils.data.Dataset | None = None


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
        self.num_classes: int | None = None  # set once the classes are known: labels are checked against it
        self.first_shape: tuple | None = None  # item 0's image shape: a batch needs one shape

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
        if self.first_shape is not None and tuple(img.shape) != self.first_shape and index != 0:
            raise DataError(f"{self.split} dataset item {index}: image of shape {tuple(img.shape)}, but item 0's is "
                            f"{self.first_shape}; every item must come out with one shape to be batched")
        return img, _label(label, self.split, index, self.num_classes)


def _finite(t: torch.Tensor) -> bool:
    """Whether every value is finite: the sum is (one pass, ~10x faster than isfinite().all() on an
    image); only a sum that overflows from finite values needs the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _label(label, split: str, index: int, num_classes: int | None = None) -> int:
    """A Dataset item's label as a class index: an integer (int, numpy or 0-d tensor) in range; a float
    or a string would otherwise be truncated by int() or fail inside it without naming the item."""
    value = label
    one = isinstance(value, torch.Tensor) and value.numel() == 1 or isinstance(value, np.ndarray) and value.size == 1
    if one or isinstance(value, np.generic):
        value = value.item()  # a one-element tensor or array, a numpy scalar: its Python number
    if not isinstance(value, int) or isinstance(value, bool):
        shown = f"{label!r} ({type(label).__name__})"
        raise DataError(f"{split} dataset item {index}: label {shown} is not an integer class index; labels must "
                        "be integers 0..K-1 (map class names or floats to them, e.g. with np.unique(y, "
                        "return_inverse=True)[1])")
    if value < 0 or (num_classes is not None and value >= num_classes):
        raise DataError(f"{split} dataset item {index}: label {value} is out of range for the {num_classes} "
                        f"classes (labels 0..{num_classes - 1})" if num_classes is not None else
                        f"{split} dataset item {index}: label {value} is negative; labels must be 0..K-1")
    return value


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
        values = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
        if values.dtype.kind not in "iu":  # floats would be truncated by the int64 cast, strings fail in it
            flat = values.reshape(-1).tolist()
            bad = next((i for i, v in enumerate(flat) if not (isinstance(v, int) and not isinstance(v, bool))), 0)
            raise DataError(f"{split} dataset's targets: item {bad} has label {flat[bad]!r} (dtype {values.dtype}), "
                            "not an integer class index; labels must be integers 0..K-1")
        return values.astype(np.int64)
    labels = [
        _label(_unpack_item(dataset[i], split, i)[1], split, i)
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
    # fail now, not inside a DataLoader worker, if items have the wrong form
    adapter.first_shape = tuple(adapter[0][0].shape)
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


def check_output_outside_data(out, train, test=None) -> None:
    """An OutputError, before anything is written, when output folder `out` is an image folder's root
    (train or test: its checkpoints/ would be read as a class) or one of its class folders (the run's
    marker, written before the data is scanned, would take that class out of this and every later fit).
    A new folder beside the classes, or below one, is fine: the scan skips folders holding the marker."""
    if out is None:
        return
    train_root, default_test = _split_dataset_root(train)
    roots = [("training", train_root), ("test", test if test is not None else default_test)]
    target = Path(os.path.realpath(out))
    for role, root in roots:
        if not isinstance(root, (str, os.PathLike)) or not Path(root).is_dir():
            continue
        real = Path(os.path.realpath(root))
        if target == real:
            raise OutputError(f"output folder {out} is the {role} data folder {root} itself: the run's files "
                              "there would be read as data by the next fit (its checkpoints/ as a class); "
                              "choose an output folder outside the data", errno.EINVAL)
        if target.parent == real and target.is_dir() and _holds_data(target):
            raise OutputError(f"output folder {out} is the class folder {target.name!r} of the {role} data folder "
                              f"{root}: the run's marker ({RUN_MARKER}) would take that class out of this and every "
                              "later fit on the folder; choose an output folder outside the data", errno.EINVAL)


def _holds_data(folder: Path) -> bool:
    """Whether a folder inside an image folder's root is data: a class folder (no run marker), or one
    holding images beside a run's own files."""
    if not (folder / RUN_MARKER).is_file():
        return not folder.name.startswith(".")
    return any(is_image_file(e.name) and e.name != "history.png" for e in os.scandir(folder))


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


def _check_two_classes(part: _Split, classes: list[str], source) -> None:
    """One class trains a one-output head whose softmax is always 1: 100% top-1 that says nothing."""
    if len(classes) >= 2:
        return
    kind = part.description["kind"]
    where = {"folder": f"train folder {source} has one class folder ({classes[0]!r})",
             "arrays": f"train labels (arrays) hold one class ({classes[0]!r})"}.get(
        kind, f"train dataset ({part.description.get('type')}) holds one class ({classes[0]!r})")
    raise DataError(f"{where}: classification needs at least two classes (one class trains to 100% top-1 and "
                    "learns nothing); give the training data with two or more classes")


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
    val=None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> DataBundle:
    """Resolve the train/test inputs into datasets with the train/eval transforms applied.

    `train` may be a folder of class folders, a folder with train/ (and
    optionally test/, used when `test` is None), a torch Dataset, or an (x, y)
    tuple. `test` takes the same forms; a test folder is indexed with the
    training class mapping so labels agree. Test images that are training images too are a
    DataError unless `allow_overlap` (data/overlap.py); the description counts them either way.
    A validation set: `val` (the same forms), or a stratified part of `train` (`val_fraction`, seeded by
    `seed`) held out before anything else reads it (data/validation.py); `train` and `train_eval` are the rest.
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
    _check_two_classes(train_part, classes, train)  # after the test argument's own errors
    overlap = _overlap(train_part, test_part, allow_overlap)
    for part in (train_part, test_part):
        if part is not None and isinstance(part.dataset, UserDatasetAdapter):
            part.dataset.num_classes = len(classes)  # a label out of range is named where it is read

    skipped = train_part.skipped + (test_part.skipped if test_part else [])
    train_description, train_listing = _describe(train_part, len(classes)), _listing(train_part)  # as given
    from .validation import validation_part
    train_part, val_part, val_description = validation_part(
        train_part, val, val_fraction, seed, classes, strict, build_center_transform(augmentation, resize, crop),
        train_tf)
    skipped += val_part.skipped if val is not None else []
    train_eval = copy.copy(train_part.dataset)  # same images and labels, deterministic view
    train_eval.transform = build_center_transform(augmentation, resize, crop)
    return DataBundle(
        train_eval=train_eval,
        train=train_part.dataset,
        test=test_part.dataset if test_part else None,
        classes=classes,
        skipped=skipped,
        val=val_part.dataset if val_part else None,
        listings={"train": train_listing, "test": _listing(test_part)},
        description={
            "train": train_description,
            "test": _describe(test_part, len(classes)) if test_part else None,
            "classes": classes,
            "num_classes": len(classes),
            "num_skipped": len(skipped),
            "overlap": overlap,
            "augmentation": augmentation,
            "resize": resize,
            "crop": crop,
            **({"val": val_description} if val_description is not None else {}),
        },
    )
