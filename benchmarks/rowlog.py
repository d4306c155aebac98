"""Rows written as they are measured: a benchmark cut short by a time limit keeps what it did."""
import json
import os
from pathlib import Path
from typing import Optional


class RowLog:
    """Appends each row as one JSON line to `path` (flushed and synced), and prints it."""

    def __init__(self, path: Optional[str], resume: bool = False):
        """resume=True keeps the rows already in `path` (a run that continues where it stopped)."""
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not resume or not self.path.is_file():
                self.path.write_text("")  # one run per file

    @staticmethod
    def rows(path) -> list:
        """The rows in a row log (none if it does not exist)."""
        path = Path(path)
        return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []

    @classmethod
    def beside(cls, out: Optional[str]) -> "RowLog":
        """The row log next to a final JSON file: OUT.json -> OUT.rows.jsonl (none without --out)."""
        return cls(None if out is None else str(Path(out).with_suffix("")) + ".rows.jsonl")

    def __call__(self, row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())


def measured_environment(report, summary_only: bool, current) -> dict:
    """The environment of the process that measured a report's rows: `current()` for a measuring run; a
    --summary-only rewrite measured nothing, so it keeps the environment `report` (a JSON file) already
    names, and takes its own only where there is none."""
    path = Path(report)
    if summary_only and path.is_file():
        try:
            kept = json.loads(path.read_text()).get("environment")
        except (OSError, ValueError):
            kept = None
        if kept:
            return kept
    return current()
