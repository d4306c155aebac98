"""The native CPU kernel (kernels/csrc/fm_distance.cpp): built with CMake just in time, cached, loaded.

The library registers torch.ops.fastdelta_native.fm_distance_fwd / fm_distance_bwd. The top-level
CMakeLists.txt is its one build definition: setup.py, kernels/build_native.py and the first use all run
``cmake -S <project> -B <build dir> -DCMAKE_PREFIX_PATH=<torch's> -G Ninja`` and ``cmake --build``. The
project is the checkout (editable installs, tests), else the copy setup.py packages in ``_native_src/``.
The first use on a machine builds (one C++ file, under a minute) into a folder named by ``current_key()``:
the torch version, the Python ABI and a digest of CMakeLists.txt, the source and the CMake options. So
every install mode (editable or not) and every torch upgrade gets a matching library, and later processes
only load it. Looked for in:

- ``$FASTDELTA_NATIVE_LIB``: that exact file, never built;
- ``fastdelta/kernels/_native/<key>/``: prebuilt by setup.py (non-editable install with torch importable);
- ``$FASTDELTA_CACHE/native/<key>/`` (default ``~/.cache/fastdelta/native/<key>/``): built on first use.

``FASTDELTA_NATIVE=0`` turns the kernel off. No cmake, no compiler, a failed build or a library that does
not load warns once and leaves ``available()`` False (the reason in ``status()``); dispatch then uses the
plain PyTorch reference path. Env: ``CXX`` (compiler command, default: CMake's pick), ``FASTDELTA_MARCH``
(-march on x86-64). cmake and ninja: on PATH or next to this Python (pip's). ``kernels/build_native.py``
builds ahead of the first use.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
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
PACKAGED_PROJECT = os.path.join(HERE, "_native_src")  # setup.py copies the CMake project here
PREBUILT_ROOT = os.path.join(HERE, "_native")
FAILED = "failed.json"
_STATE = {"loaded": None, "reason": "not tried", "path": None}


def project_root() -> str:
    """The CMake project (CMakeLists.txt + kernels/csrc/): the checkout this package runs from, else the
    copy a non-editable install carries."""
    checkout = os.path.dirname(os.path.dirname(HERE))
    if os.path.isfile(os.path.join(checkout, "CMakeLists.txt")) and \
            os.path.isfile(os.path.join(checkout, "kernels", "csrc", "fm_distance.cpp")):
        return checkout
    return PACKAGED_PROJECT


PROJECT = project_root()
CMAKE_LISTS = os.path.join(PROJECT, "CMakeLists.txt")
SOURCE = os.path.join(PROJECT, "kernels", "csrc", "fm_distance.cpp")


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


def cmake_options() -> list[str]:
    """The -D options that change the library beyond CMakeLists.txt; part of the key. The flags themselves
    (-O3 -std=c++20 -fopenmp -fno-trapping-math -march=x86-64-v2 ...) are in CMakeLists.txt, which is
    digested. An empty CMAKE_BUILD_TYPE adds no flags of its own (and overrides the environment's)."""
    opts = ["-DCMAKE_BUILD_TYPE="]
    if os.environ.get("FASTDELTA_MARCH"):
        opts.append(f"-DFASTDELTA_MARCH={os.environ['FASTDELTA_MARCH']}")
    return opts


def source_digest(source: bytes, flags: list[str]) -> str:
    return hashlib.sha256(source + b"\0" + "\0".join(flags).encode()).hexdigest()[:16]


def python_tag() -> str:
    """e.g. cpython-311-x86_64-linux-gnu: interpreter, ABI flags and platform in one."""
    return sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag


def cache_key(torch_version: str, py_tag: str, digest: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", f"torch{torch_version}-{py_tag}-{digest}")


def current_key() -> str:
    source = b""
    for path in (CMAKE_LISTS, SOURCE):
        with open(path, "rb") as f:
            source += f.read() + b"\0"
    return cache_key(torch.__version__, python_tag(), source_digest(source, cmake_options()))


# ---------------------------------------------------------------- compiling

def _say(msg: str) -> None:
    print(f"fastdelta: {msg}", file=sys.stderr, flush=True)


def tool(name: str) -> str | None:
    """cmake or ninja: on PATH, else next to this Python (pip's, in a venv that is not activated)."""
    return shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))


