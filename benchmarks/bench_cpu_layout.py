"""CPU: does channels_last pay for the training step and for evaluation? (a CPU user's `channels_last=True`)

Side by side in one process, alternating so that load on the machine hits both alike: the fast step
(fp32, eager) with contiguous vs channels_last activations and weights, for L2 and DELTA, and eval-mode
forward passes, on ImageNet EfficientNet-Lite0 at --size px, batch --batch. Median ms over --repeats
rounds; writes --out (JSON).

    python3 benchmarks/bench_cpu_layout.py --size 64 --batch 32 --out benchmarks/results/cpu_layout_2026-11-26.json
"""
import argparse
import json
import statistics
import time

import torch

from fastdelta.apps.bench.report import environment
from fastdelta.networks.models import build_networks
from fastdelta.methods import make_method
from fastdelta.train.steps import FastStep, StepOptions


def make_step(method: str, channels_last: bool, x: torch.Tensor):
    nets = build_networks("efficientnet_lite0", 10, "imagenet")
    attention = None
    if method == "delta":
        attention = [torch.full((nets.target.get_submodule(l).out_channels,), 1.0 / nets.target.get_submodule(l).out_channels)
                     for l in nets.layers]
    reg = make_method(method, nets.target, nets.source, nets.head_name, nets.layers, attention, alpha=1e-4, beta=0.01,
                      weight_decay=1e-4, feature_map="conv")
    nets.target.train()
    step = FastStep(nets.target, nets.source, reg, list(nets.target.parameters()), StepOptions("fp32", channels_last),
                    torch.device("cpu"), 0.01, 0.9)
    return step, nets.target


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size)
    y = torch.randint(0, 10, (a.batch,))
    xe = torch.randn(a.eval_batch, 3, a.size, a.size)
    rows = {}
    for method in ("l2", "delta"):
        steps = {cl: make_step(method, cl, x) for cl in (False, True)}
        times = {cl: [] for cl in steps}
        for _ in range(2):  # warm-up
            for cl, (s, _) in steps.items():
                s.step(x, y, 0.01)
        for _ in range(a.repeats):
            for cl, (s, _) in steps.items():
                t = time.perf_counter()
                s.step(x, y, 0.01)
                times[cl].append((time.perf_counter() - t) * 1000)
        contiguous, cl = statistics.median(times[False]), statistics.median(times[True])
        rows[f"train_{method}"] = {"contiguous_ms": round(contiguous, 1), "channels_last_ms": round(cl, 1),
                                   "speedup": round(contiguous / cl, 2)}
        print(method, rows[f"train_{method}"], flush=True)
        if method == "l2":  # eval forward of the same (trained a few steps) target, both layouts
            nets = {c: steps[c][1].eval() for c in steps}
            et = {c: [] for c in steps}
            with torch.no_grad():
                for r in range(a.repeats + 1):
                    for c, m in nets.items():
                        inp = xe.contiguous(memory_format=torch.channels_last if c else torch.contiguous_format)
                        t = time.perf_counter()
                        m(inp)
                        if r:
                            et[c].append((time.perf_counter() - t) * 1000)
            contiguous, cl = statistics.median(et[False]), statistics.median(et[True])
            rows["eval_forward"] = {"contiguous_ms": round(contiguous, 1), "channels_last_ms": round(cl, 1),
                                    "speedup": round(contiguous / cl, 2), "batch": a.eval_batch}
            print("eval", rows["eval_forward"], flush=True)
    result = {"model": "efficientnet_lite0 (imagenet)", "size": a.size, "batch": a.batch, "repeats": a.repeats,
              "threads": torch.get_num_threads(), "rows": rows, "environment": environment(torch.device("cpu"))}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
