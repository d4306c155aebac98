"""`fastdelta bench step --interleave ROUNDS`: every engine of a (model, method) built side by side and
their timed steps taken in turns (public, reference, fp32 channels_last, bf16 channels_last, public, ...),
so that a load change on a shared machine hits every engine alike. Each row carries its speed-up over the
public step round by round (median, min, max): one run's ratio comes with its own spread.

The engines are the CPU candidates `auto` chooses from (fastdelta.train.engine_choice) plus the public
code's step; with --with-compile also bf16 channels_last compiled, which `auto` never picks on a CPU.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch

from ...methods import make_method, method_class
from ...train.engine_choice import (cpu_candidates, cpu_flags, cpu_has_bf16_units, interleaved_ms, ratio_spread)
from ...train.evaluate import flush_denormals
from ...train.loop import set_training_mode
from ...train.steps import FastStep, ReferenceStep, StepOptions
from .measure import bench_hyperparameters
from .networks import networks_for, random_attention, synthetic_batch
from .public_step import PublicStep

PUBLIC = "public"


def engines(with_compile: bool, bf16_units: Optional[bool] = None) -> Dict[str, Optional[StepOptions]]:
    """name -> StepOptions (None: fastdelta's reference step) of the fastdelta engines compared."""
    out = dict(cpu_candidates(cpu_has_bf16_units() if bf16_units is None else bf16_units))
    if with_compile:
        out["bf16_channels_last_compiled"] = StepOptions("bf16", True, "default")
    return out


def _step_of(model: str, method: str, engine: str, options, batch: int, size: int, num_classes: int, device):
    """(one training step of `engine`, its first step's seconds) on its own calibrated copy of the network."""
    hp = bench_hyperparameters(method)
    nets, _ = networks_for(model, num_classes, device, batch=batch, size=size)
    attention = random_attention(nets, device)
    x, y = synthetic_batch(batch, size, num_classes, device)
    if engine == PUBLIC:
        runner = PublicStep(nets, method, attention, lr=hp["lr"], momentum=hp["momentum"], alpha=hp["alpha"],
                            beta=hp["beta"], wd=hp["weight_decay"])
        step = lambda: runner.step(x, y)  # noqa: E731
    else:
        reg = make_method(method, nets.target, nets.source, nets.head_name, nets.layers,
                          attention if method_class(method).uses_attention else None, alpha=hp["alpha"],
                          beta=hp["beta"], weight_decay=hp["weight_decay"], feature_map="conv")
        params = reg.trainable_parameters(nets.target)
        set_training_mode(nets.target, reg, params, extractor_bn="frozen")
        runner = (ReferenceStep(nets.target, nets.source, reg, params, device, hp["lr"], hp["momentum"])
                  if options is None else
                  FastStep(nets.target, nets.source, reg, params, options, device, hp["lr"], hp["momentum"]))

        def step():
            runner.forward_backward(x, y, hp["lr"])
            runner.update()
    t0 = time.perf_counter()
    step()
    return step, round(time.perf_counter() - t0, 2)


def measure_method(model: str, method: str, engine_options: Dict[str, Optional[StepOptions]], batch: int, size: int,
                   num_classes: int, device, rounds: int, warmup: int) -> List[dict]:
    """One row per engine for (model, method): median ms, the speed-up over the public step with its spread."""
    with flush_denormals(device):
        built = {name: _step_of(model, method, name, opts, batch, size, num_classes, device)
                 for name, opts in {PUBLIC: None, **engine_options}.items()}
        times = interleaved_ms({name: step for name, (step, _) in built.items()}, rounds, warmup)
    spread = ratio_spread(times, PUBLIC)
    return [{"model": model, "method": method, "engine": name, "batch": batch, "size": size,
             "first_step_s": built[name][1], "ms_per_step": spread[name]["ms_median"],
             "img_per_s": round(batch * 1000 / spread[name]["ms_median"], 1),
             "vs_public": {k: spread[name][k] for k in ("speedup_median", "speedup_min", "speedup_max")},
             "rounds": spread[name]["rounds"], "ms_all": [round(t, 2) for t in times[name]]}
            for name in built]


def cpu_record() -> dict:
    """The CPU's model and the flags that decide its speed (vector widths, bf16 units)."""
    from ...result import cpu_arithmetic
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    return {**cpu_arithmetic(), "cpu_flags": flags, "bf16_units": cpu_has_bf16_units()}


def markdown(rows: List[dict], env: dict) -> str:
    """Per model and method: each engine's ms, its speed-up over public (median [min-max] over rounds), and
    its ms over the same engine's L2 ms."""
    l2 = {(r["model"], r["engine"]): r["ms_per_step"] for r in rows if r["method"] == "l2"}
    lines = [f"# bench step, interleaved: {env.get('cpu_model') or env.get('device')}, torch {env.get('torch')}", "",
             "Every engine's steps taken in turns (A B C A B C ...); speed-up = public ms / engine ms per round "
             "(median [min, max]); vs L2 = ms / the same engine's L2 ms.", "",
             "| model | method | engine | ms/step | img/s | speed-up vs public | vs L2 | first step s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["vs_public"]
        own_l2 = l2.get((r["model"], r["engine"]))
        vs_l2 = "-" if own_l2 is None else f"{r['ms_per_step'] / own_l2:.2f}x"
        lines.append(f"| {r['model']} | {r['method']} | {r['engine']} | {r['ms_per_step']:.1f} | {r['img_per_s']:.1f} | "
                     f"{v['speedup_median']:.2f}x [{v['speedup_min']:.2f}, {v['speedup_max']:.2f}] | "
                     f"{vs_l2} | {r['first_step_s']} |")
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "cpu_flags"),
              "CPU flags: " + " ".join(env.get("cpu_flags", []))]
    return "\n".join(lines) + "\n"
