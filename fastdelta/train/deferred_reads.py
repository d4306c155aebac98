"""What lets the training loop run ahead of the host: deferred stats, BN snapshots, input prefetch, step timing.

On a GPU every host read of a device value (`.item()`, `.tolist()`, `.cpu()`) waits for all queued
work. The loop therefore reads step t's stats only after step t+1 is queued (`DeferredStats`: one
non-blocking copy into pinned memory per step, read after its event), lets a device flag cancel an
update instead of checking on the host first (fastdelta.train.steps.GuardedUpdate), and restores the
BatchNorm statistics a failed step's forward changed (`BufferSnapshots`) when the host learns of it.
"""
from __future__ import annotations

import time
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .steps import StepOutput


class BufferSnapshots:
    """Copies of the BatchNorm buffers (running statistics, batch counts) taken before a step's forward,
    in `slots` alternating slots (two when the host learns of a failure one step late), restored when
    the step turns out not finite: a failed step then leaves no trace in the statistics."""

    def __init__(self, model: nn.Module, slots: int = 1):
        self.buffers = [b for m in model.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]
        self.floating = [b for b in self.buffers if b.is_floating_point()]  # num_batches_tracked is not
        self.slots = [[b.clone() for b in self.buffers] for _ in range(slots if self.buffers else 0)]

    def save(self, iteration: int) -> None:
        if self.slots:
            torch._foreach_copy_(self.slots[iteration % len(self.slots)], self.buffers)

    @torch.no_grad()
    def norm(self, like: torch.Tensor) -> torch.Tensor:
        """(1,) float64 on `like`'s device: the norm of the floating BN buffers, not finite when any is not."""
        if not self.floating:
            return like.new_zeros(1)
        return torch.stack(torch._foreach_norm(self.floating)).double().norm().reshape(1)

    @torch.no_grad()
    def restore(self, iteration: int) -> None:
        if self.slots:
            torch._foreach_copy_(self.buffers, self.slots[iteration % len(self.slots)])


class DeferredStats:
    """Step stats copied device-to-host without waiting (pinned memory on CUDA), read a step later."""

    def __init__(self, device: torch.device, size: int, slots: int = 2):
        pinned = device.type == "cuda"
        self.host = [torch.empty(size, dtype=torch.float64, pin_memory=pinned) for _ in range(slots)]
        self.events = [torch.cuda.Event() if pinned else None for _ in range(slots)]

    def push(self, iteration: int, stats: torch.Tensor) -> None:
        k = iteration % len(self.host)
        self.host[k].copy_(stats.detach(), non_blocking=True)
        if self.events[k] is not None:
            self.events[k].record()

    def pop(self, iteration: int) -> StepOutput:
        k = iteration % len(self.host)
        if self.events[k] is not None:
            self.events[k].synchronize()  # waits for that step only: the next one is already queued
        return StepOutput.read(self.host[k])


class StepTimer:
    """Seconds per step: CUDA events on a GPU (read when the step's stats are read), else the host clock."""

    def __init__(self, device: torch.device, slots: int = 2):
        self.cuda = device.type == "cuda"
        self.marks = [[torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]
                      if self.cuda else [0.0, 0.0] for _ in range(slots)]

    def start(self, iteration: int) -> None:
        self._mark(iteration, 0)

    def stop(self, iteration: int) -> None:
        self._mark(iteration, 1)

    def _mark(self, iteration: int, which: int) -> None:
        slot = self.marks[iteration % len(self.marks)]
        if self.cuda:
            slot[which].record()
        else:
            slot[which] = time.perf_counter()

    def seconds(self, iteration: int) -> float:
        """The step's seconds. On CUDA both events must have completed before `elapsed_time` (else it
        raises): the non-deferred loop asks right after recording the stop event, behind the queued
        update, so the stop event is synchronised first (in the deferred loop it already has)."""
        start, stop = self.marks[iteration % len(self.marks)]
        if not self.cuda:
            return stop - start
        stop.synchronize()  # the start event was recorded before it on the same stream: complete too
        return start.elapsed_time(stop) / 1000.0


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
