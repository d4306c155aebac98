"""Which input pipeline runs: NVIDIA DALI or the torchvision DataLoader.

Setting `data_backend`: "auto" (DALI on a CUDA device when nvidia.dali imports and the data is an
image folder DALI can decode; otherwise torchvision, so CPU runs keep the torchvision path
unchanged), "dali" (required: an error when it cannot run; on a CPU device DALI runs its CPU
pipeline, device_id=None) or "torchvision".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .dali import dali_import_error, dali_unsupported
from .errors import DataError
from .folder import ImageListDataset

DATA_BACKENDS = ("auto", "dali", "torchvision")  # the data_backend setting (validated by FitSettings)


@dataclass
class BackendChoice:
    name: str    # "dali" | "torchvision"
    reason: str  # why, for the run's data record

    def to_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason}


def _dali_blocker(dataset) -> str | None:
    if not isinstance(dataset, ImageListDataset):
        return f"DALI reads image files; the data is a {type(dataset).__name__}"
    err = dali_import_error()
    if err is not None:
        return err
    bad = dali_unsupported([p for p, _ in dataset.samples])
    if bad:
        return f"DALI cannot decode {len(bad)} file(s) of the set, e.g. {bad[0]}"
    return None


def choose_backend(setting: str, device: torch.device, *datasets) -> BackendChoice:
    """The backend for these datasets (train, test, ...; None entries are ignored) on `device`."""
    if setting == "torchvision":
        return BackendChoice("torchvision", "requested")
    if setting == "auto" and device.type != "cuda":
        return BackendChoice("torchvision", f"auto: device {device.type} (DALI only by default on CUDA)")
    blockers = [b for b in (_dali_blocker(d) for d in datasets if d is not None) if b is not None]
    if blockers:
        if setting == "dali":
            raise DataError(f"data_backend='dali' cannot run: {blockers[0]}")
        return BackendChoice("torchvision", f"auto: {blockers[0]}")
    where = "GPU decode (mixed)" if device.type == "cuda" else "CPU pipeline (device_id=None)"
    return BackendChoice("dali", f"{setting}: {where}")
