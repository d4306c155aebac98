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
            plot_history(self.history, out / "history.png", f"{self.method} — {self.model_info.get('arch')}")
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


def plot_history(history: list, path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    it = [h["iteration"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("ce", "cross-entropy"), ("reg", "alpha·regulariser"), ("head", "beta·head L2"), ("loss", "total")):
        ax1.plot(it, [h[key] for h in history], label=label, lw=1)
    ax1.set_yscale("symlog", linthresh=1e-3)
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("loss term")
    ax1.set_title(f"{title}: training loss")
    ax1.legend(fontsize=8)
    ax2.plot(it, [h["lr"] for h in history], color="tab:gray")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("learning rate")
    ax2.set_title("learning-rate schedule")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
