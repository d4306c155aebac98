"""FitResult: everything a fit produced, and how it is written to disk (atomically)."""
from __future__ import annotations

import gzip
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .attention.weights import ChannelAttention
from .output_files import atomic_write, atomic_write_text


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def cpu_arithmetic() -> dict:
    """What decides a CPU run's floating-point results, beside the code: the thread count (the order of
    sums), the vector instruction set torch dispatches to and the CPU model (oneDNN picks its conv
    kernels by instruction set): the same code on another CPU gives other last digits from the first
    step on, and a different trajectory after a few hundred."""
    return {"cpu_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": _cpu_model()}


@dataclass
class FitResult:
    model: nn.Module                       # the trained target network
    method: str
    settings: dict                         # every setting used, defaults resolved
    model_info: dict                       # architecture, source weights, head, regularised layers
    data: dict                             # what data, how much, skipped files
    history: list                          # one record per iteration: ce, reg (alpha term), head (beta term), ...
    test: dict = field(default_factory=dict)       # top1 (and top1_10crop with "improved")
    attention: Optional[ChannelAttention] = None
    timings: dict = field(default_factory=dict)
    status: str = "ok"                     # "ok" or "diverged: ..."
    # with a validation set: best_iteration, best_val_top1 (its top-1) and stopped_early (result.json keys)
    selection: dict = field(default_factory=dict)

    @property
    def test_top1(self) -> Optional[float]:
        return self.test.get("top1")

    @property
    def test_top1_10crop(self) -> Optional[float]:
        return self.test.get("top1_10crop")

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {"method": self.method, "status": self.status, "test": self.test, "model": self.model_info,
                "data": self.data, "settings": self.settings, "timings_s": self.timings,
                "iterations_run": len(self.history), **self.selection,
                "final_loss_terms": {k: last.get(k) for k in ("ce", "reg", "head", "loss")},
                "attention": None if self.attention is None else {
                    "layers": self.attention.layers, "images": self.attention.images, "impl": self.attention.impl,
                    "file": "channel_attention.json"},
                "environment": {"torch": torch.__version__, "python": platform.python_version(),
                                "device": self.settings.get("device_used"), **cpu_arithmetic()}}

    def save(self, directory, weights: bool = True, plots: bool = True, attention_at=None) -> Path:
        """result.json, history.jsonl, model.pt (unless weights=False), channel_attention.json (if any),
        history.png (unless plots=False: plot_history(load_history(directory), ...) draws it again).

        attention_at: a channel_attention.json already on disk (e.g. the one a comparison shares between
        its runs): where it holds this fit's attention (same content), result.json points at it (path
        relative to `directory`) instead of a copy being written; otherwise the copy is written."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))
        finite = not weights or all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values()
                                    if t.is_floating_point())
        if weights and finite:
            atomic_write(out / "model.pt", lambda tmp: torch.save(self.model.state_dict(), tmp))
        summary = self.summary()
        if not finite:  # a diverged run's weights: no model.pt that reads as a trained model
            summary["model_file"] = "not written: the weights hold NaN or infinite values"
        if self.attention is not None:
            if attention_at is not None and same_attention(self.attention, attention_at):
                summary["attention"]["file"] = os.path.relpath(Path(attention_at), out)
            else:
                self.attention.save(out / "channel_attention.json")
        if self.history and plots:
            plot_history(self.history, out / "history.png", f"{self.method} — {self.model_info.get('arch')}",
                         self.method)
        atomic_write_text(out / "result.json", json.dumps(summary, indent=1, default=str))
        return out


def same_attention(attention: ChannelAttention, path) -> bool:
    """Whether the channel_attention.json at `path` holds exactly `attention` (by content)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return saved == json.loads(json.dumps(attention.to_dict()))


HISTORY_FILES = ("history.jsonl", "history.sampled.jsonl.gz")


def load_history(run_dir) -> list:
    """A run folder's history rows: history.jsonl (every iteration), else history.sampled.jsonl.gz (the
    rows committed results keep: benchmarks/slim_results.py)."""
    run_dir = Path(run_dir)
    for name in HISTORY_FILES:
        path = run_dir / name
        if path.is_file():
            data = path.read_bytes()
            text = (gzip.decompress(data) if name.endswith(".gz") else data).decode()
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    raise FileNotFoundError(f"no {' or '.join(HISTORY_FILES)} in {run_dir}")


