"""Fused ReLU + channel-weighted feature-map distance (fastdelta.kernels).

What runs where:
- native C++/OpenMP CPU kernel: natively, every benchmark tap shape, NCHW and channels_last, fp32/bf16
  (fp16 and relu off on the smaller ones; (32,256,56,56) in fp32 NCHW and bf16 channels_last), against
  a float64 reference.
- Triton kernels: on a CUDA machine in-process (compiled); on CPU under the Triton interpreter in a
  subprocess with TRITON_INTERPRET=1 set before triton is imported (test_triton_interpreter_suite).
  The interpreter runs small shapes in every combination and (64,2048,7,7) fp32 NCHW + bf16 channels_last;
  (32,256,56,56) only on CUDA (the interpreter needs ~15 s for it on 2 cores; the native kernel and the
  GPU run cover it).
- custom op: torch.library.opcheck (fake impl, autograd registration), torch.compile(fullgraph=True)
  of a small training step (inductor, CPU) with the op in the graph.
- reference path: torch.autograd.gradcheck in float64; the dispatch falls back to it without a build.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdelta.kernels import dispatch, native
from fastdelta.kernels import op as kop
from fastdelta.kernels import reference_distance as reference_feature_map_distance
from fastdelta.methods import make_method
from fastdelta.methods.delta_term import feature_map_distance
from fastdelta.settings import SettingsError, make_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_DEV = "cuda" if CUDA else "cpu"
run_triton = pytest.mark.skipif(not (CUDA or INTERPRET), reason="Triton needs CUDA or TRITON_INTERPRET=1 "
                                 "(run by test_triton_interpreter_suite in a subprocess)")
needs_native = pytest.mark.skipif(not native.available(), reason="native CPU kernel not built")

SMALL = [(1, 1, 1, 1), (3, 5, 7, 11), (2, 3, 1, 1), (4, 17, 3, 5)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}


def make(shape, dtype=torch.float32, channels_last=False, device="cpu", seed=0, zeros=False, zero_weights=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    s = torch.randn(shape, generator=g)
    if zeros:  # many exact zeros and negative values at the ReLU boundary
        t = torch.where(torch.rand(shape, generator=g) < 0.4, torch.zeros(()), t)
        s = torch.where(torch.rand(shape, generator=g) < 0.4, torch.zeros(()), s)
    w = torch.rand(shape[1], generator=g)
    if zero_weights:
        w[::2] = 0
    t, s = t.to(device=device, dtype=dtype), s.to(device=device, dtype=dtype)
    if channels_last:
        t, s = t.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)
    return t, s, w.to(device)


def ref64(t, s, w, relu=True, per_sample=False):
    """float64 loss (sum or per sample) and grad_t of the inputs as given (already rounded to their dtype)."""
    t64 = t.detach().double().requires_grad_()
    a, b = (F.relu(t64), F.relu(s.double())) if relu else (t64, s.double())
    per = 0.5 * ((a - b).pow(2).sum(dim=(2, 3)) * w.double()).sum(dim=1)
    (per.sum()).backward()
    return (per if per_sample else per.sum()).detach(), t64.grad


def rel(x, y):
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    den = y.abs().max().item()
    return (x - y).abs().max().item() / (den if den > 0 else 1.0)


def check(fn, shape, dtype, channels_last=False, relu=True, device="cpu", **make_kw):
    t, s, w = make(shape, dtype, channels_last, device, **make_kw)
    t.requires_grad_()
    loss = fn(t, s, w, relu)
    loss.backward()
    want, want_grad = ref64(t, s, w, relu)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert rel(loss, want) < TOL[dtype], (rel(loss, want), shape, dtype, channels_last, relu)
    assert rel(t.grad, want_grad) < TOL[dtype], (rel(t.grad, want_grad), shape, dtype, channels_last, relu)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert t.grad.dtype == dtype and t.grad.is_contiguous(memory_format=fmt)  # same layout as t
    return t, s, w


# ---------------------------------------------------------------- native CPU kernel

def test_native_kernel_is_built():
    """CI builds it (scripts/setup.sh); FASTDELTA_ALLOW_NO_NATIVE=1 accepts a machine without a compiler."""
    if os.environ.get("FASTDELTA_ALLOW_NO_NATIVE") == "1":
        pytest.skip("native kernel optional here")
    assert native.available(), native.status()
    assert dispatch.resolve("auto", torch.zeros(1, 1, 1, 1)) == "native"


def native_fn(t, s, w, relu):
    return feature_map_distance(t, s, w, relu, impl="native")


@needs_native
@pytest.mark.parametrize("shape", SMALL + [(64, 2048, 7, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_matches_float64(shape, channels_last, dtype):
    check(native_fn, shape, dtype, channels_last)


@needs_native
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)])
def test_native_matches_float64_largest(dtype, channels_last):
    """(32,256,56,56): 25.7 M elements, two of the four dtype/layout pairs (~5 s each on 2 cores)."""
    check(native_fn, (32, 256, 56, 56), dtype, channels_last)


@needs_native
@pytest.mark.parametrize("shape", SMALL + [(8, 512, 28, 28)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_native_fp16_and_no_relu(shape, channels_last):
    check(native_fn, shape, torch.float16, channels_last, relu=True)
    check(native_fn, shape, torch.float32, channels_last, relu=False)
    check(native_fn, shape, torch.bfloat16, channels_last, relu=False)


@needs_native
@pytest.mark.parametrize("channels_last", [False, True])
def test_native_relu_boundary_and_zero_weights(channels_last):
    for relu in (True, False):
        check(native_fn, (4, 16, 9, 9), torch.float32, channels_last, relu, zeros=True, zero_weights=True)
        check(native_fn, (4, 16, 9, 9), torch.bfloat16, channels_last, relu, zeros=True, zero_weights=True)


@needs_native
def test_native_deterministic_across_thread_counts():
    t, s, w = make((8, 64, 28, 28), channels_last=False)
    tc, sc = t.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)
    n = torch.get_num_threads()
    try:
        out = []
        for threads in (1, n, 1):
            torch.set_num_threads(threads)
            out.append((native.forward(t, s, w, True), native.forward(tc, sc, w, True)))
    finally:
        torch.set_num_threads(n)
    for a, b in out[1:]:
        assert torch.equal(a, out[0][0]) and torch.equal(b, out[0][1])  # bit-identical


@needs_native
def test_native_per_sample_and_float64_gradcheck():
    t, s, w = make((3, 4, 2, 3), torch.float64)
    per = dispatch.fm_distance(t, s, w, impl="native", per_sample=True)
    assert per.shape == (3,) and per.dtype == torch.float64
    assert rel(per, ref64(t, s, w, per_sample=True)[0]) < 1e-12
    t.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: dispatch.fm_distance(x, s, w, True, impl="native"), (t,))
    assert torch.autograd.gradcheck(lambda x: dispatch.fm_distance(x, s, w, True, impl="native", per_sample=True),
                                    (t,))


# ---------------------------------------------------------------- every implementation

IMPLS = ["reference", "op_reference"] + (["native"] if native.available() else [])


def run_impl(impl, t, s, w, relu=True, per_sample=False):
    if impl == "op_reference":  # the custom op with its in-op PyTorch formula
        t2, s2 = dispatch._dense_pair(t, s)
        return torch.ops.fastdelta.fm_distance(t2, s2, w.float().contiguous(), relu, per_sample, False, "reference")
    return dispatch.fm_distance(t, s, w, relu, impl=impl, per_sample=per_sample)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_propagates(impl):
    for channels_last in (False, True):
        for where in ("t_pos", "t_neg", "s"):
            t, s, w = make((2, 3, 4, 5), channels_last=channels_last)
            t, s = t.clone(), s.clone()
            if where == "s":
                s[1, 2, 3, 4] = float("nan")
            else:
                t[0, 1, 2, 3] = float("nan")
                if where == "t_neg":  # NaN among all-negative values: a max(x, 0) relu would drop it
                    t.clamp_(max=-1.0)
                    t[0, 1, 2, 3] = float("nan")
            t.requires_grad_()
            loss = run_impl(impl, t, s, w)
            assert torch.isnan(loss), (impl, channels_last, where)
            loss.backward()
            if where != "s":
                assert torch.isnan(t.grad[0, 1, 2, 3])


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_views(impl):
    base_t, base_s, _ = make((4, 12, 10, 9))
    w = torch.rand(6)
    views = [lambda x: x[:, ::2],                       # channel stride 2
             lambda x: x.transpose(2, 3)[:, :6],        # H and W swapped
             lambda x: x[1:3, 3:9, 1:8, ::2]]           # a sliced window
    for v in views:
        bt = base_t.clone().requires_grad_()
        t, s = v(bt), v(base_s)
        assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
        loss = run_impl(impl, t, s, w)
        loss.backward()
        bt64 = base_t.double().requires_grad_()
        want = reference_feature_map_distance(v(bt64), v(base_s.double()), w.double())
        want.backward()
        assert rel(loss, want) < 1e-5 and rel(bt.grad, bt64.grad) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_per_sample(impl):
    t, s, w = make((5, 6, 7, 3), channels_last=True)
    t.requires_grad_()
    per = run_impl(impl, t, s, w, per_sample=True)
    want, _ = ref64(t, s, w, per_sample=True)
    assert per.shape == (5,) and rel(per, want) < 1e-5
    gout = torch.arange(1.0, 6.0)
    per.backward(gout)
    t64 = t.detach().double().requires_grad_()
    (kop.reference_losses(t64, s.double(), w.double()) * gout.double()).sum().backward()
    assert rel(t.grad, t64.grad) < 1e-5


def test_gradcheck_reference_float64():
    for relu in (True, False):
        t, s, w = make((2, 3, 4, 5), torch.float64, zero_weights=True)
        t.requires_grad_()
        assert torch.autograd.gradcheck(lambda x: feature_map_distance(x, s, w, relu, impl="reference"), (t,))
        assert torch.autograd.gradcheck(lambda x: run_impl("op_reference", x, s, w, relu), (t,))
        assert dispatch.resolve("auto", t) == "reference"  # float64 always takes the reference


@pytest.mark.parametrize("impl", ["reference"] + (["native"] if native.available() else []))
def test_opcheck_custom_op(impl):
    t, s, w = make((2, 3, 4, 5))
    for args in [(t.requires_grad_(), s, w, True, False, False, impl),
                 (t.to(memory_format=torch.channels_last).detach().requires_grad_(),
                  s.to(memory_format=torch.channels_last), w, False, True, True, impl)]:
        torch.library.opcheck(torch.ops.fastdelta.fm_distance.default, args)
    g = torch.tensor(2.0)
    torch.library.opcheck(torch.ops.fastdelta.fm_distance_backward.default, (g, t.detach(), s, w, True, impl))


def test_compiled_training_step_fullgraph():
    """torch.compile(fullgraph=True) of a step whose loss goes through the custom op: one graph, the op in it,
    and the same loss and gradients as the eager reference path."""
    torch.manual_seed(0)
    target = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1))
    source = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)).requires_grad_(False)
    head = nn.Linear(6, 4)
    x, y = torch.randn(4, 3, 10, 10), torch.tensor([0, 1, 2, 3])
    scale = torch.rand(6)
    impl = "native" if native.available() else "auto"

    def step(x, y, impl):
        t, s = target(x), source(x)
        logits = head(t.mean(dim=(2, 3)))
        return F.cross_entropy(logits, y) + 0.1 * feature_map_distance(t, s, scale, True, impl)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(x, y, impl)
    loss.backward()
    got = [p.grad.clone() for p in target.parameters()]
    target.zero_grad()
    want = step(x, y, "reference")
    want.backward()
    assert len(graphs) == 1
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert any(o.startswith("fastdelta.fm_distance") for o in ops), ops
    assert rel(loss, want) < 1e-5
    for a, b in zip(got, (p.grad for p in target.parameters())):
        assert rel(a, b) < 1e-4


# ---------------------------------------------------------------- dispatch, settings, fallback

def test_dispatch_and_settings():
    assert make_settings("delta").distance_impl == "auto"
    with pytest.raises(SettingsError, match="distance_impl"):
        make_settings("delta", distance_impl="cuda")
    with pytest.raises(ValueError, match="distance_impl"):
        dispatch.resolve("fast", torch.zeros(1, 1, 1, 1))
    t = torch.zeros(1, 1, 1, 1)
    assert dispatch.resolve("reference", t) == "reference"
    if not CUDA:
        with pytest.raises(RuntimeError):
            dispatch.resolve("native", t.to("meta"))


def test_regularizer_distance_impl_reference_equals_auto(monkeypatch):
    calls = []
    real = dispatch.fm_distance

    def spy(*a, **k):
        calls.append(k.get("impl"))
        return real(*a, **k)

    monkeypatch.setattr(dispatch, "fm_distance", spy)
    target = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 25, 2))
    source = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 25, 2))
    tf, sf = [torch.randn(2, 4, 5, 5)], [torch.randn(2, 4, 5, 5)]
    reg = make_method("delta_no_att", target, source, "2", ["0"], alpha=1.0, beta=0.0, weight_decay=0.0)
    auto = reg.terms(tf, sf).reg
    reg.distance_impl = "reference"
    ref = reg.terms(tf, sf).reg
    assert calls == ["auto", "reference"]
    assert rel(auto, ref) < 1e-6


def test_absent_native_build_falls_back(monkeypatch):
    monkeypatch.setitem(native._STATE, "loaded", False)
    monkeypatch.setitem(native._STATE, "reason", "test: no build")
    t, s, w = make((2, 3, 4, 5))
    assert dispatch.resolve("auto", t) == "reference"
    with pytest.raises(RuntimeError, match="test: no build"):
        dispatch.resolve("native", t)
    assert torch.equal(feature_map_distance(t, s, w), reference_feature_map_distance(t, s, w))


def test_broken_native_build_warns_and_falls_back(tmp_path):
    """A library that does not load (here: garbage bytes) warns once and the reference path is used."""
    bad = tmp_path / "libfastdelta_native.so"
    bad.write_bytes(b"not a shared object")
    code = ("import warnings, torch\nwarnings.simplefilter('always')\n"
            "from fastdelta.kernels import reference_distance as reference_feature_map_distance\n"
            "from fastdelta.methods.delta_term import feature_map_distance\n"
            "from fastdelta.kernels import native, dispatch\n"
            "t, s, w = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.rand(3)\n"
            "assert not native.available() and dispatch.resolve('auto', t) == 'reference'\n"
            "assert torch.equal(feature_map_distance(t, s, w), reference_feature_map_distance(t, s, w))\n"
            "print('REASON', native.status()['reason'])\n")
    env = {**os.environ, "FASTDELTA_NATIVE_LIB": str(bad)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "failed to load" in r.stdout and "native CPU kernel unavailable" in r.stderr


def test_failed_native_build_does_not_break_setup(tmp_path):
    """setup.py's build step warns and carries on when the native prebuild fails (here: no compiler)."""
    env = {**os.environ, "CXX": str(tmp_path / "no-cxx")}
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "native CPU kernel" in r.stderr and "not built" in r.stderr
    assert (tmp_path / "lib" / "fastdelta" / "kernels" / "dispatch.py").exists()
    # the CMake project travels with the package, for the first use's build
    assert (tmp_path / "lib" / "fastdelta" / "kernels" / "_native_src" / "kernels" / "csrc" / "fm_distance.cpp").exists()


