"""Channel attention measured on the user's data (Algorithm 1 end to end): which training images, the
L2-FE head trained on a copy of the target, every channel's loss increase summed over the images (split
across ranks), and the on-disk cache. `compute_attention` is the public entry point (fastdelta.
compute_attention); fastdelta.fit uses `measure_attention`, or `load_attention` for a precomputed one."""
from __future__ import annotations

import copy
import os
import time
import warnings
from typing import Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Subset

from ..data.sampling import FixedAugmentation
from ..methods import L2FE
from ..networks.models import Networks
from ..run_setup import prepare_run, run_context, shard
from ..settings import FitSettings, SettingsError, make_settings
from ..train.distributed import DistContext
from ..train.loop import TrainSpec, make_loader, train_loop
from .cache import attention_key, cache_dir, head_data_digest, load_cached, store
from .loss_increase import channel_loss_increase
from .weights import ChannelAttention


def attention_indices(total: int, limit, sample: str, seed: int) -> list:
    """Which of `total` training images Algorithm 1 measures: all of them, or `limit` of them drawn by
    `sample` ("random": a seeded random sample, the same on every rank; "first": the first ones)."""
    n = total if limit == "all" else min(limit, total)
    if n == total or sample == "first":
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 7_919 + 104_729)
    return torch.randperm(total, generator=g)[:n].tolist()


def _sample_record(data, indices: list, sample: str) -> dict:
    labels = _labels_of(data.train_eval)
    record = {"rule": "all" if len(indices) == len(data.train_eval) else sample, "images": len(indices)}
    if labels is not None:
        counts = np.bincount([labels[i] for i in indices], minlength=len(data.classes)).tolist()
        record["per_class"] = dict(zip(map(str, data.classes), counts))
    return record


def _labels_of(dataset):
    targets = getattr(dataset, "targets", None)
    return None if targets is None else [int(t) for t in targets]


def measure_attention(nets: Networks, data, s: FitSettings, device, ctx: DistContext = DistContext(),
                      log=print) -> ChannelAttention:
    """Algorithm 1 on a copy of the target: train the L2-FE head (identically on every rank), then
    sum each channel's loss increase over the images (split across ranks, sums all-reduced).
    A result cached for the same weights, head training data, images and settings is read instead
    (single process); the loss increases are what is measured and cached, W is normalised by this run's
    settings."""
    t0 = time.perf_counter()
    indices = attention_indices(len(data.train_eval), s.attention_max_images, s.attention_sample, s.seed)
    n = len(indices)
    pool = FixedAugmentation(data.train, s.seed) if s.attention_augmented else data.train_eval
    images = shard(Subset(pool, indices), ctx)
    loader = make_loader(images, max(1, min(s.eval_batch_size, len(images))), False, s.seed, s.num_workers)
    batches = list(loader)
    cache = None if ctx.active else cache_dir(s.attention_cache)
    key = None
    if cache is not None:
        key = attention_key(nets.target, head_data_digest(data.train), batches,
                            {**s.to_dict(), "layers": nets.layers, "num_classes": len(data.classes)})
        try:
            cached = load_cached(cache, key)
        except OSError:  # a cache folder that cannot be read (no permission): as a miss; storing then warns
            cached = None
        if cached is not None:
            cached.timings = {**cached.timings, "cache_hit": True, "total": round(time.perf_counter() - t0, 3)}
            return cached.normalised(s.attention_temperature, s.attention_normalisation)
    fe = Networks(nets.source, copy.deepcopy(nets.target), nets.arch, nets.head_name, nets.layers, nets.weights)
    batch = min(s.attention_head_batch_size or s.batch_size, len(data.train))
    head_iters = max(1, s.attention_head_min_iterations, s.attention_head_epochs * max(1, len(data.train) // batch))
    reg = L2FE(fe.target, fe.source, fe.head_name, fe.layers, weight_decay=s.weight_decay)
    spec = TrainSpec(head_iters, s.lr, s.momentum, batch, s.seed, "exp", max(1, round(head_iters * 0.6)),
                     0.1, s.num_workers, s.progress and ctx.is_main, "attention: L2-FE head",
                     extractor_bn=s.attention_head_bn)
    head_history = train_loop(fe.target, fe.source, reg, data.train, spec, device)
    t_head = time.perf_counter() - t0
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    dtype = torch.bfloat16 if s.attention_dtype == "bf16" else torch.float32
    raws, ran, per_layer = channel_loss_increase(fe.target, nets.layers, batches, s.attention_impl,
                                                 s.progress and ctx.is_main, log, s.attention_chunk, dtype)
    raws = [ctx.all_reduce_sum(r) for r in raws]
    att = ChannelAttention(list(nets.layers), raws, s.attention_temperature, n, ran,
                           {"head_training": round(t_head, 3), **{f"layer:{k}": v for k, v in per_layer.items()},
                            "total": round(time.perf_counter() - t0, 3)},
                           {"iterations": head_iters, "batch_size": batch, "lr": s.lr, "schedule": "exp to 0.1x at 60%",
                            "bn": s.attention_head_bn, "images_augmented": s.attention_augmented,
                            "final_ce": head_history[-1]["ce"]},
                           torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
                           s.attention_normalisation, _sample_record(data, indices, s.attention_sample))
    if key is not None:
        _store_or_warn(cache, key, att)
    return att


def _store_or_warn(cache, key: str, att: ChannelAttention) -> None:
    """The attention stored in the cache; a cache folder that cannot take it (read-only, full, not a
    folder) costs only the cache: the run goes on with the attention it computed, and a warning says so."""
    from ..output_files import reason
    try:
        store(cache, key, att)
    except OSError as e:
        att.cache_failed = True  # the cache does not hold this run's attention (what a stop reports)
        warnings.warn(f"fastdelta: could not store the channel attention in the cache folder {cache} "
                      f"({reason(e)}); going on without the cache (the next run computes it again): free that "
                      "folder, point FASTDELTA_CACHE or --attention-cache at a writable one, or pass "
                      "--attention-cache off (attention_cache=None)", UserWarning, stacklevel=3)


def load_attention(given, nets: Networks, s: FitSettings) -> ChannelAttention:
    """A precomputed attention (object or file): its loss increases, normalised by this run's settings."""
    att = given if isinstance(given, ChannelAttention) else ChannelAttention.load(given, nets.layers)
    if list(att.layers) != list(nets.layers):
        raise SettingsError(f"attention is for layers {att.layers}, but the regularised layers are {nets.layers}")
    if not all(torch.isfinite(r).all() for r in att.raw):
        raise SettingsError("the given attention holds NaN or infinite loss increases (its weights would be "
                            "NaN or uniform): compute it again")
    return att.normalised(s.attention_temperature, s.attention_normalisation)


def compute_attention(model: Union[str, nn.Module], train, weights=None, **settings) -> ChannelAttention:
    """Only the channel attention (Algorithm 1) for `model` on `train`, as fastdelta.fit would compute it
    before training; model, train, weights and the settings as for fastdelta.fit."""
    s, data, nets = prepare_run(model, train, None, weights, make_settings(**settings), trains_target=False)
    ctx, device = run_context(s)
    nets.source.to(device)
    nets.target.to(device)
    return measure_attention(nets, data, s, device, ctx)
