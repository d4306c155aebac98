"""The fast step engine: options, equality with the reference step, no graph break, precisions,
checkpoint/resume, DDP, and the step benchmark's CPU smoke configuration."""
import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdelta
from fastdelta.attention.weights import ChannelAttention
from fastdelta.train.loop import NonFiniteLossError
from fastdelta.methods import make_method
from fastdelta.settings import SettingsError, make_settings
from fastdelta.train.steps import FastStep, ReferenceStep, Step, StepOptions, StepOutput, resolve_step_options
from tiny import TINY_LAYERS, arrays, fit_killed_and_resumed, tiny_net

QUICK = dict(layers=TINY_LAYERS, batch_size=4, resize=16, crop=12, progress=False, attention_cache=None,
             attention_head_epochs=1, eval_batch_size=8)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def _attention():
    g = torch.Generator().manual_seed(3)
    return ChannelAttention(TINY_LAYERS, [torch.rand(8, generator=g, dtype=torch.float64),
                                          torch.rand(16, generator=g, dtype=torch.float64)])


def test_options_auto_is_the_reference_step_on_cpu_and_fast_on_cuda():
    assert resolve_step_options(CPU) is None  # today's eager fp32 step, unchanged
    assert resolve_step_options(CPU, step_engine="fast") == StepOptions("fp32", False, None, False)
    cuda = resolve_step_options(torch.device("cuda"), precision="bf16")  # resolving needs no GPU
    assert (cuda.precision, cuda.channels_last, cuda.compile) == ("bf16", True, "default")
    assert resolve_step_options(CPU, precision="bf16").precision == "bf16"
    assert resolve_step_options(CPU, compile="max-autotune-no-cudagraphs").compile == "max-autotune-no-cudagraphs"
    assert resolve_step_options(torch.device("cuda"), "bf16", cuda_graphs=True).compile == "reduce-overhead"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_step_options(CPU, cuda_graphs=True)
    with pytest.raises(ValueError, match="reference"):
        resolve_step_options(CPU, precision="bf16", step_engine="reference")
    with pytest.raises(ValueError, match="compile"):
        resolve_step_options(CPU, compile="fastest")


@pytest.mark.parametrize("bad,match", [(dict(precision="fp8"), "precision"), (dict(compile="fast"), "compile"),
                                       (dict(channels_last="maybe"), "channels_last"),
                                       (dict(cuda_graphs=True, compile=False), "cuda_graphs"),
                                       (dict(step_engine="turbo"), "step_engine"),
                                       (dict(step_engine="reference", precision="bf16"), "reference")])
def test_settings_validation(bad, match):
    with pytest.raises(SettingsError, match=match):
        make_settings("delta", **bad)


@pytest.mark.parametrize("method", ["delta", "delta_no_att"])
def test_fast_eager_fp32_delta_matches_the_reference_step(method):
    """fx taps, truncated BN-folded source: the same training as hooks on the full source."""
    kw = dict(QUICK, iterations=5, alpha=0.05, attention=_attention() if method == "delta" else None)
    ref = fastdelta.fit(tiny_net(), arrays(), None, method=method, step_engine="reference", **kw)
    fast = fastdelta.fit(tiny_net(), arrays(), None, method=method, step_engine="fast", **kw)
    for (k, a), b in zip(ref.model.state_dict().items(), fast.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (k, (a - b).abs().max())
    for h1, h2 in zip(ref.history, fast.history):
        for key in ("ce", "reg", "head", "loss", "grad_norm", "train_acc"):
            assert h2[key] == pytest.approx(h1[key], rel=1e-4, abs=1e-7), key
        assert set(h1) == set(h2)


def _stepper(method, options, bn=True):
    torch.manual_seed(0)
    source = tiny_net(bn=bn).eval().requires_grad_(False)
    target = tiny_net(bn=bn)
    target.fc = torch.nn.Linear(16, 3)
    att = [torch.softmax(torch.randn(8), 0), torch.softmax(torch.randn(16), 0)]
    reg = make_method(method, target, source, "fc", TINY_LAYERS, att if method in ("delta", "l2_sp_att") else None,
                      alpha=0.01, beta=0.01, weight_decay=1e-4)
    params = reg.trainable_parameters(target)
    if reg.freezes_extractor:
        target.requires_grad_(False).eval()
        for p in params:
            p.requires_grad_(True)
    else:
        target.train()
    return FastStep(target, source, reg, params, options, CPU, 0.01, 0.9)


@pytest.mark.parametrize("method", ["l2_fe", "l2", "l2_sp", "l2_sp_att", "delta_no_att", "delta"])
def test_the_compiled_region_has_no_graph_break(method):
    step = _stepper(method, StepOptions(precision="bf16", channels_last=True))
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 0])
    explanation = torch._dynamo.explain(step._loss)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()


