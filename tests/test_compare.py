"""`fastdelta compare` on a tiny generated dataset: every file, the documented schema, valid figures,
the same numbers for the same seed, and clear errors for bad settings."""
import copy
import json
import struct
import zlib

import numpy as np
import pytest

from fastdelta import SettingsError
from fastdelta.apps.compare import CompareSettings, compare
from fastdelta.apps.compare.splits import stratified_folds, stratified_split, validation_split
from fastdelta.data.errors import DataError
from tiny import TINY_LAYERS, arrays, tiny_net

QUICK = dict(iterations=4, batch_size=4, resize=16, crop=12, attention_head_epochs=1, eval_batch_size=8,
             layers=TINY_LAYERS, progress=False)
SETTINGS = CompareSettings(alpha_grid=(0.001, 0.1), curve_points=2, map_images=2)
TOP_KEYS = {"schema", "compare", "model", "data", "settings", "search", "chosen", "runs", "table", "best",
            "filter_distances", "attention_split", "activation_maps", "roughness", "claims", "attention",
            "figures", "environment", "wall_s"}
RUN_KEYS = {"name", "method", "seed", "alpha", "beta", "schedule", "test_top1", "test_top1_10crop", "status",
            "seconds", "curve", "train_loss"}
FIGURES = ["table1.png", "fig3_curves.png", "fig4_search.png", "fig5_filter_distance.png", "fig6_activation_maps.png"]


def run(out):
    return compare(tiny_net(), arrays(n_per_class=5), arrays(seed=1), methods=["l2_sp", "delta"], seeds=1,
                   out=out, compare_settings=SETTINGS, **QUICK)


