"""The benchmark scripts run (tiny sizes) and check their own correctness figures."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_attention_smoke(tmp_path):
    out = tmp_path / "att.json"
    result = load("bench_attention").main(["--model", "resnet18", "--size", "32", "--images", "4", "--classes", "5",
                                           "--public-channels", "3", "--out", str(out)])
    assert json.load(open(out))["device"] == result["device"]
    assert [r["layer"] for r in result["layers"]] == ["layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]
    for row in result["layers"]:
        assert row["exact_vs_public_max_rel_diff"] < 1e-4  # the fast exact path = the public method
        assert set(row["speedup_vs_public"]) == {"exact_fp32", "exact_bf16", "first_order"}
    assert result["layers"][-1]["path"] == "closed_form"


def test_compare_attention(tmp_path):
    import torch
    from fastdelta.attention.weights import ChannelAttention
    raw = [torch.arange(20, dtype=torch.float64), torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)]
    ChannelAttention(["a", "b"], raw).save(tmp_path / "x.json")
    ChannelAttention(["a", "b"], [raw[0].flip(0), raw[1]]).save(tmp_path / "y.json")
    rows = load("compare_attention").compare(str(tmp_path / "x.json"), str(tmp_path / "y.json"))
    assert [(r["spearman"], r["top10_overlap"]) for r in rows] == [(-1.0, 0.0), (1.0, 1.0)]


def test_reproduction_summary_from_reports(tmp_path):
    """--summary-only rebuilds the combined README from per-size reports (sizes run as separate processes)."""
    def report(delta_mean):
        table = {m: {"mean": v, "std": 1.0} for m, v in
                 [("l2_fe", 12.0), ("l2", 60.0), ("l2_sp", 61.0), ("l2_sp_att", 59.0), ("delta_no_att", None),
                  ("delta", delta_mean)]}
        return {"environment": {"device": "cpu (2 cores)", "torch": "x", "date": "2026-11-26"},
                "settings": {"crop": 64, "resize": 73, "iterations": 100, "batch_size": 32},
                "table": table, "best": max((t["mean"], m) for m, t in table.items() if t["mean"] is not None)[1],
                "chosen": {"delta": {"alpha": 0.01}},
                "claims": {"accuracy": {"holds": delta_mean > 61.0, "text": "t"}}}
    for n, delta in [(10, 70.0), (30, 50.0)]:
        (tmp_path / f"per_class_{n}").mkdir()
        (tmp_path / f"per_class_{n}" / "report.json").write_text(json.dumps(report(delta)))
    load("reproduce_fashion_mnist").main(["--out", str(tmp_path), "--sizes", "10,30,100", "--summary-only",
                                          "--command", "the commands"])
    text = (tmp_path / "README.md").read_text()
    assert "Command: `the commands`" in text and "64x64 crops (resize 73)" in text
    assert "| method | 10/class | 30/class |" in text  # 100/class has no report: no column
    assert "| DELTA | **70.00 ± 1.00** (α 0.01) | 50.00 ± 1.00 (α 0.01) |" in text
    assert "DELTA 70.0 > L2-SP 61.0 > L2 60.0 > L2-SP(ATT) 59.0 > L2-FE 12.0; diverged: DELTA w/o ATT" in text
    assert "**accuracy: holds.**" in text and "**accuracy: does not hold.**" in text
    assert "| L2 | - | - |" in text  # reports without runs: no paired difference to show
    # notes written by hand in NOTES.md go in after the preamble and survive the next regeneration
    (tmp_path / "NOTES.md").write_text("## Notes (written by hand)\n\nSuperseded by another run.\n")
    for _ in range(2):
        load("reproduce_fashion_mnist").main(["--out", str(tmp_path), "--sizes", "10,30", "--summary-only",
                                              "--command", "the commands"])
        text = (tmp_path / "README.md").read_text()
        assert text.count("Superseded by another run.") == 1
        assert text.index("the test set") < text.index("## Notes (written by hand)") < text.index("## Table 1 analog")


def test_related_source_overview_pairs_seeds(tmp_path):
    """The overview puts every recipe x size side by side and pairs DELTA with another method seed by seed."""
    methods = ["l2_fe", "l2", "l2_sp", "l2_sp_att", "delta_no_att", "delta"]

    def report(delta_by_seed):
        runs = [{"method": m, "seed": s, "schedule": "step", "test_top1": 70.0 + s} for m in methods[:-1] for s in range(3)]
        runs += [{"method": "delta", "seed": s, "schedule": "step", "test_top1": v} for s, v in enumerate(delta_by_seed)]
        runs.append({"method": "delta", "seed": 0, "schedule": "exp", "test_top1": 0.0})  # not paired
        table = {m: {"mean": 71.0, "std": 1.0} for m in methods}
        return {"runs": runs, "table": table, "best": "l2", "settings": {"recipe": "public", "feature_map": "conv"}}
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "source.json").write_text(json.dumps(
        {"train_images": 30000, "classes": ["a"], "test_top1": 90.0, "weights_sha256": "abc", "command": "c"}))
    for name, n, delta in [("public", 30, [72.0, 72.0, 72.0]), ("public", 10, [70.0, 73.0, 71.0]),
                           ("paper", 10, [69.0, 70.0, 71.0])]:
        (tmp_path / name / f"per_class_{n}").mkdir(parents=True)
        (tmp_path / name / f"per_class_{n}" / "report.json").write_text(json.dumps(report(delta)))
    load("reproduce_related_source").main(["overview", "--out", str(tmp_path), "--command", "the command"])
    text = (tmp_path / "README.md").read_text()
    assert "| method | paper, 10/class | public, 10/class | public, 30/class |" in text
    assert "| L2 | **71.00 ± 1.00** | **71.00 ± 1.00** | **71.00 ± 1.00** |" in text
    # DELTA - L2 per seed: paper 69-70, 70-71, 71-72 -> -1 each; public/10 70-70, 73-71, 71-72 -> 0, +2, -1
    assert "| L2 | -1.00 ± 0.00 (-1.00, -1.00, -1.00) | +0.33 ± 1.53 (+0.00, +2.00, -1.00) |" in text
    # DELTA paper - DELTA public at 10/class: 69-70, 70-73, 71-71
    assert "| paper, 10/class | -1.33 ± 1.53 (-1.00, -3.00, +0.00) |" in text
    (tmp_path / "NOTES.md").write_text("## Notes (written by hand)\n\n- why this run\n")
    load("reproduce_related_source").main(["overview", "--out", str(tmp_path), "--command", "the command"])
    text = (tmp_path / "README.md").read_text()
    assert text.index("- `public` ([README]") < text.index("- why this run") < text.index("## Test top-1")


def test_bench_cpu_layout_smoke(tmp_path):
    out = tmp_path / "layout.json"
    result = load("bench_cpu_layout").main(["--size", "32", "--batch", "4", "--eval-batch", "8", "--repeats", "1",
                                            "--out", str(out)])
    assert set(result["rows"]) == {"train_l2", "train_delta", "eval_forward"}
    assert all(r["contiguous_ms"] > 0 and r["channels_last_ms"] > 0 for r in result["rows"].values())
    assert json.load(open(out))["rows"] == result["rows"]


def test_reproduction_passes_its_command_line_to_compare(tmp_path, monkeypatch):
    """Every size gets the same fit settings from the command line (recipe, crop, --set, search reuse); a
    size whose report exists is not rerun."""
    mod = load("reproduce_fashion_mnist")
    calls = []
    monkeypatch.setattr(mod, "compare", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(mod, "load_fashion_mnist", lambda split: (None, None))
    monkeypatch.setattr(mod, "few_shot_subset", lambda x, y, n, seed: ("subset", n))
    monkeypatch.setattr(mod, "write_summary", lambda *a, **kw: None)
    (tmp_path / "per_class_100").mkdir()
    (tmp_path / "per_class_100" / "report.json").write_text("{}")
    mod.main(["--out", str(tmp_path), "--sizes", "10,100", "--image-size", "64", "--iterations", "7",
              "--recipe", "paper", "--set", "feature_scale=source_energy", "--set", "nesterov=true",
              "--methods", "l2,delta", "--reuse-search"])
    assert len(calls) == 1
    (model, train, test), kw = calls[0]
    assert (model, train) == ("efficientnet_lite0", ("subset", 10))
    assert kw["methods"] == ["l2", "delta"] and kw["out"] == tmp_path / "per_class_10"
    assert (kw["crop"], kw["resize"], kw["iterations"], kw["recipe"]) == (64, 73, 7, "paper")
    assert kw["feature_scale"] == "source_energy" and kw["nesterov"] is True
    assert kw["compare_settings"].reuse_runs is True and kw["search"] == "alpha"


@pytest.mark.filterwarnings("ignore:fastdelta. NO PRE-TRAINED WEIGHTS")
def test_tap_form_probe_leaves_the_bn_statistics_as_they_were():
    """The diagnosis measures a batch in train mode between steps; the training it observes must not see it."""
    import torch
    from fastdelta.methods import make_method
    from fastdelta.networks.models import build_networks
    mod = load("diagnose_tap_forms")
    nets = build_networks("resnet18", 3, None, None, 0)
    reg = make_method("delta_no_att", nets.target, nets.source, nets.head_name, nets.layers, None, alpha=1e-4,
                      beta=0.01, weight_decay=1e-4, feature_map="relu_conv", delta_no_att_scale="sum")
    nets.target.train()
    before = {k: v.clone() for k, v in nets.target.state_dict().items() if "running" in k or "num_batches" in k}
    probe = mod.measure(reg, nets.target, nets.source, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    after = nets.target.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    assert abs(sum(row["share"] for row in probe["layers"].values()) - 1.0) < 1e-9


@pytest.mark.filterwarnings("ignore:fastdelta. NO PRE-TRAINED WEIGHTS")
def test_bench_step_delta_rows_stay_finite_on_deep_random_resnets():
    """A random ResNet's fresh BN statistics (mean 0, var 1) let the eval-mode source's deep taps reach an
    rms of ~1e4 against ~0.5 for the target, and DELTA's term overflowed within a few steps (the smoke CNN
    is too shallow to show it). With the BN statistics calibrated and the method's default hyperparameters,
    identical for both engines, every row of ResNet-50 and ResNet-101 is finite (3 steps, 64 px, batch 2)."""
    import math
    import torch
    from fastdelta.apps.bench import measure, networks
    from fastdelta.train.steps import resolve_step_options
    cpu = torch.device("cpu")
    fast = resolve_step_options(cpu, "fp32", "off", False, False, "fast")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU a thread team waits on its descheduled members: 3-30x slower
    try:
        for model in ("resnet50", "resnet101"):
            for engine, options in (("public", None), ("fastdelta", fast)):
                row = measure.measure(model, "delta", engine, 2, 64, 10, cpu, warmup=1, iters=1, options=options)
                assert "error" not in row and row["finite"] is True and row["steps"] == 3, row
                assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("ms_per_step", "img_per_s")), row
                assert (row["alpha"], row["beta"], row["lr"]) == (1e-4, 0.01, 0.01)
                assert row["bn_calibration"]["batches"] == networks.CALIBRATION_BATCHES
                assert row["bn_calibration"]["batch"] >= 8  # enough values per channel at the 2x2 last stage
    finally:
        torch.set_num_threads(threads)
        networks.CALIBRATED.clear()


def test_bench_step_rows_are_checked_for_non_finite_steps(monkeypatch):
    """A row whose steps go non-finite is an error, not a timing (the public step had no check)."""
    import torch
    from fastdelta.apps.bench import measure, networks
    monkeypatch.setattr(measure, "bench_hyperparameters",
                        # finite (a method refuses an infinite alpha), but alpha x the term overflows fp32
                        lambda method: {"alpha": 1e38, "beta": 0.01, "lr": 0.01, "momentum": 0.9,
                                        "weight_decay": 1e-4})
    for engine in ("public", "fastdelta"):
        from fastdelta.train.steps import resolve_step_options
        options = resolve_step_options(torch.device("cpu"), "fp32", "off", False, False, "fast") \
            if engine == "fastdelta" else None
        with pytest.raises(FloatingPointError, match="non-finite"):
            measure.measure("smoke", "delta", engine, 2, 16, 10, torch.device("cpu"), 0, 1, options)
    networks.CALIBRATED.clear()


def test_step_timer_synchronises_the_stop_event_before_reading_cuda_events():
    """CUDA's elapsed_time needs both events completed; the non-deferred loop asks right after recording
    the stop event (the update still queued), so StepTimer.seconds must synchronise it first."""
    import torch
    from fastdelta.train.deferred_reads import StepTimer
    calls = []

    class FakeEvent:
        def __init__(self, name):
            self.name = name

        def record(self):
            calls.append((self.name, "record"))

        def synchronize(self):
            calls.append((self.name, "synchronize"))

        def elapsed_time(self, other):
            calls.append((self.name, "elapsed_time", other.name))
            if (other.name, "synchronize") not in calls:
                raise RuntimeError("CUDA error: device not ready")  # what CUDA does for a pending event
            return 250.0

    timer = StepTimer(torch.device("cpu"))
    timer.cuda = True  # the CUDA path, with events that record what is done to them
    timer.marks = [[FakeEvent(f"start{i}"), FakeEvent(f"stop{i}")] for i in range(2)]
    timer.start(3)
    timer.stop(3)
    assert timer.seconds(3) == 0.25
    assert calls == [("start1", "record"), ("stop1", "record"), ("stop1", "synchronize"),
                     ("start1", "elapsed_time", "stop1")]


def test_session_summary_reads_step_and_anchor_rows(tmp_path):
    """benchmarks/bench_step.py summary: anchor rows next to the step rows, ratios to the public
    re-implementation, every part's exit status; the text ends with the parts table (no torch import)."""
    mod = load("bench_step")
    (tmp_path / "bench_step_gpu").mkdir()
    timing = {"model": "resnet101", "batch": 64, "size": 224, "first_step_s": 1.0, "peak_gib": 5.0}
    rows = [dict(timing, method="delta", engine="public", ms_per_step=66.0, img_per_s=969.7),
            dict(timing, method="delta", engine="fastdelta", ms_per_step=33.0, img_per_s=1939.4),
            {"model": "resnet101", "method": "l2", "engine": "fastdelta", "error": "RuntimeError: x"}]
    (tmp_path / "bench_step_gpu" / "bench_step.json").write_text(json.dumps(
        {"rows": rows, "environment": {"gpu": "NVIDIA H200", "torch": "2.11"},
         "config": {"batch": 64, "size": 224, "iters": 20, "warmup": 5}}))
    (tmp_path / "anchor.json").write_text(json.dumps({
        "env": {}, "step/resnet101/delta/amp=0/cl=0/compile=0": {"ms_per_step": 66.02, "img_per_s": 969,
                                                                 "first_step_s": 0.3, "peak_gib": 9.45},
        "step/resnet101/l2sp/amp=1/cl=1/compile=0": "FAILED OutOfMemoryError"}))
    (tmp_path / "status.tsv").write_text("step/delta\t0\t120\t160\npreflight\t124\t75\t75\ndistance\tskipped\t0\t60\n")
    text = mod.summary(tmp_path)
    assert "delta: fastdelta 1,939.4 img/s = 2.00x the public re-implementation" in text
    assert "| resnet101 | delta | anchor fp32 | 969.0 | 66.02 | 1.00x | 0.30 | 9.45 |" in text
    assert "| resnet101 | delta | fastdelta | 1,939.4 | 33.00 | 2.00x | 1.00 | 5.00 |" in text
    assert "| resnet101 | l2 | fastdelta | error: RuntimeError: x |" in text
    assert "| resnet101 | l2_sp | anchor bf16+cl | error: FAILED OutOfMemoryError |" in text
    assert text.rstrip("\n").splitlines()[-3:] == ["| step/delta | 0 | 120 | 160 |",
                                                  "| preflight | 124 (timed out) | 75 | 75 |",
                                                  "| distance | skipped | 0 | 60 |"]


