"""benchmarks/slim_results.py and the slim outputs of fastdelta itself: what is cut, what points at what,
that readers see the same reports, and that a second run changes nothing."""
import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

from fastdelta.apps.compare.report import claims, load_report, markdown, report_path, shortest_float32
from fastdelta.attention.weights import ChannelAttention
from fastdelta.result import FitResult, load_history

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "benchmarks" / "results" / "reproduction_fashion_mnist_public_64px_2026-11-27" / "per_class_30"


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def full_attention(raw_scale: float = 1.0) -> dict:
    """A channel_attention.json as fastdelta writes it (weights and public_layout included)."""
    att = ChannelAttention.load(COMMITTED / "channel_attention.json")
    att.raw = [r * raw_scale for r in att.raw]
    return att.to_dict()


def history(n: int, every_test: int = 30) -> list:
    return [{"iteration": i, "ce": float(torch.tensor(2.0 / (i + 1)).item()), "reg": 0.1, "head": 0.01,
             "loss": 2.0 / (i + 1) + 0.11, "lr": 0.01 if i < 200 else 0.001,
             "test_top1": (50.0 + i / 10) if (i + 1) % every_test == 0 else None} for i in range(n)]


def run_folder(path: Path, att: dict = None, iterations: int = 300) -> None:
    path.mkdir(parents=True)
    result = json.loads(next(COMMITTED.glob("runs/delta_seed0/result.json")).read_text())
    result.pop("history", None)
    result["attention"]["file"] = "channel_attention.json"
    (path / "result.json").write_text(json.dumps(result, indent=1))
    (path / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history(iterations)))
    (path / "history.png").write_bytes(b"\x89PNG not read")
    if att is not None:
        (path / "channel_attention.json").write_text(json.dumps(att, indent=1))


def make_results(root: Path) -> Path:
    folder = root / "per_class_30"
    folder.mkdir(parents=True)
    report = load_report(COMMITTED)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    (folder / "report.md").write_text((COMMITTED / "report.md").read_text())
    final, search = full_attention(), full_attention(0.5)
    (folder / "channel_attention.json").write_text(json.dumps(final, indent=1))
    run_folder(folder / "runs" / "delta_seed0", final)
    (folder / "runs" / "delta_seed0" / "analysis.json").write_text(json.dumps({"filter_distances": {"s": [0.5, 1.25]}}))
    run_folder(folder / "runs" / "l2_seed0")
    run_folder(folder / "runs" / "search" / "delta_a0.1_b0.01", search)
    run_folder(folder / "runs" / "search" / "delta_a0.01_b0.01", search)
    image = Image.new("RGBA", (64, 48), (255, 255, 255, 255))
    image.paste((200, 30, 30, 255), (10, 10, 40, 30))
    image.save(folder / "table1.png", compress_level=0)
    return folder


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_slim_results_cuts_points_and_is_idempotent(tmp_path):
    root = tmp_path / "results"
    folder = make_results(root)
    original = json.loads((folder / "report.json").read_text())
    original_weights = ChannelAttention.load(folder / "channel_attention.json").weights
    png_pixels = Image.open(folder / "table1.png").tobytes()
    before = sum(len(b) for b in snapshot(root).values())

    assert load("slim_results").main(["--quiet", str(root)]) == 0
    after = snapshot(root)
    assert sum(len(b) for b in after.values()) < before / 5

    # report: gzipped, the same claims and report.md text, float32 noise gone only from the figures' data
    assert not (folder / "report.json").exists() and report_path(folder) == folder / "report.json.gz"
    slim = load_report(folder)
    assert slim == shortest_float32(original)
    assert claims(slim) == claims(original) and markdown(slim, slim["figures"]) == markdown(original, original["figures"])
    assert slim["table"] == original["table"] and slim["runs"][0]["test_top1"] == original["runs"][0]["test_top1"]

    # attention: the comparison's copy kept (compact, weights recomputed from raw), run copies point at it
    runs = folder / "runs"
    assert not (runs / "delta_seed0" / "channel_attention.json").exists()
    assert json.loads((runs / "delta_seed0" / "result.json").read_text())["attention"]["file"] == "../../channel_attention.json"
    kept = json.loads((folder / "channel_attention.json").read_text())
    assert "weights" not in kept and "public_layout" not in kept and "derived" in kept
    assert all(torch.equal(a, b) for a, b in zip(ChannelAttention.load(folder / "channel_attention.json").weights,
                                                 original_weights))
    # the search's shared attention (another one): the first search run keeps it, the other points at it
    search = runs / "search"
    assert (search / "delta_a0.01_b0.01" / "channel_attention.json").is_file()
    assert not (search / "delta_a0.1_b0.01" / "channel_attention.json").exists()
    assert json.loads((search / "delta_a0.1_b0.01" / "result.json").read_text())["attention"]["file"] == \
        "../delta_a0.01_b0.01/channel_attention.json"

    # histories: sampled and gzipped, history.png dropped, result.json says so
    for run in ("delta_seed0", "l2_seed0", "search/delta_a0.1_b0.01"):
        assert not (runs / run / "history.jsonl").exists() and not (runs / run / "history.png").exists()
        rows = load_history(runs / run)
        its = [r["iteration"] for r in rows]
        assert its[0] == 0 and its[-1] == 299 and set(range(0, 300, 15)) <= set(its)
        assert {i for i in range(300) if (i + 1) % 30 == 0} <= set(its)  # every test evaluation
        assert len(rows) == len(set(its)) < 40
        note = json.loads((runs / run / "result.json").read_text())["history"]
        assert (note["file"], note["rows"], note["of"], note["every"]) == ("history.sampled.jsonl.gz", len(rows), 300, 15)
    full, kept = history(300), load_history(runs / "l2_seed0")
    for row, i in ((kept[1], 15), (kept[-1], 299)):  # float32 values at their shortest digits: the same float32
        assert {k: v for k, v in row.items() if k != "ce"} == {k: v for k, v in full[i].items() if k != "ce"}
        assert torch.tensor(row["ce"], dtype=torch.float32) == torch.tensor(full[i]["ce"], dtype=torch.float32)

    # a first seed's analysis.json: compact, and says it was computed on the CPU (what compare does)
    assert json.loads((runs / "delta_seed0" / "analysis.json").read_text()) == {
        "device": "cpu", "filter_distances": {"s": [0.5, 1.25]}}

    # a figure re-encoded losslessly
    assert Image.open(folder / "table1.png").tobytes() == png_pixels

    # again: nothing changes
    load("slim_results").main(["--quiet", str(root)])
    assert snapshot(root) == after


