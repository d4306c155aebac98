"""One image's prediction: its top-k class names with their probabilities, and its path when it has one."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch


@dataclass
class Prediction:
    path: Optional[str]      # the image file, None for an image given in memory
    labels: list             # top-k class names, most probable first
    probabilities: list      # their probabilities (softmax; for a 10-crop run averaged over the crops)

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def probability(self) -> float:
        return self.probabilities[0]

    def to_dict(self) -> dict:
        return asdict(self)


def top_k_predictions(probabilities: torch.Tensor, classes: list, paths: list, top_k: int) -> list:
    """A Prediction per row of `probabilities` (N, K); top_k beyond the class count gives every class."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    values, indices = probabilities.topk(min(top_k, len(classes)), dim=1)
    return [Prediction(path, [classes[i] for i in idx.tolist()], [float(v) for v in vals.tolist()])
            for path, vals, idx in zip(paths, values, indices)]