def png_pixels(path):
    """Decode a non-interlaced 8-bit PNG's pixel bytes (zlib of the IDAT chunks), without extra libraries."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    assert width > 100 and height > 100
    return np.frombuffer(raw, dtype=np.uint8)


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    return (run(a), a), (run(b), b)


def test_every_file_and_the_schema(twice):
    (report, out), _ = twice
    for name in ["report.json", "report.md", "channel_attention.json", *FIGURES]:
        assert (out / name).is_file(), name
    saved = json.loads((out / "report.json").read_text())
    assert set(saved) == TOP_KEYS and saved["schema"] == "fastdelta.compare/1"
    assert saved["figures"] == FIGURES
    # 2 methods x 1 seed with the step schedule, and the exp schedule of both for Fig. 3
    assert sorted(r["name"] for r in saved["runs"]) == ["delta_seed0", "delta_seed0_exp", "l2_sp_seed0",
                                                        "l2_sp_seed0_exp"]
    for r in saved["runs"]:
        assert set(r) == RUN_KEYS
        assert r["status"] == "ok" and 0 <= r["test_top1"] <= 100
        assert [it for it, _ in r["curve"]] == [1, 3]  # every 2 iterations and the last
    assert len(saved["search"]["results"]) == 4  # 2 methods x 2 alphas, beta fixed
    for m in ("l2_sp", "delta"):
        chosen = saved["chosen"][m]
        best = max((r for r in saved["search"]["results"] if r["method"] == m), key=lambda r: r["val_top1"])
        assert chosen["alpha"] == best["alpha"] and chosen["beta"] == 0.01
        assert saved["table"][m]["values"] == [next(r["test_top1"] for r in saved["runs"] if r["name"] == f"{m}_seed0")]
    assert set(saved["filter_distances"]["delta"]) == {"conv1", "block", "conv2"}  # stages of TinyNet
    maps = saved["activation_maps"]
    assert set(maps["maps"]) == {"source", "l2_sp", "delta"} and len(maps["images"]) == 2
    assert set(saved["claims"]) == {"accuracy", "smoother_curve", "unactivated_filters_move", "attention_regions"}
    md = (out / "report.md").read_text()
    assert "| DELTA |" in md and "**" in md and "fig5_filter_distance.png" in md
    assert "Attention: the L2-FE head it is measured against ended at cross-entropy" in md


def test_figures_are_pngs_with_content(twice):
    (_, out), _ = twice
    for name in FIGURES:
        pixels = png_pixels(out / name)
        assert pixels.std() > 5, f"{name} looks blank"


def test_same_seed_same_numbers(twice):
    (a, _), (b, _) = twice
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(a["runs"]) == strip(b["runs"])
    assert [r["val_top1"] for r in a["search"]["results"]] == [r["val_top1"] for r in b["search"]["results"]]
    assert a["filter_distances"] == b["filter_distances"]


def test_validation_split_is_stratified_and_disjoint():
    y = np.repeat(np.arange(3), [5, 10, 2])
    fit_idx, val_idx = stratified_split(y, 0.2, seed=0)
    assert not set(fit_idx) & set(val_idx) and len(fit_idx) + len(val_idx) == len(y)
    assert np.bincount(y[val_idx]).tolist() == [1, 2, 1]
    (xf, yf), (xv, yv) = validation_split(arrays(n_per_class=5), 0.4, seed=0)
    assert np.bincount(yv).tolist() == [2, 2, 2] and np.bincount(yf).tolist() == [3, 3, 3]
    with pytest.raises(DataError, match="class 2 has 1"):
        stratified_split(np.array([0, 0, 1, 1, 2]), 0.2, 0)


def test_cross_validation_folds_partition_each_class():
    y = np.repeat(np.arange(3), [5, 10, 7])
    folds = stratified_folds(y, 5, seed=0)
    assert len(folds) == 5
    vals = np.concatenate([v for _, v in folds])
    assert sorted(vals.tolist()) == list(range(len(y)))  # every image validates exactly once
    for fit_idx, val_idx in folds:
        assert not set(fit_idx) & set(val_idx) and len(fit_idx) + len(val_idx) == len(y)
        assert np.bincount(y[val_idx], minlength=3).tolist() in ([1, 2, 1], [1, 2, 2])
    assert [v.tolist() for _, v in folds] == [v.tolist() for _, v in stratified_folds(y, 5, seed=0)]
    with pytest.raises(DataError, match="5-fold"):
        stratified_folds(np.array([0, 0, 0, 1, 1, 1, 1, 1]), 5, 0)


def test_cross_validated_search_scores_the_mean_over_folds(tmp_path, monkeypatch):
    import contextlib
    import dataclasses
    from fastdelta.apps.compare import comparison
    bars = []

    class Bar:  # the progress bar compare draws: its total and what advanced it
        def __init__(self, total):
            self.total, self.done, self.postfixes = total, 0, []

        def update(self, n):
            self.done += n

        def set_postfix_str(self, text):
            self.postfixes.append(text)

    @contextlib.contextmanager
    def recording_bar(total, *args, **kwargs):
        bars.append(Bar(total))
        yield bars[-1]
    monkeypatch.setattr(comparison, "progress_bar", recording_bar)
    cs = dataclasses.replace(SETTINGS, folds=3, schedules=("step",), curve_points=0)
    report = compare(tiny_net(), arrays(n_per_class=6), arrays(seed=1), methods=["l2_sp", "delta"], seeds=1,
                     out=tmp_path, compare_settings=cs, **QUICK)
    # the bar counts every fit: 2 methods x 2 alphas x 3 folds, then 2 final runs
    assert bars[0].total == bars[0].done == 2 * 2 * 3 + 2
    assert "search delta alpha=0.1 beta=0.01 fold 3/3" in bars[0].postfixes
    search = report["search"]
    assert search["split"] == {"folds": 3, "fit": [12, 12, 12], "val": [6, 6, 6]}
    for r in search["results"]:
        assert [f["fold"] for f in r["folds"]] == [0, 1, 2]
        if r["status"] == "ok":
            assert r["val_top1"] == pytest.approx(np.mean([f["val_top1"] for f in r["folds"]]))
        for k in range(3):
            name = f"{r['method']}_a{r['alpha']:g}_b{r['beta']:g}_fold{k}"
            assert (tmp_path / "runs" / "search" / name / "result.json").is_file()
    ok = [r for r in search["results"] if r["method"] == "l2_sp" and r["status"] == "ok"]
    assert report["chosen"]["l2_sp"]["alpha"] == max(ok, key=lambda r: (r["val_top1"], -r["alpha"]))["alpha"]
    assert "3-fold cross-validation" in (tmp_path / "report.md").read_text()


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, text):
        pass


@pytest.mark.parametrize("folds", [1, 3])
def test_each_folds_attention_sees_only_that_folds_training_part(folds, tmp_path, monkeypatch):
    """The attention a search fit uses (its head's training set and the pool its ablation samples) is
    measured on that fold's fit part alone: the fold's validation images never reach it."""
    import dataclasses
    import fastdelta.attention.measure as measure_module
    from fastdelta.apps.compare import runs
    from fastdelta.apps.compare.search import run_search
    from fastdelta.settings import make_settings
    x, y = arrays(n_per_class=6)
    index = {img.tobytes(): i for i, img in enumerate(x)}
    assert len(index) == len(x)  # every image identifies its index

    def indices(images):
        return sorted(index[img.tobytes()] for img in images)

    measured, fits = {}, []  # id(attention) -> {what: indices}; each search fit's parts and attention
    real_measure, real_fit = measure_module.measure_attention, runs.Runner.fit

    def spy_measure(nets, data, *args, **kwargs):
        att = real_measure(nets, data, *args, **kwargs)
        measured[id(att)] = {"head": indices(data.train.images), "ablation pool": indices(data.train_eval.images)}
        return att

    def spy_fit(self, name, train, test, method, **overrides):
        fits.append((name, indices(train[0]), indices(test[0]), id(overrides.get("attention"))))
        return real_fit(self, name, train, test, method, **overrides)
    monkeypatch.setattr(measure_module, "measure_attention", spy_measure)
    monkeypatch.setattr(runs.Runner, "fit", spy_fit)
    base = {**QUICK, "progress": False, "attention_cache": None}
    runner = runs.Runner(tiny_net(), None, base, tmp_path, print)
    cs = dataclasses.replace(SETTINGS, methods=["delta"], alpha_grid=(0.1,), folds=folds)
    run_search(cs, runner, (x, y), ["delta"], make_settings(**base), 0, _NoBar())
    assert len(fits) == folds and len(measured) == folds
    validated = sorted(i for _, _, val, _ in fits for i in val)
    if folds > 1:
        assert validated == list(range(len(x)))  # the folds partition the training set
    for name, fit_part, val_part, att in fits:
        assert not set(fit_part) & set(val_part) and len(fit_part) + len(val_part) == len(x), name
        for what, seen in measured[att].items():
            assert seen == fit_part, f"{name}: the attention's {what} is not the fold's fit part"


def test_bad_settings_fail_before_any_run(tmp_path):
    data = arrays()
    with pytest.raises(SettingsError, match="methods"):
        compare(tiny_net(), data, data, methods=["delta", "nope"], out=tmp_path, **QUICK)
    with pytest.raises(SettingsError, match="seeds"):
        compare(tiny_net(), data, data, methods=["delta"], seeds=0, out=tmp_path, **QUICK)
    with pytest.raises(SettingsError, match="'seed'"):
        compare(tiny_net(), data, data, methods=["delta"], out=tmp_path, seed=3, **QUICK)
    with pytest.raises(SettingsError, match="unknown setting"):
        compare(tiny_net(), data, data, methods=["delta"], out=tmp_path, iterationz=3, **QUICK)
    with pytest.raises(SettingsError, match="test set"):
        compare(tiny_net(), data, None, methods=["delta"], out=tmp_path, **QUICK)
    assert not any(tmp_path.iterdir())  # nothing written


def test_fast_top1_matches_the_reference_evaluation():
    """fast_top1 (held tensors sliced into train.evaluate.evaluate) gives the same top-1 as evaluate over a DataLoader, and
    channels_last logits match a float64 forward (eval mode) to float32 rounding."""
    import torch
    from fastdelta.apps.compare.evaluation import TensorSet, fast_top1
    from fastdelta.train.evaluate import evaluate
    from fastdelta.train.loop import make_loader
    net = tiny_net(num_classes=3).eval()
    x = torch.randn(37, 3, 12, 12)
    y = torch.randint(0, 3, (37,))
    data = TensorSet(x, y, ["a", "b", "c"])
    ref = evaluate(net, make_loader(data, 8, False, 0, 0), torch.device("cpu"), progress=False)["top1"]
    with torch.no_grad():
        logits64 = copy.deepcopy(net).double()(x.double())
    assert fast_top1(net, data, batch_size=8) == ref
    with torch.no_grad():
        fast_logits = net(x.contiguous(memory_format=torch.channels_last))  # the layout evaluate uses on CPU
    assert torch.allclose(fast_logits.double(), logits64, rtol=1e-5, atol=1e-5)


def test_evaluate_runs_channels_last_on_cpu_and_restores_the_layout():
    """train.evaluate.evaluate switches a CPU model to channels_last for its forwards (faster) and back after;
    a model that was channels_last already stays so; the top-1 equals a float64 forward's."""
    import torch
    from fastdelta.apps.compare.evaluation import TensorSet
    from fastdelta.train.evaluate import evaluate
    from fastdelta.train.loop import make_loader
    net = tiny_net(num_classes=3).eval()
    x = torch.randn(37, 3, 12, 12)
    y = torch.randint(0, 3, (37,))
    with torch.no_grad():
        ref = 100.0 * (copy.deepcopy(net).double()(x.double()).argmax(1) == y).sum().item() / 37
    loader = make_loader(TensorSet(x, y, ["a", "b", "c"]), 8, False, 0, 0)
    seen = []
    hook = net.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    convs = [p for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous() for p in convs)
    assert evaluate(net, loader, torch.device("cpu"), progress=False)["top1"] == ref
    assert seen and all(seen)  # every forward got channels_last input
    assert all(p.is_contiguous() for p in convs)  # layout restored
    net.to(memory_format=torch.channels_last)
    assert evaluate(net, loader, torch.device("cpu"), progress=False)["top1"] == ref
    assert all(not p.is_contiguous() for p in convs)  # still channels_last
    hook.remove()


def test_reuse_search_takes_finished_runs_with_the_same_settings(twice, tmp_path):
    import dataclasses
    import shutil
    (report, out), _ = twice
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "runs" / "search", resumed / "runs" / "search")
    # a finished run whose saved accuracy differs from what a refit would give: reuse must take it
    marked = resumed / "runs" / "search" / "l2_sp_a0.1_b0.01" / "result.json"
    saved = json.loads(marked.read_text())
    saved["test"]["top1"] = 100.0
    marked.write_text(json.dumps(saved))
    # a run saved with other settings must be refitted, not reused
    other = resumed / "runs" / "search" / "delta_a0.001_b0.01" / "result.json"
    saved = json.loads(other.read_text())
    saved["settings"]["iterations"] = 999
    other.write_text(json.dumps(saved))
    again = compare(tiny_net(), arrays(n_per_class=5), arrays(seed=1), methods=["l2_sp", "delta"], seeds=1,
                    out=resumed, compare_settings=dataclasses.replace(SETTINGS, reuse_runs=True), **QUICK)
    by_key = {(r["method"], r["alpha"]): r for r in again["search"]["results"]}
    assert by_key[("l2_sp", 0.1)]["reused"] and by_key[("l2_sp", 0.1)]["val_top1"] == 100.0
    assert again["chosen"]["l2_sp"]["alpha"] == 0.1
    assert not by_key[("delta", 0.001)]["reused"]
    assert by_key[("l2_sp", 0.001)]["reused"] and by_key[("delta", 0.1)]["reused"]
    first = {(r["method"], r["alpha"]): r["val_top1"] for r in report["search"]["results"]}
    assert by_key[("delta", 0.001)]["val_top1"] == first[("delta", 0.001)]  # refitted: same seed, same number
    assert json.loads(other.read_text())["settings"]["iterations"] == QUICK["iterations"]


