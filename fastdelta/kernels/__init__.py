"""Fused kernels for the DELTA feature-map distance, in one place.

    distance = 0.5 * sum_{b,j} scale_j ||FM_bj(t) - FM_bj(s)||^2,   FM = ReLU or identity

- ``dispatch.fm_distance``: the entry point (picks the kernel for the device; the regularisers call it).
- ``op``: the torch custom ops fastdelta::fm_distance / fm_distance_backward with their fake and autograd
  registrations (torch.compile-able), and the plain PyTorch reference they are tested against.
- ``triton_distance``: the Triton kernels (imported only when used).
- ``native``: the C++/OpenMP CPU library from the top-level kernels/csrc/fm_distance.cpp, built by the
  top-level CMakeLists.txt on first use into a cache keyed by torch version, Python ABI and source digest,
  then loaded (kernels/README.md).
"""
from .dispatch import IMPLS, fm_distance, resolve  # noqa: F401
from .op import reference_distance  # noqa: F401  (importing op registers the custom ops)
