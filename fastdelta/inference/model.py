"""FineTunedModel: a finished run made usable: its network, class names and eval transform, with
predict, evaluate and export."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from .forward import run_network
from .inputs import resolve_inputs
from .metrics import Evaluation, evaluate_scores
from .network import build_network
from .predictions import top_k_predictions
from .preprocessing import eval_transform
from .record import RunRecord, read_record
from .test_sets import resolve_test_set


class FineTunedModel:
    """The network of a run (eval mode), its `classes` and the `transform` its test images went through."""

    def __init__(self, record: RunRecord, network: nn.Module, device: torch.device):
        self.record = record
        self.network = network
        self.device = device
        self.classes = list(record.classes)
        self.transform = eval_transform(record)

    @property
    def run_dir(self) -> Path:
        return self.record.run_dir

    def __repr__(self) -> str:
        return (f"FineTunedModel({str(self.run_dir)!r}, arch={self.record.arch!r}, method={self.record.method!r}, "
                f"classes={len(self.classes)}, device={str(self.device)!r})")

    def predict(self, inputs, top_k: int = 5, batch_size: Optional[int] = None,
                num_workers: Optional[int] = None) -> list:
        """A Prediction (path, top-k labels, probabilities) per image, in input order.

        inputs: a PIL image, an image path, a folder (its images, recursively, sorted by path), a list of
        paths and PIL images, or an array batch as fit takes (uint8 (N,H,W[,C]) or float (N,C,H,W) in
        [0, 1]; raw images, transformed here). For already-normalised tensors call self.network."""
        dataset, paths = resolve_inputs(inputs, self.transform)
        scores = run_network(self.network, dataset, self.device, batch_size or self.record.eval_batch_size,
                             num_workers)
        return top_k_predictions(scores.probabilities, self.classes, paths, top_k)

    def evaluate(self, test, batch_size: Optional[int] = None, num_workers: Optional[int] = None,
                 strict: bool = False) -> Evaluation:
        """Top-1 (fit's rule: equal to result.json's on the run's own test set), top-5, per-class accuracy
        and the confusion matrix on `test`: an image folder ROOT/<class>/<image>, an (images, labels)
        pair or a torch Dataset, as fit takes it. strict: a bad image file is an error, not skipped."""
        dataset, description = resolve_test_set(test, self.classes, self.transform, strict)
        scores = run_network(self.network, dataset, self.device, batch_size or self.record.eval_batch_size,
                             num_workers)
        return evaluate_scores(scores, self.classes, description)

    def export(self, format: str, out, images=None, tolerance: float = 1e-4) -> dict:
        """Write the network as `format` ("torchscript", "onnx", "pt2") to `out` plus out.json (transform and
        classes), after checking it against this eager network; returns the sidecar's content."""
        from .export import export
        return export(self, format, out, images=images, tolerance=tolerance)


def load(run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
         architecture: Optional[nn.Module] = None) -> FineTunedModel:
    """The fine-tuned model of `run_dir` (the --out / run_dir of a fit), rebuilt from result.json with
    model.pt's weights (read without running code from the file). architecture: the nn.Module a run was
    fitted from when result.json cannot name it (arch "custom"). Raises RunFolderError (a ValueError)
    naming the folder when it is not a loadable run, WeightsMismatchError when model.pt does not fit."""
    record = read_record(run_dir)
    if record.status != "ok":
        warnings.warn(f"fastdelta: the run in {record.run_dir} did not finish normally ({record.status}); its "
                      "model.pt holds the weights at the point it stopped", UserWarning, stacklevel=2)
    device = torch.device(device)
    network = build_network(record, architecture).to(device)
    return FineTunedModel(record, network, device)
