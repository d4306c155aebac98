"""The CUDA cases the CPU run skips, run first on a GPU machine (benchmarks/gpu/session.sh: preflight).

The Triton distance kernel against float64 on the four ResNet-101 tap shapes (fp32 and bf16, NCHW
and channels_last, forward and gradient); the custom op inside torch.compile(fullgraph=True); three
iterations of fit's fast step (bf16, channels_last, compiled) against its reference step on CUDA.
"""
import pytest
import torch

import fastdelta
from fastdelta.kernels import dispatch, reference_distance
from tiny import TINY_LAYERS, arrays, tiny_net

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the GPU session's preflight)")
RESNET101_TAPS = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]


def maps(shape, dtype, channels_last, batch=4):
    g = torch.Generator(device="cpu").manual_seed(0)
    t, s = (torch.randn(batch, *shape, generator=g).to("cuda", dtype) for _ in range(2))
    if channels_last:
        t, s = t.contiguous(memory_format=torch.channels_last), s.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(), s, torch.rand(shape[0], generator=g).cuda()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", RESNET101_TAPS)
def test_triton_kernel_against_float64(shape, dtype, channels_last):
    t, s, w = maps(shape, dtype, channels_last)
    for relu in (True, False):
        t.grad = None
        loss = dispatch.fm_distance(t, s, w, relu, impl="triton")
        loss.backward()
        t64 = t.detach().double().requires_grad_()
        want = reference_distance(t64, s.double(), w.double(), relu)
        want.backward()
        assert abs(float(loss) - float(want)) <= 1e-4 * abs(float(want)) + 1e-6
        err = (t.grad.double() - t64.grad).abs().max() / t64.grad.abs().max().clamp_min(1e-12)
        assert float(err) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
        assert t.grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_custom_op_inside_a_fullgraph_compile():
    t, s, w = maps((512, 28, 28), torch.bfloat16, True)
    fn = lambda t, s, w: dispatch.fm_distance(t.float() * 2, s, w, True)  # noqa: E731
    eager = fn(t, s, w)
    compiled = torch.compile(fn, fullgraph=True)(t, s, w)
    assert torch.allclose(eager, compiled, rtol=1e-4)
    compiled.backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


def test_three_fast_steps_match_the_reference_step():
    kw = dict(layers=TINY_LAYERS, batch_size=4, resize=16, crop=12, progress=False, attention_cache=None,
              attention_head_epochs=1, iterations=3, device="cuda", alpha=0.05)
    ref = fastdelta.fit(tiny_net(), arrays(), None, method="delta", step_engine="reference", **kw)
    fast = fastdelta.fit(tiny_net(), arrays(), None, method="delta", **kw)  # auto: bf16, channels_last, compiled
    assert fast.settings["step_used"]["step_engine"] == "fast"
    for h1, h2 in zip(ref.history, fast.history):
        for key in ("ce", "reg"):
            assert h2[key] == pytest.approx(h1[key], rel=5e-2, abs=1e-4), key
