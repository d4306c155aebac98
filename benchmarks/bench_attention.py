"""Channel attention (Algorithm 1's ablation), public method vs fastdelta's paths, in one run.

Times, on the same images and network (random-weight ResNet-101 by default, as the timing does not
depend on the weights):
- public: zero one conv filter's weights, full forward, restore (the public code's loop);
- exact: fastdelta's prefix reuse (closed form where the suffix is channel-separable, else K masked
  copies per suffix pass), fp32 and bf16;
- first_order: -sum(a_j dL/da_j) from one forward + backward.
Reports ms per channel per 32 images and the ratio to the public method, checks that the exact
path equals the public method's vectors (fp32, max abs diff relative to scale) and the bf16 /
first-order rank correlation, and writes JSON (with device, torch version, date) to --out.

    python benchmarks/bench_attention.py --model resnet101 --images 32 --out benchmarks/results/attention.json
    python benchmarks/bench_attention.py --model resnet18 --size 64 --public-channels 8   # CPU smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rowlog import RowLog  # noqa: E402
from fastdelta.attention.loss_increase import (loss_increase_closed_form, loss_increase_first_order,
                                               loss_increase_prefix)
from fastdelta.attention.prefix_reuse import PrefixReuse
from fastdelta.attention.weights import spearman
from fastdelta.networks.models import DEFAULT_LAYERS


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def public_method(model, layer, x, y, channels):
    """The public code: zero filter j in the weights, full forward, restore."""
    conv = model.get_submodule(layer)
    base = F.cross_entropy(model(x), y, reduction="none").double()
    raw = torch.zeros(len(channels), dtype=torch.float64)
    for i, j in enumerate(channels):
        w = conv.weight[j].clone()
        conv.weight[j] = 0
        raw[i] = (F.cross_entropy(model(x), y, reduction="none").double() - base).sum().cpu()
        conv.weight[j] = w
    return raw


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet101")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--public-channels", type=int, default=64,
                   help="channels per layer timed with the public method (its time is linear in channels)")
    p.add_argument("--skip-bf16", action="store_true", help="skip bf16 (slow on CPUs without bf16 units)")
    p.add_argument("--layers", default=None, help="comma separated regularised layers (default: the model's four)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = torchvision.models.get_model(a.model, num_classes=a.classes).to(device).eval()
    layers = a.layers.split(",") if a.layers else DEFAULT_LAYERS[a.model]
    x = torch.randn(a.images, 3, a.size, a.size, device=device)
    y = torch.randint(0, a.classes, (a.images,), device=device)
    batches = [(x, y)]
    reuse = PrefixReuse(model, layers)
    rows, scale = [], 32 / a.images
    emit = RowLog.beside(a.out)  # every row on disk as soon as it is measured
    for layer in layers:
        c = model.get_submodule(layer).out_channels
        subset = list(range(min(c, a.public_channels)))
        model(x[:2])  # warm-up
        pub, t_pub = timed(lambda: public_method(model, layer, x, y, subset), device)
        ms_pub = 1000 * t_pub / len(subset) * scale
        exact_fn = (lambda d=torch.float32: loss_increase_closed_form(reuse, layer, batches, dtype=d)) \
            if reuse.separable[layer] is not None else (lambda d=torch.float32: loss_increase_prefix(reuse, layer, batches, dtype=d))
        exact_fn()  # warm-up (cudnn autotuning, allocations)
        exact, t_exact = timed(exact_fn, device)
        bf16, t_bf16 = (None, None) if a.skip_bf16 else timed(lambda: exact_fn(torch.bfloat16), device)
        fo, t_fo = timed(lambda: loss_increase_first_order(model, [layer], batches)[0], device)
        err = float((exact[subset] - pub).abs().max() / pub.abs().max().clamp_min(1e-12))
        row = {"layer": layer, "channels": c, "path": "closed_form" if reuse.separable[layer] is not None else "prefix_batched",
               "ms_per_channel_per_32": {"public": round(ms_pub, 4), "exact_fp32": round(1000 * t_exact / c * scale, 4),
                                         "exact_bf16": None if a.skip_bf16 else round(1000 * t_bf16 / c * scale, 4),
                                         "first_order": round(1000 * t_fo / c * scale, 4)},
               "exact_vs_public_max_rel_diff": err,
               "bf16_spearman": None if a.skip_bf16 else spearman(exact, bf16),
               "first_order_spearman": spearman(exact, fo)}
        ms = row["ms_per_channel_per_32"]
        row["speedup_vs_public"] = {k: round(ms["public"] / max(v, 1e-9), 1) for k, v in ms.items()
                                    if k != "public" and v is not None}
        rows.append(row)
        emit(row)
    result = {"benchmark": "attention", "model": a.model, "weights": "random (timing does not depend on them)",
              "images": a.images, "size": a.size, "device": torch.cuda.get_device_name(0) if device.type == "cuda"
              else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "date": datetime.date.today().isoformat(), "layers": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
