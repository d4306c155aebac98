"""Train/eval image transforms: the paper's recipe ("default") and an improved variant."""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENTATIONS = ("default", "improved")


class _StackCrops:
    """Turn TenCrop's tuple of PIL crops into one normalized (10,C,H,W) tensor.

    A class rather than a lambda so the transform pickles into DataLoader
    workers under the spawn start method.
    """

    def __init__(self, normalize: T.Normalize):
        self.to_tensor = T.ToTensor()
        self.normalize = normalize

    def __call__(self, crops) -> torch.Tensor:
        return torch.stack([self.normalize(self.to_tensor(c)) for c in crops])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.normalize!r})"


def _check_sizes(resize: int, crop: int) -> None:
    if resize < 1 or crop < 1:
        raise ValueError(f"resize and crop must be positive, got resize={resize}, crop={crop}")
    if crop > resize:
        raise ValueError(f"crop ({crop}) must not be larger than resize ({resize})")


def build_transforms(
    augmentation: str = "default",
    resize: int = 256,
    crop: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[T.Compose, T.Compose]:
    """Return (train_tf, eval_tf) mapping a PIL RGB image to a normalized tensor.

    "default" follows the paper: squash to resize x resize, random crop + flip
    for training, centre crop for evaluation. "improved" keeps the aspect ratio
    (short side -> resize) and evaluates on ten crops, giving (10,3,crop,crop).
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {list(AUGMENTATIONS)}, got {augmentation!r}")
    _check_sizes(resize, crop)
    normalize = T.Normalize(mean, std)

    if augmentation == "default":
        resize_tf = T.Resize((resize, resize))  # squash: the paper ignores aspect ratio
        eval_tail = [T.CenterCrop(crop), T.ToTensor(), normalize]
    else:
        resize_tf = T.Resize(resize)  # short side, aspect ratio kept
        eval_tail = [T.TenCrop(crop), _StackCrops(normalize)]

    train_tf = T.Compose([resize_tf, T.RandomCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    eval_tf = T.Compose([resize_tf, *eval_tail])
    return train_tf, eval_tf


def build_center_transform(
    augmentation: str = "default",
    resize: int = 256,
    crop: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """One deterministic centre crop with the augmentation's resize rule (for the attention pass,
    which needs one view per training image even under the 10-crop "improved" protocol)."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {list(AUGMENTATIONS)}, got {augmentation!r}")
    _check_sizes(resize, crop)
    resize_tf = T.Resize((resize, resize)) if augmentation == "default" else T.Resize(resize)
    return T.Compose([resize_tf, T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)])


def is_ten_crop(batch) -> bool:
    """True for an eval batch of multi-crop images, shaped (B, n_crops, C, H, W)."""
    return isinstance(batch, torch.Tensor) and batch.dim() == 5