def test_public_step_is_the_six_methods_and_refuses_others():
    """The public recipe's step is a fixed transcription: it agrees with fastdelta's own terms at step 0
    (public conventions: raw conv taps, DELTA w/o ATT as 0.5 sum ||d||^2) and refuses a method it lacks."""
    import copy
    import torch
    import torch.nn.functional as F
    from fastdelta.apps.bench.public_step import PublicStep
    from fastdelta.methods import METHODS, make_method
    from fastdelta.features.hooks import FeatureTaps
    from fastdelta.networks.models import build_networks
    from tiny import TINY_LAYERS, tiny_net
    torch.manual_seed(0)
    nets0 = build_networks(tiny_net(), 3, None, TINY_LAYERS, 0)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    att = [torch.softmax(torch.randn(8), 0), torch.softmax(torch.randn(16), 0)]
    assert set(PublicStep.FORMULAS) == set(METHODS)
    for method in METHODS:
        nets = copy.deepcopy(nets0)
        reg = make_method(method, nets.target, nets.source, nets.head_name, nets.layers,
                          att if METHODS[method].uses_attention else None, alpha=0.3, beta=0.2, weight_decay=0.05,
                          feature_map="conv")
        freeze = METHODS[method].freezes_extractor
        nets.target.train(not freeze)
        taps = reg.taps if reg.uses_source_features else nets.layers  # only the feature-map methods read taps
        with FeatureTaps(nets.target, taps) as tt, FeatureTaps(nets.source.eval(), taps) as ts:
            logits, t_feats = tt(x)
            _, s_feats = ts(x)
        terms = reg.terms(t_feats, s_feats) if reg.uses_source_features else reg.terms()
        # the public step applies weight decay inside SGD: its loss is the cross-entropy alone
        want = F.cross_entropy(logits, y) + (0 if METHODS[method].uses_weight_decay else terms.reg + terms.head)
        got = PublicStep(copy.deepcopy(nets0), method, att, alpha=0.3, beta=0.2, wd=0.05).step(x, y)
        assert float(got) == pytest.approx(float(want), rel=1e-5), method
    with pytest.raises(ValueError, match="no step for method 'l1_sp'"):
        PublicStep(copy.deepcopy(nets0), "l1_sp", att)


