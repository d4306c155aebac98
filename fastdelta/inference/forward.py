"""The network over a dataset, batch by batch, as fit's test evaluation runs it (train.evaluate: the same
loader, denormals flushed and channels_last on the CPU), so the same images give the same scores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..train.evaluate import cpu_channels_last, flush_denormals
from ..train.loop import make_loader

# TenCrop puts the centre crop at this index: fit's "top1" of a 10-crop run is that crop's
CENTRE_CROP = 4


@dataclass
class Scores:
    """logits (N, V, K) of N images in V views (1 crop, or the 10 of TenCrop), and the labels read with them."""
    logits: torch.Tensor
    labels: torch.Tensor

    @property
    def ten_crop(self) -> bool:
        return self.logits.shape[1] > 1

    @property
    def probabilities(self) -> torch.Tensor:
        """(N, K): softmax, averaged over the views (fit's top1_10crop rule; one view: its softmax)."""
        return F.softmax(self.logits.float(), dim=2).mean(1)

    @property
    def headline(self) -> torch.Tensor:
        """(N,) the class fit's "top1" counts: the logits' argmax, or for 10 crops the centre crop's."""
        if self.ten_crop:
            return F.softmax(self.logits[:, CENTRE_CROP].float(), dim=1).argmax(1)
        return self.logits[:, 0].argmax(1)


@torch.no_grad()
def run_network(network: nn.Module, dataset, device: torch.device, batch_size: int,
                num_workers: Optional[int] = None) -> Scores:
    """Scores of every item of `dataset` ((image tensor, label) pairs), in order. Worker processes only
    for more than one batch: starting them costs more than a few images do."""
    workers = 0 if len(dataset) <= batch_size else num_workers
    loader = make_loader(dataset, batch_size, False, 0, workers)
    logits, labels = [], []
    network.eval()
    with flush_denormals(device), cpu_channels_last(network, device) as layout:
        for x, y in loader:
            x = x.to(device)
            views = x.shape[1] if x.dim() == 5 else 1
            out = network(x.flatten(0, 1).contiguous(memory_format=layout) if views > 1
                          else x.contiguous(memory_format=layout))
            logits.append(out.float().view(len(y), views, -1).cpu())
            labels.append(torch.as_tensor(y))
    return Scores(torch.cat(logits), torch.cat(labels))
