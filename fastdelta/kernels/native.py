"""The native CPU kernel (csrc/fm_distance.cpp): compiled just in time, cached, loaded.

The library registers torch.ops.fastdelta_native.fm_distance_fwd / fm_distance_bwd. Its first use on a
machine compiles it (one C++ file, under a minute) into a folder named by ``current_key()``: the torch
version, the Python ABI and a digest of the source and compiler flags. So every install mode (editable
or not) and every torch upgrade gets a matching library, and later processes only load it. Looked for in:

- ``$FASTDELTA_NATIVE_LIB``: that exact file, never built;
- ``fastdelta/kernels/_native/<key>/``: prebuilt by setup.py (non-editable install with torch importable);
- ``$FASTDELTA_CACHE/native/<key>/`` (default ``~/.cache/fastdelta/native/<key>/``): compiled on first use.

``FASTDELTA_NATIVE=0`` turns the kernel off. No compiler, a failed build or a library that does not load
warns once and leaves ``available()`` False (the reason in ``status()``); dispatch then uses the plain
PyTorch reference path. Env: ``CXX`` (compiler command, default ``c++``), ``FASTDELTA_MARCH`` (-march on
x86-64). ``kernels/build_native.py`` compiles ahead of the first use.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings

import torch

LIB_NAME = "libfastdelta_native.so"
HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "csrc", "fm_distance.cpp")
PREBUILT_ROOT = os.path.join(HERE, "_native")
FAILED = "failed.json"
_STATE = {"loaded": None, "reason": "not tried", "path": None}


class BuildError(RuntimeError):
    pass


# ---------------------------------------------------------------- where, and under which key

def cache_root() -> str:
    """$FASTDELTA_NATIVE_CACHE, else $FASTDELTA_CACHE/native, else ~/.cache/fastdelta/native (the attention
    cache's base folder). The first lets a test suite give every test its own attention cache while the
    compiled kernel, which does not depend on the test, is built once."""
    if os.environ.get("FASTDELTA_NATIVE_CACHE"):
        return os.environ["FASTDELTA_NATIVE_CACHE"]
    base = os.environ.get("FASTDELTA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastdelta")
    return os.path.join(base, "native")


def compile_flags() -> list[str]:
    """Every flag but the paths; part of the key, since other flags make another library.

    C++20: torch >= 2.10's headers need concepts. -fno-trapping-math lets GCC vectorise the ReLU selects
    (without it ``x < 0 ? 0 : x`` stays a branch: ~18x slower on random signs, measured). x86-64-v2 is
    portable and the loops are memory-bound (-march=native measured no faster)."""
    flags = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-fno-trapping-math", "-Wall",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append(f"-march={os.environ.get('FASTDELTA_MARCH') or 'x86-64-v2'}")
    return flags


def source_digest(source: bytes, flags: list[str]) -> str:
    return hashlib.sha256(source + b"\0" + "\0".join(flags).encode()).hexdigest()[:16]


def python_tag() -> str:
    """e.g. cpython-311-x86_64-linux-gnu: interpreter, ABI flags and platform in one."""
    return sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag


def cache_key(torch_version: str, py_tag: str, digest: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", f"torch{torch_version}-{py_tag}-{digest}")


def current_key() -> str:
    with open(SOURCE, "rb") as f:
        source = f.read()
    return cache_key(torch.__version__, python_tag(), source_digest(source, compile_flags()))


# ---------------------------------------------------------------- compiling

def _say(msg: str) -> None:
    print(f"fastdelta: {msg}", file=sys.stderr, flush=True)


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX") or "c++")


def _compiler_id() -> str:
    """The compiler command and its binary's mtime: a changed or upgraded compiler retries a failed build."""
    cxx = compiler()
    exe = shutil.which(cxx[0]) if cxx else None
    return f"{shlex.join(cxx)} @{os.stat(exe).st_mtime if exe else None}"


def compile_command(out: str) -> list[str]:
    # torch's own layout; torch.utils.cpp_extension would give the same paths but warns about CUDA on import
    base = os.path.dirname(torch.__file__)
    inc = [os.path.join(base, "include"), os.path.join(base, "include", "torch", "csrc", "api", "include")]
    return [*compiler(), *compile_flags(), *[a for p in inc for a in ("-isystem", p)], SOURCE, "-o", out,
            f"-L{os.path.join(base, 'lib')}", "-ltorch_cpu", "-lc10"]


@contextlib.contextmanager
def _locked(key_dir: str, quiet: bool):
    """One compile per key across processes (DDP ranks, parallel runs); the others wait. The OS drops an
    flock when its holder dies, so a killed build leaves no stale lock."""
    import fcntl
    with open(os.path.join(key_dir, "lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                _say(f"waiting for the native CPU kernel that another process is compiling in {key_dir}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _compile(key_dir: str, quiet: bool) -> str:
    cxx = compiler()
    if not cxx or shutil.which(cxx[0]) is None:
        raise BuildError(f"no C++ compiler: {' '.join(cxx) or '$CXX (empty)'} not found")
    path = os.path.join(key_dir, LIB_NAME)
    tmp = f"{path}.tmp{os.getpid()}"  # the final name appears only complete (os.replace is atomic)
    if not quiet:
        _say(f"compiling the native CPU kernel (once per torch version) into {key_dir} ...")
    t0 = time.monotonic()
    r = subprocess.run(compile_command(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = round(time.monotonic() - t0, 1)
    with open(os.path.join(key_dir, "build.log"), "w") as f:
        f.write(r.stdout)
    if r.returncode != 0:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        tail = "\n".join(r.stdout.strip().splitlines()[-6:])
        _write_json(os.path.join(key_dir, FAILED), {"compiler": _compiler_id(), "tail": tail})
        raise BuildError(f"{cxx[0]} exited with status {r.returncode}; its last lines:\n{tail}")
    os.replace(tmp, path)
    _write_json(os.path.join(key_dir, "build.json"), {"torch": torch.__version__, "python": python_tag(),
                "compiler": cxx, "flags": compile_flags(), "seconds": seconds})
    with contextlib.suppress(OSError):
        os.remove(os.path.join(key_dir, FAILED))
    if not quiet:
        _say(f"compiled the native CPU kernel in {seconds} s: {path}")
    return path


def build_library(root: str | None = None, quiet: bool = False, force: bool = False) -> str:
    """The library for this torch in root/<key>/ (root: the cache), compiled unless there; its path.
    force: compile again even if present. Raises BuildError (or OSError) on failure."""
    key_dir = os.path.join(root or cache_root(), current_key())
    os.makedirs(key_dir, exist_ok=True)
    path = os.path.join(key_dir, LIB_NAME)
    with _locked(key_dir, quiet):
        if os.path.isfile(path) and not force:  # built by another process while this one waited
            return path
        return _compile(key_dir, quiet)


def _failed_before(key_dir: str) -> str | None:
    """The last lines of a compile that already failed for this key with this compiler. Not retried by
    every process (a failing compile can take a minute); kernels/build_native.py retries."""
    try:
        with open(os.path.join(key_dir, FAILED)) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec.get("tail", "") if rec.get("compiler") == _compiler_id() else None


# ---------------------------------------------------------------- loading

def _find(key: str) -> str | None:
    for root in (PREBUILT_ROOT, cache_root()):
        path = os.path.join(root, key, LIB_NAME)
        if os.path.isfile(path):
            return path
    return None


def _settle(ok: bool, reason: str, path: str | None, warn: bool) -> bool:
    _STATE.update(loaded=ok, reason=reason, path=path)
    if warn and not ok:
        warnings.warn(f"fastdelta native CPU kernel unavailable, using the PyTorch reference: {reason}",
                      RuntimeWarning, stacklevel=4)
    return ok


def _load_file(path: str, warn: bool) -> bool:
    try:
        torch.ops.load_library(path)
        torch.ops.fastdelta_native.fm_distance_fwd  # noqa: B018 - the op must be registered
    except Exception as e:  # noqa: BLE001 - any load failure means: use the reference path
        return _settle(False, f"{path} failed to load: {type(e).__name__}: {e}", path, warn)
    return _settle(True, "loaded", path, warn)


def _path_to_load(build: bool) -> str | None:
    """The library to load, compiling it when build; None when build is False and there is none yet."""
    explicit = os.environ.get("FASTDELTA_NATIVE_LIB")
    if explicit:
        if not os.path.isfile(explicit):
            raise BuildError(f"FASTDELTA_NATIVE_LIB={explicit} not found")
        return explicit
    key = current_key()
    found = _find(key)
    if found or not build:
        return found
    key_dir = os.path.join(cache_root(), key)
    failed = _failed_before(key_dir)
    if failed is not None:
        raise BuildError(f"the compile failed before (remove {key_dir} or run kernels/build_native.py to "
                         f"retry); its last lines:\n{failed}")
    return build_library()


def load(warn: bool = True, build: bool = True) -> bool:
    """Load once (compiling first when build and none is there); True when torch.ops.fastdelta_native is
    usable. build=False finds an existing library only and, when there is none, leaves the question open."""
    if _STATE["loaded"] is not None:
        return _STATE["loaded"]
    if os.environ.get("FASTDELTA_NATIVE", "") == "0":
        return _settle(False, "turned off by FASTDELTA_NATIVE=0", None, False)
    try:
        path = _path_to_load(build)
    except Exception as e:  # noqa: BLE001 - no compiler, a failed compile, an unwritable cache: reference path
        return _settle(False, f"not built: {type(e).__name__}: {e}", None, warn)
    if path is None:
        _STATE["reason"] = "not compiled yet (it is, on the first use with a CPU tensor)"
        return False
    return _load_file(path, warn)


def available() -> bool:
    """Loads, compiling on first use. Not inside a torch.compile trace (nothing can be built there): a
    graph traced before the first eager use takes the reference path."""
    if _STATE["loaded"] is None and not torch.compiler.is_compiling():
        load()
    return bool(_STATE["loaded"])


def status() -> dict:
    """What is loaded, or would be; never compiles (dispatch.describe() runs on GPU machines too)."""
    if _STATE["loaded"] is None:
        load(build=False)
    return {"available": bool(_STATE["loaded"]), "reason": _STATE["reason"], "path": _STATE["path"]}


def forward(t, s, scale, relu: bool):
    return torch.ops.fastdelta_native.fm_distance_fwd(t, s, scale, relu)


def backward(grad_out, t, s, scale, relu: bool):
    return torch.ops.fastdelta_native.fm_distance_bwd(grad_out, t, s, scale, relu)


def main(argv=None) -> int:
    """kernels/build_native.py: compile now. Exit status 1 on a failed build (the reference path is used)."""
    ap = argparse.ArgumentParser(description="Compile fastdelta's native CPU kernel now instead of on first use.")
    ap.add_argument("--out-dir", default=None, help="build into OUT_DIR/<key>/ (default: the cache, "
                    f"{cache_root()})")
    ap.add_argument("--force", action="store_true", help="compile again even if a library is there")
    ap.add_argument("--quiet", action="store_true", help="print only the result")
    a = ap.parse_args(argv)
    try:
        path = build_library(a.out_dir, quiet=a.quiet, force=a.force)
    except Exception as e:  # noqa: BLE001 - any failure means: no native kernel, reference path
        print(f"warning: fastdelta native CPU kernel not built ({type(e).__name__}: {e}); "
              "the plain PyTorch reference path will be used on CPU", file=sys.stderr)
        return 1
    print(f"fastdelta native CPU kernel: {path}")
    return 0