def test_fullgraph_compiled_step_trains_like_the_eager_step():
    """torch.compile(fullgraph=True) through AOTAutograd (forward + backward traced, no codegen: fast on
    CPU); the inductor backend compiles the same graph (FASTDELTA_SLOW_TESTS=1 runs it too)."""
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0])
    backends = ["aot_eager"] + (["inductor"] if os.environ.get("FASTDELTA_SLOW_TESTS") else [])
    eager = _stepper("delta", StepOptions())
    outs = [eager.step(x, y, 0.01) for _ in range(3)]
    for backend in backends:
        torch._dynamo.reset()
        compiled = _stepper("delta", StepOptions(compile="default", backend=backend, fullgraph=True))
        outs_c = [compiled.step(x, y, 0.01) for _ in range(3)]
        for a, b in zip(outs, outs_c):
            assert b.values["reg"] == pytest.approx(a.values["reg"], rel=1e-4)
            assert b.values["ce"] == pytest.approx(a.values["ce"], rel=1e-4)
        for p, q in zip(eager.target.parameters(), compiled.target.parameters()):
            assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_steps_built_one_after_another_do_not_share_a_compile_cache(monkeypatch):
    """fit() runs methods one after another in one process: each FastStep compiles its own copy of the
    step, so dynamo's per-code recompile limit is never reached (it would fall back to eager)."""
    cfg = torch._dynamo.config
    monkeypatch.setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        _stepper("l2_sp", StepOptions(compile="default", backend="eager")).step(x, y, 0.01)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    torch._dynamo.reset()


def test_bf16_channels_last_and_fp16_gradscaler_train_on_cpu(tmp_path):
    res = fastdelta.fit(tiny_net(), arrays(), None, method="delta", precision="bf16", channels_last=True,
                        attention=_attention(), **{**QUICK, "iterations": 3})
    assert res.settings["step_used"]["precision"] == "bf16" and res.settings["step_used"]["channels_last"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) and h["reg"] > 0 for h in res.history)
    assert all(p.is_contiguous() for p in res.model.parameters())  # the caller's layout is given back
    res = fastdelta.fit(tiny_net(), arrays(), None, method="l2_sp", precision="fp16", run_dir=str(tmp_path),
                        checkpoint_every=2, **{**QUICK, "iterations": 2})
    assert res.settings["step_used"]["precision"] == "fp16"
    from fastdelta.train.checkpoint import load_latest
    ckpt = load_latest(tmp_path / "checkpoints")
    assert "grad_scaler" in ckpt["optimizer"]


class _RuleOnly(Step):
    """A step with nothing but the non-finite rule (the rule is the base's, shared by every engine)."""

    def __init__(self, skips_nonfinite_grads):
        self.skips_nonfinite_grads = skips_nonfinite_grads

    def forward_backward(self, x, y, lr):
        raise NotImplementedError

    def close(self):
        pass


@pytest.mark.parametrize("skips", [False, True])
def test_the_non_finite_rule_is_the_same_on_the_host_and_on_the_device(skips):
    """Each stat in turn (and two at once: the first names the failure) made NaN or inf: the device flag
    and the host's first failure agree; train_acc is never checked, the gradient not under fp16's scaler."""
    assert issubclass(FastStep, Step) and issubclass(ReferenceStep, Step)
    rule = _RuleOnly(skips)
    names = ["ce", "reg", "head", "gradient", "train_acc", "bn_statistics"]
    checked = [n for n in names if n != "train_acc" and not (skips and n == "gradient")]
    cases = [(i,) for i in range(6)] + [(1, 5), (3, 5), (4, 0)]
    for bad in cases:
        for value in (float("nan"), float("inf")):
            stats = torch.tensor([0.5, 0.1, 0.2, 3.0, 0.75, 7.0], dtype=torch.float64)
            stats[list(bad)] = value
            first = next((names[i] for i in sorted(bad) if names[i] in checked), None)
            got = rule.first_nonfinite(StepOutput.read(stats))
            assert (got[0] if got else None) == first, (bad, got)
            assert got is None or (got[1] != got[1] if value != value else got[1] == value)
            assert bool(rule.finite_on_device(stats)) == (first is None), bad
    assert bool(rule.finite_on_device(torch.tensor([0.5, 0.1, 0.2, 3.0, 0.75], dtype=torch.float64)))


def test_non_finite_loss_stops_the_fast_step_with_the_last_good_weights():
    with pytest.raises(NonFiniteLossError) as info:
        fastdelta.fit(tiny_net(), arrays(), None, method="l2_sp", step_engine="fast",
                      **{**QUICK, "iterations": 50, "lr": 1e6})
    e = info.value
    assert len(e.history) == e.iteration
    assert all(torch.isfinite(p).all() for p in e.partial_result.model.parameters())


