"""`auto` on a CPU: the candidates follow the CPU's bf16 units, the fastest measured one is used and
recorded with why, the choice is cached per workload and kept on resume, and every engine `auto` can
pick trains to the reference's loss within the precision's tolerance."""
import json

import pytest
import torch

import fastdelta
from fastdelta.train import engine_choice
from fastdelta.train.engine_choice import (MIN_PROBE_ITERATIONS, REFERENCE, cpu_candidates, cpu_has_bf16_units,
                                           interleaved_ms, ratio_spread)
from tiny import TINY_LAYERS, arrays, tiny_net

QUICK = dict(batch_size=4, resize=16, crop=12, progress=False, attention_head_epochs=1, layers=TINY_LAYERS)


def test_bf16_is_a_candidate_only_with_bf16_units():
    assert cpu_has_bf16_units({"avx512f", "avx512_bf16"}) and cpu_has_bf16_units({"amx_bf16", "amx_tile"})
    assert not cpu_has_bf16_units({"avx2", "avx512f", "fma"})
    assert list(cpu_candidates(False)) == [REFERENCE, "fp32_channels_last"]
    assert list(cpu_candidates(True)) == [REFERENCE, "fp32_channels_last", "bf16_channels_last"]
    assert cpu_candidates(True)["bf16_channels_last"].precision == "bf16"
    assert all(o is None or o.compile is None for o in cpu_candidates(True).values())  # never compiled by auto


def test_interleaved_timing_takes_turns_and_reports_the_spread():
    order = []
    times = interleaved_ms({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, warmup=1)
    assert order == ["a", "b"] * 4 and [len(t) for t in times.values()] == [3, 3]
    spread = ratio_spread({"a": [10.0, 10.0, 10.0], "b": [5.0, 4.0, 10.0]}, "a")
    assert spread["b"]["speedup_median"] == 2.0 and spread["b"]["speedup_min"] == 1.0
    assert spread["b"]["speedup_max"] == 2.5 and spread["a"]["speedup_median"] == 1.0


@pytest.mark.parametrize("bf16_units", [False, True])
def test_auto_measures_the_cpu_candidates_and_records_its_choice(monkeypatch, bf16_units):
    monkeypatch.setattr(engine_choice, "cpu_has_bf16_units", lambda flags=None: bf16_units)
    res = fastdelta.fit(tiny_net(), arrays(), None, method="delta", iterations=MIN_PROBE_ITERATIONS, **QUICK)
    choice = res.settings["step_choice"]
    assert set(choice["measured"]) == set(cpu_candidates(bf16_units))
    fastest = min(choice["measured"], key=lambda k: choice["measured"][k]["ms_median"])
    assert choice["choice"] == fastest and "fastest" in choice["why"]
    used = res.settings["step_used"]
    assert used == ({"step_engine": "reference"} if fastest == REFERENCE else
                    cpu_candidates(bf16_units)[fastest].describe())


def test_the_choice_is_cached_per_workload_and_kept_on_resume(tmp_path, monkeypatch):
    kw = dict(method="l2", iterations=MIN_PROBE_ITERATIONS, **QUICK)
    first = fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "run"), checkpoint_every=25, **kw)
    again = fastdelta.fit(tiny_net(), arrays(), None, **kw)
    assert again.settings["step_choice"]["choice"] == first.settings["step_choice"]["choice"]
    cached = again.settings["step_choice"]["cached"]
    assert json.loads(open(cached).read())["choice"] == first.settings["step_choice"]["choice"]
    # another choice in the cache: a resumed run still continues with the engine it started with
    other = "fp32_channels_last" if first.settings["step_choice"]["choice"] == REFERENCE else REFERENCE
    with open(cached, "w") as f:
        json.dump({"choice": other, "measured": {}}, f)
    (tmp_path / "run" / "checkpoints" / "ckpt-00000050.pt").unlink()
    (tmp_path / "run" / "result.json").unlink()
    resumed = fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "run"), resume=True,
                            checkpoint_every=25, **kw)
    assert resumed.settings["step_choice"]["choice"] == first.settings["step_choice"]["choice"]
    assert resumed.history[-1]["loss"] == first.history[-1]["loss"]


def test_a_short_run_or_an_explicit_setting_is_not_measured():
    short = fastdelta.fit(tiny_net(), arrays(), None, method="l2", iterations=3, **QUICK)
    assert short.settings["step_choice"]["choice"] == REFERENCE and "not worth" in short.settings["step_choice"]["why"]
    given = fastdelta.fit(tiny_net(), arrays(), None, method="l2", iterations=MIN_PROBE_ITERATIONS,
                          step_engine="reference", **QUICK)
    assert given.settings["step_choice"] is None and given.settings["step_used"] == {"step_engine": "reference"}


@pytest.mark.parametrize("engine,rtol", [("fp32_channels_last", 1e-4), ("bf16_channels_last", 3e-2)])
@pytest.mark.parametrize("method", ["l2", "delta"])
def test_every_engine_auto_can_pick_trains_to_the_reference_loss(engine, rtol, method):
    """Five steps on the same data: each engine's losses against the eager fp32 reference step's."""
    options = cpu_candidates(True)[engine]
    kw = dict(method=method, iterations=5, seed=3, **QUICK)
    ref = fastdelta.fit(tiny_net(), arrays(), None, step_engine="reference", **kw)
    run = fastdelta.fit(tiny_net(), arrays(), None, precision=options.precision, channels_last=options.channels_last,
                        compile=False, **kw)
    assert run.settings["step_used"]["precision"] == options.precision
    for a, b in zip(ref.history, run.history):
        assert b["ce"] == pytest.approx(a["ce"], rel=rtol)
        assert b["loss"] == pytest.approx(a["loss"], rel=rtol)
