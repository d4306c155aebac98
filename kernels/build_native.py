"""Build the native CPU kernel now instead of at its first use.

    python3 kernels/build_native.py [--quiet] [--force] [--out-dir DIR]

The work is fastdelta.kernels.native.build_library, the same function the first use runs: CMake builds
the top-level CMakeLists.txt (kernels/csrc/fm_distance.cpp) against the torch importable here into the
cache ($FASTDELTA_CACHE/native/<key>/, default ~/.cache/fastdelta/native/<key>/; --out-dir DIR: DIR/<key>/).
Loads native.py by path (imports torch, not fastdelta), so setup.py can run it before fastdelta is
installed. Exit status 0 on success, 1 on a failed build (callers warn; the PyTorch reference path is
used on CPU). Retries a build that failed before.
"""
import importlib.util
import os
import sys

NATIVE_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastdelta", "kernels",
                         "native.py")


def native_module():
    spec = importlib.util.spec_from_file_location("fastdelta_native_build", NATIVE_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    sys.exit(native_module().main())
