"""Progress of long work: a tqdm bar on a terminal; plain lines in a log file (a bar written to a file is
one endless line of carriage returns); nothing with progress=False (tests, library calls)."""
from __future__ import annotations

import contextlib
import os
import sys
import time

from tqdm.auto import tqdm

# a log gets a line at most this often (and at the end), so a long run's log stays readable
LOG_EVERY_S = float(os.environ.get("FASTDELTA_LOG_EVERY_S", "30"))


class LogLines:
    """tqdm's `update`, `set_postfix`, `set_postfix_str` and `close`, printed as plain lines on stderr: one
    when the work starts, one per LOG_EVERY_S seconds, and one at the end."""

    def __init__(self, total: int, desc: str, unit: str, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.postfix = ""
        self.stream = stream or sys.stderr
        self.t0 = self.last = time.perf_counter()
        self._print("started")

    def _print(self, what: str) -> None:
        elapsed = time.perf_counter() - self.t0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {elapsed:.1f} s{tail} [{what}]",
              file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= LOG_EVERY_S and self.n < self.total:
            self.last = now
            self._print("running")

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        self._print("done" if self.n >= self.total else "stopped")


def on_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    if enabled and not on_terminal():
        bar = LogLines(total, desc, unit)
    else:
        bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
