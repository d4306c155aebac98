"""`fastdelta compare` on a tiny generated dataset: every file, the documented schema, valid figures,
the same numbers for the same seed, and clear errors for bad settings."""
import copy
import json
import struct
import zlib

import numpy as np
import pytest

from fastdelta import SettingsError
from fastdelta.compare.comparison import (CompareSettings, compare, stratified_folds, stratified_split,
                                          validation_split)
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


def test_cross_validated_search_scores_the_mean_over_folds(tmp_path):
    import dataclasses
    cs = dataclasses.replace(SETTINGS, folds=3, schedules=("step",), curve_points=0)
    report = compare(tiny_net(), arrays(n_per_class=6), arrays(seed=1), methods=["l2_sp", "delta"], seeds=1,
                     out=tmp_path, compare_settings=cs, **QUICK)
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
    from fastdelta.compare.comparison import _TensorSet, fast_top1
    from fastdelta.train.evaluate import evaluate
    from fastdelta.train.loop import make_loader
    net = tiny_net(num_classes=3).eval()
    x = torch.randn(37, 3, 12, 12)
    y = torch.randint(0, 3, (37,))
    data = _TensorSet(x, y, ["a", "b", "c"])
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
    from fastdelta.compare.comparison import _TensorSet
    from fastdelta.train.evaluate import evaluate
    from fastdelta.train.loop import make_loader
    net = tiny_net(num_classes=3).eval()
    x = torch.randn(37, 3, 12, 12)
    y = torch.randint(0, 3, (37,))
    with torch.no_grad():
        ref = 100.0 * (copy.deepcopy(net).double()(x.double()).argmax(1) == y).sum().item() / 37
    loader = make_loader(_TensorSet(x, y, ["a", "b", "c"]), 8, False, 0, 0)
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
                    out=resumed, compare_settings=dataclasses.replace(SETTINGS, reuse_search=True), **QUICK)
    by_key = {(r["method"], r["alpha"]): r for r in again["search"]["results"]}
    assert by_key[("l2_sp", 0.1)]["reused"] and by_key[("l2_sp", 0.1)]["val_top1"] == 100.0
    assert again["chosen"]["l2_sp"]["alpha"] == 0.1
    assert not by_key[("delta", 0.001)]["reused"]
    assert by_key[("l2_sp", 0.001)]["reused"] and by_key[("delta", 0.1)]["reused"]
    first = {(r["method"], r["alpha"]): r["val_top1"] for r in report["search"]["results"]}
    assert by_key[("delta", 0.001)]["val_top1"] == first[("delta", 0.001)]  # refitted: same seed, same number
    assert json.loads(other.read_text())["settings"]["iterations"] == QUICK["iterations"]


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
                    out=resumed, compare_settings=dataclasses.replace(SETTINGS, reuse_search=True), **QUICK)
    by_key = {(r["method"], r["alpha"]): r for r in again["search"]["results"]}
    assert not by_key[("delta", 0.1)]["reused"] and by_key[("l2_sp", 0.1)]["reused"]


@pytest.mark.parametrize("means, verdict", [
    ({"l2": 80.0, "l2_sp": 79.0, "delta_no_att": 78.0, "delta": 82.0}, "DELTA has the best mean, by 2.00 at least: less than"),
    ({"l2": 80.0, "l2_sp": 79.0, "delta_no_att": 70.0, "delta": 85.0}, "DELTA has the best mean, by more than"),
    ({"l2": 80.0, "l2_sp": 79.0, "delta_no_att": 70.0, "delta": 78.0}, "does not beat L2, L2-SP: behind by up to 2.00, within"),
    ({"l2": 90.0, "l2_sp": 79.0, "delta_no_att": 70.0, "delta": 78.0}, "does not beat L2, L2-SP: behind by up to 12.00, more than"),
])
def test_accuracy_claim_text_says_what_the_margin_is(means, verdict):
    from fastdelta.compare.report import claims
    table = {m: {"mean": v, "std": 3.0 if m == "delta" else 0.5} for m, v in means.items()}
    c = claims({"table": table, "activation_maps": {"images": []}})["accuracy"]
    assert c["holds"] == (means["delta"] > max(v for m, v in means.items() if m != "delta"))
    assert verdict in c["text"], c["text"]