def test_fast_step_resume_is_exact_and_curves_still_work(tmp_path):
    kw = dict(method="delta", iterations=6, checkpoint_every=2, step_engine="fast", eval_every=3, eval_images=4,
              attention=_attention(), **QUICK)
    full, resumed = fit_killed_and_resumed(tmp_path / "a", **kw)  # killed after iteration 4
    assert resumed.settings["resumed_from_iteration"] == 4
    assert [h.get("test_top1") is not None for h in full.history] == [False, False, True, False, False, True]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_KW = dict(method="delta", iterations=4, step_engine="fast", seed=0, **{**QUICK, "attention_head_epochs": 1})


def _ddp_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    res = fastdelta.fit(tiny_net(bn=False), arrays(), None, distributed=True, attention=_attention(), **DDP_KW)
    torch.save({"model": res.model.state_dict(), "history": res.history}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_fast_step_under_ddp_matches_one_process(tmp_path):
    torch.set_num_threads(1)
    single = fastdelta.fit(tiny_net(bn=False), arrays(), None, attention=_attention(), **DDP_KW)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k, v in single.model.state_dict().items():
        assert torch.equal(r0["model"][k], r1["model"][k]), k
        assert torch.allclose(r0["model"][k], v, rtol=1e-5, atol=1e-6), k
    for h1, h2 in zip(single.history, r0["history"]):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)


def test_bench_step_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_step", os.path.join(ROOT, "benchmarks", "bench_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--smoke", "--out", str(tmp_path)])
    rows = result["rows"]
    assert [r for r in rows if "error" in r] == []
    assert {(r["method"], r["engine"]) for r in rows} == {(m, e) for m in fastdelta.settings.METHODS
                                                          for e in ("public", "fastdelta")}
    assert all(r["ms_per_step"] > 0 and r["first_step_s"] >= 0 for r in rows)
    assert json.load(open(tmp_path / "bench_step.json"))["environment"]["torch"] == torch.__version__
    table = (tmp_path / "bench_step.md").read_text()
    assert "| smoke | delta |" in table and "ratio" in table
    from fastdelta.apps.cli import main as cli_main  # `fastdelta bench step` is the same code
    assert cli_main(["bench", "step", "--smoke", "--methods", "l2", "--engines", "fastdelta", "--profile", "1",
                     "--out", str(tmp_path / "cli")]) == 0
    rows = json.load(open(tmp_path / "cli" / "bench_step.json"))["rows"]
    assert len(rows) == 1 and (tmp_path / "cli" / rows[0]["profile"]).read_text().strip()


def test_bench_warm_first_step_reruns_compiled_rows_in_a_fresh_process(tmp_path, monkeypatch):
    """--warm-first-step: one subprocess times the compiled rows' first step again; its figures are merged.
    (The real thing compiles twice with inductor: run by hand.)"""
    import argparse
    import subprocess
    from fastdelta.apps.bench import command as bench
    from fastdelta.apps.bench.report import markdown
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--smoke", "--compile", "default", "--warm-first-step"])
    timing = {"batch": 4, "size": 32, "ms_per_step": 10.0, "img_per_s": 400.0, "peak_gib": None}
    compiled = dict(timing, model="smoke", method="delta", engine="fastdelta", first_step_s=40.0,
                    options={"compile": "default"})
    rows = [compiled, dict(timing, model="smoke", method="delta", engine="public", first_step_s=1.0),
            dict(timing, model="smoke", method="l2", engine="fastdelta", first_step_s=1.0, options={"compile": None})]
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        warm = dict(compiled, first_step_s=3.0, compile_cache={"fxgraph_hit": 2})
        (out / "bench_step.json").write_text(json.dumps({"rows": [warm]}))
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(subprocess, "run", fake_run)
    bench.warm_first_steps(args, rows)
    assert len(calls) == 1 and calls[0][1:5] == ["-m", "fastdelta", "bench", "step"]
    cmd = calls[0]
    assert cmd[cmd.index("--methods") + 1] == "delta" and cmd[cmd.index("--compile") + 1] == "default"
    assert compiled["first_step_warm_s"] == 3.0 and compiled["compile_cache_warm"] == {"fxgraph_hit": 2}
    assert "first_step_warm_s" not in rows[1] and "first_step_warm_s" not in rows[2]
    assert "| warm first s |" in markdown({"rows": rows, "environment": {"device": "cpu", "torch": "x", "date": "d"},
                                                "config": {"batch": 4, "size": 32, "iters": 1, "warmup": 0}})
