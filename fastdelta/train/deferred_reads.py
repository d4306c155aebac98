"""What the host reads of a training step one step later, so that the loop runs ahead of the device
(the loop's deferred reads): the step's stats and its time.

On a GPU every host read of a device value (`.item()`, `.tolist()`, `.cpu()`) waits for all queued
work. The loop therefore reads step t's stats only after step t+1 is queued (`DeferredStats`: one
non-blocking copy into pinned memory per step, read after its event) and times each step with CUDA
events read at the same time (`StepTimer`). A device flag cancels an update instead of a check on the
host first (fastdelta.train.steps.GuardedUpdate), and the BatchNorm statistics a failed step's forward
changed are restored when the host learns of it (fastdelta.train.bn_buffers).
"""
from __future__ import annotations

import time

import torch

from .steps import StepOutput


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
