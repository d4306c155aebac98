"""Images to predict, in any form a user has them (a PIL image, paths, a folder, an array batch), turned
into one Dataset of transformed tensors plus the path of each image where it has one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from ..data.arrays import ArrayDataset
from ..data.errors import DataError
from ..data.folder import IMAGE_EXTENSIONS, is_image_file, load_rgb, to_rgb
from .errors import InputError


class ImageItems(torch.utils.data.Dataset):
    """PIL images and image paths, loaded when read (a folder of thousands is not held in memory);
    yields (transform(image), -1): no label, the loader's collate still wants one."""

    def __init__(self, items: list, transform: Callable):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        if isinstance(item, Image.Image):
            return self.transform(to_rgb(item)), -1
        try:
            image = load_rgb(item)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for a bad file
            raise InputError(f"image {item} cannot be read ({type(e).__name__}: {e})", item) from e
        return self.transform(image), -1


def resolve_inputs(inputs, transform: Callable) -> tuple:
    """(dataset, paths): `paths[i]` is image i's file, None for an image given in memory.

    inputs: a PIL image; a path to an image or to a folder (its image files, recursively, sorted); a list
    of paths and PIL images; or an image batch as fit takes arrays: uint8 (N,H,W[,C]) or float (N,C,H,W)
    in [0, 1], numpy or torch. Arrays are raw images: they go through the run's transform."""
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        return _array_inputs(inputs, transform)
    if isinstance(inputs, (str, os.PathLike, Image.Image)):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)):
        raise InputError(f"cannot predict on a {type(inputs).__name__}: give a PIL image, image paths, a folder "
                         "or an image array batch")
    items = [item for given in inputs for item in _expand(given)]
    if not items:
        raise InputError("no images to predict: the list is empty")
    paths = [None if isinstance(item, Image.Image) else str(item) for item in items]
    return ImageItems(items, transform), paths


def _expand(item) -> list:
    """One given item as the images it stands for: a folder's image files, a file, a PIL image."""
    if isinstance(item, Image.Image):
        return [item]
    if not isinstance(item, (str, os.PathLike)):
        raise InputError(f"cannot predict on a {type(item).__name__} in the list: give paths or PIL images")
    path = Path(item)
    if path.is_dir():
        return _folder_images(path)
    if not path.exists():
        raise InputError(f"image {path} does not exist", path)
    return [path]


def _folder_images(folder: Path) -> list:
    """The image files below `folder` (hidden files and folders skipped), sorted by path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / name for name in files if is_image_file(name))
    if not found:
        raise InputError(f"folder {folder} holds no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
                         "in its subfolders too)", folder)
    return sorted(found)


def _array_inputs(x, transform: Callable) -> tuple:
    try:
        dataset = ArrayDataset(x, np.zeros(len(x), dtype=np.int64), transform, name="predict")
    except (DataError, TypeError) as e:
        raise InputError(str(e)) from e
    return dataset, [None] * len(dataset)
