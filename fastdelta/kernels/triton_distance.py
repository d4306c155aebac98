"""Triton kernels: fused ReLU + channel-weighted squared feature-map distance, forward and backward.

    loss_b = 0.5 * sum_{j,p} scale_j * (relu(t_bjp) - relu(s_bjp))^2          (per sample; summed: the loss)
    grad_t = grad_out_b * scale_j * (relu(t) - relu(s)) * (t > 0)              (relu=False: t - s, no mask)

One kernel, two uses (constexpr BACKWARD): forward (loss only: reads t and s once) and backward (reads
t and s once, writes grad_t once). Autograd is the custom op's (fastdelta.kernels.op). Layouts: contiguous NCHW or channels_last, read in memory order with
the channel computed from the offset, so neither layout is copied. Any B, C, H*W (masked tails).
fp32 / bf16 / fp16 inputs, fp32 arithmetic and accumulation; fp64 inputs are computed in fp32.

Grid: (B, blocks per sample). Each program reduces its block in fp32 (tree reduction) and either
atomically adds it to loss_b (default: one launch, order not fixed) or, with ``deterministic=True``,
stores it in a (B, blocks) buffer that is then summed in a fixed order: bit-identical losses for
identical inputs. NaN propagates: relu(x) = where(x < 0, 0, x) keeps NaN (as torch.relu does).

CUDA tensors use the compiled kernel. CPU tensors work only under the Triton interpreter, i.e. with
``TRITON_INTERPRET=1`` set before triton is first imported (triton 3.x decides per jit function at
decoration time, its own ``tl.sum`` included); the CI tests run them in a subprocess for that reason.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _fmd_kernel(t_ptr, s_ptr, scale_ptr, loss_ptr, grad_ptr, gout_ptr,
                CHW, HW, C, n_blk,
                RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr, BACKWARD: tl.constexpr,
                ATOMIC: tl.constexpr, GOUT_PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)  # offset inside sample b (both layouts keep samples contiguous)
    mask = offs < CHW
    base = b.to(tl.int64) * CHW
    t = tl.load(t_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if CHANNELS_LAST:
        c = offs % C
    else:
        c = offs // HW
    w = tl.load(scale_ptr + c, mask=mask, other=0.0)
    if RELU:
        d = tl.where(t < 0.0, 0.0, t) - tl.where(s < 0.0, 0.0, s)
    else:
        d = t - s
    if not BACKWARD:  # forward: the loss only
        part = 0.5 * tl.sum(w * d * d, axis=0)
        if ATOMIC:
            tl.atomic_add(loss_ptr + b, part)
        else:
            tl.store(loss_ptr + b * n_blk + blk, part)
    else:  # backward: the gradient only, scaled by the incoming gradient
        g = w * d
        if GOUT_PER_SAMPLE:
            g = g * tl.load(gout_ptr + b).to(tl.float32)
        else:
            g = g * tl.load(gout_ptr).to(tl.float32)
        if RELU:
            g = tl.where(t <= 0.0, 0.0, g)  # relu'(t) = (t > 0); a NaN t keeps its NaN gradient
        tl.store(grad_ptr + base + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel(t: torch.Tensor):
    if not t.is_cuda and not interpreting():
        raise RuntimeError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton "
                           "is imported (interpreter on CPU tensors)")
    return _fmd_kernel


def layout_of(t: torch.Tensor, s: torch.Tensor) -> bool:
    """True for channels_last, False for NCHW; both tensors must be dense in the same layout."""
    if t.is_contiguous() and s.is_contiguous():
        return False
    cl = torch.channels_last
    if t.is_contiguous(memory_format=cl) and s.is_contiguous(memory_format=cl):
        return True
    raise ValueError("fm_distance: t and s must both be contiguous NCHW or both channels_last")


def _config(t: torch.Tensor, chw: int, block: Optional[int]) -> Tuple[int, int, int]:
    interpret = not t.is_cuda
    if block is None:
        # GPU: 4096 elements per program (16 per thread at 8 warps); interpreter: large blocks, few programs
        block = 65536 if interpret else 4096
    block = max(16, min(block, triton.next_power_of_2(max(chw, 1))))
    while triton.cdiv(chw, block) > 65535:  # CUDA grid-y limit
        block *= 2
    num_warps = 8 if block >= 4096 else 4
    return block, triton.cdiv(chw, block), num_warps


def fm_distance_forward(t: torch.Tensor, s: torch.Tensor, scale: torch.Tensor, relu: bool = True,
                        deterministic: bool = False, block: Optional[int] = None) -> torch.Tensor:
    """Per-sample losses (B,) fp32."""
    B, C, H, W = t.shape
    channels_last = layout_of(t, s)
    chw, hw = C * H * W, H * W
    loss = torch.zeros(B, device=t.device, dtype=torch.float32)
    if B == 0 or chw == 0:
        return loss
    block, n_blk, num_warps = _config(t, chw, block)
    buf = loss if not deterministic else torch.empty(B, n_blk, device=t.device, dtype=torch.float32)
    kernel(t)[(B, n_blk)](
        t, s, scale, buf, t, t, chw, hw, C, n_blk,
        RELU=relu, CHANNELS_LAST=channels_last, BACKWARD=False,
        ATOMIC=not deterministic, GOUT_PER_SAMPLE=False, BLOCK=block, num_warps=num_warps)
    if deterministic:
        loss = buf.sum(dim=1)  # fixed-order reduction of the per-block partials
    return loss


def fm_distance_backward(grad_out: torch.Tensor, t: torch.Tensor, s: torch.Tensor, scale: torch.Tensor,
                         relu: bool = True, block: Optional[int] = None) -> torch.Tensor:
    """grad_t = grad_out_b * scale_j * (relu(t) - relu(s)) * (t > 0); grad_out a scalar or (B,)."""
    B, C, H, W = t.shape
    channels_last = layout_of(t, s)
    grad = torch.empty_like(t)
    chw = C * H * W
    if B == 0 or chw == 0:
        return grad
    gout = grad_out.detach().to(torch.float32).contiguous()
    if gout.numel() not in (1, B):
        raise ValueError(f"grad_out has {gout.numel()} elements; expected 1 or {B}")
    block, n_blk, num_warps = _config(t, chw, block)
    kernel(t)[(B, n_blk)](
        t, s, scale, t, grad, gout, chw, H * W, C, n_blk,
        RELU=relu, CHANNELS_LAST=channels_last, BACKWARD=True,
        ATOMIC=False, GOUT_PER_SAMPLE=gout.numel() != 1,
        BLOCK=block, num_warps=num_warps)
    return grad