# ---------------------------------------------------------------- Triton (CUDA, or the interpreter on CPU)

def triton_fn(t, s, w, relu):
    return feature_map_distance(t, s, w, relu, impl="triton")


@run_triton
@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("relu", [True, False])
def test_triton_small(shape, channels_last, dtype, relu):
    check(triton_fn, shape, dtype, channels_last, relu, device=TRITON_DEV)


@run_triton
@pytest.mark.parametrize("shape,dtype,channels_last", [
    ((64, 2048, 7, 7), torch.float32, False), ((64, 2048, 7, 7), torch.bfloat16, True)] + ([
    ((64, 2048, 7, 7), torch.float32, True), ((64, 2048, 7, 7), torch.bfloat16, False),
    ((32, 256, 56, 56), torch.float32, True), ((32, 256, 56, 56), torch.float32, False),
    ((32, 256, 56, 56), torch.bfloat16, False),
    ((32, 256, 56, 56), torch.bfloat16, True)] if CUDA else []))
def test_triton_large(shape, dtype, channels_last):
    check(triton_fn, shape, dtype, channels_last, device=TRITON_DEV)


@run_triton
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_boundary_zero_weights_nan_and_determinism(channels_last):
    for relu in (True, False):
        check(triton_fn, (4, 16, 9, 9), torch.float32, channels_last, relu, device=TRITON_DEV, zeros=True,
              zero_weights=True)
    from fastdelta.kernels.dispatch import fm_distance
    from fastdelta.kernels.triton_distance import fm_distance_forward
    t, s, w = make((3, 40, 9, 9), channels_last=channels_last, device=TRITON_DEV)
    a = fm_distance_forward(t, s, w, deterministic=True, block=256)
    b = fm_distance_forward(t, s, w, deterministic=True, block=256)
    assert torch.equal(a, b)  # fixed-order reduction: bit-identical
    assert rel(a.sum(), ref64(t, s, w)[0]) < 1e-5
    t2 = t.clone()
    t2[2, 39, 8, 8] = float("nan")
    assert torch.isnan(fm_distance_forward(t2, s, w, deterministic=False)[2])
    t2.clamp_(max=-1)
    t2[0, 0, 0, 0] = float("nan")
    assert torch.isnan(fm_distance(t2, s, w, impl="triton"))
    # per sample through the custom op's autograd, a per-sample upstream gradient
    x = t.detach().clone().requires_grad_()
    per = fm_distance(x, s, w, impl="triton", per_sample=True)
    gout = torch.arange(1.0, 4.0, device=TRITON_DEV)
    per.backward(gout)
    x64 = t.detach().double().requires_grad_()
    (kop.reference_losses(x64, s.double(), w.double()) * gout.double()).sum().backward()
    assert rel(per, ref64(t, s, w, per_sample=True)[0]) < 1e-5 and rel(x.grad, x64.grad) < 1e-5