def test_paired_reports_pairs_methods_by_seed(tmp_path):
    """benchmarks/paired_reports.py: A − B per seed for each method of both runs, and which came out identical."""
    def report(folder, delta):
        runs = [{"method": "l2", "seed": s, "schedule": "step", "test_top1": 70.0 + s} for s in range(3)]
        runs += [{"method": "delta", "seed": s, "schedule": "step", "test_top1": v} for s, v in enumerate(delta)]
        runs.append({"method": "delta", "seed": 0, "schedule": "exp", "test_top1": 0.0})  # not paired
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps({"runs": runs, "table": {"l2": {}, "delta": {}}}))
    report(tmp_path / "a", [72.0, 73.0, 71.0])
    report(tmp_path / "b", [71.0, 71.0, 71.0])
    rows = load("paired_reports").main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert "| L2 | +0.00 ± 0.00 (+0.00, +0.00, +0.00) | yes |" in rows
    assert "| DELTA | +1.00 ± 1.00 (+1.00, +2.00, +0.00) | no |" in rows


def test_alpha_range_summary_keeps_the_environment_that_measured_the_rows(tmp_path):
    """A --summary-only rewrite measures nothing: the report keeps the measuring process's machine and thread
    count, not the rewriting one's (which would say 2 threads for single-threaded runs)."""
    rows = [{"variant": "public", "settings": {}, "alpha": a, "test_top1": t, "status": "ok"}
            for a, t in ((1e-4, 75.0), (1e-3, 70.0))]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    measured = {"device": "cpu (2 cores)", "cpu_threads": 1, "cpu_model": "the measuring machine"}
    (tmp_path / "alpha_range.json").write_text(json.dumps({"environment": measured}))
    mod = load("alpha_range")
    args = ["--out", str(tmp_path), "--variant", "x={}", "--alphas", "0.0001,0.001", "--summary-only"]
    mod.main(args + ["--command", "the command"])
    report = json.loads((tmp_path / "alpha_range.json").read_text())
    assert report["environment"] == measured and report["command"] == "the command"
    assert "| public | `{}` | 75.00 | 70.00 |" in (tmp_path / "alpha_range.md").read_text()
    (tmp_path / "alpha_range.json").unlink()  # nothing recorded: the summary names its own process
    mod.main(args)
    assert json.loads((tmp_path / "alpha_range.json").read_text())["environment"]["cpu_threads"] >= 1


