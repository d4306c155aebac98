"""A run's eval transform, made by the call fit's test set gets it from (data.inputs.resolve_data), so
images are resized, cropped and normalised exactly as the run's test images were."""
from __future__ import annotations

from torchvision import transforms as T

from ..data.transforms import build_transforms
from .record import RunRecord


def eval_transform(record: RunRecord) -> T.Compose:
    """PIL RGB image -> (3, crop, crop) tensor, or (10, 3, crop, crop) for the "improved" 10-crop protocol."""
    return build_transforms(record.augmentation, record.resize, record.crop)[1]


def normalisation(transform: T.Compose) -> tuple:
    """(mean, std) of the transform's Normalize: read from the transform itself, so a description of it
    (an export's sidecar) cannot disagree with what it does."""
    for step in transform.transforms:
        norm = step if isinstance(step, T.Normalize) else getattr(step, "normalize", None)
        if isinstance(norm, T.Normalize):
            return [float(m) for m in norm.mean], [float(s) for s in norm.std]
    raise ValueError(f"no Normalize step in {transform!r}")


def describe_transform(record: RunRecord, transform: T.Compose) -> dict:
    """Everything another program needs to preprocess images as the run did, JSON-ready."""
    mean, std = normalisation(transform)
    ten_crop = record.augmentation == "improved"
    return {"augmentation": record.augmentation, "resize": record.resize, "crop": record.crop,
            "resize_rule": ("short side to resize, aspect ratio kept" if ten_crop
                            else "squash to resize x resize (aspect ratio not kept)"),
            "crops": ("10 (TenCrop: corners and centre, and their flips; average the softmax over them)"
                      if ten_crop else "1 (centre crop)"),
            "mean": mean, "std": std, "input": "RGB, scaled to [0, 1], then (x - mean) / std; NCHW float32",
            "repr": repr(transform)}
