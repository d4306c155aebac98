"""What a benchmark run writes besides its rows: the machine it ran on and the table of ratios."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

from ...methods import L2


def environment(device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cpu_count": os.cpu_count()}
    try:
        import torchvision
        env["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        import timm
        env["timm"] = timm.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   driver_capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    try:
        from ...kernels.dispatch import describe
        env["distance_kernels"] = describe()
    except Exception:  # noqa: BLE001 - the kernels module is optional here
        pass
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


def markdown(result: dict) -> str:
    """The results table: per model and method, public vs fastdelta img/s and ratios."""
    rows = result["rows"]
    env = result["environment"]
    lines = [f"# bench_step: {env.get('gpu', env['device'])}, torch {env['torch']}, {env['date']}", "",
             f"batch {result['config']['batch']}, {result['config']['size']}x{result['config']['size']}, "
             f"synthetic tensors, {result['config']['iters']} timed steps after {result['config']['warmup']} "
             "warm-up steps. ratio = fastdelta img/s / public img/s; vs L2 = the method's ms/step / the same "
             "engine's L2 ms/step.", ""]
    fast_engines = sorted({r["engine"] for r in rows if r["engine"] != "public"})
    head = ["model", "method", "public img/s", "public ms", "public first s", "public peak GiB"]
    for e in fast_engines:
        head += [f"{e} img/s", f"{e} ms", "ratio", "vs L2", "first s", "warm first s", "peak GiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    key = {(r["model"], r["method"], r["engine"]): r for r in rows if "error" not in r}
    errors = [r for r in rows if "error" in r]
    fmt = lambda v, f="{:,.1f}": "-" if v is None else f.format(v)
    for model in dict.fromkeys(r["model"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model):
            pub = key.get((model, method, "public"))
            cells = [model, method, fmt(pub and pub["img_per_s"]), fmt(pub and pub["ms_per_step"], "{:.2f}"),
                     fmt(pub and pub["first_step_s"]), fmt(pub and pub["peak_gib"], "{:.2f}")]
            for e in fast_engines:
                r = key.get((model, method, e))
                l2 = key.get((model, L2.name, e))
                ratio = r["img_per_s"] / pub["img_per_s"] if r and pub else None
                vs_l2 = r["ms_per_step"] / l2["ms_per_step"] if r and l2 else None
                cells += [fmt(r and r["img_per_s"]), fmt(r and r["ms_per_step"], "{:.2f}"), fmt(ratio, "{:.2f}x"),
                          fmt(vs_l2, "{:.2f}x"), fmt(r and r["first_step_s"]), fmt(r and r.get("first_step_warm_s")),
                          fmt(r and r["peak_gib"], "{:.2f}")]
            lines.append("| " + " | ".join(cells) + " |")
    if errors:
        lines += ["", "Failed rows:", ""] + [f"- {r['model']} {r['method']} {r['engine']}: {r['error']}" for r in errors]
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items())]
    return "\n".join(lines) + "\n"
