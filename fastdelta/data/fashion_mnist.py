"""Fashion-MNIST from the system-installed IDX files, plus seeded few-shot subsets."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzip-compressed if the name ends in .gz) into a native-endian array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    # Magic: two zero bytes, a type code, then the number of dimensions.
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: header says shape {shape} ({expected} bytes) but file has {len(data) - header} data bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_path(root: str | os.PathLike, split: str, kind: str) -> Path:
    path = Path(root) / f"{_SPLIT_PREFIX[split]}-{kind}-ubyte.gz"
    if not path.is_file():
        raise DataError(
            f"Fashion-MNIST file {path} not found; install the dataset as root with "
            "`apt-get update && apt-get install -y dataset-fashion-mnist`, or pass root=<dir with the IDX .gz files>"
        )
    return path


def load_fashion_mnist(split: str = "train", root: str | os.PathLike = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Return (x uint8 (N,28,28), y int64 (N,)) for split "train" (60k) or "test" (10k)."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    x = read_idx(_idx_path(root, split, "images-idx3"))
    y = read_idx(_idx_path(root, split, "labels-idx1"))
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"Fashion-MNIST {split} files in {root} are inconsistent: images {x.shape}, labels {y.shape}")
    return x.astype(np.uint8, copy=False), y.astype(np.int64)


def few_shot_subset(x, y, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick exactly `per_class` random examples of every class present in `y`.

    Output is ordered by class, then by original index, so a given seed always
    yields the same arrays regardless of how the sampler iterates.
    """
    if int(per_class) != per_class or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    y_np = np.asarray(y)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(y_np):
        idx = np.flatnonzero(y_np == cls)
        if len(idx) < per_class:
            raise DataError(f"class {cls} has only {len(idx)} examples, fewer than per_class={per_class}")
        chosen.append(np.sort(rng.choice(idx, size=int(per_class), replace=False)))
    keep = np.concatenate(chosen)
    return x[keep], y_np[keep]
