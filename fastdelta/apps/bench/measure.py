"""One benchmark row: an engine's step built, its first step timed (compile included), warm-up, timed steps,
peak memory, and every step's finiteness checked on the device."""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ...methods import make_method, method_class
from ...settings import make_settings
from ...train.evaluate import flush_denormals
from ...train.loop import set_training_mode
from ...train.steps import FastStep
from .networks import CALIBRATION_BATCHES, networks_for, random_attention, synthetic_batch
from .public_step import PublicStep


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_hyperparameters(method: str) -> dict:
    """The method's default alpha/beta/lr/momentum/weight decay (fastdelta.settings, public recipe): both
    engines of a row run these, so that they do the same work per step at settings that stay finite."""
    s = make_settings(method).resolved()
    return {"alpha": s.alpha, "beta": s.beta, "lr": s.lr, "momentum": s.momentum, "weight_decay": s.weight_decay}


def measure(model: str, method: str, engine: str, batch: int, size: int, num_classes: int, device,
            warmup: int, iters: int, options=None, profile_steps: int = 0, profile_dir: Optional[Path] = None,
            calibration_batches: int = CALIBRATION_BATCHES) -> dict:
    """One row: build, first step (timed, compile included), warm-up, timed steps, peak memory.

    Both engines: the method's default hyperparameters (`bench_hyperparameters`), BN statistics
    calibrated before source and target are built. Raises FloatingPointError when a step's loss (or
    fastdelta's gradient norm) or the parameters after the steps are not finite. On the CPU denormal
    floats are flushed to zero, as the training loop does (they make x86 float ops many times slower)."""
    with flush_denormals(device):
        return _measure(model, method, engine, batch, size, num_classes, device, warmup, iters, options,
                        profile_steps, profile_dir, calibration_batches)


def _measure(model, method, engine, batch, size, num_classes, device, warmup, iters, options, profile_steps,
             profile_dir, calibration_batches) -> dict:
    cleanup(device)
    hp = bench_hyperparameters(method)
    nets, calibration = networks_for(model, num_classes, device, batch=batch, size=size,
                                  calibration_batches=calibration_batches)
    attention = random_attention(nets, device)
    x, y = synthetic_batch(batch, size, num_classes, device)
    finite = _FiniteSteps(device)
    sync(device)
    t0 = time.perf_counter()
    if engine == "public":
        runner, step = _public_steps(nets, method, attention, hp, x, y, finite)
    else:
        runner, step = _fastdelta_steps(nets, method, attention, hp, options, device, x, y, finite)
    cache_before = compile_cache_counters()
    step()
    sync(device)
    first = time.perf_counter() - t0
    cache = {k: v - cache_before[k] for k, v in compile_cache_counters().items()}
    ms = _timed_ms_per_step(step, device, warmup, iters)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    steps = 1 + warmup + iters
    finite.raise_if_not(nets.target, steps, hp)
    row = {"model": model, "method": method, "engine": engine, "batch": batch, "size": size,
           "ms_per_step": round(ms, 3), "img_per_s": round(batch * 1000 / ms, 1), "first_step_s": round(first, 2),
           "peak_gib": None if peak is None else round(peak, 3), "steps": steps, "finite": True,
           **hp, "bn_calibration": calibration}
    if options is not None:
        row["options"] = options.describe()
        if options.compile is not None:
            row["compile_cache"] = cache  # hits: the first step reused compiled code from an earlier run
    if profile_steps and profile_dir is not None:
        row["profile"] = _profile(step, device, profile_steps,
                                  Path(profile_dir) / f"profile_{model}_{method}_{engine}.txt".replace("[", "_").replace("]", ""))
    del runner, step, nets
    torch._dynamo.reset()
    cleanup(device)
    return row


class _FiniteSteps:
    """Whether every step so far was finite, collected on the device (no step waits for the GPU) and read
    once after the timed steps, with the parameters' finiteness."""

    def __init__(self, device):
        self.ok = torch.ones((), dtype=torch.bool, device=device)

    def add(self, finite: torch.Tensor) -> None:
        self.ok = self.ok & finite

    def raise_if_not(self, model: nn.Module, steps: int, hp: dict) -> None:
        """FloatingPointError if a step's checked stats, or `model`'s parameters after the steps, are not finite."""
        with torch.no_grad():
            params_finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(
                [p.detach() for p in model.parameters()]))).all())
        if not bool(self.ok) or not params_finite:
            raise FloatingPointError(f"non-finite {'loss or gradient' if not bool(self.ok) else 'parameters'} "
                                     f"within {steps} steps (alpha {hp['alpha']}, lr {hp['lr']})")


def _public_steps(nets, method: str, attention, hp: dict, x, y, finite: _FiniteSteps):
    """(the public recipe's step, one step on the batch); the step's loss must be finite."""
    runner = PublicStep(nets, method, attention, lr=hp["lr"], momentum=hp["momentum"], alpha=hp["alpha"],
                        beta=hp["beta"], wd=hp["weight_decay"])

    def step():
        finite.add(torch.isfinite(runner.step(x, y)))
    return runner, step


def _fastdelta_steps(nets, method: str, attention, hp: dict, options, device, x, y, finite: _FiniteSteps):
    """(fastdelta's step, one step on the batch) set up as train_loop sets it up; the step's stats must
    pass the loop's non-finite rule."""
    reg = make_method(method, nets.target, nets.source, nets.head_name, nets.layers,
                      attention if method_class(method).uses_attention else None, alpha=hp["alpha"],
                      beta=hp["beta"], weight_decay=hp["weight_decay"], feature_map="conv")
    params = reg.trainable_parameters(nets.target)
    set_training_mode(nets.target, reg, params, extractor_bn="frozen")
    runner = FastStep(nets.target, nets.source, reg, params, options, device, hp["lr"], hp["momentum"])

    def step():  # forward_backward + update without reading the stats (the loop's deferred reads)
        stats = runner.forward_backward(x, y, hp["lr"])
        finite.add(runner.finite_on_device(stats))
        runner.update()
    return runner, step


def _timed_ms_per_step(step, device, warmup: int, iters: int) -> float:
    """Milliseconds per step over `iters` steps after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    t1 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - t1) * 1000 / iters


def compile_cache_counters() -> dict:
    """torch.compile's on-disk cache lookups so far in this process (inductor FX graphs, AOTAutograd)."""
    from torch._dynamo.utils import counters
    return {"fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
            "autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "autograd_miss": counters["aot_autograd"]["autograd_cache_miss"]}


def _profile(step, device, steps: int, path: Path) -> str:
    """torch.profiler over a few steps: the top kernels / ops by self time, written to `path`."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=25))
    return path.name
