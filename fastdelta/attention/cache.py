"""On-disk cache of channel attention, keyed by what determines it: the network's weights (source
+ the seeded new head), the exact images and labels the ablation sees, and the settings of head
training and ablation. A second fit on the same inputs reads the file instead of recomputing."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

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
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(str((t.dtype, t.numel())).encode())
    h.update(t.view(torch.uint8).numpy().tobytes())


def attention_key(model: nn.Module, batches: Sequence, settings: dict) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _update(h, t)
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