def _comparable(report):
    """A report less what a rerun may change: timings, the environment, the reuse flag."""
    report = json.loads(json.dumps(report, default=str))
    for key in ("wall_s", "environment", "figures"):
        report.pop(key, None)
    report["compare"].pop("reuse_runs")
    report["attention"].pop("seconds")
    for row in report["runs"] + report["search"]["results"]:
        row.pop("seconds")
        row.pop("reused", None)
    return report


def test_reuse_runs_takes_back_finished_final_runs_with_the_same_report(twice, tmp_path):
    """An interrupted comparison run again refits nothing it finished, final runs included (the first
    seed's figures come from its analysis.json), and writes the same report; a final run whose
    analysis is missing is fitted again."""
    import dataclasses
    import shutil
    (report, out), _ = twice
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "runs", resumed / "runs")
    assert json.loads((out / "runs" / "l2_sp_seed0" / "analysis.json").read_text())["device"] == "cpu"
    (resumed / "runs" / "delta_seed0" / "analysis.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (resumed / "runs").glob("*/result.json")}
    again = compare(tiny_net(), arrays(n_per_class=5), arrays(seed=1), methods=["l2_sp", "delta"], seeds=1,
                    out=resumed, compare_settings=dataclasses.replace(SETTINGS, reuse_runs=True), **QUICK)
    refitted = sorted(p.parent.name for p, t in stamps.items() if p.stat().st_mtime_ns != t)
    assert refitted == ["delta_seed0"]
    assert _comparable(again) == _comparable(report)


def test_reuse_search_refits_attention_runs_made_before_the_attention_conventions(twice, tmp_path):
    """A search fit saved before attention_sample existed measured the first images of the set: an
    attention method's fit must be refitted, a method without attention may be reused."""
    import dataclasses
    import shutil
    (report, out), _ = twice
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "runs" / "search", resumed / "runs" / "search")
    for name in ("delta_a0.1_b0.01", "l2_sp_a0.1_b0.01"):
        path = resumed / "runs" / "search" / name / "result.json"
        saved = json.loads(path.read_text())
        del saved["settings"]["attention_sample"]
        path.write_text(json.dumps(saved))
    again = compare(tiny_net(), arrays(n_per_class=5), arrays(seed=1), methods=["l2_sp", "delta"], seeds=1,
                    out=resumed, compare_settings=dataclasses.replace(SETTINGS, reuse_runs=True), **QUICK)
    by_key = {(r["method"], r["alpha"]): r for r in again["search"]["results"]}
    assert not by_key[("delta", 0.1)]["reused"] and by_key[("l2_sp", 0.1)]["reused"]