def plot_history(history: list, path, title: str, method: Optional[str] = None) -> None:
    """history.png: the figure history_figure draws, written atomically."""
    fig = history_figure(history, title, method)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    import matplotlib.pyplot as plt
    plt.close(fig)


def history_figure(history: list, title: str, method: Optional[str] = None):
    """The training history as a matplotlib Figure, one panel each: the cross-entropy (and the total loss)
    on its own axis, so it shows however small the regulariser is; the regularisation terms (named "weight
    decay" for the methods regularised by weight decay); the learning rate (a step schedule drawn as steps);
    and, when curve points were recorded (rows with test_top1 or val_top1), the accuracy. Integer
    iteration ticks throughout."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    it = [h["iteration"] for h in history]
    curves = {key: [(h["iteration"], h[key]) for h in history if h.get(key) is not None]
              for key in ("test_top1", "val_top1")}
    curves = {k: v for k, v in curves.items() if v}
    n = 3 + bool(curves)
    fig, grid = plt.subplots(2, 2, figsize=(10, 6.4), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        fig.delaxes(ax)
    axes = axes[:n]
    loss_ax, reg_ax, lr_ax = axes[:3]

    lines = loss_ax.plot(it, [h.get("ce") for h in history], label="cross-entropy", lw=1, color="tab:blue")
    loss_ax.set_ylabel("cross-entropy", color="tab:blue")
    if any(h.get("loss") is not None for h in history):
        # the total on its own (right) axis: a large regulariser would otherwise flatten the cross-entropy
        total_ax = loss_ax.twinx()
        lines += total_ax.plot(it, [h.get("loss") for h in history], label="total loss (right axis)", lw=1,
                               color="tab:gray", alpha=0.7)
        total_ax.set_ylabel("total loss", color="tab:gray")
    loss_ax.set_title("training cross-entropy and total loss", fontsize=9)
    loss_ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8)

    decay = _uses_weight_decay(method)
    labels = ({"reg": "weight decay (shared layers)", "head": "weight decay (head)"} if decay else
              {"reg": "alpha·regulariser", "head": "beta·head L2"})
    drawn = []
    for key, colour in (("reg", "tab:orange"), ("head", "tab:green")):
        values = [h.get(key) for h in history]
        if any(v for v in values if v is not None):
            reg_ax.plot(it, values, label=labels[key], lw=1, color=colour)
            drawn += [v for v in values if v is not None]
    if drawn and min(drawn) > 0 and max(drawn) / min(drawn) > 100:
        reg_ax.set_yscale("log")
    if drawn:
        reg_ax.legend(fontsize=8)
    else:
        reg_ax.text(0.5, 0.5, "no regularisation term", ha="center", va="center", transform=reg_ax.transAxes)
    reg_ax.set_ylabel("weight decay term" if decay else "regularisation term")
    reg_ax.set_title("weight decay terms" if decay else "regularisation terms (own scale)", fontsize=9)

    lr_ax.plot(it, [h.get("lr") for h in history], color="tab:gray", drawstyle="steps-post")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_title("learning-rate schedule", fontsize=9)

    if curves:
        acc_ax = axes[3]
        for key, lab in (("test_top1", "test top-1"), ("val_top1", "validation top-1")):
            if key in curves:
                acc_ax.plot(*zip(*curves[key]), marker="o", ms=3, lw=1, label=lab)
        acc_ax.set_ylabel("top-1 (%)")
        acc_ax.set_title("accuracy along training", fontsize=9)
        acc_ax.legend(fontsize=8)
        acc_ax.set_xlim(loss_ax.get_xlim())  # the whole run, so a single curve point gets integer ticks too
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: training history", fontsize=10)
    fig.tight_layout()
    return fig


def _uses_weight_decay(method: Optional[str]) -> bool:
    if method is None:
        return False
    from .methods import METHODS
    cls = METHODS.get(method)
    return bool(cls is not None and cls.uses_weight_decay)
