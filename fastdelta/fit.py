"""`fastdelta.fit` and `fastdelta.attention`: the library entry points."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .attention import ChannelAttention, channel_loss_increase
from .data import resolve_data
from .engine import NonFiniteLossError, TrainSpec, evaluate, make_loader, pick_device, train_loop
from .models import Networks, build_networks, guess_arch
from .regularizers import L2FE, make_regularizer, REGULARIZERS
from .result import FitResult
from .settings import FitSettings, SettingsError, make_settings


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare(model, train_data, test_data, weights, settings: FitSettings):
    """Settings with the architecture's defaults, then data, then networks (the head needs the class count)."""
    arch = model if isinstance(model, str) else guess_arch(model) if isinstance(model, nn.Module) else None
    s = settings.resolved(arch)
    seed_everything(s.seed)
    data = resolve_data(train_data, test_data, augmentation=s.augmentation, resize=s.resize, crop=s.crop,
                        strict=s.strict_data)
    nets = build_networks(model, len(data.classes), weights, s.layers, s.seed)
    if s.batch_size > len(data.train):
        raise SettingsError(f"batch_size={s.batch_size} is larger than the training set ({len(data.train)} images)")
    return s, data, nets


def _model_info(nets: Networks) -> dict:
    return {"arch": nets.arch, "weights": nets.weights, "head": nets.head_name, "layers": nets.layers,
            "parameters": sum(p.numel() for p in nets.target.parameters())}


def _train_head(nets: Networks, data, s: FitSettings, device, iterations: int, progress_desc: str) -> list:
    """Algorithm 1's first loop: train only the new head on the frozen source extractor (L2-FE)."""
    reg = L2FE(nets.target, nets.source, nets.head_name, nets.layers, s.alpha, s.beta, s.weight_decay)
    loader = make_loader(data.train, s.batch_size, True, s.seed, s.num_workers, drop_last=True)
    spec = TrainSpec(iterations, s.lr, s.momentum, "exp", max(1, round(iterations * 0.6)), 0.1, s.progress,
                     progress_desc)
    return train_loop(nets.target, nets.source, reg, loader, spec, device)


def _attention_batches(data, s: FitSettings, device) -> list:
    n = len(data.train_eval) if s.attention_max_images is None else min(s.attention_max_images, len(data.train_eval))
    subset = torch.utils.data.Subset(data.train_eval, range(n))
    loader = make_loader(subset, min(s.eval_batch_size, n), False, s.seed, s.num_workers)
    return [(x.to(device), y.to(device)) for x, y in loader]


def compute_attention(nets: Networks, data, s: FitSettings, device, log=print) -> ChannelAttention:
    """Algorithm 1 on a copy of the target: train the L2-FE head, then the per-channel loss increases."""
    t0 = time.perf_counter()
    fe = Networks(nets.source, _copy(nets.target), nets.arch, nets.head_name, nets.layers, nets.weights)
    head_iters = max(1, s.attention_head_epochs * max(1, len(data.train) // s.batch_size))
    head_history = _train_head(fe, data, s, device, head_iters, "attention: L2-FE head")
    t_head = time.perf_counter() - t0
    batches = _attention_batches(data, s, device)
    raws, impl, per_layer = channel_loss_increase(fe.target, nets.layers, batches, s.attention_impl, s.progress, log)
    images = sum(len(y) for _, y in batches)
    return ChannelAttention(list(nets.layers), raws, s.attention_temperature, images, impl,
                            {"head_training": round(t_head, 3), **{f"layer:{k}": v for k, v in per_layer.items()},
                             "total": round(time.perf_counter() - t0, 3)},
                            {"iterations": head_iters, "lr": s.lr, "schedule": "exp to 0.1x at 60%",
                             "final_ce": head_history[-1]["ce"]})


def _copy(module: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(module)


def _load_attention(given, nets: Networks, s: FitSettings) -> ChannelAttention:
    att = given if isinstance(given, ChannelAttention) else ChannelAttention.load(given, nets.layers, s.attention_temperature)
    if list(att.layers) != list(nets.layers):
        raise SettingsError(f"attention is for layers {att.layers}, but the regularised layers are {nets.layers}")
    return att


def fit(model: Union[str, nn.Module], train, test=None, method: str = "delta", weights=None, **settings) -> FitResult:
    """Fine-tune `model` on `train` with one of the paper's methods and evaluate on `test`.

    model: torchvision/timm name or nn.Module; weights: state-dict path, "imagenet" (EfficientNet-Lite0,
    shipped), or None/"random" (warned). train/test: ImageFolder root, torch Dataset or (images, labels).
    Settings: see FitSettings. Raises NonFiniteLossError (with .partial_result) if a loss term diverges.
    """
    s, data, nets = _prepare(model, train, test, weights, make_settings(method, **settings))
    device = pick_device(s.device)
    nets.source.to(device)
    nets.target.to(device)
    timings = {}
    t_all = time.perf_counter()
    reg_cls = REGULARIZERS[s.method]
    attention = None
    if reg_cls.uses_attention:
        attention = (_load_attention(s.attention, nets, s) if s.attention is not None
                     else compute_attention(nets, data, s, device))
        timings["attention"] = attention.timings.get("total", 0.0)
    reg = make_regularizer(s.method, nets.target, nets.source, nets.head_name, nets.layers, s.alpha, s.beta,
                           s.weight_decay, s.feature_relu, None if attention is None else attention.weights)
    loader = make_loader(data.train, s.batch_size, True, s.seed, s.num_workers, drop_last=True,
                         pin_memory=device.type == "cuda")
    spec = TrainSpec(s.iterations, s.lr, s.momentum, s.lr_schedule, s.lr_step, s.lr_gamma, s.progress,
                     f"train {s.method}")
    settings_record = {**s.to_dict(), "device_used": str(device)}
    data_record = {**data.description, "skipped_files": [list(x) for x in data.skipped]}
    info = _model_info(nets)
    t0 = time.perf_counter()
    try:
        history = train_loop(nets.target, nets.source, reg, loader, spec, device)
    except NonFiniteLossError as e:
        timings["train"] = round(time.perf_counter() - t0, 3)
        e.partial_result = FitResult(nets.target, s.method, settings_record, info, data_record, e.history,
                                     {}, attention, timings, f"diverged: {e}")
        raise
    timings["train"] = round(time.perf_counter() - t0, 3)
    if history:
        timings["first_step"] = history[0]["step_s"]
        timings["img_per_s"] = round(s.batch_size * len(history) / max(timings["train"], 1e-9), 2)
    test_metrics = {}
    if data.test is not None:
        t0 = time.perf_counter()
        test_loader = make_loader(data.test, s.eval_batch_size, False, s.seed, s.num_workers)
        test_metrics = evaluate(nets.target, test_loader, device, s.progress, f"test {s.method}")
        timings["test"] = round(time.perf_counter() - t0, 3)
    timings["total"] = round(time.perf_counter() - t_all, 3)
    return FitResult(nets.target, s.method, settings_record, info, data_record, history, test_metrics,
                     attention, timings)


def attention(model: Union[str, nn.Module], train, weights=None, **settings) -> ChannelAttention:
    """Only the channel attention (Algorithm 1) for `model` on `train`."""
    s, data, nets = _prepare(model, train, None, weights, make_settings("delta", **settings))
    device = pick_device(s.device)
    nets.source.to(device)
    nets.target.to(device)
    return compute_attention(nets, data, s, device)
