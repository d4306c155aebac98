"""`fastdelta.fit` and `fastdelta.attention`: the library entry points."""
from __future__ import annotations

import copy
import os
import random
import time
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Subset

from .data import resolve_data
from .data.backend import choose_backend
from .data.sampling import FixedAugmentation
from .ioutil import check_output_dir, warn_if_short_of_space
from .methods import L2FE, make_method, method_class
from .methods.attention import ChannelAttention, channel_loss_increase
from .methods.attention_cache import attention_key, cache_dir, load_cached, store
from .methods.taps import FeatureTaps
from .networks.models import Networks, build_networks, guess_arch
from .result import FitResult
from .settings import FitSettings, SettingsError, make_settings
from .train.checkpoint import KEEP, CheckpointError, checkpoint_bytes, load_latest, state_bytes, write_failed
from .train.distributed import DistContext, device_for, init_distributed
from .train.evaluate import evaluate
from .train.loop import NonFiniteLossError, StartState, TrainSpec, make_loader, train_loop
from .train.source_net import batch_statistics_copy
from .train.steps import resolve_step_options

# settings that may differ between a run and its resumption: they do not change the result (the
# global batches are the same on any number of ranks, so a DDP run may resume on one process)
RESUMABLE_DIFFERENCES = {"progress", "device", "num_workers", "eval_batch_size", "resume", "run_dir",
                         "checkpoint_every", "attention", "extra", "distributed", "data_prefetch"}


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


def _writes_files(s: FitSettings) -> bool:
    """Whether this process writes the run's files: under torchrun only rank 0 does (its context is
    not set up yet when the output folder is checked)."""
    return not s.distributed or os.environ.get("RANK", "0") == "0"


def _output_bytes(nets: Networks, s: FitSettings) -> int:
    """Disk space the run needs at most: model.pt, and with checkpoints the KEEP kept ones plus the
    one being written."""
    return state_bytes(nets.target) + ((KEEP + 1) * checkpoint_bytes(nets.target) if s.checkpoint_every > 0 else 0)


def _context(s: FitSettings):
    ctx = init_distributed(s.device) if s.distributed else DistContext()
    if s.batch_size % ctx.world_size:
        raise SettingsError(f"batch_size={s.batch_size} (global) is not divisible by the {ctx.world_size} ranks")
    return ctx, device_for(ctx, s.device)


def _model_info(nets: Networks) -> dict:
    return {"arch": nets.arch, "weights": nets.weights, "head": nets.head_name, "layers": nets.layers,
            "parameters": sum(p.numel() for p in nets.target.parameters())}


def _shard(dataset, ctx: DistContext):
    return dataset if not ctx.active else Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))


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


