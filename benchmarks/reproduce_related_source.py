"""DELTA where the paper expects it to pay off: a source trained on a large related task, few-shot transfer.

Source task: Fashion-MNIST classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat), all 30,000
training images. fastdelta itself trains the source: ImageNet EfficientNet-Lite0 fine-tuned with L2
(stage `source`; its command, test accuracy and the SHA-256 of its weights go to OUT/source/source.json).
Target task: the other five classes (Sandal, Shirt, Sneaker, Bag, Ankle boot), disjoint from the
source, from the same domain, with 10 / 30 / 100 training images per class (subset seed 0) and all
5,000 test images of those classes; all six methods, three seeds, alpha chosen on a validation split
(stage `target`, one `fastdelta.compare` per size into OUT/<name>/per_class_N, where <name> says
which recipe and options ran). A size whose report exists is skipped, so an interrupted run continues.

    python3 benchmarks/reproduce_related_source.py source --out OUT
    python3 benchmarks/reproduce_related_source.py target --out OUT --recipe public --sizes 10,30,100
    python3 benchmarks/reproduce_related_source.py target --out OUT --recipe paper --summary-only
    python3 benchmarks/reproduce_related_source.py overview --out OUT

`overview` writes OUT/README.md: every recipe and size side by side, and DELTA's paired per-seed
difference to L2 and to L2-SP (same seed = same data order and initialisation of the head).
"""
import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_fashion_mnist import (Plan, hand_notes, paired_cell, paired_rows, paired_stats,  # noqa: E402
                                     run_sizes, write_summary)

import fastdelta  # noqa: E402
from fastdelta.data.fashion_mnist import FASHION_MNIST_CLASSES, few_shot_subset, load_fashion_mnist  # noqa: E402
from fastdelta.apps.compare.figures import label  # noqa: E402
from fastdelta.apps.compare.report import RULE_SHORT, load_report, report_path  # noqa: E402
from fastdelta.environment import environment  # noqa: E402
from fastdelta.output_files import atomic_write_text  # noqa: E402
from fastdelta.settings import DEFAULT_RECIPE, RECIPES, describe_conventions  # noqa: E402

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)


def classes_subset(split: str, classes) -> tuple:
    """The images of `classes`, relabelled 0..len(classes)-1 in that order."""
    x, y = load_fashion_mnist(split)
    keep = np.isin(y, classes)
    relabel = {c: i for i, c in enumerate(classes)}
    return x[keep], np.array([relabel[int(v)] for v in y[keep]], dtype=np.int64)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train_source(a) -> None:
    folder = Path(a.out) / "source"
    if (folder / "source.json").is_file():
        print("source exists:", json.loads((folder / "source.json").read_text())["weights_sha256"])
        return
    t0 = time.perf_counter()
    res = fastdelta.fit("efficientnet_lite0", classes_subset("train", SOURCE_CLASSES),
                        classes_subset("test", SOURCE_CLASSES), method="l2", weights="imagenet",
                        iterations=a.iterations, batch_size=a.batch_size, lr=0.01,
                        resize=round(a.image_size * 256 / 224), crop=a.image_size, seed=0,
                        run_dir=str(folder), checkpoint_every=0, progress=not a.no_progress)
    record = {"command": " ".join(sys.argv), "classes": [FASHION_MNIST_CLASSES[c] for c in SOURCE_CLASSES],
              "train_images": res.data["train"]["num_samples"], "test_top1": res.test_top1,
              "weights": str(folder / "model.pt"), "weights_sha256": sha256(folder / "model.pt"),
              "settings": {k: res.settings[k] for k in ("iterations", "batch_size", "lr", "resize", "crop", "method")},
              "seconds": round(time.perf_counter() - t0, 1), "environment": environment()}
    atomic_write_text(folder / "source.json", json.dumps(record, indent=1))
    print(f"source: test top-1 {res.test_top1:.2f}% on classes {SOURCE_CLASSES}, sha256 {record['weights_sha256']}")


def run_target(a) -> None:
    source = json.loads((Path(a.out) / "source" / "source.json").read_text())
    weights = Path(a.out) / "source" / "model.pt"
    # the weights (not committed) are needed to train; a summary reads only the reports and source.json
    if not a.summary_only and sha256(weights) != source["weights_sha256"]:
        raise SystemExit(f"{weights} does not match the SHA-256 recorded in source.json")
    plan = Plan.from_args(a)
    name = a.name or "_".join([a.recipe] + [f"{k}-{v}" for k, v in sorted(plan.extra.items())])
    out = Path(a.out) / name
    sizes = [int(s) for s in a.sizes.split(",")]
    preamble = [f"- source: ImageNet EfficientNet-Lite0 fine-tuned by fastdelta (L2) on all "
                f"{source['train_images']:,} training images of {', '.join(source['classes'])}: "
                f"test top-1 {source['test_top1']:.2f}% on those classes; weights SHA-256 "
                f"`{source['weights_sha256']}`, command `{source['command']}`",
                f"- target: {', '.join(FASHION_MNIST_CLASSES[c] for c in TARGET_CLASSES)} (disjoint classes, "
                "same domain), per-class training subsets drawn with subset seed 0", ""]
    if not a.summary_only:
        x_all, y_all = classes_subset("train", TARGET_CLASSES)
        run_sizes(out, sizes, lambda n: few_shot_subset(x_all, y_all, n, 0), classes_subset("test", TARGET_CLASSES),
                  str(weights), plan)
    write_summary(out, sizes, a.command or " ".join(sys.argv),
                  "related source (Fashion-MNIST classes 0-4) -> Fashion-MNIST classes 5-9", preamble)


