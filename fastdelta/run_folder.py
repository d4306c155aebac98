"""One run per output folder.

A run takes an exclusive lock (flock) on OUT/.fastdelta-run for as long as it lasts; the file holds
the holder's pid, host and start time, so a second run into the same folder fails at once naming
it. The kernel drops the lock with the process, kill -9 included; the file stays and marks the
folder as fastdelta's (a data scan skips it). A new fit also refuses a folder holding an earlier
run's files (checkpoints, result.json, history.jsonl, model.pt) unless it resumes that run or is
told to overwrite it, which removes them first: two runs' files never mix in one folder.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Iterable, List, Optional

from .output_files import RUN_MARKER, OutputError, reason
from .train.checkpoint import checkpoint_files

try:
    import fcntl
except ImportError:  # not POSIX: folders are marked, not locked
    fcntl = None

# what makes a folder hold a run: a fit writes these
RUN_FILES = ("result.json", "history.jsonl", "model.pt")
# removed with them on overwrite (a run writes these too; they would describe the old run)
ALSO_CLEARED = ("history.png", "channel_attention.json", "history.csv")


def earlier_run_files(folder) -> List[str]:
    """The files of a run in `folder`, relative to it."""
    folder = Path(folder)
    found = [name for name in RUN_FILES if (folder / name).exists()]
    return found + [f"checkpoints/{p.name}" for p in checkpoint_files(folder / "checkpoints")]


# the temp files atomic_write makes for those files (".NAME.<random>.tmp", output_files.atomic_write): a
# process killed mid-write (kill -9) leaves one behind
_TEMP = re.compile(r"^\.(?:%s)\.[A-Za-z0-9_]+\.tmp$"
                   % "|".join(re.escape(n) for n in (*RUN_FILES, *ALSO_CLEARED)))
_CHECKPOINT_TEMP = re.compile(r"^\.ckpt-\d{8}\.pt\.[A-Za-z0-9_]+\.tmp$")


def stale_temp_files(folder) -> List[Path]:
    """Temp files of fastdelta's own naming that a killed write left in `folder` and its checkpoints/."""
    found = []
    for where, pattern in ((Path(folder), _TEMP), (Path(folder) / "checkpoints", _CHECKPOINT_TEMP)):
        if where.is_dir():
            found += sorted(p for p in where.iterdir() if pattern.match(p.name) and p.is_file())
    return found


def clear_run_files(folder, keep: Iterable = ()) -> None:
    """Remove an earlier run's files from `folder` (those in `keep`, e.g. a given attention file, stay),
    with the temp files a write killed midway left (fastdelta's own naming only)."""
    folder = Path(folder)
    kept = {os.path.realpath(k) for k in keep}
    doomed = ([folder / n for n in (*RUN_FILES, *ALSO_CLEARED)] + checkpoint_files(folder / "checkpoints")
              + stale_temp_files(folder))
    try:
        for path in doomed:
            if path.exists() and os.path.realpath(path) not in kept:
                path.unlink()
    except OSError as e:
        raise OutputError(f"output folder {folder}: could not remove the earlier run's {path.name}: {reason(e)}",
                          e.errno) from e


class RunFolder:
    """The lock a run holds on its output folder; a context manager that releases it. A run that fails
    before writing anything removes the marker and the folders it made, leaving the disk as it was."""

    def __init__(self, path):
        self.path = Path(path)
        self.marker = self.path / RUN_MARKER
        self.fd: Optional[int] = None
        self.made: list = []
        self.had_marker = False
        self.unlocked = False  # the file system refused the lock

    @classmethod
    def claim(cls, path, resume: bool = False, overwrite: bool = False, keep: Iterable = (),
              check_earlier: bool = True) -> "RunFolder":
        """Lock `path` (made if needed). With check_earlier: refuse an earlier run's files unless
        `resume`, or remove them first with `overwrite`."""
        folder = cls(path)
        folder._lock()
        try:
            earlier = earlier_run_files(folder.path) if check_earlier and not resume else []
            if earlier and not overwrite:
                shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
                raise OutputError(f"output folder {folder.path} holds the files of an earlier run ({shown}): "
                                  "continue it with resume=True (CLI: --resume), replace it with overwrite=True "
                                  "(CLI: --overwrite), or choose another folder", errno.EEXIST)
            if earlier:
                clear_run_files(folder.path, keep)
        except BaseException:
            folder.release(failed=True)
            raise
        return folder

    def _lock(self) -> None:
        self.made = list(itertools.takewhile(lambda d: not d.exists(), (self.path, *self.path.parents)))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"output folder {self.path} cannot be created: {reason(e)}", e.errno) from e
        self.had_marker = self.marker.exists()
        while self.fd is None:
            fd = self._open_marker()
            if fcntl is None or self.unlocked or _locked_and_current(fd, self.marker):
                self.fd = fd
            else:  # removed by the holder that failed early: lock the file that is there now
                os.close(fd)
        _write_holder(self.fd)

    def _open_marker(self) -> int:
        try:
            fd = os.open(self.marker, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(f"output folder {self.path} is not writable: {reason(e)}", e.errno) from e
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputError(f"output folder {self.path} is in use by another fastdelta run ({holder}); "
                              "wait for it to end or choose another folder", errno.EBUSY) from None
        except OSError as e:  # a file system without locks (some network mounts): mark, do not lock
            warnings.warn(f"fastdelta: cannot lock {self.marker} ({reason(e)}): a second run into this folder "
                          "would not be stopped", UserWarning, stacklevel=4)
            self.unlocked = True
        return fd

    def release(self, failed: bool = False) -> None:
        if self.fd is None:
            return
        try:
            if failed and not self.had_marker and self._holds_nothing_else():
                self.marker.unlink()
                for d in self.made:  # deepest first; stop at one something else put a file in
                    d.rmdir()
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def _holds_nothing_else(self) -> bool:
        return [p.name for p in self.path.iterdir()] == [RUN_MARKER]

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.release(failed=exc_type is not None)


def _locked_and_current(fd: int, marker: Path) -> bool:
    """Whether the locked descriptor is still the file at `marker` (not one unlinked meanwhile)."""
    try:
        st = os.stat(marker)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "by": "fastdelta"}
    data = (json.dumps(info) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:  # a full disk: the lock holds all the same, a second run just cannot name its holder
        pass


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are not written yet"