def test_readers_take_the_slim_report(tmp_path):
    """The reproduction summary is the same from report.json and from report.json.gz."""
    plain = tmp_path / "plain"
    make_results(plain)
    slim = tmp_path / "slim"
    shutil.copytree(plain, slim)
    load("slim_results").main(["--quiet", str(slim)])
    mod = load("reproduce_fashion_mnist")
    for folder in (plain, slim):
        mod.main(["--out", str(folder), "--sizes", "10,30,100", "--summary-only", "--command", "c"])
    assert (slim / "README.md").read_text() == (plain / "README.md").read_text()
    assert "| DELTA |" in (slim / "README.md").read_text()


def test_refresh_reports_keeps_a_gzipped_report_gzipped(tmp_path):
    folder = make_results(tmp_path / "r")
    load("slim_results").main(["--quiet", str(tmp_path / "r")])
    data = (folder / "report.json.gz").read_bytes()
    load("refresh_reports").main([str(folder)])
    assert not (folder / "report.json").exists() and (folder / "report.json.gz").read_bytes() == data
    assert json.loads(gzip.decompress(data))["claims"] == claims(load_report(folder))


def test_fit_result_save_without_plots_and_with_a_shared_attention(tmp_path):
    att = ChannelAttention(["a", "b"], [torch.arange(4.0, dtype=torch.float64), torch.tensor([1.0, 3.0], dtype=torch.float64)])
    rows = history(5)
    res = FitResult(model=nn.Linear(2, 2), method="delta", settings={}, model_info={"arch": "tiny"}, data={},
                    history=rows, attention=att)
    att.save(tmp_path / "channel_attention.json")
    run = res.save(tmp_path / "runs" / "delta_seed0", weights=False, plots=False,
                   attention_at=tmp_path / "channel_attention.json")
    assert sorted(p.name for p in run.iterdir()) == ["history.jsonl", "result.json"]
    assert json.loads((run / "result.json").read_text())["attention"]["file"] == "../../channel_attention.json"
    assert load_history(run) == rows
    # another attention on disk: the fit's own copy is written
    ChannelAttention(["a", "b"], [torch.zeros(4, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]).save(
        tmp_path / "other.json")
    run = res.save(tmp_path / "runs" / "delta_seed1", weights=False, plots=False, attention_at=tmp_path / "other.json")
    assert (run / "channel_attention.json").is_file()
    assert json.loads((run / "result.json").read_text())["attention"]["file"] == "channel_attention.json"
    # the default still draws history.png
    run = res.save(tmp_path / "runs" / "delta_seed2", weights=False)
    assert (run / "history.png").is_file() and (run / "channel_attention.json").is_file()


def test_palette_keeps_a_plot_within_the_error_bound_and_a_photo_lossless(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(4, 3))
    for k in range(5):
        ax.plot(np.sin(np.linspace(0, 6, 200) + k), label=f"curve {k}")
    ax.legend()
    fig.savefig(tmp_path / "fig3_curves.png", dpi=80)
    plt.close(fig)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    plot_before, photo_before = Image.open(tmp_path / "fig3_curves.png"), Image.open(tmp_path / "photo.png")
    plot_pixels = np.asarray(plot_before.convert("RGB"), dtype=int)
    plot_size, photo_pixels = (tmp_path / "fig3_curves.png").stat().st_size, photo_before.tobytes()

    assert load("slim_results").main(["--quiet", "--palette", str(tmp_path)]) == 0
    after = snapshot(tmp_path)
    plot = Image.open(tmp_path / "fig3_curves.png")
    error = np.abs(np.asarray(plot.convert("RGB"), dtype=int) - plot_pixels)
    assert plot.mode == "P" and (tmp_path / "fig3_curves.png").stat().st_size < plot_size / 2
    assert error.max() <= load("slim_results").PALETTE_MAX_ERROR and error.mean() < 1 and error.max() > 0
    assert "256-colour palette" in plot.text["fastdelta-slim"]
    # a photo's colours do not fit a palette within the bound: kept lossless
    assert Image.open(tmp_path / "photo.png").tobytes() == photo_pixels
    # again: nothing changes
    load("slim_results").main(["--quiet", "--palette", str(tmp_path)])
    assert snapshot(tmp_path) == after