def recipe_rows(columns) -> list:
    """Markdown: DELTA of each other recipe minus DELTA of `public` at the same size, seed by seed."""
    base = {n: r for name, n, r in columns if name == "public"}
    rows = []
    for name, n, r in columns:
        if name == "public" or n not in base:
            continue
        top1 = lambda rep: {x["seed"]: x["test_top1"] for x in rep["runs"]
                            if x["method"] == "delta" and x["schedule"] == "step" and x["test_top1"] is not None}
        mine, ref = top1(r), top1(base[n])
        d = paired_stats([mine[k] - ref[k] for k in sorted(mine) if k in ref])
        if d is not None:
            rows.append(f"| {name}, {n}/class | {paired_cell(d)} |")
    if not rows:
        return []
    return ["", "## DELTA of each recipe minus DELTA of the public recipe, paired by seed (points)", "",
            "| recipe, size | difference |", "|---|---|", *rows]


def write_overview(a) -> None:
    """OUT/README.md: the table of every recipe x size found under OUT, and DELTA's paired differences."""
    out = Path(a.out)
    source = json.loads((out / "source" / "source.json").read_text())
    columns = []  # (recipe folder, size, report)
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "source"):
        sizes = [p for p in folder.glob("per_class_*") if report_path(p) is not None]  # .json or .json.gz
        for size in sorted(sizes, key=lambda p: int(p.name.split("_")[-1])):
            columns.append((folder.name, int(size.name.split("_")[-1]), load_report(size)))
    if not columns:
        raise SystemExit(f"no per_class_N/report.json under {out}")
    lines = ["# Related source -> disjoint target: every recipe and size", "",
             f"Command: `{a.command or ' '.join(sys.argv)}`", "",
             f"- source: ImageNet EfficientNet-Lite0 fine-tuned by fastdelta (L2) on all {source['train_images']:,} "
             f"training images of {', '.join(source['classes'])}: test top-1 {source['test_top1']:.2f}%; weights "
             f"SHA-256 `{source['weights_sha256']}`, command `{source['command']}`",
             f"- target: {', '.join(FASHION_MNIST_CLASSES[c] for c in TARGET_CLASSES)}, all 5,000 test images; "
             "six methods, three seeds, alpha chosen on a validation split per method, recipe and size", ""]
    if any(not c[2].get("search") for c in columns):  # no alpha search recorded
        lines[-1:-1] = ["- a folder run with `--search none` (e.g. `tap_form_*`: the public recipe with one "
                        "`feature_map` changed) fits its methods at the alpha its README names, with the seeds "
                        "and data of the others, so its DELTA pairs seed by seed with the public recipe's"]
    for name in dict.fromkeys(c[0] for c in columns):
        r = next(c[2] for c in columns if c[0] == name)
        lines.append(f"- `{name}` ([README]({name}/README.md)): {describe_conventions(r['settings'])}")
    lines += ["", *hand_notes(out), "## Test top-1 (%), mean ± std over three seeds", "",
              "| method | " + " | ".join(f"{name}, {n}/class" for name, n, _ in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for m in fastdelta.METHODS:
        cells = []
        for _, _, r in columns:
            t = r["table"].get(m)
            c = "-" if t is None else "diverged" if t["mean"] is None else f"{t['mean']:.2f} ± {t['std']:.2f}"
            cells.append(f"**{c}**" if r["best"] == m else c)
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    lines += ["", "## DELTA minus another method, paired by seed (points of test top-1)", "",
              f"Rule: {RULE_SHORT}; each report states it in full.", "",
              "| versus | " + " | ".join(f"{name}, {n}/class" for name, n, _ in columns) + " |",
              "|---|" + "---|" * len(columns)]
    lines += paired_rows([r for _, _, r in columns])
    lines += recipe_rows(columns)
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'README.md'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["source", "target", "overview"])
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=32, help="crop; resize is image_size * 256/224")
    p.add_argument("--iterations", type=int, default=None, help="default: 2,000 (source), 300 (target)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sizes", default="10,30,100")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default=",".join(fastdelta.METHODS))
    p.add_argument("--search", default="alpha", choices=["alpha", "grid", "none"],
                   help="none: every method at the --set alpha (e.g. to re-run chosen fits with one setting changed)")
    p.add_argument("--folds", type=int, default=1, help="K >= 2: K-fold cross-validation for the search (paper: 5)")
    p.add_argument("--curve-images", type=int, default=1000)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES), help="fit recipe")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="another fit setting")
    p.add_argument("--name", default=None, help="folder name of this target run (default: recipe + settings)")
    p.add_argument("--reuse-runs", "--reuse-search", dest="reuse_runs", action="store_true",
                   help="take back the runs an interrupted run finished (same settings and data) instead of refitting them")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--command", help="with --summary-only: the command that made the reports, for the README")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.iterations is None:
        a.iterations = 2000 if a.stage == "source" else 300
    {"source": train_source, "target": run_target, "overview": write_overview}[a.stage](a)


if __name__ == "__main__":
    main()
