"""What the predict and evaluate commands write: predictions as CSV, JSON or a table on the terminal,
an evaluation as evaluation.json and confusion_matrix.png. Every file is written atomically."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..output_files import atomic_write, atomic_write_text
from .metrics import Evaluation

PREDICTION_FORMATS = (".csv", ".json")
EVALUATION_FILE = "evaluation.json"
CONFUSION_FILE = "confusion_matrix.png"


def write_predictions(predictions: list, path) -> Path:
    """preds.csv (one row per image: path, label_1, probability_1, ..., label_k, probability_k) or
    preds.json (a list of {path, labels, probabilities}), chosen by the suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        atomic_write_text(path, json.dumps([p.to_dict() for p in predictions], indent=1))
    elif suffix == ".csv":
        atomic_write_text(path, predictions_csv(predictions))
    else:
        raise ValueError(f"predictions file {path}: the suffix must be one of {', '.join(PREDICTION_FORMATS)}")
    return path


def predictions_csv(predictions: list) -> str:
    k = max((len(p.labels) for p in predictions), default=0)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", *[f"{what}_{i}" for i in range(1, k + 1) for what in ("label", "probability")]])
    for p in predictions:
        writer.writerow([p.path or "", *[v for pair in zip(p.labels, p.probabilities) for v in pair]])
    return buf.getvalue()


def predictions_table(predictions: list) -> str:
    """One line per image: its path (or its position), then the top-k classes with their probabilities."""
    names = [p.path if p.path is not None else f"[{i}]" for i, p in enumerate(predictions)]
    width = max((len(n) for n in names), default=4)
    lines = [f"{'image':<{width}}  top-k (probability)"]
    for name, p in zip(names, predictions):
        lines.append(f"{name:<{width}}  " + ", ".join(f"{l} ({v:.3f})" for l, v in zip(p.labels, p.probabilities)))
    return "\n".join(lines)


def write_evaluation(evaluation: Evaluation, folder, title: str = "") -> dict:
    """evaluation.json and confusion_matrix.png in `folder`; returns {name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / EVALUATION_FILE, json.dumps(evaluation.to_dict(), indent=1))
    plot_confusion(evaluation, folder / CONFUSION_FILE, title)
    return {"evaluation": str(folder / EVALUATION_FILE), "confusion_matrix": str(folder / CONFUSION_FILE)}


def plot_confusion(evaluation: Evaluation, path, title: str = "") -> None:
    """Rows: true class, columns: predicted class, counts in the cells (too many classes: colours only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    matrix = np.asarray(evaluation.confusion_matrix)
    k = len(evaluation.classes)
    side = min(max(4.5, 2.5 + 0.45 * k), 20)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    ticks = range(k) if k <= 50 else []
    ax.set_xticks(list(ticks), [evaluation.classes[i] for i in ticks], rotation=90)
    ax.set_yticks(list(ticks), [evaluation.classes[i] for i in ticks])
    if k <= 30:
        top = matrix.max() or 1
        for (i, j), n in np.ndenumerate(matrix):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if n > top / 2 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title + chr(10) if title else ''}top-1 {evaluation.top1:.2f}% on {evaluation.images} images",
                 fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
