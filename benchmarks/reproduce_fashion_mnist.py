"""The project's reproduction of the paper's comparison on real data.

ImageNet EfficientNet-Lite0 (shipped weights) -> Fashion-MNIST with 10, 30 and 100 training images
per class (fixed subset, subset seed 0), the full 10,000-image test set, all six methods, three
seeds, alpha chosen per size on a validation split of the training images (paper grid, beta 0.01).
One `fastdelta.compare` per size into OUT/per_class_N/ (a size whose report.json exists is skipped,
so an interrupted reproduction continues), then OUT/README.md with the combined Table 1 analog
(OUT/NOTES.md, where someone wrote one, goes in after its preamble, so a regenerated README keeps it).

    python3 benchmarks/reproduce_fashion_mnist.py --out benchmarks/results/reproduction_fashion_mnist_cpu

`--recipe` and `--set NAME=VALUE` (any fastdelta.fit setting, repeatable) pick the conventions; the
README names the ones used.
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Tuple

from fastdelta.apps.compare import CompareSettings, compare
from fastdelta.data.fashion_mnist import few_shot_subset, load_fashion_mnist
from fastdelta.apps.compare.figures import label
from fastdelta.apps.compare.report import RULE_SHORT, load_report, report_path, verdict
from fastdelta.apps.compare.report import (paired_difference as report_paired_difference,
                                           paired_stats as report_paired_stats)
from fastdelta.output_files import atomic_write_text
from fastdelta.settings import DEFAULT_RECIPE, METHODS, RECIPES, describe_conventions


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/reproduction_fashion_mnist_cpu")
    p.add_argument("--sizes", default="10,30,100", help="training images per class")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32, help="crop; resize is image_size * 256/224")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--search", default="alpha", choices=["alpha", "grid", "none"])
    p.add_argument("--folds", type=int, default=1, help="K >= 2: K-fold cross-validation for the search (paper: 5)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--curve-images", type=int, default=1000, help="test images per learning-curve point")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES), help="fit recipe")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="another fit setting (JSON value, or a plain string), e.g. feature_map=relu_conv")
    p.add_argument("--reuse-runs", "--reuse-search", dest="reuse_runs", action="store_true",
                   help="take search runs an interrupted run finished (same settings) instead of refitting them")
    p.add_argument("--summary-only", action="store_true",
                   help="only rewrite OUT/README.md from the per-size reports already in OUT (e.g. after "
                        "running the sizes as separate processes)")
    p.add_argument("--command", help="with --summary-only: the command(s) that made the reports, for the README")
    a = p.parse_args(argv)
    out = Path(a.out)
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.summary_only:
        write_summary(out, sizes, a.command or " ".join(sys.argv))
        return
    x_all, y_all = load_fashion_mnist("train")
    run_sizes(out, sizes, lambda n: few_shot_subset(x_all, y_all, n, 0), load_fashion_mnist("test"), "imagenet",
              Plan.from_args(a))
    write_summary(out, sizes, " ".join(sys.argv))


@dataclass(frozen=True)
class Plan:
    """What every training size of one reproduction shares (one command line)."""
    iterations: int
    batch_size: int
    image_size: int
    recipe: str
    methods: Tuple[str, ...]
    seeds: int
    curve_images: int
    search: str = "alpha"
    folds: int = 1
    reuse_runs: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)  # further fastdelta.fit settings (--set NAME=VALUE)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "Plan":
        return cls(iterations=a.iterations, batch_size=a.batch_size, image_size=a.image_size, recipe=a.recipe,
                   methods=tuple(a.methods.split(",")), seeds=a.seeds, curve_images=a.curve_images,
                   search=a.search, folds=getattr(a, "folds", 1), reuse_runs=a.reuse_runs,
                   progress=not getattr(a, "no_progress", False), extra=dict(parse_setting(v) for v in a.set))

    def fit_settings(self) -> dict:
        return dict(iterations=self.iterations, batch_size=self.batch_size, lr=0.01, beta=0.01,
                    resize=round(self.image_size * 256 / 224), crop=self.image_size, attention_head_epochs=10,
                    recipe=self.recipe, **self.extra)


def run_sizes(out: Path, sizes, train_of_size, test, weights: str, plan: Plan) -> None:
    """One `fastdelta.compare` per training size into out/per_class_N (a size whose report exists is
    skipped, so an interrupted reproduction continues)."""
    for n in sizes:
        folder = out / f"per_class_{n}"
        if report_path(folder) is not None:
            print(f"{folder}: report exists, skipped")
            continue
        t0 = time.perf_counter()
        compare("efficientnet_lite0", train_of_size(n), test, methods=list(plan.methods), seeds=plan.seeds,
                search=plan.search, out=folder, weights=weights,
                compare_settings=CompareSettings(curve_points=10, curve_images=plan.curve_images,
                                                 reuse_runs=plan.reuse_runs, folds=plan.folds),
                progress=plan.progress, **plan.fit_settings())
        print(f"{folder}: done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def search_rule(report: dict) -> str:
    """How the report's alpha was chosen, in words (none: given)."""
    search = report.get("search")
    if search is None:
        return "hand (no search; `--search none`)"
    split = search["split"]
    if "folds" in split:
        return f"{split['folds']}-fold cross-validation on the training images (seed {search['seed']})"
    return (f"a validation split ({round(100 * split.get('val_fraction', 0.2))}% of each class's training images, "
            f"seed {search['seed']})")


def parse_setting(text: str):
    name, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--set {text!r}: expected NAME=VALUE")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


TITLE = "ImageNet EfficientNet-Lite0 -> Fashion-MNIST"
NOTES = "NOTES.md"