def claim_report(delta_minus):
    """A report whose step-schedule runs give DELTA − rival = delta_minus[rival][seed], an exp-schedule run
    that must not be paired (it would replace L2's seed 0), and the table of the runs' means."""
    seeds = range(len(next(iter(delta_minus.values()))))
    runs = [{"method": "delta", "seed": k, "schedule": "step", "test_top1": 80.0 + k} for k in seeds]
    for m, diffs in delta_minus.items():
        runs += [{"method": m, "seed": k, "schedule": "step", "test_top1": 80.0 + k - d} for k, d in enumerate(diffs)]
    runs.append({"method": "l2", "seed": 0, "schedule": "exp", "test_top1": 0.0})
    table = {m: {"mean": float(np.mean([r["test_top1"] for r in runs if r["method"] == m and r["schedule"] == "step"])),
                 "std": 1.0} for m in [*delta_minus, "delta"]}
    return {"table": table, "runs": runs, "activation_maps": {"images": []}}


@pytest.mark.parametrize("delta_minus, holds, verdict", [
    # every rival: mean above its spread
    ({"l2": [2.0, 2.5, 3.0], "l2_sp": [1.0, 1.2, 0.8], "delta_no_att": [5.0, 4.0, 6.0]}, True, "holds"),
    # one rival below minus its spread: fails, whatever the others do
    ({"l2": [-2.0, -2.5, -3.0], "l2_sp": [1.08, 1.38, -0.85], "delta_no_att": [5.0, 4.0, 6.0]}, False, "does not hold"),
    # DELTA has the best mean against every rival, by less than the spread against L2: not decided (the old
    # rule said it holds)
    ({"l2": [1.08, 1.38, -0.85], "l2_sp": [1.0, 1.2, 0.8], "delta_no_att": [5.0, 4.0, 6.0]}, None,
     "not decided: within the seed spread"),
    # behind on the mean but within the spread: not decided either (not 'does not hold')
    ({"l2": [-1.08, -1.38, 0.85], "l2_sp": [1.0, 1.2, 0.8]}, None, "not decided: within the seed spread"),
    # one seed decides nothing, however large the difference
    ({"l2": [9.0], "l2_sp": [9.0], "delta_no_att": [9.0]}, None, "not decided: one seed"),
    ({"l2": [-9.0], "l2_sp": [9.0]}, None, "not decided: one seed"),
])
def test_accuracy_claim_holds_only_where_the_paired_difference_exceeds_its_spread(delta_minus, holds, verdict):
    from fastdelta.apps.compare.report import RULE, claims
    c = claims(claim_report(delta_minus))["accuracy"]
    assert c["holds"] is holds and c["verdict"] == verdict and c["rule"] == RULE
    assert set(c["paired"]) == set(delta_minus)
    for m, diffs in delta_minus.items():
        p = c["paired"][m]
        assert p["values"] == pytest.approx(diffs) and p["n"] == len(diffs) and p["seeds"] == list(range(len(diffs)))
        assert p["mean"] == pytest.approx(np.mean(diffs))
        assert p["std"] == (pytest.approx(np.std(diffs, ddof=1)) if len(diffs) > 1 else None)
    assert "paired by seed" in c["text"] and ("+1.08, +1.38, -0.85" in c["text"]) == ([1.08, 1.38, -0.85] in
                                                                                     delta_minus.values())


