"""Checkpoints: corruption is detected, resume is exact, a killed run continues to the same weights."""
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import fastdelta
from fastdelta.train.checkpoint import CheckpointError, checkpoint_files, load_latest, save_checkpoint
from tiny import TINY_LAYERS, arrays, fit_killed_and_resumed, tiny_net

QUICK = dict(batch_size=4, resize=16, crop=12, progress=False, attention_head_epochs=1, eval_batch_size=8)




def test_truncated_or_flipped_checkpoint_falls_back_to_the_previous(tmp_path):
    for it in (1, 2, 3):
        save_checkpoint(tmp_path, it, {"iteration": it, "w": torch.arange(1000) * it})
    assert [p.name for p in checkpoint_files(tmp_path)] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    latest = checkpoint_files(tmp_path)[-1]
    good = latest.read_bytes()
    latest.write_bytes(good[: len(good) // 2])  # torn write
    with pytest.warns(UserWarning, match="truncated|corrupt"):
        assert load_latest(tmp_path)["iteration"] == 2
    flipped = bytearray(good)
    flipped[len(flipped) - 100] ^= 0x01  # one bit in the payload
    latest.write_bytes(bytes(flipped))
    with pytest.warns(UserWarning, match="checksum"):
        assert load_latest(tmp_path)["iteration"] == 2
    checkpoint_files(tmp_path)[0].write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_latest(tmp_path)
    assert load_latest(tmp_path / "none") is None


def test_resume_from_an_earlier_checkpoint_is_bitwise_exact(tmp_path):
    kw = dict(method="delta", layers=TINY_LAYERS, iterations=12, checkpoint_every=4, **QUICK)
    full, resumed = fit_killed_and_resumed(tmp_path / "a", **kw)  # killed after iteration 8
    assert resumed.settings["resumed_from_iteration"] == 8
    assert len((tmp_path / "a" / "history.jsonl").read_text().splitlines()) == 12


def test_resume_with_other_settings_is_a_clear_error(tmp_path):
    kw = dict(layers=TINY_LAYERS, iterations=4, checkpoint_every=2, **QUICK)
    fastdelta.fit(tiny_net(), arrays(), None, method="l2", run_dir=str(tmp_path), **kw)
    with pytest.raises(fastdelta.SettingsError, match="method: checkpoint 'l2' vs now 'l2_sp'"):
        fastdelta.fit(tiny_net(), arrays(), None, method="l2_sp", run_dir=str(tmp_path), resume=True, **kw)
    with pytest.raises(fastdelta.SettingsError, match="data"):
        fastdelta.fit(tiny_net(), arrays(5), None, method="l2", run_dir=str(tmp_path), resume=True, **kw)
    with pytest.raises(fastdelta.SettingsError, match="needs run_dir"):
        fastdelta.fit(tiny_net(), arrays(), None, method="l2", resume=True, **kw)


def _folder(root):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")
    return root


def test_kill_minus_9_then_resume_reaches_the_same_weights(tmp_path):
    data = _folder(tmp_path / "data")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pt")
    args = ["--data", str(data), "--model", "resnet18", "--weights", str(tmp_path / "w.pt"), "--method", "delta_no_att",
            "--iterations", "30", "--batch-size", "4", "--resize", "16", "--crop", "16", "--checkpoint-every", "10",
            "--no-progress"]
    fit = [sys.executable, "-m", "fastdelta", "fit"]
    ref = subprocess.run(fit + args + ["--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen(fit + args + ["--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "ckpt-00000020.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its 2nd checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "result.json").exists()
    lines_at_kill = len((run / "history.jsonl").read_text().splitlines())
    assert 20 <= lines_at_kill < 30
    resumed = subprocess.run(fit + args + ["--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = torch.load(tmp_path / "ref" / "model.pt"), torch.load(run / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref_hist = (tmp_path / "ref" / "history.jsonl").read_text().splitlines()
    run_hist = (run / "history.jsonl").read_text().splitlines()
    assert len(run_hist) == 30
    strip = lambda line: {k: v for k, v in json.loads(line).items() if not k.endswith("_s")}  # timings differ
    assert [strip(l) for l in run_hist] == [strip(l) for l in ref_hist]
    assert json.load(open(run / "result.json"))["settings"]["resumed_from_iteration"] >= 20


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def test_long_run_memory_is_flat_and_history_grows_linearly(tmp_path):
    samples, stop = [], threading.Event()
    history = tmp_path / "history.jsonl"

    def sample():
        while not stop.is_set():
            if history.exists():
                text = history.read_bytes()
                samples.append((text.count(b"\n"), len(text), _rss_mb()))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fastdelta.fit(tiny_net(), arrays(), None, method="delta_no_att", layers=TINY_LAYERS, iterations=2000,
                      run_dir=str(tmp_path), checkpoint_every=500, **QUICK)
    finally:
        stop.set()
        sampler.join()
    assert len(history.read_text().splitlines()) == 2000
    early = [rss for lines, _, rss in samples if 200 <= lines < 400]
    late = [rss for lines, _, rss in samples if lines >= 1600]
    assert early and late, samples[:3]
    growth = max(late) - min(early)
    assert growth < 40, f"RSS grew {growth:.1f} MB from iteration ~200 to 2000"
    per_line = [size / lines for lines, size, _ in samples if lines >= 100]
    assert max(per_line) < 1.2 * min(per_line)  # bytes per iteration stay constant: linear growth
