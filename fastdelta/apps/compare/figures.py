"""The comparison report's figures (matplotlib, Agg), each written atomically as a PNG.

table1.png (test top-1 per method), fig3_curves.png (learning curves, l2_sp vs delta per lr schedule),
fig4_search.png (validation top-1 over each method's searched hyperparameters),
fig5_filter_distance.png (sorted per-filter distance from w* per stage), fig6_activation_maps.png (weakly
active source filters).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from ...methods import METHODS, method_class
from ...output_files import atomic_write
from ...settings import FEATURE_MAP_NAMES

SOURCE = "source"  # the source network's column of Fig. 6


def label(name: str) -> str:
    return "source" if name == SOURCE else method_class(name).label


def color(name: str) -> str:
    return method_class(name).color


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> str:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _plt().close(fig)
    return path.name


def table_figure(report: dict, path: Path) -> str:
    """Table 1 as bars (mean, ± std error bars, a dot per seed) on a y axis from 0, so that the gaps between
    methods are drawn to scale; each mean's label sits above its error bar and its seeds."""
    plt = _plt()
    table = report["table"]
    methods = [m for m in report["compare"]["methods"] if table[m]["mean"] is not None]
    fig, ax = plt.subplots(figsize=(1.3 * max(3, len(methods)) + 1, 4.2))
    tops = []
    for i, m in enumerate(methods):
        t = table[m]
        std = t["std"] or 0.0
        ax.bar(i, t["mean"], yerr=std, color=color(m), alpha=0.8, capsize=4)
        ax.scatter([i] * len(t["values"]), t["values"], color="k", s=10, zorder=3)
        top = max([t["mean"] + std, *t["values"]])
        tops.append(top)
        ax.annotate(f"{t['mean']:.2f}", (i, top), xytext=(0, 4), textcoords="offset points", ha="center",
                    va="bottom", fontsize=8)
    # from 0: a bar's height is its accuracy, so a 1-point gap never looks like a 10-fold one
    ax.set_ylim(0.0, min(100.0, max(tops) * 1.12) if tops and max(tops) > 0 else 100.0)
    ax.set_xticks(range(len(methods)), [label(m) for m in methods], fontsize=8)
    ax.set_ylabel("test top-1 (%), axis from 0")
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{_subject(report)}\nmean ± std over {report['compare']['seeds']} seed(s), dots = seeds",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def curves_figure(report: dict, path: Path) -> str:
    plt = _plt()
    runs = [r for r in report["runs"] if r["seed"] == 0 and r["curve"]]
    schedules = sorted({r["schedule"] for r in runs}, key=lambda s: s != "step")
    fig, axes = plt.subplots(max(1, len(schedules)), 2, figsize=(10, 3.2 * max(1, len(schedules))), squeeze=False)
    names = {"step": "StepLR", "exp": "ExponentialLR"}
    for row, sch in enumerate(schedules):
        for r in (r for r in runs if r["schedule"] == sch):
            c = color(r["method"])
            it, ce = zip(*r["train_loss"]) if r["train_loss"] else ((), ())
            axes[row, 0].plot(it, _smooth(ce), color=c, label=label(r["method"]), lw=1.2)
            it, acc = zip(*r["curve"])
            axes[row, 1].plot(it, acc, color=c, marker="o", ms=3, label=label(r["method"]))
        axes[row, 0].set_title(f"{names[sch]}: training cross-entropy (moving average of 5)", fontsize=9)
        axes[row, 0].set_ylabel("cross-entropy")
        axes[row, 1].set_title(f"{names[sch]}: test top-1 along training", fontsize=9)
        axes[row, 1].set_ylabel("test top-1 (%)")
        for ax in axes[row]:
            ax.set_xlabel("iteration")
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _smooth(v, k: int = 5):
    v = np.asarray(v, dtype=float)
    if len(v) < k:
        return v
    return np.convolve(np.pad(v, (k // 2, k - 1 - k // 2), mode="edge"), np.ones(k) / k, mode="valid")


def describe_split(search: dict) -> str:
    """How the search scored its grid: one validation split, or K-fold cross-validation."""
    split = search["split"]
    if "folds" in split:
        return (f"{split['folds']}-fold cross-validation (mean validation top-1 over folds of "
                f"{min(split['val'])}-{max(split['val'])} training images, seed {search['seed']})")
    return f"a validation split of {split['val']} training images (seed {search['seed']})"


# what a search record holds beside the point's hyperparameters (fastdelta.apps.compare.search.run_search)
RECORD_KEYS = ("method", "val_top1", "status", "seconds", "reused", "folds")


def _point(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in RECORD_KEYS}


def _text(name: str, value) -> str:
    return f"{name} = {value:g}" if isinstance(value, (int, float)) else f"{name} = {value}"


def search_panels(search: dict) -> list:
    """Fig. 4's panels from the search's results, for any method's hyperparameters: each {title, x, xs, ylabel,
    rows, cells}, cells[(row, x value)] = validation top-1 (None: diverged; a cell not there was not run).
    When every method varies at most one and the same hyperparameter (search "alpha"), one panel with a row
    per method; otherwise one per method, its first varying hyperparameter across, the others' values down."""
    records: Dict[str, list] = {}
    for r in search["results"]:
        records.setdefault(r["method"], []).append(r)
    names = {m: list(dict.fromkeys(k for r in rs for k in _point(r))) for m, rs in records.items()}
    values = {m: {n: sorted({_point(r)[n] for r in rs if n in _point(r)}) for n in names[m]}
              for m, rs in records.items()}
    varying = {m: [n for n in names[m] if len(values[m][n]) > 1] for m in records}
    across = {tuple(v) for v in varying.values() if v}
    if len(across) <= 1 and all(len(v) <= 1 for v in varying.values()):
        x = next(iter(across))[0] if across else next((n for ns in names.values() for n in ns), None)
        if x is not None and all(x in ns for ns in names.values()):
            fixed = {m: {n: values[m][n][0] for n in names[m] if n != x} for m in records}
            common = {n: v for n, v in next(iter(fixed.values())).items()
                      if all(f.get(n) == v for f in fixed.values())}
            rows, cells = [], {}
            for m, rs in records.items():
                own = ", ".join(_text(n, v) for n, v in fixed[m].items() if n not in common)
                rows.append(label(m) + (f" ({own})" if own else ""))
                cells.update({(rows[-1], r[x]): r["val_top1"] for r in rs})
            title = f"{x} search" + (f" ({', '.join(_text(n, v) for n, v in common.items())})" if common else "")
            xs = sorted({v for m in records for v in values[m][x]})
            return [dict(title=title, x=x, xs=xs, ylabel="method", rows=rows, cells=cells)]
    panels = []
    for m, rs in records.items():
        x = varying[m][0] if varying[m] else names[m][0]
        down = [n for n in varying[m] if n != x]
        fixed = [n for n in names[m] if n != x and n not in down]
        row_of = (lambda p: f"{p[down[0]]:g}") if len(down) == 1 else (
            lambda p: ", ".join(f"{n}={p[n]:g}" for n in down) or label(m))
        keyed = sorted(rs, key=lambda r: tuple(_point(r)[n] for n in down))
        rows = list(dict.fromkeys(row_of(_point(r)) for r in keyed))
        title = label(m) + (f" ({', '.join(_text(n, values[m][n][0]) for n in fixed)})" if fixed else "")
        panels.append(dict(title=title, x=x, xs=values[m][x], ylabel=", ".join(down) or "method", rows=rows,
                           cells={(row_of(_point(r)), r[x]): r["val_top1"] for r in rs}))
    return panels


def search_figure(report: dict, path: Path) -> str:
    plt = _plt()
    search = report["search"]
    panels = search_panels(search)
    most = max(len(p["rows"]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 0.5, 0.5 * most + 2.2), squeeze=False)
    for ax, p in zip(axes[0], panels):
        ran = {(i, j): p["cells"][(row, x)] for i, row in enumerate(p["rows"]) for j, x in enumerate(p["xs"])
               if (row, x) in p["cells"]}
        grid = np.full((len(p["rows"]), len(p["xs"])), np.nan)
        for (i, j), v in ran.items():
            grid[i, j] = _nan(v)
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        mean = np.nanmean(grid) if np.isfinite(grid).any() else 0.0
        for (i, j), v in ran.items():  # a cell not run stays blank
            ax.text(j, i, "div." if v is None else f"{v:.1f}", ha="center", va="center", fontsize=7,
                    color="w" if v is None or v < mean else "k")
        ax.set_xticks(range(len(p["xs"])), [f"{v:g}" for v in p["xs"]], fontsize=8)
        ax.set_yticks(range(len(p["rows"])), p["rows"], fontsize=8)
        ax.set_xlabel(p["x"])
        ax.set_ylabel(p["ylabel"])
        ax.set_title(p["title"], fontsize=9)
        fig.colorbar(im, ax=ax, label="validation top-1 (%)")
    fig.suptitle(f"{describe_split(search)}; div. = diverged", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _nan(v):
    return np.nan if v is None else v


def distance_figure(report: dict, path: Path) -> str:
    plt = _plt()
    dist: Dict[str, dict] = report["filter_distances"]
    methods = [m for m in METHODS if m in dist and not METHODS[m].freezes_extractor]
    stages = list(next(iter(dist.values())).keys()) if dist else []
    cols = min(4, max(1, len(stages)))
    rows = -(-len(stages) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, stage in zip(axes.flat, stages):
        for m in methods:
            q = dist[m][stage]["sorted_quantiles"]
            ax.plot(np.linspace(0, 1, len(q)), q, color=color(m), label=label(m),
                    lw=2 if METHODS[m].learning_curve else 1, alpha=1 if METHODS[m].learning_curve else 0.5)
        ax.set_title(f"{stage} ({dist[methods[0]][stage]['filters']} filters)", fontsize=8)
        ax.set_xlabel("filter rank (fraction, sorted)", fontsize=7)
        ax.set_ylabel("||w_j - w*_j||", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(stages):]:
        ax.axis("off")
    if stages:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle("per-filter Euclidean distance from the start point, sorted, per stage (seed 0)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def maps_figure(report: dict, path: Path) -> str:
    """Fig. 6: each test image (in colour when the report stores its colour, H x W x 3) beside the min-max
    scaled map of its weakly active filter in the source and each trained network, with a colour bar."""
    plt = _plt()
    am = report["activation_maps"]
    nets = [n for n in [SOURCE, *(m for m in METHODS if METHODS[m].activation_map)] if n in am["maps"]]
    n_img = len(am["images"])
    fig, axes = plt.subplots(max(1, n_img), len(nets) + 1, figsize=(1.7 * (len(nets) + 1) + 0.8, 1.8 * max(1, n_img)),
                             squeeze=False)
    im = None
    for i in range(n_img):
        image = np.asarray(am["images"][i], dtype=float)
        if image.ndim == 3:
            axes[i, 0].imshow(np.clip(image, 0, 1))
        else:  # a report from before colour inputs: the channel mean
            axes[i, 0].imshow(image, cmap="gray")
        axes[i, 0].set_ylabel(f"{am['classes'][i]}\nfilter {am['filters'][i]}", fontsize=7)
        for j, n in enumerate(nets, start=1):
            im = axes[i, j].imshow(am["maps"][n][i], cmap="jet", vmin=0, vmax=1)
            if i == 0:
                axes[i, j].set_title(label(n), fontsize=8)
        axes[i, 0].set_title("input" if i == 0 else "", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"min-max scaled maps of weakly active source filters, layer {am['layer']}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.86, 1))  # the right edge left to the colour bar and its labels
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.88, 0.15, 0.02, 0.7)), label="activation (min-max scaled)")
    return _save(fig, path)


def _subject(report: dict) -> str:
    m, d = report.get("model", {}), report.get("data", {})
    n = (d.get("train") or {}).get("num_samples")
    form = report.get("settings", {}).get("feature_map")
    taps = f", FM: {FEATURE_MAP_NAMES.get(form, form)}" if form else ""
    return f"{m.get('arch')} ({m.get('weights')}) -> {n} training images, recipe {report.get('settings', {}).get('recipe')}{taps}"


def all_figures(report: dict, out: Path) -> List[str]:
    files = [table_figure(report, out / "table1.png")]
    if any(r["curve"] for r in report["runs"]):
        files.append(curves_figure(report, out / "fig3_curves.png"))
    if report.get("search"):
        files.append(search_figure(report, out / "fig4_search.png"))
    if report["filter_distances"]:
        files.append(distance_figure(report, out / "fig5_filter_distance.png"))
    if report["activation_maps"]["images"]:
        files.append(maps_figure(report, out / "fig6_activation_maps.png"))
    return files
