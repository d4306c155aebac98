"""The benchmark scripts run (tiny sizes) and check their own correctness figures."""
import importlib.util
import json
import os

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
    from fastdelta.attention import ChannelAttention
    raw = [torch.arange(20, dtype=torch.float64), torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)]
    ChannelAttention(["a", "b"], raw).save(tmp_path / "x.json")
    ChannelAttention(["a", "b"], [raw[0].flip(0), raw[1]]).save(tmp_path / "y.json")
    rows = load("compare_attention").compare(str(tmp_path / "x.json"), str(tmp_path / "y.json"))
    assert [(r["spearman"], r["top10_overlap"]) for r in rows] == [(-1.0, 0.0), (1.0, 1.0)]