def test_diagnosis_table_gives_the_figures_the_tap_form_readme_quotes(tmp_path):
    """`diagnose_tap_forms.py --table-only` rewrites diagnosis.md from a committed diagnosis.json; its
    ReLU-of-pre-BN row is the one the 2026-11-27 tap-form README quotes (the collapse's evidence)."""
    import shutil
    committed = os.path.join(ROOT, "benchmarks", "results", "tap_forms_cpu_2026-11-27", "diagnosis", "diagnosis.json")
    shutil.copy(committed, tmp_path / "diagnosis.json")
    load("diagnose_tap_forms").main(["--out", str(tmp_path), "--table-only"])
    lines = (tmp_path / "diagnosis.md").read_text().splitlines()
    assert len(lines) == 2 + 6
    assert "| delta | relu_conv | 70.35 | 21.8 -> 4.9 | -0.24 | 1.50 / 0.58 / 3.61 | 0.77 | 0.57 / 0.44 | " \
           "0.99 / 0.95 | 0.018 / 0.011 |" in lines
    readme = open(os.path.join(ROOT, "benchmarks", "results", "tap_forms_cpu_2026-11-27", "README.md")).read()
    assert "| DELTA | relu_conv | 70.35 | 21.8 -> 4.9 | -0.24 | 1.50 / 0.58 / **3.61** | **0.77** | 0.57 / 0.44 |" in readme


