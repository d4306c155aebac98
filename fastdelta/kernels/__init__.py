"""Fused kernels for the DELTA feature-map distance (issue 3).

- ``dispatch.fm_distance``: the entry point (fastdelta.regularizers.feature_map_distance calls it).
- ``op``: the torch custom ops fastdelta::fm_distance / fm_distance_backward (torch.compile-able).
- ``triton_distance``: the Triton kernels + a Liger-style autograd.Function (imported only when used).
- ``native``: loader of the C++/OpenMP CPU library built from kernels/cpu/fm_distance.cpp.
"""
from .dispatch import IMPLS, fm_distance, resolve  # noqa: F401
from . import op  # noqa: F401  (registers the custom ops)