def compiler() -> list[str]:
    """$CXX, which CMake reads on the first configure of a build folder; [] leaves the pick to CMake."""
    return shlex.split(os.environ.get("CXX", ""))


def _compiler_id() -> str:
    """The compiler command, cmake, and their binaries' mtimes: a changed or upgraded toolchain retries a
    failed build."""
    def stamp(cmd: str) -> str:
        exe = shutil.which(cmd)
        return f"{cmd} @{os.stat(exe).st_mtime if exe else None}"
    cxx = compiler()
    return f"{shlex.join(cxx)} {stamp(cxx[0] if cxx else 'c++')} {stamp(tool('cmake') or 'cmake')}"


def configure_command(build_dir: str) -> list[str]:
    cmd = [tool("cmake") or "cmake", "-S", PROJECT, "-B", build_dir,
           f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", *cmake_options()]
    ninja = tool("ninja")
    return cmd + (["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else [])  # else CMake's default


def _build_env() -> dict:
    """CMake would add $CXXFLAGS / $LDFLAGS to the flags: the library is CMakeLists.txt's and the key's."""
    return {k: v for k, v in os.environ.items() if k not in ("CXXFLAGS", "LDFLAGS")}


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


def _run_logged(cmd: list[str], log) -> int:
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_build_env()).returncode


def failure_summary(log: str, n: int = 6) -> str:
    """What went wrong: the first distinct lines that name an error (the compiler's or CMake's), else the
    last lines. CMake ends a failed configure with boilerplate, so the last lines alone say little."""
    lines = [ln.rstrip() for ln in log.splitlines() if ln.strip()]
    errors = [ln.strip() for ln in lines if re.search(r"error", ln, re.I) and "errors occurred" not in ln]
    return "\n".join(list(dict.fromkeys(errors))[:n] or lines[-n:])


def _cmake_build(key_dir: str, build_dir: str) -> tuple[bool, str]:
    """Configure and build in build_dir (fresh); True on success, and the combined log."""
    shutil.rmtree(build_dir, ignore_errors=True)  # a killed build's leftovers
    log_path = os.path.join(key_dir, "build.log")
    with open(log_path, "w") as log:
        ok = _run_logged(configure_command(build_dir), log) == 0 and \
            _run_logged([tool("cmake") or "cmake", "--build", build_dir], log) == 0
    with open(log_path) as f:
        return ok, f.read()


def _compile(key_dir: str, quiet: bool) -> str:
    if tool("cmake") is None:
        raise BuildError("cmake not found (pip install cmake ninja, or the system's)")
    cxx = compiler()
    if cxx and shutil.which(cxx[0]) is None:
        raise BuildError(f"no C++ compiler: $CXX={shlex.join(cxx)} not found")
    if not quiet:
        _say(f"compiling the native CPU kernel with CMake (once per torch version) into {key_dir} ...")
    build_dir = os.path.join(key_dir, "build")
    t0 = time.monotonic()
    ok, log = _cmake_build(key_dir, build_dir)
    seconds = round(time.monotonic() - t0, 1)
    if not ok:
        summary = failure_summary(log)
        _write_json(os.path.join(key_dir, FAILED), {"compiler": _compiler_id(), "tail": summary})
        raise BuildError(f"the CMake build failed (log: {key_dir}/build.log); what went wrong:\n{summary}")
    path = os.path.join(key_dir, LIB_NAME)
    os.replace(os.path.join(build_dir, LIB_NAME), path)  # the final name appears only complete (atomic)
    shutil.rmtree(build_dir, ignore_errors=True)
    _write_json(os.path.join(key_dir, "build.json"), {"torch": torch.__version__, "python": python_tag(),
                "configure": configure_command(build_dir), "compiler": compiler(), "seconds": seconds})
    with contextlib.suppress(OSError):
        os.remove(os.path.join(key_dir, FAILED))
    if not quiet:
        _say(f"compiled the native CPU kernel in {seconds} s: {path}")
    return path


def build_library(root: str | None = None, quiet: bool = False, force: bool = False) -> str:
    """The library for this torch in root/<key>/ (root: the cache), built with CMake unless there; its
    path. force: build again even if present. Raises BuildError (or OSError) on failure."""
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
