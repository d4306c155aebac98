"""Two comparisons of the same data and seeds, method by method: A − B per seed (test top-1 points).

Where two `fastdelta compare` runs share data, seeds and test set (e.g. the same reproduction with
`--recipe paper` and `--recipe public`), a method whose computation both runs share comes out identical
seed by seed, and the others pair:

    python3 benchmarks/paired_reports.py A/per_class_30 B/per_class_30

prints, per method in both, the paired mean ± std (the seeds' differences in brackets) and whether the
two runs gave it identical figures.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_fashion_mnist import paired_cell, paired_stats  # noqa: E402

from fastdelta.apps.compare.figures import label  # noqa: E402
from fastdelta.apps.compare.report import load_report  # noqa: E402


def top1_by_seed(report: dict, method: str) -> dict:
    return {r["seed"]: r["test_top1"] for r in report["runs"]
            if r["method"] == method and r["schedule"] == "step" and r["test_top1"] is not None}


def paired_table(a: dict, b: dict) -> list:
    """Markdown rows: per method of both reports, A − B paired by seed."""
    rows = ["| method | A − B, paired by seed | identical |", "|---|---|---|"]
    for method in [m for m in a["table"] if m in b["table"]]:
        mine, theirs = top1_by_seed(a, method), top1_by_seed(b, method)
        seeds = [s for s in sorted(mine) if s in theirs]
        d = paired_stats([mine[s] - theirs[s] for s in seeds])
        rows.append(f"| {label(method)} | {paired_cell(d)} | "
                    f"{'yes' if seeds and all(mine[s] == theirs[s] for s in seeds) else 'no'} |")
    return rows


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="a comparison's folder (report.json or report.json.gz)")
    p.add_argument("b")
    args = p.parse_args(argv)
    rows = paired_table(load_report(Path(args.a)), load_report(Path(args.b)))
    print("\n".join(rows))
    return rows


if __name__ == "__main__":
    main()
