"""Rewrite committed comparison reports from their report.json (claims, report.md, figures) after the
report code changed; the runs themselves are not touched.

    python3 benchmarks/refresh_reports.py benchmarks/results/*/per_class_*/ benchmarks/results/*/*/per_class_*/
"""
import json
import sys
from pathlib import Path

from fastdelta.compare.report import finish_report


def main(argv=None) -> None:
    for folder in (argv if argv is not None else sys.argv[1:]):
        path = Path(folder) / "report.json"
        if not path.is_file():
            print(f"{folder}: no report.json, skipped")
            continue
        report = finish_report(json.loads(path.read_text()), Path(folder))
        print(f"{folder}: {report['claims'].get('accuracy', {}).get('text', '')[-90:]}")


if __name__ == "__main__":
    main()
