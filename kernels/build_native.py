"""Build the native CPU kernel (CMakeLists.txt) against the torch importable by this interpreter.

    python3 kernels/build_native.py [--build-dir build/native] [--quiet]

Puts libfastdelta_native.so and a stamp (torch version it was built against) into
fastdelta/kernels/_native/, where fastdelta.kernels.native loads it from. Incremental: re-running
with nothing changed takes about a second. Standalone on purpose (imports torch, not fastdelta), so
setup.py and scripts/setup.sh can both call it. Exit status 0 on success, 1 on a failed build
(callers warn and the plain PyTorch reference path is used). Env: FASTDELTA_CMAKE (cmake binary),
FASTDELTA_NATIVE_JOBS (parallel compile jobs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "fastdelta", "kernels", "_native")
LIB_NAME = "libfastdelta_native.so"


def torch_info() -> dict:
    import torch
    from torch.utils import cpp_extension
    return {"torch": torch.__version__, "include": cpp_extension.include_paths(),
            "lib": cpp_extension.library_paths(), "abi": int(torch._C._GLIBCXX_USE_CXX11_ABI)}


def build(build_dir: str | None = None, quiet: bool = False) -> str:
    """Configure + build; returns the installed library's path. Raises on any failure."""
    cmake = os.environ.get("FASTDELTA_CMAKE") or shutil.which("cmake")
    if not cmake or not (os.path.isfile(cmake) or shutil.which(cmake)):
        raise RuntimeError(f"cmake not found ({cmake!r})")
    info = torch_info()
    build_dir = build_dir or os.path.join(ROOT, "build", "native")
    os.makedirs(build_dir, exist_ok=True)
    gen = ["-G", "Ninja"] if shutil.which("ninja") and not os.path.exists(os.path.join(build_dir, "Makefile")) else []
    def run(cmd):
        if not quiet:
            return subprocess.run(cmd, check=True)
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:  # quiet, but a failure shows its output
            sys.stderr.write(r.stdout[-6000:])
            raise subprocess.CalledProcessError(r.returncode, cmd)

    run([cmake, "-S", ROOT, "-B", build_dir, *gen, "-DCMAKE_BUILD_TYPE=Release",
                    f"-DTORCH_INCLUDE_DIRS={';'.join(info['include'])}",
                    f"-DTORCH_LIBRARY_DIRS={';'.join(info['lib'])}", f"-DTORCH_CXX11_ABI={info['abi']}"])
    jobs = os.environ.get("FASTDELTA_NATIVE_JOBS", str(os.cpu_count() or 1))
    run([cmake, "--build", build_dir, "--parallel", jobs])
    built = os.path.join(build_dir, LIB_NAME)
    os.makedirs(OUT_DIR, exist_ok=True)
    dest = os.path.join(OUT_DIR, LIB_NAME)
    tmp = dest + ".tmp"
    shutil.copy2(built, tmp)
    os.replace(tmp, dest)  # atomic: a process loading the old library is not disturbed
    with open(os.path.join(OUT_DIR, "build.json"), "w") as f:
        json.dump({"torch": info["torch"], "library": LIB_NAME}, f)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=None)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        path = build(a.build_dir, a.quiet)
    except Exception as e:  # noqa: BLE001 - any failure means: no native kernel, reference path
        print(f"warning: fastdelta native CPU kernel not built ({type(e).__name__}: {e}); "
              "the plain PyTorch reference path will be used on CPU", file=sys.stderr)
        return 1
    print(f"fastdelta native CPU kernel: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
