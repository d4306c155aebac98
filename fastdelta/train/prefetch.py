"""Batches moved to the device ahead of the step that uses them (`DevicePrefetcher`): on CUDA the next
batch is copied on a side stream, from pinned memory, while the current step computes."""
from __future__ import annotations

from typing import Iterator, Optional

import torch


class DevicePrefetcher:
    """Batches on the device. On CUDA the next batch is copied on a side stream (from pinned memory)
    while the current step computes; elsewhere a plain `.to(device)`."""

    def __init__(self, batches: Iterator, device: torch.device):
        self.batches, self.device = batches, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready: Optional[tuple] = None

    def __iter__(self):
        return self

    def _load(self) -> tuple:
        x, y = next(self.batches)
        if self.stream is None:
            return x.to(self.device), y.to(self.device)
        with torch.cuda.stream(self.stream):
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __next__(self) -> tuple:
        if self.stream is None:
            return self._load()
        x, y = self.ready if self.ready is not None else self._load()
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        x.record_stream(current)
        y.record_stream(current)
        self.ready = self._load()
        return x, y
