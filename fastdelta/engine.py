"""The training loop and evaluation shared by every method.

One step: target forward (with taps), source forward (no grad, eval mode) when the method needs
its feature maps, loss = CE + reg + head, a non-finite check on each term before the update (so
the model keeps its last good state), SGD with momentum, lr from the schedule.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .progress import progress_bar
from .regularizers import Regularizer
from .taps import FeatureTaps


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/inf loss term; the model holds the last good weights."""

    def __init__(self, iteration: int, term: str, value: float, history: list):
        what = "gradient norm" if term == "gradient" else f"loss term {term!r}"
        super().__init__(f"non-finite {what} at iteration {iteration} ({value}); training stopped, "
                         f"the model keeps the weights of iteration {iteration - 1} (try a smaller alpha or lr)")
        self.iteration, self.term, self.value, self.history = iteration, term, value, history
        self.partial_result = None  # filled in by fit()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: Optional[int],
                drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    if num_workers is None:
        import os
        num_workers = 0 if (os.cpu_count() or 1) <= 2 else min(8, (os.cpu_count() or 1) - 1)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=g,
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)


def endless(loader: DataLoader) -> Iterator:
    """Iteration-based training: start a new (reshuffled) epoch whenever one ends."""
    while True:
        yield from loader


def lr_at(iteration: int, base_lr: float, schedule: str, step: int, gamma: float) -> float:
    if schedule == "step":
        return base_lr * (gamma if iteration >= step else 1.0)
    return base_lr * gamma ** (iteration / step)  # "exp": reaches gamma x at `step`, keeps decaying


@dataclass
class TrainSpec:
    iterations: int
    lr: float
    momentum: float
    lr_schedule: str = "step"
    lr_step: int = 1
    lr_gamma: float = 0.1
    progress: bool = True
    desc: str = "train"


def train_loop(target: nn.Module, source: nn.Module, reg: Regularizer, loader: DataLoader, spec: TrainSpec,
          device: torch.device) -> List[dict]:
    """Train `target` in place; returns one history record per iteration."""
    params = reg.trainable_parameters(target)
    if reg.freezes_extractor:  # L2-FE: the extractor is fixed, BN statistics included
        target.requires_grad_(False).eval()
        for p in params:
            p.requires_grad_(True)
    else:
        target.requires_grad_(True).train()
    opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)
    target_taps = FeatureTaps(target, reg.layers) if reg.uses_source_features else None
    source_taps = FeatureTaps(source, reg.layers) if reg.uses_source_features else None
    history = []
    batches = endless(loader)
    t_start = time.perf_counter()
    try:
        with progress_bar(spec.iterations, spec.desc, "it", spec.progress) as bar:
            for it in range(spec.iterations):
                t0 = time.perf_counter()
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                t_data = time.perf_counter() - t0
                lr = lr_at(it, spec.lr, spec.lr_schedule, spec.lr_step, spec.lr_gamma)
                for group in opt.param_groups:
                    group["lr"] = lr
                if target_taps is not None:
                    logits, t_feats = target_taps(x)
                    with torch.no_grad():
                        _, s_feats = source_taps(x)
                    terms = reg.terms(t_feats, s_feats)
                else:
                    logits = target(x)
                    terms = reg.terms()
                ce = F.cross_entropy(logits.float(), y)
                values = {"ce": ce.item(), "reg": terms.reg.item(), "head": terms.head.item()}
                for name, v in values.items():
                    if not math.isfinite(v):
                        raise NonFiniteLossError(it, name, v, history)
                loss = ce + terms.reg + terms.head
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # a finite loss can still give an infinite gradient: never apply such an update
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(it, "gradient", grad_norm, history)
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t_step = time.perf_counter() - t0
                history.append({"iteration": it, **values, "loss": values["ce"] + values["reg"] + values["head"],
                                "grad_norm": grad_norm,
                                "lr": lr, "train_acc": (logits.argmax(1) == y).float().mean().item(),
                                "data_s": round(t_data, 5), "step_s": round(t_step, 5),
                                "elapsed_s": round(time.perf_counter() - t_start, 3)})
                bar.update(1)
                if it % 5 == 0 or it == spec.iterations - 1:
                    bar.set_postfix(loss=f"{history[-1]['loss']:.4g}", img_s=f"{len(y) / max(t_step, 1e-9):.0f}")
    finally:
        for taps in (target_taps, source_taps):
            if taps is not None:
                taps.close()
        target.requires_grad_(True)
    return history


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, progress: bool = True,
             desc: str = "test") -> dict:
    """Top-1 accuracy; for 10-crop batches (B, 10, C, H, W) also the centre-crop-only top-1
    (TenCrop puts the centre crop at index 4) and the top-1 of softmax averaged over crops."""
    model.eval()
    correct = correct_center = total = 0
    ten_crop = False
    with progress_bar(len(loader), desc, "batch", progress) as bar:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if x.dim() == 5:
                ten_crop = True
                b, k = x.shape[:2]
                probs = F.softmax(model(x.flatten(0, 1)).float(), dim=1).view(b, k, -1)
                correct += (probs.mean(1).argmax(1) == y).sum().item()
                correct_center += (probs[:, 4].argmax(1) == y).sum().item()
            else:
                correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
            bar.update(1)
    if total == 0:
        return {"top1": None, "images": 0}
    if ten_crop:
        return {"top1": 100.0 * correct_center / total, "top1_10crop": 100.0 * correct / total, "images": total}
    return {"top1": 100.0 * correct / total, "images": total}