def compute_attention(nets: Networks, data, s: FitSettings, device, ctx: DistContext = DistContext(),
                      log=print) -> ChannelAttention:
    """Algorithm 1 on a copy of the target: train the L2-FE head (identically on every rank), then
    sum each channel's loss increase over the images (split across ranks, sums all-reduced).
    A result cached for the same weights, images and settings is read instead (single process); the
    loss increases are what is measured and cached, W is normalised by this run's settings."""
    t0 = time.perf_counter()
    indices = attention_indices(len(data.train_eval), s.attention_max_images, s.attention_sample, s.seed)
    n = len(indices)
    pool = FixedAugmentation(data.train, s.seed) if s.attention_augmented else data.train_eval
    images = _shard(Subset(pool, indices), ctx)
    loader = make_loader(images, max(1, min(s.eval_batch_size, len(images))), False, s.seed, s.num_workers)
    batches = list(loader)
    cache = None if ctx.active else cache_dir(s.attention_cache)
    key = None
    if cache is not None:
        key = attention_key(nets.target, batches, {**s.to_dict(), "layers": nets.layers,
                                                   "num_classes": len(data.classes)})
        cached = load_cached(cache, key)
        if cached is not None:
            cached.timings = {**cached.timings, "cache_hit": True, "total": round(time.perf_counter() - t0, 3)}
            return cached.normalised(s.attention_temperature, s.attention_normalisation)
    fe = Networks(nets.source, copy.deepcopy(nets.target), nets.arch, nets.head_name, nets.layers, nets.weights)
    batch = min(s.attention_head_batch_size or s.batch_size, len(data.train))
    head_iters = max(1, s.attention_head_min_iterations, s.attention_head_epochs * max(1, len(data.train) // batch))
    reg = L2FE(fe.target, fe.source, fe.head_name, fe.layers, s.alpha, s.beta, s.weight_decay)
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
        store(cache, key, att)
    return att


# training images (centre crop) over which feature_scale="source_energy" measures the source maps
ENERGY_IMAGES = 256


@torch.no_grad()
def source_energy(reg, source: nn.Module, data, s: FitSettings, device) -> list:
    """Per regularised layer, E_l: the regulariser's distance between the source maps and zero, per
    image, over the first ENERGY_IMAGES training images (centre crop); the same on every rank."""
    n = min(ENERGY_IMAGES, len(data.train_eval))
    loader = make_loader(Subset(data.train_eval, range(n)), max(1, min(s.eval_batch_size, n)), False, s.seed,
                         s.num_workers)
    totals = [0.0] * len(reg.taps)
    with FeatureTaps(source, reg.taps, rectify=reg.rectify_at_tap) as taps:
        for x, _ in loader:
            _, feats = taps(x.to(device))
            totals = [t + e for t, e in zip(totals, reg.source_energy(feats))]
    return [t / n for t in totals]


def _load_attention(given, nets: Networks, s: FitSettings) -> ChannelAttention:
    """A precomputed attention (object or file): its loss increases, normalised by this run's settings."""
    att = given if isinstance(given, ChannelAttention) else ChannelAttention.load(given, nets.layers)
    if list(att.layers) != list(nets.layers):
        raise SettingsError(f"attention is for layers {att.layers}, but the regularised layers are {nets.layers}")
    return att.normalised(s.attention_temperature, s.attention_normalisation)


def _identity(s: FitSettings, nets: Networks, data, world_size: int) -> dict:
    """What a checkpoint must agree with to be resumed: every result-changing setting, model, data."""
    settings = {k: v for k, v in s.to_dict().items() if k not in RESUMABLE_DIFFERENCES}
    return {"settings": settings, "model": _model_info(nets), "data": data.description, "world_size": world_size}


def _check_identity(saved: dict, current: dict, run_dir) -> None:
    diffs = []
    defaults = FitSettings().to_dict()
    for part in ("settings", "model", "data"):
        a, b = saved.get(part, {}), current.get(part, {})
        diffs += [f"{part}.{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                  if a.get(k) != b.get(k)
                  # a setting added after the checkpoint was written, left at its default, changes nothing
                  and not (part == "settings" and k not in a and k in defaults and b.get(k) == defaults[k])]
    if diffs:
        raise SettingsError(f"cannot resume {run_dir}: the run was made with other settings: " + "; ".join(diffs[:6]))


def _resume_state(s: FitSettings, nets: Networks, identity: dict):
    ckpt = load_latest(Path(s.run_dir) / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"resume: no checkpoint in {Path(s.run_dir) / 'checkpoints'}")
    _check_identity(ckpt["identity"], identity, s.run_dir)
    nets.target.load_state_dict(ckpt["model"])
    att = None
    if ckpt.get("attention") is not None:
        att = ChannelAttention.from_dict(ckpt["attention"])
    return StartState(ckpt["iteration"], ckpt["history"], ckpt["optimizer"], ckpt["rng"]), att


def _curve_evaluator(model: nn.Module, test, s: FitSettings, device, ctx: DistContext):
    """With eval_every > 0: a step callback that adds test_top1 (on the first eval_images test images)
    to the history every eval_every iterations and at the last one, for learning curves."""
    if not s.eval_every or test is None:
        return None
    subset = test if s.eval_images is None else Subset(test, range(min(s.eval_images, len(test))))
    loader = make_loader(_shard(subset, ctx), s.eval_batch_size, False, s.seed, s.num_workers)

    def evaluates(done: int) -> bool:
        return done % s.eval_every == 0 or done == s.iterations

    def on_step(done: int, record: dict) -> None:
        if evaluates(done):
            was_training = model.training  # evaluate() leaves eval mode; L2-FE trains in eval mode
            record["test_top1"] = evaluate(model, loader, device, False, "curve", ctx)["top1"]
            model.train(was_training)
            record["test_images"] = len(subset)
    on_step.reads_model = evaluates  # the training loop waits for the step before these iterations
    return on_step


def _dali_kwargs(s: FitSettings, device) -> dict:
    return dict(augmentation=s.augmentation, resize=s.resize, crop=s.crop, prefetch=s.data_prefetch,
                device_id=(device.index or 0) if device.type == "cuda" else None)


def _dali_train_factory(data, s: FitSettings, device, step_options):
    """(start_iteration, ctx) -> DALI training loader: the torchvision path's batches, crops and flips."""
    def make(start_iteration: int, ctx: DistContext):
        from .data.dali import dali_train_loader
        return dali_train_loader(data.train.samples, s.batch_size, s.seed, start_iteration, ctx.rank,
                                 ctx.world_size, channels_last=bool(step_options and step_options.channels_last),
                                 **_dali_kwargs(s, device))
    return make


def _dali_eval_loader(test, s: FitSettings, device, ctx: DistContext):
    from .data.dali import dali_eval_loader
    samples = test.samples[ctx.rank::ctx.world_size] if ctx.active else test.samples
    return dali_eval_loader(samples, s.eval_batch_size, **_dali_kwargs(s, device))


def fit(model: Union[str, nn.Module], train, test=None, method: str = FitSettings.method, weights=None,
        **settings) -> FitResult:
    """Fine-tune `model` on `train` with one of the paper's methods and evaluate on `test`.

    model: torchvision/timm name or nn.Module; weights: state-dict path, "imagenet" (EfficientNet-Lite0,
    shipped), or None/"random" (warned). train/test: ImageFolder root, torch Dataset or (images, labels).
    Settings: see FitSettings. Raises NonFiniteLossError (with .partial_result) if a loss term diverges,
    OutputError if run_dir cannot take the run's files (checked first) or a write fails, and Preempted
    (after a checkpoint) on SIGTERM/SIGINT while training with a run_dir.
    Under torchrun with distributed=True every rank returns the result; only rank 0 writes files.
    """
    requested = make_settings(method, **settings)
    if requested.run_dir is not None and _writes_files(requested):
        # before any work: a bad folder fails now, not after the training
        check_output_dir(requested.run_dir, create=not requested.resume)
    s, data, nets = _prepare(model, train, test, weights, requested)
    ctx, device = _context(s)
    if s.run_dir is not None and ctx.is_main:
        warn_if_short_of_space(s.run_dir, _output_bytes(nets, s), "this run's checkpoints and model.pt")
    nets.source.to(device)
    nets.target.to(device)
    timings = {}
    t_all = time.perf_counter()
    identity = _identity(s, nets, data, ctx.world_size)
    start, attention = (_resume_state(s, nets, identity) if s.resume else (StartState(), None))
    if attention is None and method_class(s.method).uses_attention:
        attention = (_load_attention(s.attention, nets, s) if s.attention is not None
                     else compute_attention(nets, data, s, device, ctx))
        timings["attention"] = attention.timings.get("total", 0.0)
    reg = make_method(s.method, nets.target, nets.source, nets.head_name, nets.layers, s.alpha, s.beta,
                      s.weight_decay, s.feature_map, None if attention is None else attention.weights,
                      s.delta_no_att_scale, delta_scale=s.delta_scale, distance_impl=s.distance_impl,
                      world_size=ctx.world_size)
    feature_source = nets.source if s.source_bn == "running" else batch_statistics_copy(nets.source)
    energy = None
    if reg.uses_source_features and s.feature_scale == "source_energy":
        energy = source_energy(reg, feature_source, data, s, device)
        reg.layer_scale = [1.0 / e if e > 0 else 1.0 for e in energy]
    try:
        step_options = resolve_step_options(device, s.precision, s.compile, s.channels_last, s.cuda_graphs,
                                            s.step_engine)
    except ValueError as e:
        raise SettingsError(str(e)) from e
    run_dir = Path(s.run_dir) if s.run_dir is not None else None
    backend = choose_backend(s.data_backend, device, data.train, data.test)
    curve = _curve_evaluator(nets.target, data.test, s, device, ctx)
    spec = TrainSpec(s.iterations, s.lr, s.momentum, s.batch_size, s.seed, s.lr_schedule, s.lr_step, s.lr_gamma,
                     s.num_workers, s.progress, f"train {s.method}", nesterov=s.nesterov,
                     backbone_lr_mult=s.backbone_lr_mult,
                     checkpoint_dir=None if run_dir is None else run_dir / "checkpoints",
                     checkpoint_every=s.checkpoint_every,
                     history_path=None if run_dir is None else run_dir / "history.jsonl",
                     payload_extra={"identity": identity,
                                    "attention": None if attention is None else attention.to_dict()},
                     on_step=curve, on_step_reads_model=getattr(curve, "reads_model", None), step=step_options,
                     loader=_dali_train_factory(data, s, device, step_options) if backend.name == "dali" else None)
    settings_record = {**s.to_dict(), "device_used": str(device), "world_size": ctx.world_size,
                       "step_used": step_options.describe() if step_options is not None else {"step_engine": "reference"},
                       "resumed_from_iteration": start.iteration if s.resume else None,
                       "feature_map_taps": dict(zip(nets.layers, reg.taps)),
                       "source_energy": None if energy is None else dict(zip(nets.layers, energy))}
    data_record = {**data.description, "skipped_files": [list(x) for x in data.skipped],
                   "backend": backend.to_dict()}
    info = _model_info(nets)
    t0 = time.perf_counter()
    try:
        history = train_loop(nets.target, feature_source, reg, data.train, spec, device, ctx, start)
    except NonFiniteLossError as e:
        timings["train"] = round(time.perf_counter() - t0, 3)
        if reg.uses_source_features and s.feature_map == "conv" and s.feature_scale == "none":
            e.args = (f"{e.args[0]}; with raw conv taps the feature-map term grows with the network's "
                      "pre-BN activations, so an alpha tuned elsewhere can diverge here: lower alpha, or use "
                      "feature_map='activation' (recipe='paper') or feature_scale='source_energy'",)
        e.partial_result = FitResult(nets.target, s.method, settings_record, info, data_record, e.history,
                                     {}, attention, timings, f"diverged: {e}")
        raise
    timings["train"] = round(time.perf_counter() - t0, 3)
    ran = len(history) - start.iteration
    if ran:
        timings["first_step"] = history[start.iteration]["step_s"]
        timings["img_per_s"] = round(s.batch_size * ran / max(timings["train"], 1e-9), 2)
    test_metrics = {}
    if data.test is not None:
        t0 = time.perf_counter()
        test_loader = (_dali_eval_loader(data.test, s, device, ctx) if backend.name == "dali" else
                       make_loader(_shard(data.test, ctx), s.eval_batch_size, False, s.seed, s.num_workers))
        test_metrics = evaluate(nets.target, test_loader, device, s.progress, f"test {s.method}", ctx)
        timings["test"] = round(time.perf_counter() - t0, 3)
    timings["total"] = round(time.perf_counter() - t_all, 3)
    result = FitResult(nets.target, s.method, settings_record, info, data_record, history, test_metrics,
                       attention, timings)
    if run_dir is not None and ctx.is_main:
        try:
            result.save(run_dir)
        except OSError as e:
            raise write_failed(f"the results in {run_dir}", e, spec.checkpoint_dir) from e
    return result


def attention(model: Union[str, nn.Module], train, weights=None, **settings) -> ChannelAttention:
    """Only the channel attention (Algorithm 1) for `model` on `train`."""
    s, data, nets = _prepare(model, train, None, weights, make_settings(**settings))
    ctx, device = _context(s)
    nets.source.to(device)
    nets.target.to(device)
    return compute_attention(nets, data, s, device, ctx)
