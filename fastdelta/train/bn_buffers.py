"""The BatchNorm buffers saved before each step's forward and restored when the step turns out not finite
(`BufferSnapshots`): a failed step leaves no trace in the running statistics, also when the host learns
of the failure a step late (the loop's deferred reads, fastdelta.train.deferred_reads)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


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
