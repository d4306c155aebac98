"""`fastdelta bench step` / benchmarks/bench_step.py: the training step of every method, timed side by side
with the public recipe; the rows written as they are measured.

The plan (models x methods x engines) from the command line, one row at a time, bench_step.json and
bench_step.md rewritten after each, and the first steps timed again in a fresh process on request.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from ...settings import METHODS
from ...train.steps import resolve_step_options
from .measure import bench_hyperparameters, cleanup, measure
from .networks import CALIBRATION_BATCHES
from .report import environment, markdown


GPU_MODELS = ["resnet50", "resnet101", "efficientnet_lite0"]


def warm_first_steps(args, rows: list) -> None:
    """Time to first step again in a fresh process, now that this one filled torch.compile's caches.

    A user's second run (or second job on the machine) sees this time, not the cold one; one subprocess
    measures every compiled fastdelta row (1 timed step each) and the result goes to `first_step_warm_s`."""
    todo = [r for r in rows if "error" not in r and r["engine"] != "public" and r.get("options", {}).get("compile")]
    if not todo:
        return
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fastdelta", "bench", "step", "--engines", "fastdelta", "--warmup", "0",
               "--iters", "1", "--out", tmp,
               "--models", ",".join(dict.fromkeys(r["model"] for r in todo)),
               "--methods", ",".join(dict.fromkeys(r["method"] for r in todo)),
               "--batch", str(todo[0]["batch"]), "--size", str(todo[0]["size"]),
               "--num-classes", str(args.num_classes), "--device", args.device, "--precision", args.precision,
               "--channels-last", args.channels_last]
        cmd += ["--compile-modes", args.compile_modes] if args.compile_modes else ["--compile", args.compile]
        cmd += ["--calibration-batches", str(getattr(args, "calibration_batches", CALIBRATION_BATCHES))]
        cmd += ["--cuda-graphs"] if args.cuda_graphs else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"warm first step: the subprocess failed ({done.returncode}): {done.stderr[-2000:]}", flush=True)
            return
        warm = {(r["model"], r["method"], r["engine"]): r for r in json.loads((Path(tmp) / "bench_step.json").read_text())["rows"]}
    for r in todo:
        w = warm.get((r["model"], r["method"], r["engine"]))
        if w is not None and "error" not in w:
            r["first_step_warm_s"], r["compile_cache_warm"] = w["first_step_s"], w.get("compile_cache")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU configuration (a small CNN, batch 4, 32x32, few steps): a CI smoke test")
    p.add_argument("--models", default=None,
                   help=f"comma separated (default {','.join(GPU_MODELS)}; 'smoke' = the tiny CNN)")
    p.add_argument("--methods", default="all", help=f"comma separated from {', '.join(METHODS)}, or all")
    p.add_argument("--engines", default="public,fastdelta", help="public and/or fastdelta")
    p.add_argument("--batch", type=int, default=None, help="default 64 (smoke: 4)")
    p.add_argument("--size", type=int, default=None, help="default 224 (smoke: 32)")
    p.add_argument("--num-classes", type=int, default=120)
    p.add_argument("--warmup", type=int, default=None, help="default 5 (smoke: 1)")
    p.add_argument("--iters", type=int, default=None, help="default 20 (smoke: 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", default="auto", help="auto, off, or a torch.compile mode (fastdelta engine)")
    p.add_argument("--compile-modes", default=None,
                   help="measure the fastdelta engine once per mode, e.g. default,max-autotune-no-cudagraphs,"
                        "reduce-overhead (overrides --compile)")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--cuda-graphs", action="store_true", help="fastdelta: CUDA graphs (compile 'reduce-overhead')")
    p.add_argument("--also-eager", action="store_true",
                   help="also measure the fastdelta engine without torch.compile (engine 'fastdelta[eager]', same "
                        "precision and layout), before the compiled one: a fastdelta figure even when the "
                        "compile does not finish in time, and what the compile adds")
    p.add_argument("--calibration-batches", type=int, default=CALIBRATION_BATCHES,
                   help="synthetic batches that set the random network's BN running statistics before source "
                        "and target are built (0: fresh statistics, whose eval-mode source maps overflow DELTA)")
    p.add_argument("--out", default="bench-step", help="folder for bench_step.json and bench_step.md")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of an existing OUT/bench_step.json (same model/method/engine: replaced), "
                        "so a configuration can be measured in several runs")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many steps per row: top kernels to OUT/profile_*.txt")
    p.add_argument("--warm-first-step", action="store_true",
                   help="after the run, time each compiled fastdelta row's first step again in a fresh process "
                        "(torch.compile's on-disk caches now warm): first_step_warm_s")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="time the public step and every CPU engine `auto` chooses from side by side, their steps "
                        "in turns for ROUNDS rounds (after --warmup rounds): each ratio with its spread")
    p.add_argument("--with-compile", action="store_true",
                   help="with --interleave: also bf16 channels_last compiled (never chosen by auto on a CPU)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: start no new row after this (rows measured so far are written)")


def run(args) -> dict:
    from ...train.distributed import DistContext, device_for
    device = device_for(DistContext(), args.device)
    if args.interleave:
        return run_interleaved(args, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    plan = _Plan.of(args)
    fast = _fastdelta_engines(args, device, plan.engines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = None
    if args.append and (out / "bench_step.json").is_file():
        previous = json.loads((out / "bench_step.json").read_text())
    t_start = time.perf_counter()
    result = _new_result(args, plan, fast, device, previous)
    for model in plan.models:
        for method in plan.methods:
            runs = ([("public", None)] if "public" in plan.engines else []) + fast
            for label, opts in runs:
                if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                    print(f"time budget of {args.time_budget:.0f} s spent: {model} {method} {label} not measured",
                          flush=True)
                    continue
                row = _measure_row(args, plan, model, method, label, opts, device, out)
                result["rows"] = [r for r in result["rows"] if (r["model"], r["method"], r["engine"]) !=
                                  (row["model"], row["method"], row["engine"])] + [row]
                print(json.dumps(row), flush=True)
                _save(out, result)
    if args.warm_first_step:
        warm_first_steps(args, result["rows"])
    _save(out, result)
    print(markdown(result), flush=True)
    return result


def run_interleaved(args, device) -> dict:
    """--interleave: per model and method, every engine side by side (fastdelta.apps.bench.interleaved)."""
    from .interleaved import cpu_record, engines, markdown as interleaved_markdown, measure_method
    plan = _Plan.of(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**environment(device), **cpu_record()}
    result = {"config": {"models": plan.models, "methods": plan.methods, "batch": plan.batch, "size": plan.size,
                         "warmup": plan.warmup, "rounds": args.interleave, "num_classes": args.num_classes,
                         "interleaved": True},
              "environment": env, "rows": []}
    for model in plan.models:
        for method in plan.methods:
            result["rows"] += measure_method(model, method, engines(args.with_compile), plan.batch, plan.size,
                                             args.num_classes, device, args.interleave, plan.warmup)
            (out / "bench_step.json").write_text(json.dumps(result, indent=1))
            (out / "bench_step.md").write_text(interleaved_markdown(result["rows"], env))
    print(interleaved_markdown(result["rows"], env), flush=True)
    return result


@dataclass
class _Plan:
    """What a bench run measures: models x methods x engines, and the shape and number of the steps."""
    models: List[str]
    methods: List[str]
    engines: List[str]
    batch: int
    size: int
    warmup: int
    iters: int

    @classmethod
    def of(cls, args) -> "_Plan":
        """From the command line; --smoke changes the defaults to the tiny CPU configuration."""
        smoke = args.smoke
        models = args.models.split(",") if args.models else (["smoke"] if smoke else GPU_MODELS)
        methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ValueError(f"--methods: unknown {bad}; valid: {', '.join(METHODS)}")
        return cls(models, methods, engines=[e.strip() for e in args.engines.split(",") if e.strip()],
                   batch=args.batch or (4 if smoke else 64), size=args.size or (32 if smoke else 224),
                   warmup=args.warmup if args.warmup is not None else (1 if smoke else 5),
                   iters=args.iters or (2 if smoke else 20))


def _fastdelta_engines(args, device, engines: List[str]) -> list:
    """(engine label, StepOptions) per fastdelta engine measured: one per compile mode, with --also-eager
    the same step uncompiled first."""
    cl = {"auto": "auto", "on": True, "off": False}[args.channels_last]
    fast = []
    if "fastdelta" in engines:
        modes = args.compile_modes.split(",") if args.compile_modes else [args.compile]
        for mode in modes:
            opts = resolve_step_options(device, args.precision, mode, cl, args.cuda_graphs, "fast")
            label = "fastdelta" if len(modes) == 1 else f"fastdelta[{mode}]"
            if args.also_eager and len(modes) == 1 and opts is not None and opts.compile is not None:
                eager = resolve_step_options(device, opts.precision, "off", opts.channels_last, False, "fast")
                fast.append(("fastdelta[eager]", eager))
            fast.append((label, opts))
    return fast


def _new_result(args, plan: _Plan, fast: list, device, previous: Optional[dict]) -> dict:
    """bench_step.json before any row is measured; with --append it keeps `previous`'s rows."""
    result = {"config": {"models": plan.models, "methods": plan.methods, "batch": plan.batch, "size": plan.size,
                         "warmup": plan.warmup, "iters": plan.iters, "num_classes": args.num_classes,
                         "smoke": args.smoke,
                         "fastdelta_options": {label: o.describe() for label, o in fast},
                         "hyperparameters": {m: bench_hyperparameters(m) for m in plan.methods},
                         "bn_calibration_batches": args.calibration_batches,
                         "host_reads_per_step": 0},
              "environment": environment(device), "rows": []}
    if previous is not None:
        result["previous_environments"] = previous.get("previous_environments", []) + [previous["environment"]]
        result["config"]["hyperparameters"] = {**previous.get("config", {}).get("hyperparameters", {}),
                                               **result["config"]["hyperparameters"]}
        result["rows"] = previous["rows"]
    return result


def _measure_row(args, plan: _Plan, model: str, method: str, label: str, opts, device, out: Path) -> dict:
    """One row, or the row's error: one failed row must not lose the others."""
    try:
        return measure(model, method, "public" if label == "public" else label, plan.batch, plan.size,
                       args.num_classes, device, plan.warmup, plan.iters, opts, args.profile, out,
                       args.calibration_batches)
    except Exception as e:  # noqa: BLE001
        row = {"model": model, "method": method, "engine": label, "error": f"{type(e).__name__}: {e}"[:500]}
        torch._dynamo.reset()
        cleanup(device)
        return row


def _save(out: Path, result: dict) -> None:
    """Written after every row, so that a cut-off run keeps what it measured."""
    (out / "bench_step.json").write_text(json.dumps(result, indent=1))
    (out / "bench_step.md").write_text(markdown(result))


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="bench_step", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
