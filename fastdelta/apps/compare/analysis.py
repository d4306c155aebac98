"""Measurements behind the paper's figures, on trained networks (used by `fastdelta compare`).

- filter_distances: per-filter Euclidean distance from the start point w*, grouped per stage (Fig. 5).
- attention_split_distances: the same distance for the regularised convs' low- and high-attention
  filters (the paper's claim that DELTA lets "unactivated" filters move further than L2-SP does).
- pick_low_activation_filters / activation_maps: min-max scaled feature maps of filters that are
  weakly active in the source network, for a few images (Fig. 6).
- curve_roughness: how jagged a learning curve is (Fig. 3's "smoother" claim, as a number).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn as nn

from ...features.hooks import FeatureTaps


def stage_of(model: nn.Module, param_name: str) -> str:
    """The stage a parameter belongs to: `layer3` for ResNet (a Sequential of blocks), `blocks.4`
    for timm EfficientNets (a Sequential of Sequentials), else the top-level module (`conv_stem`)."""
    parts = param_name.split(".")
    top = getattr(model, parts[0], None)
    if isinstance(top, nn.Sequential) and len(parts) > 2 and parts[1].isdigit():
        if isinstance(top[int(parts[1])], nn.Sequential):
            return f"{parts[0]}.{parts[1]}"
    return parts[0]


def _filter_weights(model: nn.Module, skip_prefix: str):
    """(name, weight) of every conv / linear layer outside the head: one filter per output channel."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not (name == skip_prefix or name.startswith(skip_prefix + ".")):
            yield name, m.weight


@torch.no_grad()
def filter_distances(trained: nn.Module, source: nn.Module, head_name: str, points: int = 200) -> Dict[str, dict]:
    """Per stage: every filter's ||w_j - w*_j||, sorted descending and summarised as `points` quantiles
    (so a 10,000-filter stage stays small in JSON), plus count / mean / median / max."""
    src = dict(source.named_modules())
    per_stage: Dict[str, List[torch.Tensor]] = {}
    for name, w in _filter_weights(trained, head_name):
        d = (w.detach().float().cpu() - src[name].weight.detach().float().cpu()).flatten(1).norm(dim=1)
        per_stage.setdefault(stage_of(trained, name + ".weight"), []).append(d)
    out = {}
    for stage, ds in per_stage.items():
        d = torch.cat(ds).sort(descending=True).values.numpy()
        q = np.linspace(0, len(d) - 1, min(points, len(d))).round().astype(int)
        out[stage] = {"filters": int(len(d)), "mean": float(d.mean()), "median": float(np.median(d)),
                      "max": float(d[0]), "sorted_quantiles": [float(v) for v in d[q]]}
    return out


@torch.no_grad()
def attention_split_distances(trained: nn.Module, source: nn.Module, conv_names: Sequence[str],
                              attention_weights: Sequence[torch.Tensor]) -> Dict[str, dict]:
    """For each regularised conv: mean filter distance from w* over its low-attention half (the
    filters whose removal barely changes the loss) and its high-attention half."""
    src = dict(source.named_modules())
    trg = dict(trained.named_modules())
    out = {}
    for conv, W in zip(conv_names, attention_weights):
        d = (trg[conv].weight.float().cpu() - src[conv].weight.float().cpu()).flatten(1).norm(dim=1)
        order = torch.as_tensor(W).float().cpu().argsort()
        low, high = order[: len(order) // 2], order[len(order) // 2:]
        out[conv] = {"low_attention_mean": float(d[low].mean()), "high_attention_mean": float(d[high].mean()),
                     "filters": int(len(d))}
    return out


@torch.no_grad()
def tap_maps(model: nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """ReLU'd feature maps (B, C, h, w) of `layer` for `images`, in eval mode."""
    was_training = model.training
    model.eval()
    with FeatureTaps(model, [layer]) as taps:
        _, feats = taps(images)
    model.train(was_training)
    return feats[0].float().relu().cpu()


def pick_map_layer(model: nn.Module, layers: Sequence[str], image: torch.Tensor, min_side: int = 7) -> str:
    """The deepest regularised layer whose map is still at least min_side pixels wide (else the first)."""
    sizes = [tap_maps(model, l, image[None]).shape[-1] for l in layers]
    ok = [l for l, s in zip(layers, sizes) if s >= min_side]
    return ok[-1] if ok else layers[0]


def pick_low_activation_filters(source_maps: torch.Tensor) -> List[int]:
    """Per image: the source filter with the lowest total activation among those not entirely zero
    (a dead filter has nothing to show); the paper's Fig. 6 looks at such weakly active filters."""
    picks = []
    for m in source_maps:  # (C, h, w)
        total = m.flatten(1).sum(1)
        alive = torch.nonzero(total > 0).flatten()
        pool = alive if len(alive) else torch.arange(len(total))
        picks.append(int(pool[total[pool].argmin()]))
    return picks


def min_max(m: torch.Tensor) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return ((m - lo) / (hi - lo)).numpy() if hi > lo else np.zeros(tuple(m.shape), dtype=np.float32)


def activation_maps(model: nn.Module, layer: str, images: torch.Tensor, filters: Sequence[int]) -> List[list]:
    """Min-max scaled map of filters[i] on images[i], as nested lists (JSON)."""
    maps = tap_maps(model, layer, images)
    return [min_max(maps[i, f]).round(4).tolist() for i, f in enumerate(filters)]


def curve_roughness(values: Sequence[float]) -> float:
    """Mean absolute second difference of a curve: 0 for a straight line, large for a zig-zag.
    Comparable between methods evaluated at the same points (Fig. 3's "smoother" claim)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return float(np.abs(np.diff(v, n=2)).mean()) if len(v) > 2 else 0.0
