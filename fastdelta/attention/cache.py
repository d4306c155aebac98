"""On-disk cache of channel attention, keyed by what determines it: the network's weights (source
+ the seeded new head), the data the head trains on, the exact images and labels the ablation sees,
and the settings of head training and ablation. A second fit on the same inputs reads the file instead
of recomputing."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from PIL import Image

from ..data.inputs import UserDatasetAdapter, _unpack_item
from .weights import ChannelAttention

# settings that change the attention (alpha, beta, iterations of the main fit do not)
KEY_SETTINGS = ("layers", "attention_head_epochs", "attention_head_min_iterations", "lr", "momentum", "weight_decay", "batch_size", "seed",
                "attention_max_images", "attention_impl", "attention_dtype", "augmentation", "resize", "crop",
                "num_classes", "attention_head_bn", "attention_head_batch_size", "attention_augmented")


def cache_dir(setting: Optional[str]) -> Optional[Path]:
    if setting in (None, "off", ""):
        return None
    if setting == "auto":
        return Path(os.environ.get("FASTDELTA_CACHE", Path.home() / ".cache" / "fastdelta")) / "attention"
    return Path(setting)


def _update(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str((t.dtype, tuple(t.shape))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def head_data_digest(dataset) -> str:
    """A digest of the data the attention head trains on. A dataset's own fingerprint covers its
    contents (arrays: their bytes; image folders: each file's size and mtime) and is computed once per
    dataset; a plain torch Dataset's fallback fingerprint sees only its labels, so its items are read
    here instead: one pass, cheap beside the head's epochs over the same images."""
    inner = dataset.dataset if isinstance(dataset, UserDatasetAdapter) else dataset
    if callable(getattr(inner, "fingerprint", None)):
        return inner.fingerprint()["sha256"]
    h = hashlib.sha256(f"{type(inner).__qualname__}\0{len(inner)}\0".encode())
    for i in range(len(inner)):
        img, label = _unpack_item(inner[i], "train", i)
        _update_image(h, img)
        # the label as given: a bad one is the adapter's to report, when the head reads it
        h.update(f"\0{label.tolist() if hasattr(label, 'tolist') else label!r}\n".encode())
    return h.hexdigest()


def _update_image(h, img) -> None:
    if isinstance(img, Image.Image):
        h.update(f"{img.mode}{img.size}".encode())
        h.update(img.tobytes())
    elif isinstance(img, torch.Tensor):
        _update(h, img)
    else:  # the adapter refuses other items before the head trains; the key need only differ
        h.update(repr(img).encode())


def attention_key(model: nn.Module, head_data: str, batches: Sequence, settings: dict) -> str:
    """`head_data`: head_data_digest of the head's training set (the sampled images alone do not
    determine the head, so two sets that share them must not share an entry)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _update(h, t)
    h.update(f"head data {head_data}\0".encode())
    for x, y in batches:
        _update(h, x)
        _update(h, y)
    h.update(json.dumps({k: settings.get(k) for k in KEY_SETTINGS}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def load_cached(directory: Optional[Path], key: str) -> Optional[ChannelAttention]:
    """The cached attention for `key`, or None: missing, unreadable, or holding a NaN/inf loss
    increase (its weights would come out NaN or uniform), each of which is recomputed, never trusted."""
    if directory is None or not (directory / f"{key}.json").is_file():
        return None
    try:
        att = ChannelAttention.load(directory / f"{key}.json")
    except (ValueError, KeyError, TypeError, OSError):
        return None
    return att if all(torch.isfinite(r).all() for r in att.raw) else None


def store(directory: Optional[Path], key: str, attention: ChannelAttention) -> None:
    if directory is not None:
        attention.save(directory / f"{key}.json")