def test_accuracy_claim_pairs_only_seeds_both_finished():
    """A diverged run (test_top1 None) leaves its seed out of the pairs: two pairs left still decide."""
    from fastdelta.apps.compare.report import claims
    report = claim_report({"l2": [2.0, 2.1, 1.9]})
    next(r for r in report["runs"] if r["method"] == "l2" and r["seed"] == 1)["test_top1"] = None
    c = claims(report)["accuracy"]
    assert c["paired"]["l2"]["seeds"] == [0, 2] and c["paired"]["l2"]["values"] == pytest.approx([2.0, 1.9])
    assert c["holds"] is True


def test_single_seed_claims_decide_nothing_and_say_so():
    """The learning curves and the filter distances are measured on seed 0 only: one seed's measurement."""
    from fastdelta.apps.compare.report import claims
    report = claim_report({"l2_sp": [3.0, 3.1, 2.9]})
    report["roughness"] = {"delta/step": 1.0, "l2_sp/step": 2.0}
    report["attention_split"] = {m: {"conv": {"low_attention_mean": v}} for m, v in [("delta", 0.5), ("l2_sp", 0.2)]}
    c = claims(report)
    for name in ("smoother_curve", "unactivated_filters_move"):
        assert c[name]["holds"] is None and c[name]["seed0_agrees"] is True, name
        assert c[name]["verdict"] == "not decided: one seed" and "one seed's measurement" in c[name]["text"]
    assert c["accuracy"]["holds"] is True


