"""torch custom ops: fastdelta::fm_distance and fastdelta::fm_distance_backward, and their reference.

Opaque to torch.compile (a fake implementation gives shapes, dtypes and strides; autograd is registered
with torch.library.register_autograd), so a compiled training step traces through the fused kernel with
no graph break and calls it from the compiled graph. ``impl`` picks the kernel inside the op:
"triton" (CUDA tensors; CPU tensors under TRITON_INTERPRET=1), "native" (the C++/OpenMP CPU library)
or "reference" (the same formula in plain PyTorch inside the op: used when no fused kernel exists for
the device, and by tests). Inputs: t and s dense in the same layout (NCHW or channels_last), same
dtype; scale a contiguous float32 vector of C values (fastdelta.kernels.dispatch prepares them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

OP_IMPLS = ("triton", "native", "reference")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _out_dtype(dtype: torch.dtype, impl: str) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 and impl != "triton" else torch.float32


def reference_losses(t: Tensor, s: Tensor, scale: Tensor, relu: bool = True) -> Tensor:
    """Per-sample losses (B,) in plain PyTorch (differentiable), fp32 accumulation (fp64 for fp64)."""
    acc = _acc(t.dtype)
    t, s = t.to(acc), s.to(acc)
    if relu:
        t, s = F.relu(t), F.relu(s)
    return 0.5 * ((t - s).pow(2).sum(dim=(2, 3)) * scale.to(acc)).sum(dim=1)


def reference_distance(target: Tensor, source: Tensor, scale: Tensor, relu: bool = True,
                       per_sample: bool = False) -> Tensor:
    """The plain PyTorch composite the fused kernels replace (differentiable w.r.t. target only):
    0.5 * sum_{b,j} scale_j ||FM_bj(target) - FM_bj(source)||^2, FM = ReLU or identity; per sample (B,)."""
    losses = reference_losses(target, source.detach(), scale, relu)
    return losses if per_sample else losses.sum()


def reference_grad(grad_out: Tensor, t: Tensor, s: Tensor, scale: Tensor, relu: bool = True) -> Tensor:
    acc = _acc(t.dtype)
    tf, sf = t.to(acc), s.to(acc)
    d = (F.relu(tf) - F.relu(sf)) if relu else (tf - sf)
    g = grad_out.to(acc)
    g = g.view(-1, 1, 1, 1) if g.dim() == 1 else g
    grad = g * scale.to(acc).view(1, -1, 1, 1) * d
    if relu:
        grad = torch.where(tf <= 0, torch.zeros((), dtype=acc, device=t.device), grad)
    return grad.to(t.dtype)


def _check_impl(impl: str) -> None:
    if impl not in OP_IMPLS:
        raise ValueError(f"fm_distance: impl={impl!r}, expected one of {OP_IMPLS}")


@torch.library.custom_op("fastdelta::fm_distance", mutates_args=())
def fm_distance(t: Tensor, s: Tensor, scale: Tensor, relu: bool, per_sample: bool, deterministic: bool,
                impl: str) -> Tensor:
    """0.5 * sum_{b,j} scale_j ||relu(t_bj) - relu(s_bj)||^2 (per sample: shape (B,)). No gradient to s, scale."""
    _check_impl(impl)
    if impl == "triton":
        from .triton_distance import fm_distance_forward
        loss = fm_distance_forward(t, s, scale, relu, deterministic)
    elif impl == "native":
        loss = native.forward(t, s, scale, relu)  # always fixed-order (deterministic)
    else:
        loss = reference_losses(t, s, scale, relu)
    return loss if per_sample else loss.sum()


@fm_distance.register_fake
def _(t, s, scale, relu, per_sample, deterministic, impl):
    return t.new_empty((t.shape[0],) if per_sample else (), dtype=_out_dtype(t.dtype, impl))


@torch.library.custom_op("fastdelta::fm_distance_backward", mutates_args=())
def fm_distance_backward(grad_out: Tensor, t: Tensor, s: Tensor, scale: Tensor, relu: bool, impl: str) -> Tensor:
    """grad_t = grad_out_b * scale_j * (relu(t) - relu(s)) * (t > 0), in t's dtype and layout."""
    _check_impl(impl)
    if impl == "triton":
        from .triton_distance import fm_distance_backward as bwd
        return bwd(grad_out, t, s, scale, relu)
    if impl == "native":
        return native.backward(grad_out, t, s, scale, relu)
    return reference_grad(grad_out, t, s, scale, relu).contiguous(
        memory_format=torch.channels_last if not t.is_contiguous() else torch.contiguous_format)


@fm_distance_backward.register_fake
def _(grad_out, t, s, scale, relu, impl):
    return torch.empty_like(t)


def _setup_context(ctx, inputs, output):
    t, s, scale, relu, per_sample, deterministic, impl = inputs
    ctx.save_for_backward(t, s, scale)
    ctx.relu, ctx.impl = relu, impl


def _backward(ctx, grad):
    t, s, scale = ctx.saved_tensors
    grad_t = None
    if ctx.needs_input_grad[0]:
        grad_t = torch.ops.fastdelta.fm_distance_backward(grad, t, s, scale, ctx.relu, ctx.impl)
    return grad_t, None, None, None, None, None, None


torch.library.register_autograd("fastdelta::fm_distance", _backward, setup_context=_setup_context)