def hand_notes(out: Path) -> list:
    """OUT/NOTES.md, written by hand (what the tables cannot say: why a run was superseded, what changed
    since an earlier one), as README lines placed after the preamble: a regenerated README keeps them."""
    path = out / NOTES
    return [path.read_text().strip("\n"), ""] if path.is_file() else []


def write_summary(out: Path, sizes, command: str, title: str = TITLE, preamble=()) -> None:
    reports = {n: load_report(out / f"per_class_{n}") for n in sizes
               if report_path(out / f"per_class_{n}") is not None}  # report.json, or .gz in committed results
    if not reports:
        return
    any_r = next(iter(reports.values()))
    run = any_r["settings"]  # crop, iterations and batch are one per reproduction (the same command)
    n_seeds = len({r["seed"] for r in any_r.get("runs") or []})
    seeds = {1: "one seed", 2: "two seeds", 3: "three seeds", 5: "five seeds"}.get(n_seeds, f"{n_seeds} seeds")
    lines = [f"# Reproduction: {title}, six methods, {seeds}", "",
             f"Command: `{command}`", "", *preamble,
             f"- device {any_r['environment']['device']}, torch {any_r['environment']['torch']}, "
             f"{any_r['environment']['date']}",
             f"- CPU-feasible size: {run['crop']}x{run['crop']} crops (resize {run['resize']}), "
             f"{run['iterations']} iterations of batch {run['batch_size']} per run (the paper: 224 px, 9,000 iterations of 64)",
             f"- conventions: {describe_conventions(run)}",
             f"- alpha per method and size chosen by {search_rule(any_r)} over 0.0001, 0.001, 0.01, 0.1, 0.2 "
             f"with beta 0.01; the test set ({test_images(any_r)} images) only measures", "", *hand_notes(out),
             "## Table 1 analog: test top-1 (%), mean ± std over seeds", "",
             "| method | " + " | ".join(f"{n}/class" for n in reports) + " |",
             "|---|" + "---|" * len(reports)]
    for m in [m for m in METHODS if all(m in r["table"] for r in reports.values())]:
        cells = []
        for n, r in reports.items():
            t = r["table"][m]
            c = "diverged" if t["mean"] is None else f"{t['mean']:.2f} ± {t['std']:.2f}"
            if r["best"] == m:
                c = f"**{c}**"
            alpha = r["chosen"].get(m, {}).get("alpha")
            cells.append(c + (f" (α {alpha:g})" if alpha is not None else ""))
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    lines += ["", "## DELTA minus another method, paired by seed (points of test top-1; the seeds in brackets)", "",
              "| versus | " + " | ".join(f"{n}/class" for n in reports) + " |", "|---|" + "---|" * len(reports)]
    lines += paired_rows(list(reports.values()))
    lines += ["", "## The paper's claims, per size", "", f"Rule: {RULE_SHORT}; each report states it in full.",
              ""]
    for n, r in reports.items():
        lines.append(f"### {n} images per class ([report](per_class_{n}/report.md))")
        lines.append("")
        lines.append(f"- **ranking by mean test top-1:** {ranking(r['table'])} (the paper's Table 1 mostly reads "
                     "DELTA > DELTA w/o ATT ≈ L2-SP > L2-SP(ATT) ≈ L2 > L2-FE)")
        for name, c in r["claims"].items():
            lines.append(f"- **{name.replace('_', ' ')}: {verdict(c, 'qualitative')}.** {c['text']}")
        lines.append("")
    atomic_write_text(out / "README.md", "\n".join(lines))


def paired_difference(report: dict, other: str):
    """(mean, std, per-seed values) of DELTA minus `other`, seed by seed (step schedule), or None: the
    numbers the report's claims are decided on (fastdelta.apps.compare.report.paired_difference)."""
    return _as_tuple(report_paired_difference(report, other))


def paired_stats(diffs):
    """(mean, std, the values) of per-seed differences, or None without any (std 0.0 for one seed)."""
    return _as_tuple(report_paired_stats(diffs))


def _as_tuple(d: dict):
    if d["n"] == 0:
        return None
    return d["mean"], d["std"] if d["std"] is not None else 0.0, d["values"]


def paired_cell(d) -> str:
    """'+0.54 ± 1.21 (+1.08, +1.38, -0.85)' for paired_stats' result, '-' for None."""
    return "-" if d is None else f"{d[0]:+.2f} ± {d[1]:.2f} ({', '.join(f'{v:+.2f}' for v in d[2])})"


def paired_rows(reports) -> list:
    """Markdown rows: per rival, DELTA's paired difference in each report ('-' without runs)."""
    rows = []
    for other in ("l2", "l2_sp", "delta_no_att"):
        cells = []
        for r in reports:
            d = paired_difference(r, other) if "runs" in r else None
            cells.append(paired_cell(d))
        rows.append(f"| {label(other)} | " + " | ".join(cells) + " |")
    return rows


def test_images(report: dict) -> str:
    n = report.get("data", {}).get("test", {}).get("num_samples")
    return "all the test" if n is None else f"all {n:,}"


def ranking(table: dict) -> str:
    """'L2-SP 65.1 > L2 62.3 > ...' by mean, diverged methods last."""
    done = sorted((t["mean"], m) for m, t in table.items() if t["mean"] is not None)[::-1]
    text = " > ".join(f"{label(m)} {mean:.1f}" for mean, m in done)
    failed = [label(m) for m, t in table.items() if t["mean"] is None]
    return text + (f"; diverged: {', '.join(failed)}" if failed else "")


if __name__ == "__main__":
    main()