def test_report_md_states_the_rule_once(twice):
    from fastdelta.apps.compare.report import RULE
    (report, out), _ = twice
    md = (out / "report.md").read_text()
    assert md.count(RULE) == 1 and md.index(RULE) > md.index("## The paper's claims on this data")
    saved = json.loads((out / "report.json").read_text())["claims"]["accuracy"]
    assert saved["holds"] is None and saved["verdict"] == "not decided: one seed"  # this comparison ran one seed
    assert "**accuracy: not decided: one seed.**" in md


def test_refresh_reports_rewrites_only_the_claims(twice, tmp_path):
    """benchmarks/refresh_reports.py: report.json's claims and report.md's claims section are rewritten from
    the runs; the rest of report.md (possibly from older report code) and the figures are kept."""
    import importlib.util
    import shutil
    from pathlib import Path
    (_, out), _ = twice
    folder = tmp_path / "per_class_5"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("runs"))
    saved = json.loads((folder / "report.json").read_text())
    saved["claims"]["accuracy"] = {"holds": True, "text": "old"}
    (folder / "report.json").write_text(json.dumps(saved, indent=1))
    md = (folder / "report.md").read_text()
    head, claims_and_after = md.split("## The paper's claims on this data")
    old_md = "- an older header line\n" + head + "## The paper's claims on this data\n\n- **accuracy: holds.** old\n\n" \
        + claims_and_after[claims_and_after.index("## Table 1 analog"):]
    (folder / "report.md").write_text(old_md)
    figure = (folder / "table1.png").read_bytes()
    spec = importlib.util.spec_from_file_location(
        "refresh_reports", Path(__file__).resolve().parent.parent / "benchmarks" / "refresh_reports.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([str(folder)])
    new = json.loads((folder / "report.json").read_text())
    assert new["claims"]["accuracy"]["holds"] is None and new["claims"]["accuracy"]["text"] != "old"
    assert {k: v for k, v in new.items() if k != "claims"} == {k: v for k, v in saved.items() if k != "claims"}
    assert (folder / "report.md").read_text() == md.replace(head, "- an older header line\n" + head)
    assert (folder / "table1.png").read_bytes() == figure


def test_a_full_disk_while_writing_the_report_names_the_folder_and_the_way_on(twice, tmp_path, monkeypatch):
    import errno

    from fastdelta.apps.compare import report as report_module
    from fastdelta.output_files import OutputError
    (first, folder), _ = twice

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(report_module, "save_report_json", full)
    saved = report_module.load_report(folder)
    with pytest.raises(OutputError, match=r"could not write the comparison report in .*No space left on device.*"
                                          r"--reuse-runs") as e:
        report_module.finish_report(saved, tmp_path)
    assert e.value.errno == errno.ENOSPC and str(tmp_path / "runs") in str(e.value)


def test_chosen_keeps_each_methods_first_seed_model_that_loads_and_scores_its_top1(twice):
    """keep_models="chosen" (the default): <method>_seed0 has model.pt, which fastdelta.load rebuilds and
    which evaluates on the test set to the top-1 result.json records; the other schedules keep none."""
    import fastdelta
    (report, out), _ = twice
    test = arrays(seed=1)
    for m in ("l2_sp", "delta"):
        run_dir = out / "runs" / f"{m}_seed0"
        assert (run_dir / "model.pt").is_file()
        assert not (out / "runs" / f"{m}_seed0_exp" / "model.pt").exists()
        saved = json.loads((run_dir / "result.json").read_text())
        top1 = fastdelta.load(run_dir, architecture=tiny_net()).evaluate(test).top1
        assert top1 == pytest.approx(saved["test"]["top1"], abs=1e-6)
        assert f"`runs/{m}_seed0/model.pt`" in (out / "report.md").read_text()
    assert not list((out / "runs").glob("search*/**/model.pt"))  # search fits keep no weights


@pytest.mark.parametrize("keep", ["none", "all"])
def test_keep_models_none_saves_no_weights_and_all_every_final_runs(keep, tmp_path):
    cs = CompareSettings(search="none", curve_points=0, map_images=0, schedules=(), keep_models=keep)
    compare(tiny_net(), arrays(n_per_class=4), arrays(n_per_class=2, seed=1), methods=["l2", "l2_sp"], seeds=2,
            out=tmp_path, compare_settings=cs, **{**QUICK, "iterations": 2, "batch_size": 2})
    kept = sorted(p.parent.name for p in (tmp_path / "runs").rglob("model.pt"))
    assert kept == ([] if keep == "none" else ["l2_seed0", "l2_seed1", "l2_sp_seed0", "l2_sp_seed1"])


def test_keep_models_is_checked():
    with pytest.raises(SettingsError, match="keep_models"):
        CompareSettings(keep_models="best").validate()


def test_reuse_refits_a_final_run_whose_kept_model_is_missing(twice, tmp_path):
    """reuse_runs with keep_models="chosen": a finished run without model.pt (e.g. from a comparison that
    kept none) is fitted again, so its model is there afterwards."""
    import shutil
    (report, out), _ = twice
    shutil.copytree(out / "runs", tmp_path / "runs")
    (out / "channel_attention.json").is_file() and shutil.copy(out / "channel_attention.json", tmp_path)
    (tmp_path / "runs" / "l2_sp_seed0" / "model.pt").unlink()
    before = (tmp_path / "runs" / "delta_seed0" / "result.json").stat().st_mtime_ns
    compare(tiny_net(), arrays(n_per_class=5), arrays(seed=1), methods=["l2_sp", "delta"], seeds=1,
            out=tmp_path, compare_settings=CompareSettings(alpha_grid=(0.001, 0.1), curve_points=2, map_images=2,
                                                           reuse_runs=True), **QUICK)
    assert (tmp_path / "runs" / "l2_sp_seed0" / "model.pt").is_file()
    assert (tmp_path / "runs" / "delta_seed0" / "result.json").stat().st_mtime_ns == before  # reused
