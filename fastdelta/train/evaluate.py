"""Evaluation and the CPU's numeric setting: top-1 on a loader (centre crop or 10-crop), the device to
run on, denormals flushed to zero while training or evaluating on the CPU, channels_last forwards there."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..progress import progress_bar
from .distributed import DistContext


@contextmanager
def flush_denormals(device: torch.device):
    """On CPU, flush denormal floats to zero while training or evaluating: tiny values such as w - w*
    under a strong L2-SP pull otherwise make float ops many times slower on x86. Values below 1.2e-38
    become 0, far below anything that matters. torch sets this per thread (the calling one), so OpenMP
    worker threads created earlier may keep denormals."""
    if device.type != "cpu" or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@contextmanager
def cpu_channels_last(model: nn.Module, device: torch.device):
    """On CPU, run the block with the model's conv weights in channels_last and yield the input layout to
    use: CPU eval forwards are faster that way (benchmarks/bench_cpu_layout.py measures it); the model's own
    layout is restored afterwards. Elsewhere: no change."""
    convs = [p for p in model.parameters() if p.dim() == 4]
    if torch.device(device).type != "cpu" or not convs:
        yield torch.contiguous_format
        return
    cl = torch.channels_last
    # 1x1 kernels are both layouts at once: a model is channels_last already if every weight is and some
    # weight is not also contiguous
    already = all(p.is_contiguous(memory_format=cl) for p in convs) and not all(p.is_contiguous() for p in convs)
    model.to(memory_format=cl)
    try:
        yield cl
    finally:
        if not already:
            model.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, progress: bool = True,
             desc: str = "test", ctx: DistContext = DistContext()) -> dict:
    """Top-1 accuracy; for 10-crop batches (B, 10, C, H, W) also the centre-crop-only top-1
    (TenCrop puts the centre crop at index 4) and the top-1 of softmax averaged over crops.
    Under torch.distributed each rank passes its shard and the counts are summed."""
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64)  # correct, correct centre crop, images, 10-crop batches
    with progress_bar(len(loader), desc, "batch", progress and ctx.is_main) as bar, flush_denormals(device), \
            cpu_channels_last(model, device) as layout:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if x.dim() == 5:
                b, k = x.shape[:2]
                x = x.flatten(0, 1).contiguous(memory_format=layout)
                probs = F.softmax(model(x).float(), dim=1).view(b, k, -1)
                counts += torch.tensor([(probs.mean(1).argmax(1) == y).sum().item(),
                                        (probs[:, 4].argmax(1) == y).sum().item(), len(y), 1.0], dtype=torch.float64)
            else:
                correct = (model(x.contiguous(memory_format=layout)).argmax(1) == y).sum().item()
                counts += torch.tensor([correct, correct, len(y), 0.0], dtype=torch.float64)
            bar.update(1)
    correct, correct_center, total, ten_crop = ctx.all_reduce_sum(counts).tolist()
    if total == 0:
        return {"top1": None, "images": 0}
    if ten_crop:
        return {"top1": 100.0 * correct_center / total, "top1_10crop": 100.0 * correct / total, "images": int(total)}
    return {"top1": 100.0 * correct / total, "images": int(total)}
