"""Accuracy of a run on a labelled test set: top-1 by fit's own rule (so it equals result.json's on the
same images), top-5, per-class accuracy and the confusion matrix."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .errors import ClassMismatchError
from .forward import Scores


@dataclass
class Evaluation:
    top1: float                   # percent; a 10-crop run: its centre crop, as result.json's "top1"
    top5: float                   # percent (top-k with k = min(5, classes))
    per_class: dict               # class -> {"accuracy": percent or None without images, "images": n}
    confusion_matrix: list        # [true class][predicted class] image counts, in `classes` order
    classes: list
    images: int
    top1_10crop: Optional[float] = None   # a 10-crop run: softmax averaged over the crops
    test: dict = field(default_factory=dict)  # what the test set was
    predictions_from: str = "logits of the single centre crop"

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_scores(scores: Scores, classes: list, test: dict) -> Evaluation:
    """The metrics of `scores` against their labels. Top-5, per-class and the matrix rank classes as
    predict does (the probabilities); top1 counts fit's headline prediction."""
    labels = scores.labels.long()
    k = len(classes)
    if len(labels) == 0:
        raise ValueError("the test set has no images")
    if labels.min() < 0 or labels.max() >= k:
        raise ClassMismatchError(f"test labels range over [{int(labels.min())}, {int(labels.max())}], but the run "
                                 f"has {k} classes {classes}")
    probs = scores.probabilities
    predicted = probs.argmax(1)
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    per_class = {}
    for c, name in enumerate(classes):
        n = int(confusion[c].sum())
        per_class[name] = {"accuracy": 100.0 * int(confusion[c, c]) / n if n else None, "images": n}
    top5 = (probs.topk(min(5, k), dim=1).indices == labels[:, None]).any(1)
    return Evaluation(top1=_percent(scores.headline == labels), top5=_percent(top5), per_class=per_class,
                      confusion_matrix=confusion.tolist(), classes=list(classes), images=len(labels),
                      top1_10crop=_percent(predicted == labels) if scores.ten_crop else None, test=test,
                      predictions_from=("softmax averaged over the 10 crops" if scores.ten_crop
                                        else "logits of the single centre crop"))


def _percent(hits: torch.Tensor) -> float:
    """Computed as fit computes its accuracy (100 * correct / images, in Python floats), so equal counts
    give equal numbers to the last digit."""
    return 100.0 * int(hits.sum()) / len(hits)
