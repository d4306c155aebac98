#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine (Python 3.11, root): torch, the real Fashion-MNIST
# data package, and fastdelta itself with its test extras. Safe to re-run: each step is a no-op
# when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null \
  || python3 -m pip install -q torch==2.14.1 torchvision==0.29.1

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

python3 -m pip install -q -e ".[test]"
# NVIDIA DALI (~200 MB wheel, about a minute): tests/test_dali.py runs its CPU pipelines; a failed install only skips them
python3 -c "import nvidia.dali" 2>/dev/null || python3 -m pip install -q nvidia-dali-cuda130 || echo "DALI not installed: tests/test_dali.py will skip"
python3 kernels/build_native.py --quiet || true  # native CPU kernel (CMakeLists.txt); a failed build warns, PyTorch path used
