"""The test split held in memory as one tensor, and its top-1 measured by slicing it: every run of a
comparison is evaluated on the same images, decoded and transformed once."""
from __future__ import annotations

import numpy as np
import torch

from ...data.fingerprint import array_fingerprint
from ...train.evaluate import evaluate

class TensorSet(torch.utils.data.Dataset):
    """A transformed split held as one tensor: fit passes CHW tensors through untransformed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes):
        self.x, self.targets, self.classes = x, y.tolist(), list(classes)
        self._fingerprint = None

    def fingerprint(self) -> dict:
        """SHA-256 of the tensors and labels (computed once): which test set a top-1 was measured on."""
        if self._fingerprint is None:
            self._fingerprint = array_fingerprint(self.x.numpy(), np.asarray(self.targets))
        return self._fingerprint

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def curve_subset(test: TensorSet, n: int) -> TensorSet:
    """n test images for the curve points: the first n, unless they leave a class out (a class-ordered
    set, e.g. an image folder), then each class's first images in turn, so that every class is tested."""
    targets = np.asarray(test.targets)
    if len(np.unique(targets[:n])) == len(np.unique(targets)):
        return TensorSet(test.x[:n], torch.as_tensor(test.targets[:n]), test.classes)
    rank = np.zeros(len(targets), dtype=np.int64)  # position of each image within its class
    for c in np.unique(targets):
        rank[targets == c] = np.arange(int((targets == c).sum()))
    idx = torch.as_tensor(np.sort(np.lexsort((np.arange(len(targets)), rank))[:n]))
    return TensorSet(test.x[idx], torch.as_tensor(targets)[idx], test.classes)


def materialise(dataset, classes, batch_size: int = 256) -> TensorSet:
    """Decode and transform a deterministic (centre-crop) split once; every run then reuses the tensors
    instead of decoding and resizing the same test images again (the test set is the same for all runs)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    xs, ys = zip(*[(x, y) for x, y in loader])
    return TensorSet(torch.cat(xs), torch.cat(ys), classes)


def fast_top1(model, test: TensorSet, batch_size: int = 256) -> float:
    """Top-1 on a held tensor split through train.evaluate.evaluate (channels_last on CPU, denormals flushed),
    fed slices of the held tensors instead of a per-item DataLoader."""
    device = next(model.parameters()).device
    return evaluate(model, Batches(test, batch_size), device, progress=False)["top1"]


class Batches:
    """(x, y) batches sliced from a TensorSet, in order (what train.evaluate.evaluate iterates)."""

    def __init__(self, test: TensorSet, batch_size: int):
        self.test, self.batch_size = test, batch_size

    def __len__(self):
        return -(-len(self.test) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.test), self.batch_size):
            yield self.test.x[i:i + self.batch_size], torch.as_tensor(self.test.targets[i:i + self.batch_size])
