"""Dataset over in-memory image arrays (numpy or torch) that yields PIL RGB images.

Items are turned into PIL images so arrays go through exactly the same
resize/crop/normalize transforms as image folders.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from .errors import DataError
from .fingerprint import array_fingerprint

_ACCEPTED_SHAPES = (
    "uint8 (N,H,W) grayscale, uint8 (N,H,W,3) or (N,H,W,1), "
    "or float (N,C,H,W) in [0,1] with C in {1,3}"
)


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _images_to_uint8_hwc(x: np.ndarray, name: str) -> np.ndarray:
    """Validate image array `x`; return uint8 (N,H,W) or (N,H,W,3) ready for Image.fromarray."""
    if x.dtype == np.uint8:
        if x.ndim == 3:
            return x
        if x.ndim == 4 and x.shape[-1] == 3:
            return x
        if x.ndim == 4 and x.shape[-1] == 1:
            return x[..., 0]
    elif x.dtype.kind == "f" and x.ndim == 4 and x.shape[1] in (1, 3):
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            shown = f"{bad[:5].tolist()}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise DataError(f"{name} images: float images contain NaN or infinity (items {shown})")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{name} images: float images must be in [0,1], got values in [{lo:g}, {hi:g}]")
        # Quantise once up front: 4x less memory than float32 and the same
        # 8-bit input a decoded image file would give.
        hwc = np.round(np.moveaxis(x, 1, -1) * 255.0).astype(np.uint8)
        return hwc[..., 0] if hwc.shape[-1] == 1 else hwc
    raise DataError(f"{name} images: expected {_ACCEPTED_SHAPES}; got shape {tuple(x.shape)} dtype {x.dtype}")


def _check_not_one_image(x: np.ndarray, name: str) -> None:
    """An unbatched (H, W, 3) image would otherwise be read as H grey images of width 3, and trained
    on as such when H labels are given: (N, H, W) with W of 3 or 4 is taken for one colour image."""
    if x.ndim == 3 and x.shape[-1] in (3, 4):
        raise DataError(
            f"{name} images has shape {tuple(x.shape)} (H, W, C): that looks like one colour image; "
            f"pass a batch (N, H, W, C), e.g. x[None] for a single image, or grey images of width "
            f"{x.shape[-1]} as (N, H, W, 1)"
        )


def _validate_labels(y: np.ndarray, n_images: int, name: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{name} labels: expected a 1-D array of class indices, got shape {tuple(y.shape)}")
    if y.dtype.kind not in "iu":
        raise DataError(f"{name} labels: expected integer class indices, got dtype {y.dtype} (cast with .astype(int))")
    if len(y) != n_images:
        raise DataError(f"{name} labels: got {len(y)} labels for {n_images} images")
    if len(y) and y.min() < 0:
        raise DataError(f"{name} labels: class indices must be >= 0, got {int(y.min())}")
    return y.astype(np.int64)


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory images `x` with integer labels `y`; yields (transform(PIL RGB image), label).

    `name` (e.g. "train", "test") only prefixes error messages.
    """

    def __init__(self, x, y, transform: Callable | None = None, *, name: str = "array"):
        x_np = _as_numpy(x)
        if x_np.ndim == 0 or len(x_np) == 0:
            raise DataError(f"{name} images: expected a non-empty array, got shape {tuple(x_np.shape)}")
        y_np = _as_numpy(y)
        _check_not_one_image(x_np, name)
        self.images = np.ascontiguousarray(_images_to_uint8_hwc(x_np, name))
        self.targets = _validate_labels(y_np, len(self.images), name)
        self.transform = transform
        self._fingerprint = None

    def fingerprint(self) -> dict:
        """SHA-256 of the images (as trained on: uint8) and labels; computed once."""
        if self._fingerprint is None:
            self._fingerprint = array_fingerprint(self.images, self.targets)
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).convert("RGB")
        return (self.transform(img) if self.transform is not None else img), int(self.targets[index])