def test_paired_rows_pairs_any_two_row_sets_by_seed_with_the_reports_rule():
    """paired_rows.py gives the committed paired figures from their rows: a row log with seeds, one
    log per `seedN` folder, and a comparison's report."""
    mod = load("paired_rows")
    res = os.path.join(ROOT, "benchmarks", "results")
    forms = os.path.join(res, "tap_forms_cpu_2026-12-05", "runs.jsonl")
    assert mod.main(["--a", forms, "--a-where", "method=delta", "feature_map=activation",
                     "--b", forms, "--b-where", "method=l2"]) == "+1.17 ± 0.50 (+0.67, +1.67, +1.16): holds (seeds [0, 1, 2])"
    taps = [os.path.join(res, "alpha_range_cpu_2026-12-05", "taps_check", f"seed{s}", "runs.jsonl") for s in range(3)]
    assert mod.main(["--a", *taps, "--a-where", "variant=taps_without_conv_head", "--b", *taps,
                     "--b-where", "variant=public"]) == "+1.55 ± 1.53 (+2.37, -0.21, +2.49): holds (seeds [0, 1, 2])"
    fold5 = os.path.join(res, "reproduction_fashion_mnist_public_64px_5fold_2026-12-06", "per_class_30")
    assert mod.main(["--a", fold5, "--a-where", "method=l2_sp_att", "--b", fold5, "--b-where", "method=l2"]) \
        == "+0.77 ± 0.85 (+1.57, +0.85, -0.12): not decided (seeds [0, 1, 2])"
    with pytest.raises(SystemExit):  # every delta row of seed 0 matches: ambiguous, refused
        mod.main(["--a", forms, "--a-where", "method=delta", "--b", forms, "--b-where", "method=l2"])
