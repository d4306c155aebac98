"""What a run starts from, for fastdelta.fit and fastdelta.compute_attention alike: the settings resolved
for the architecture, seeded random generators, the data, the networks (checked against the batch size),
the process's distributed context and device, and its shard of a dataset."""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Subset

from .data import resolve_data
from .methods import method_class
from .networks.models import Networks, build_networks, guess_arch
from .settings import FitSettings, SettingsError
from .train.distributed import DistContext, device_for, init_distributed
from .train.preempt import StopOutsideTraining


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run(model, train_data, test_data, weights, settings: FitSettings,
                stop: Optional[StopOutsideTraining] = None, trains_target: bool = True):
    """Settings with the architecture's defaults, then data, then networks (the head needs the class count);
    trains_target=False: only the attention's head is trained (fastdelta.compute_attention)."""
    arch = model if isinstance(model, str) else guess_arch(model) if isinstance(model, nn.Module) else None
    s = settings.resolved(arch)
    seed_everything(s.seed)
    data = resolve_data(train_data, test_data, augmentation=s.augmentation, resize=s.resize, crop=s.crop,
                        strict=s.strict_data, allow_overlap=s.allow_overlap, val=s.val, val_fraction=s.val_fraction,
                        seed=s.seed)
    if stop is not None:
        stop.phase = "building the networks, before training"
    method = method_class(s.method)  # l2_fe, l2 and l2_sp read no layer: a network without Conv2d trains too
    needs_layers = not trains_target or method.uses_attention or method.uses_source_features
    nets = build_networks(model, len(data.classes), weights, s.layers, s.seed, needs_layers)
    if s.batch_size > len(data.train):
        raise SettingsError(f"batch_size={s.batch_size} is larger than the training set ({len(data.train)} images)")
    _check_batch_norm_batches(s, nets, len(data.train), trains_target)
    return s, data, nets


def _check_batch_norm_batches(s: FitSettings, nets: Networks, train_images: int, trains_target: bool) -> None:
    """BatchNorm in train mode normalises by the batch's statistics, which one image per rank does not
    have: torch fails mid-step ("Expected more than 1 value per channel") without naming the setting."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in nets.target.modules()):
        return
    world = int(os.environ.get("WORLD_SIZE", "1")) if s.distributed else 1
    method = method_class(s.method)
    why = ("the network has BatchNorm layers, which train on each batch's statistics and need at least 2 "
           "images per batch")
    if trains_target and not method.freezes_extractor and s.batch_size // world == 1:  # L2-FE: BN in eval mode
        per_rank = f" over {world} ranks (1 image per rank)" if world > 1 else ""
        raise SettingsError(f"batch_size={s.batch_size}{per_rank}: {why}; use a larger batch_size")
    head_batch = min(s.attention_head_batch_size or s.batch_size, train_images)
    if method.uses_attention and s.attention is None and s.attention_head_bn == "train" and head_batch == 1:
        name = "attention_head_batch_size" if s.attention_head_batch_size else "batch_size"
        raise SettingsError(f"{name}={getattr(s, name)}: the attention's head training uses it, and {why}; use "
                            f"a larger {name}, or attention_head_bn='frozen'")


def run_context(s: FitSettings):
    ctx = init_distributed(s.device, s.dist_timeout) if s.distributed else DistContext()
    if s.batch_size % ctx.world_size:
        raise SettingsError(f"batch_size={s.batch_size} (global) is not divisible by the {ctx.world_size} ranks")
    return ctx, device_for(ctx, s.device)


def shard(dataset, ctx: DistContext):
    return dataset if not ctx.active else Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
