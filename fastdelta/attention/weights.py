"""Channel attention's weights: `ChannelAttention` holds, per regularised layer, the raw loss increases
that Algorithm 1 measured (fastdelta.attention.loss_increase) and turns them into DELTA's per-channel
weights, W = softmax(zscore(raw) / T) (public code) or softmax(raw) (the paper's text): NORMALISATIONS.
It reads and writes its JSON file (ours, or the public code's layout). `spearman` and `top_overlap`
compare two attentions channel by channel.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..output_files import atomic_write_text


# How a layer's raw loss increases become weights W (per layer):
# "zscore_softmax": softmax(zscore(raw) / T), the public code (channel_eval.py / train.py), T = temperature;
# "softmax": softmax(raw), the paper's text (Algorithm 1: the loss increases summed over the training set,
# then a softmax; no standardisation and no temperature, so the temperature is not used)
NORMALISATIONS = ("zscore_softmax", "softmax")
NORMALISATION_TEXT = {"zscore_softmax": "per layer softmax(zscore(raw) / temperature), population std",
                      "softmax": "per layer softmax(raw) (the paper's text: no z-score, no temperature)"}


def normalize_attention(raw: torch.Tensor, temperature: float = 5.0,
                        normalisation: str = "zscore_softmax") -> torch.Tensor:
    """W from raw loss increases (NORMALISATIONS); for "zscore_softmax" the z-score uses the population
    std and a constant vector gives uniform weights."""
    raw = raw.double()
    if normalisation == "softmax":
        return torch.softmax(raw, dim=0).float()
    if normalisation != "zscore_softmax":
        raise ValueError(f"attention normalisation {normalisation!r}: expected one of {NORMALISATIONS}")
    std = raw.std(unbiased=False)
    z = (raw - raw.mean()) / std if std > 0 else torch.zeros_like(raw)
    return torch.softmax(z / temperature, dim=0).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two per-channel vectors (ties broken by position)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_overlap(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.1) -> float:
    """Share of a's top `fraction` channels that are also among b's."""
    k = max(1, int(len(a) * fraction))
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k


@dataclass
class ChannelAttention:
    layers: List[str]
    raw: List[torch.Tensor]        # per layer: summed loss increase per channel (float64)
    temperature: float = 5.0
    images: int = 0
    impl: object = ""             # what ran, per layer (closed_form / prefix_batched / masked_forward / first_order)
    timings: Dict[str, float] = field(default_factory=dict)
    head: Dict[str, float] = field(default_factory=dict)  # how the L2-FE head was trained
    device: str = ""              # where it was computed (its timings are only comparable there)
    normalisation: str = "zscore_softmax"  # NORMALISATIONS: how raw becomes W
    sample: Dict[str, object] = field(default_factory=dict)  # which images Algorithm 1 measured

    @property
    def weights(self) -> List[torch.Tensor]:
        return [normalize_attention(r, self.temperature, self.normalisation) for r in self.raw]

    def normalised(self, temperature: float, normalisation: str) -> "ChannelAttention":
        """The same measurement normalised another way (raw is what is measured; W follows the settings)."""
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"attention normalisation {normalisation!r}: expected one of {NORMALISATIONS}")
        return dataclasses.replace(self, temperature=temperature, normalisation=normalisation)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "temperature": self.temperature, "images": self.images, "impl": self.impl,
                "normalisation": self.normalisation, "normalisation_text": NORMALISATION_TEXT[self.normalisation],
                "sample": self.sample,
                "raw": {l: r.tolist() for l, r in zip(self.layers, self.raw)},
                "weights": {l: w.tolist() for l, w in zip(self.layers, self.weights)},
                "public_layout": [r.tolist() for r in self.raw],
                "timings_s": self.timings, "head": self.head, "device": self.device}

    def save(self, path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d, layers: Optional[Sequence[str]] = None, temperature: Optional[float] = None) -> "ChannelAttention":
        """From our JSON, or from the public code's layout (a list of raw vectors per layer)."""
        if isinstance(d, list):
            if layers is None or len(layers) != len(d):
                raise ValueError(f"public-layout attention has {len(d)} layers; pass the {len(d)} layer names")
            return cls(list(layers), [torch.tensor(v, dtype=torch.float64) for v in d], temperature or 5.0)
        raw = d["raw"]
        # files written before the paper's normalisation existed hold a description, not a name
        normalisation = d.get("normalisation", "zscore_softmax")
        normalisation = normalisation if normalisation in NORMALISATIONS else "zscore_softmax"
        return cls(list(d["layers"]), [torch.tensor(raw[l], dtype=torch.float64) for l in d["layers"]],
                   temperature or d.get("temperature", 5.0), d.get("images", 0), d.get("impl", ""),
                   d.get("timings_s", {}), d.get("head", {}), d.get("device", ""), normalisation,
                   d.get("sample", {}))

    @classmethod
    def load(cls, path, layers=None, temperature=None) -> "ChannelAttention":
        """From a JSON file (ours or the public layout); anything else is a ValueError naming the file."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"attention file {path} is not a JSON text file (byte {e.start} is not UTF-8): "
                             "give the channel_attention.json a run or `fastdelta attention` wrote") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"attention file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        try:
            return cls.from_dict(data, layers, temperature)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"attention file {path} does not hold channel attention "
                             f"({type(e).__name__}: {e}): expected {{'layers': [...], 'raw': {{layer: [...]}}}} "
                             "or one list of loss increases per layer") from None
