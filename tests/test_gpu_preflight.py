"""The CUDA cases the CPU run skips, run first on a GPU machine (benchmarks/gpu/session.sh: preflight).

The Triton distance kernel against float64 on the four ResNet-101 tap shapes (fp32 and bf16, NCHW
and channels_last, forward and gradient); the custom op inside torch.compile(fullgraph=True); three
iterations of fit's fast step (bf16, channels_last, compiled) against its reference step on CUDA; the
loop's deferred reads on CUDA (pinned stats, events, the guarded fused update, BN snapshots).
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


@pytest.mark.parametrize("method", ["delta", "l2_sp"])
def test_deferred_reads_on_cuda_train_as_the_checked_step(method):
    """The CUDA loop reads each step's stats a step later; it must train as the step checked on the host."""
    from test_loop import run, values
    cuda = torch.device("cuda")
    a, ha, _ = run(method, deferred=False, device=cuda)
    b, hb, _ = run(method, deferred=True, device=cuda)
    assert [h["iteration"] for h in ha] == [h["iteration"] for h in hb]
    for x, y in zip(values(ha), values(hb)):
        for k in ("ce", "reg", "head"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), k
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(v.double(), w.double(), rtol=1e-4, atol=1e-6), k


@pytest.fixture
def deterministic_cuda():
    """Bitwise comparisons of two CUDA runs: cuDNN's autotuner off (it may pick a different algorithm per
    run) and deterministic algorithms only (no atomics-based convolution backward); the flags are
    restored afterwards (the fast step turns the autotuner on for the benchmark-like tests)."""
    import os
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


@pytest.mark.parametrize("method", ["delta", "l2"])
def test_a_failed_deferred_cuda_step_leaves_the_state_of_the_step_before(method, deterministic_cuda):
    """A NaN batch at step 3: the guarded update is cancelled on the device and the BN statistics are
    restored, so the model equals a run stopped after step 2 (bitwise: deterministic kernels, no autotuner)."""
    from test_loop import run, values
    cuda = torch.device("cuda")
    good, hist, _ = run(method, iterations=3, deferred=True, device=cuda)
    bad, partial, error = run(method, iterations=6, deferred=True, poison_at=3, device=cuda)
    assert error is not None and error.iteration == 3
    assert values(partial) == values(hist)
    for (k, v), w in zip(good.state_dict().items(), bad.state_dict().values()):
        assert torch.equal(v, w), k
