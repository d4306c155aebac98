"""A − B paired by seed between any two sets of measured rows, with the reports' rule.

A set is the rows of one or more files, filtered by KEY=VALUE: a comparison's folder (its report's
final runs: method, seed, test_top1, schedule) or row logs (`runs.jsonl` of `tap_forms.py` or
`alpha_range.py`). A row's seed is its `seed` field, else the N of a `seedN` folder on its path (the
alpha ranges run one folder per seed). Values compare as text (`alpha=0.001`, `feature_map=activation`).

    python3 benchmarks/paired_rows.py --a DIR/tap_forms_cpu_2026-12-05/runs.jsonl --a-where method=delta feature_map=activation \\
                                      --b DIR/tap_forms_cpu_2026-12-05/runs.jsonl --b-where method=l2

prints the paired mean ± std (the seeds' differences in brackets) and whether it holds by the rule the
reports state (`fastdelta.apps.compare.report.decide`).
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_fashion_mnist import paired_cell, paired_stats  # noqa: E402

from fastdelta.apps.compare.report import decide, load_report, paired_stats as report_paired_stats  # noqa: E402

VERDICT = {True: "holds", False: "fails", None: "not decided"}


def rows_of(path: Path) -> list:
    """Every measured row of a comparison folder or a row log, with its seed."""
    if path.is_dir():
        return [r for r in load_report(path)["runs"] if r.get("schedule", "step") == "step"]
    folder_seed = next((int(m.group(1)) for part in path.parts for m in [re.fullmatch(r"seed(\d+)", part)] if m), None)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{**r, "seed": r.get("seed", folder_seed)} for r in rows]


def top1_by_seed(paths, where) -> dict:
    wanted = dict(w.split("=", 1) for w in where)
    found = {}
    for path in paths:
        for r in rows_of(Path(path)):
            if all(str(r.get(k)) == v for k, v in wanted.items()) and r.get("test_top1") is not None:
                if r["seed"] in found:
                    raise SystemExit(f"{path}: two rows for seed {r['seed']} match {where}: narrow the filter")
                found[r["seed"]] = r["test_top1"]
    return found


def paired(a: dict, b: dict) -> str:
    seeds = [s for s in sorted(a) if s in b]
    diffs = [a[s] - b[s] for s in seeds]
    return f"{paired_cell(paired_stats(diffs))}: {VERDICT[decide(report_paired_stats(diffs))]} (seeds {seeds})"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for side in ("a", "b"):
        p.add_argument(f"--{side}", nargs="+", required=True, help="comparison folders or runs.jsonl files")
        p.add_argument(f"--{side}-where", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    line = paired(top1_by_seed(args.a, args.a_where), top1_by_seed(args.b, args.b_where))
    print(line)
    return line


if __name__ == "__main__":
    main()
