"""Fused ReLU + channel-weighted feature-map distance (fastdelta.kernels) vs the plain PyTorch composite.

One run, one device, fwd+bwd (loss, then grad_t by autograd) on random maps of the four ResNet-101
DELTA taps (layer1.2.conv3 256x56x56, layer2.3.conv3 512x28x28, layer3.22.conv3 1024x14x14,
layer4.2.conv3 2048x7x7):

- GPU (default batch 64, bf16 and fp32, NCHW and channels_last): the fused custom op (Triton), its
  deterministic variant,
  the eager composite (fastdelta.kernels.reference_distance) and the same composite under
  torch.compile (one compilation per dtype and layout, shapes symbolic; --compile-shapes static: per shape). Achieved GB/s counts each byte once (METHOD.md): one read of t and s plus one write of
  grad_t; the card's copy bandwidth is measured in the same run (dst.copy_(src), read + write counted),
  and "x_ideal" = time / (those bytes at copy bandwidth) (goal: <= 1.5), with ratios to eager and
  to compiled (goal: eager >= 3).
- CPU (default batch 8, fp32 and bf16, NCHW): the native C++/OpenMP kernel vs the eager composite
  (fwd+bwd and fwd only), ratio in the same run; the two are timed in interleaved rounds and the best
  round of each is kept (on a shared CPU other work only adds time).

    python benchmarks/bench_distance.py --out benchmarks/results/distance_h100_<date>.json     # GPU + CPU
    python benchmarks/bench_distance.py --device cpu --out benchmarks/results/distance_cpu_<date>.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import statistics
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rowlog import RowLog  # noqa: E402
from fastdelta.kernels import dispatch, native
from fastdelta.kernels import reference_distance as reference_feature_map_distance

RESNET101_TAPS = {"layer1.2.conv3": (256, 56, 56), "layer2.3.conv3": (512, 28, 28),
                  "layer3.22.conv3": (1024, 14, 14), "layer4.2.conv3": (2048, 7, 7)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg():
    """1/5/15-min load averages: other work on a shared machine shows here (CPU timings are noisy then)."""
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def timer(fn, device, warmup, repeats, stat=statistics.median):
    """Median (or stat) seconds of fn() over repeats (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return stat(times)


def copy_bandwidth(device, nbytes=1 << 30, repeats=20):
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    sec = timer(lambda: dst.copy_(src), device, 3, repeats)
    return 2 * nbytes / sec / 1e9  # read + write


def fwd_bwd(fn, t, s, w):
    def run():
        loss = fn(t, s, w)
        (g,) = torch.autograd.grad(loss, (t,))
        return g
    return run


def fwd_only(fn, t, s, w):
    def run():
        with torch.no_grad():
            return fn(t, s, w)
    return run


def inputs(batch, shape, dtype, device, channels_last):
    c, h, w = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    t = torch.randn(batch, c, h, w, generator=g).to(device=device, dtype=dtype)
    s = torch.randn(batch, c, h, w, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        t, s = t.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)
    scale = torch.rand(c, generator=g).to(device)
    return t.requires_grad_(), s, scale


def gpu_rows(args, device):
    bw = copy_bandwidth(device)
    # The compiled composite: one compilation per (dtype, layout) with symbolic shapes (dynamic=True), 4 cold
    # compiles for the four taps x 2 dtypes x 2 layouts instead of 16 static ones (60-100 s cold on an H200
    # machine, more than the session gives the part); --compile-shapes static compiles per shape (its
    # kernels specialised to each shape). Either way the first call of each compilation is timed apart
    # (compile_s) and the timed calls come after warm-up.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    dynamic = args.compile_shapes == "dynamic"
    compiled = {}  # compilation key -> torch.compile'd composite
    compile_s = {}

    def key_of(t):
        layout = "nchw" if t.is_contiguous() else "channels_last"
        return f"{str(t.dtype).replace('torch.', '')}/{layout}" + ("" if dynamic else f"/{'x'.join(map(str, t.shape))}")

    def compile_for(t, s, w):
        """Compile the composite for t's key (once), timing the first forward + backward apart."""
        key = key_of(t)
        if key in compiled:
            return
        compiled[key] = torch.compile(reference_feature_map_distance, dynamic=dynamic)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd_bwd(compiled_ref, t, s, w)()  # the compilation of the forward and backward graphs
        torch.cuda.synchronize()
        compile_s[key] = round(time.perf_counter() - t0, 2)
        args.emit({"part": "gpu", "compiled_composite": key, "dynamic": dynamic, "compile_s": compile_s[key]})

    def compiled_ref(t, s, w):
        return compiled[key_of(t)](t, s, w, True)

    impls = {
        "fused": lambda t, s, w: dispatch.fm_distance(t, s, w, True, impl="triton"),
        "fused_deterministic": lambda t, s, w: dispatch.fm_distance(t, s, w, True, impl="triton", deterministic=True),
        "eager_composite": lambda t, s, w: reference_feature_map_distance(t, s, w, True),
        "compiled_composite": compiled_ref,
    }
    if args.no_compiled:
        impls.pop("compiled_composite")
    rows = []
    for layer, shape in args.shape_items:
        for dname in args.dtypes:
            for cl in args.layouts:
                t, s, w = inputs(args.batch, shape, DTYPES[dname], device, cl)
                if "compiled_composite" in impls:
                    compile_for(t, s, w)  # compiles here (once per key), not inside a timed call
                nbytes = 3 * t.numel() * t.element_size()  # read t, read s, write grad_t
                row = {"layer": layer, "shape": [args.batch, *shape], "dtype": dname,
                       "layout": "channels_last" if cl else "nchw", "bytes_counted": nbytes,
                       "ideal_ms_at_copy_bw": round(nbytes / (bw * 1e9) * 1e3, 4), "ms": {}, "gb_per_s": {}}
                for name, fn in impls.items():
                    sec = timer(fwd_bwd(fn, t, s, w), device, args.warmup, args.repeats)
                    row["ms"][name] = round(sec * 1e3, 4)
                    row["gb_per_s"][name] = round(nbytes / sec / 1e9, 1)
                f = row["ms"]["fused"]
                row["fraction_of_copy_bw"] = round(row["gb_per_s"]["fused"] / bw, 3)
                row["x_ideal"] = round(f / row["ideal_ms_at_copy_bw"], 3)
                row["speedup_vs_eager"] = round(row["ms"]["eager_composite"] / f, 2)
                if "compiled_composite" in row["ms"]:
                    row["speedup_vs_compiled"] = round(row["ms"]["compiled_composite"] / f, 2)
                rows.append(row)
                args.emit({"part": "gpu", **row})
                del t, s, w
                torch.cuda.empty_cache()
    return {"copy_bandwidth_gb_per_s": round(bw, 1), "rows": rows,
            "compiled_composite": {"dynamic_shapes": dynamic, "compilations": len(compiled), "compile_s": compile_s}}


def cpu_rows(args):
    device = torch.device("cpu")
    if not native.available():
        return {"error": f"native CPU kernel unavailable: {native.status()['reason']}"}
    impls = {"native": lambda t, s, w: dispatch.fm_distance(t, s, w, True, impl="native"),
             "eager_composite": lambda t, s, w: reference_feature_map_distance(t, s, w, True)}
    rows = []
    for layer, shape in args.shape_items:
        for dname, cl in [(d, cl) for d in args.cpu_dtypes for cl in args.layouts]:
            t, s, w = inputs(args.cpu_batch, shape, DTYPES[dname], device, cl)
            row = {"layer": layer, "shape": [args.cpu_batch, *shape], "dtype": dname,
                   "layout": "channels_last" if cl else "nchw", "fwd_bwd_ms": {}, "fwd_ms": {}}
            # interleaved rounds, best of each (a shared CPU's interference only ever adds time)
            for _ in range(args.cpu_repeats):
                for name, fn in impls.items():
                    for key, mk in (("fwd_bwd_ms", fwd_bwd), ("fwd_ms", fwd_only)):
                        ms = timer(mk(fn, t, s, w), device, 1, 1) * 1e3
                        row[key][name] = round(min(row[key].get(name, ms), ms), 3)
            row["fwd_bwd_speedup_native_vs_eager"] = round(row["fwd_bwd_ms"]["eager_composite"] / row["fwd_bwd_ms"]["native"], 2)
            row["fwd_speedup_native_vs_eager"] = round(row["fwd_ms"]["eager_composite"] / row["fwd_ms"]["native"], 2)
            rows.append(row)
            args.emit({"part": "cpu", **row})
    total = {k: sum(r["fwd_bwd_ms"][k] for r in rows) for k in impls}
    return {"rows": rows, "fwd_bwd_total_ms": total,
            "fwd_bwd_speedup_all_layers": round(total["eager_composite"] / total["native"], 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="auto: the GPU part when CUDA is available, and the CPU part always")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cpu-batch", type=int, default=8)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--cpu-dtypes", default="fp32,bf16")
    ap.add_argument("--layouts", default="nchw,channels_last")
    ap.add_argument("--shapes", default=None, help="comma list of CxHxW (default: the ResNet-101 taps)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--cpu-repeats", type=int, default=5)
    ap.add_argument("--no-compiled", action="store_true", help="skip the torch.compile'd composite (GPU)")
    ap.add_argument("--compile-shapes", choices=["dynamic", "static"], default="dynamic",
                    help="the compiled composite: one compilation per (dtype, layout) with symbolic shapes "
                         "(dynamic, 4 cold compiles by default) or one per shape as well (static, 16)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.dtypes = args.dtypes.split(",")
    args.cpu_dtypes = args.cpu_dtypes.split(",")
    args.layouts = [x == "channels_last" for x in args.layouts.split(",")]
    args.emit = RowLog.beside(args.out)  # every row on disk as soon as it is measured
    args.shape_items = (list(RESNET101_TAPS.items()) if args.shapes is None else
                        [(s, tuple(int(v) for v in s.split("x"))) for s in args.shapes.split(",")])
    import triton  # noqa: F401 - version only
    result = {"benchmark": "feature-map distance, fused vs composite, fwd+bwd", "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "triton": getattr(__import__("triton"), "__version__", None),
              "python": platform.python_version(), "cpu": cpu_name(), "cpu_threads": torch.get_num_threads(),
              "os_cpu_count": os.cpu_count(), "loadavg_start": loadavg(), "kernels": dispatch.describe(), "settings": {
                  k: v for k, v in vars(args).items() if k not in ("shape_items", "emit")}}
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda")
        result["gpu"] = {"name": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                         **gpu_rows(args, device)}
    elif args.device == "cuda":
        raise SystemExit("--device cuda: no CUDA device")
    if args.device in ("auto", "cpu"):
        result["cpu_part"] = {"device": "cpu", **cpu_rows(args)}
    result["loadavg_end"] = loadavg()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
