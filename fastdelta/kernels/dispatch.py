"""Which implementation computes the DELTA feature-map distance, and the call that prepares inputs.

``impl``: "auto" (default) -> "triton" for CUDA tensors (when triton imports), "native" for CPU tensors
when the C++ library builds (on first use, once per torch version: native.py) and loads, else
"reference"; float64 inputs always take "reference".
"triton" / "native" force that kernel (an error where it cannot run; "triton" on CPU tensors needs
TRITON_INTERPRET=1). "reference" forces the plain PyTorch composite
(fastdelta.kernels.op.reference_distance), e.g. for debugging: it never calls the custom op.
"""
from __future__ import annotations

import importlib.util

import torch

from . import native
from .op import reference_distance

IMPLS = ("auto", "triton", "native", "reference")
_TRITON = importlib.util.find_spec("triton") is not None
# Load an existing build at import (cheap, and outside any torch.compile trace); compiling waits for the
# first use with a CPU tensor, so GPU-only runs never pay for it. A broken library warns here.
native.load(build=False)


def resolve(impl: str, t: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"distance_impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        if t.dtype == torch.float64:
            return "reference"
        if t.is_cuda:
            return "triton" if _TRITON else "reference"
        if t.device.type == "cpu" and native.available():
            return "native"
        return "reference"
    if impl == "native" and not native.available():
        raise RuntimeError(f"distance_impl='native' but the native CPU kernel is unavailable: {native.status()['reason']}")
    if impl == "native" and t.device.type != "cpu":
        raise RuntimeError(f"distance_impl='native' runs on CPU tensors only, got {t.device}")
    if impl == "triton" and not _TRITON:
        raise RuntimeError("distance_impl='triton' but triton is not installed")
    return impl


def _dense_pair(t: torch.Tensor, s: torch.Tensor):
    """t and s dense in one layout: NCHW and channels_last pass without a copy; other views are copied."""
    if s.dtype != t.dtype:
        s = s.to(t.dtype)
    if t.is_contiguous():
        return t, s.contiguous()
    cl = torch.channels_last
    if t.is_contiguous(memory_format=cl):
        return t, s.contiguous(memory_format=cl)
    return t.contiguous(), s.contiguous()


def fm_distance(target: torch.Tensor, source: torch.Tensor, channel_scale: torch.Tensor, relu: bool = True,
                impl: str = "auto", per_sample: bool = False, deterministic: bool = False) -> torch.Tensor:
    """0.5 * sum_{b,j} scale_j ||FM_bj(target) - FM_bj(source)||^2 (per_sample: (B,) instead of the sum).

    Gradient flows to ``target`` only (source and scale are constants). fp32 result (fp64 for fp64
    inputs on the reference path); bf16/fp16 inputs accumulate in fp32."""
    if target.dim() != 4 or target.shape != source.shape:
        raise ValueError(f"fm_distance: expected two 4-D maps of one shape, got {tuple(target.shape)} and "
                         f"{tuple(source.shape)}")
    which = resolve(impl, target)
    if which == "reference":
        return reference_distance(target, source, channel_scale, relu, per_sample)
    t, s = _dense_pair(target, source.detach())
    scale = channel_scale.detach().to(device=t.device, dtype=torch.float32).contiguous()
    if scale.numel() != t.shape[1]:
        raise ValueError(f"fm_distance: {scale.numel()} channel weights for {t.shape[1]} channels")
    return torch.ops.fastdelta.fm_distance(t, s, scale, relu, per_sample, deterministic, which)


def describe() -> dict:
    """What "auto" would use, per device type (recorded in benchmark results)."""
    return {"triton_installed": _TRITON, "cuda": torch.cuda.is_available(), "native": native.status()}
