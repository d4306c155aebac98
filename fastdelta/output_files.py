"""Atomic file writes: a temp file in the same folder, then rename, so an interrupted run
never leaves a truncated result behind; and the output folder checks made before a run starts."""
from __future__ import annotations

import errno as errnos
import itertools
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

# the file every folder a fastdelta run writes into gets (and locks while the run lasts): a data scan
# skips folders holding it, so an output folder inside a data root never becomes a class
RUN_MARKER = ".fastdelta-run"


class OutputError(OSError):
    """The output folder cannot take the run's files: it is a file, cannot be created or written,
    or a write failed during the run (disk full, read-only). The message names the path and what
    is wrong; errno is the underlying error's, if any."""

    def __init__(self, message: str, errno: Optional[int] = None):
        super().__init__(message)
        self.errno = errno


def reason(error: OSError) -> str:
    """What went wrong, without the path (the caller's message names the right one)."""
    return error.strerror or str(error) or type(error).__name__


def check_output_dir(path, create: bool = True) -> Path:
    """Check, before any work, that `path` is a folder (or can be created, unless not `create`: a run
    to resume) and takes a new file, so that a bad output folder fails at once instead of after the
    training. Folders made for the check are removed again (the run's first write makes them), so a
    run that then fails on its settings leaves nothing behind."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"output folder {p} is a file, not a folder")
    if not create and not p.is_dir():
        raise OutputError(f"output folder {p} does not exist, so there is no run to resume in it")
    made = list(itertools.takewhile(lambda d: not d.exists(), (p, *p.parents)))  # deepest first
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"output folder {p} cannot be created: {reason(e)}", e.errno) from e
    try:
        _probe(p)
    finally:
        for d in made:
            try:
                d.rmdir()
            except OSError:  # something else put a file there meanwhile: leave it
                break
    return p


def _probe(folder: Path) -> None:
    """Create, write and remove a small file in `folder`."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastdelta-probe.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise OutputError(f"output folder {folder} is not writable: {reason(e)}", e.errno) from e
    try:
        os.write(fd, b"fastdelta")
    except OSError as e:
        raise OutputError(f"output folder {folder} is not writable: {reason(e)}", e.errno) from e
    finally:
        os.close(fd)
        os.unlink(probe)


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def require_free_space(path, needed: int, what: str, allow_low_disk: bool = False) -> None:
    """An OutputError, before the work, when the file system of `path` has less than `needed` bytes
    free (a full disk would stop the run at a write); with allow_low_disk a UserWarning instead (the
    estimate has a margin, so the run may still fit)."""
    existing = next(d for d in (Path(path), *Path(path).parents) if d.exists())  # made at the first write
    free = shutil.disk_usage(existing).free
    if free >= needed:
        return
    short = f"output folder {path} has {_size(free)} free, but {what} need about {_size(needed)}"
    if not allow_low_disk:
        raise OutputError(f"{short}: free some space or choose another folder, or pass allow_low_disk=True "
                          "(CLI: --allow-low-disk) to start anyway", errnos.ENOSPC)
    warnings.warn(f"fastdelta: {short}; a full disk will stop the run at a write (it can then be resumed "
                  "from its last checkpoint)", UserWarning, stacklevel=3)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(mask)
    return mask


# what torch.save says when its C++ writer cannot write a path (it loses the errno)
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "inline_container", "file write failed")


def torch_write_error(error: RuntimeError, path) -> Optional[OSError]:
    """The OSError behind a RuntimeError of torch.save(obj, path) that failed to write, else None:
    ENOSPC when the folder has (almost) no space left, EIO otherwise."""
    message = str(error)
    if not any(s in message for s in _TORCH_WRITE_FAILURES):
        return None
    try:
        full = shutil.disk_usage(Path(path).parent).free < 1 << 20
    except OSError:
        full = False
    code = errnos.ENOSPC if full else errnos.EIO
    first_line = message.strip().splitlines()[0] if message.strip() else "write failed"
    return OSError(code, f"{os.strerror(code)} (torch.save: {first_line})")


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then move tmp_path onto path, with the permissions a plain open() would
    give (mkstemp makes 0600 files: the umask decides, as for any other file the user writes). A
    torch.save that fails to write is raised as the OSError it stands for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
        except RuntimeError as e:
            oserror = torch_write_error(e, path)
            if oserror is None:
                raise
            raise oserror from e
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:  # already gone, or the folder turned read-only: the first error is the one to see
            pass
        raise


def atomic_write_text(path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)
