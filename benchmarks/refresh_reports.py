"""Rewrite committed comparison reports' claims from their report.json after the claim code changed; the
runs themselves are not touched.

    python3 benchmarks/refresh_reports.py benchmarks/results/*/per_class_*/ benchmarks/results/*/*/per_class_*/

Per report folder: report.json gets the claims of the current code, and report.md its claims section
("## The paper's claims on this data"); the rest of report.md and the figures stay as they are (they may
come from an older report code, and new claims should not rewrite them; `--full` regenerates report.md
and the figures whole). Then each folder above them whose README.md was written by
reproduce_fashion_mnist.py (write_summary: "## The paper's claims, per size") or by
`reproduce_related_source.py overview` (its paired-difference section) gets that section regenerated from
the refreshed reports; the rest of the README, hand-written notes included, is kept.
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastdelta.apps.compare.report import (REPORT_FILES, claims, finish_report, load_report, markdown,  # noqa: E402
                                           report_path, save_report_json)
from fastdelta.output_files import atomic_write_text  # noqa: E402

REPORT_CLAIMS = "## The paper's claims on this data"
SUMMARY_CLAIMS = "## The paper's claims, per size"
OVERVIEW_PAIRED = "## DELTA minus another method, paired by seed (points of test top-1)"


def _core(lines, heading):
    """(start, end) of the section under `heading` up to the next '## ' heading, without trailing blank
    lines; None where there is no such heading."""
    if heading not in lines:
        return None
    start = lines.index(heading)
    end = next((k for k in range(start + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return start, end


def splice(old: str, new: str, heading: str) -> str:
    """`old` with its section under `heading` replaced by that section of `new` (unchanged where either
    lacks it); what surrounds the section in `old`, blank lines included, is kept."""
    a, b = old.split("\n"), new.split("\n")
    sa, sb = _core(a, heading), _core(b, heading)
    if sa is None or sb is None:
        return old
    return "\n".join(a[:sa[0]] + b[sb[0]:sb[1]] + a[sa[1]:])


def refresh_report(folder: Path, full: bool = False) -> dict:
    """The report in `folder` with the current claims (report.json or report.json.gz, written back in the
    same form; report.md's claims section)."""
    report = load_report(folder)
    if full:
        return finish_report(report, folder)
    report["claims"] = claims(report)
    save_report_json(report, folder)
    md = folder / "report.md"
    fresh = markdown(report, report.get("figures") or [])
    atomic_write_text(md, splice(md.read_text(), fresh, REPORT_CLAIMS) if md.is_file() else fresh)
    return report


def _sizes(folder: Path):
    return sorted({int(p.parent.name.split("_")[-1]) for name in REPORT_FILES for p in folder.glob(f"per_class_*/{name}")})


def _generated(folder: Path, write) -> str:
    """The README `write` makes from a copy of the reports (and source.json) under `folder`."""
    with tempfile.TemporaryDirectory() as tmp:
        reports = [p for name in REPORT_FILES for pattern in (f"per_class_*/{name}", f"*/per_class_*/{name}")
                   for p in folder.glob(pattern)]  # report.json, or report.json.gz in committed results
        for p in [*reports, *folder.glob("source/source.json")]:
            (Path(tmp) / p.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, Path(tmp) / p.relative_to(folder))
        write(Path(tmp))
        return (Path(tmp) / "README.md").read_text()


def refresh_readme(folder: Path) -> bool:
    """Regenerate the claims (summary) or paired-difference (overview) section of folder/README.md."""
    from reproduce_fashion_mnist import write_summary
    from reproduce_related_source import write_overview
    path = folder / "README.md"
    if not path.is_file():
        return False
    old = path.read_text()
    lines = old.split("\n")
    new = old
    if SUMMARY_CLAIMS in lines and _sizes(folder):
        new = splice(new, _generated(folder, lambda tmp: write_summary(tmp, _sizes(folder), "")), SUMMARY_CLAIMS)
    if OVERVIEW_PAIRED in lines and (folder / "source" / "source.json").is_file():
        overview = _generated(folder, lambda tmp: write_overview(argparse.Namespace(out=str(tmp), command="")))
        new = splice(new, overview, OVERVIEW_PAIRED)
    if new != old:
        atomic_write_text(path, new)
    return new != old


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="*", help="report folders (per_class_N)")
    p.add_argument("--full", action="store_true", help="regenerate report.md and the figures whole")
    a = p.parse_args(argv)
    above = []
    for folder in map(Path, a.folders):
        if report_path(folder) is None:
            print(f"{folder}: no report.json, skipped")
            continue
        before = load_report(folder).get("claims", {}).get("accuracy", {}).get("holds")
        report = refresh_report(folder, a.full)
        after = report["claims"].get("accuracy", {})
        print(f"{folder}: accuracy holds {before} -> {after.get('holds')} ({after.get('verdict', '')})")
        above += [folder.resolve().parent, folder.resolve().parent.parent]
    for folder in dict.fromkeys(above):
        if refresh_readme(folder):
            print(f"{folder / 'README.md'}: claims rewritten")


if __name__ == "__main__":
    main()