@run_triton
def test_triton_non_contiguous_and_custom_op():
    test_non_contiguous_views("triton")
    test_per_sample("triton")
    t, s, w = make((2, 3, 4, 5), device=TRITON_DEV)
    torch.library.opcheck(torch.ops.fastdelta.fm_distance.default, (t.requires_grad_(), s, w, True, False, False,
                                                                    "triton"))


@pytest.mark.skipif(INTERPRET or CUDA, reason="this is the launcher of the interpreter run")
def test_triton_interpreter_suite():
    """The Triton tests above, on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                        "-k", "triton and not interpreter_suite"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], \
        r.stdout[-6000:] + r.stderr[-3000:]


def test_bench_distance_smoke(tmp_path):
    """benchmarks/bench_distance.py runs (tiny CPU sizes) and writes its JSON."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_distance", os.path.join(ROOT, "benchmarks", "bench_distance.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "d.json"
    res = mod.main(["--device", "cpu", "--shapes", "8x4x4,3x5x7", "--cpu-batch", "2", "--cpu-repeats", "1", "--layouts", "nchw",
                    "--out", str(out)])
    saved = json.load(open(out))
    assert saved["torch"] == torch.__version__ and "cpu" in saved
    if native.available():
        assert [r["layer"] for r in res["cpu_part"]["rows"]] == ["8x4x4", "8x4x4", "3x5x7", "3x5x7"]
        assert res["cpu_part"]["fwd_bwd_speedup_all_layers"] > 0
