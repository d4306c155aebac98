"""Messages that name the cause, and the edges of long runs: NaN inputs and NaN weights named as such, a
batch of one under BatchNorm, `fastdelta fit --resume RUN` alone (and its hint, shell-quoted), a stalled
rank, SIGTERM outside the training loop, and resuming a run that already finished."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastdelta
import fastdelta.attention.measure as measure_module
import fastdelta.fitting as fit_module
from fastdelta.apps import cli
from fastdelta.data import DataError
from fastdelta.train import loop
from tiny import TINY_LAYERS, arrays, image_folder, sigterm_must_be_handled, tiny_net

TESTS = os.path.dirname(os.path.abspath(__file__))
RUN = dict(method="l2", layers=TINY_LAYERS, iterations=4, checkpoint_every=2, batch_size=4, resize=16, crop=12,
           progress=False, attention_cache=None, attention_head_epochs=1, eval_batch_size=8)


def folder(root, per_class=4, seed=0):
    """ROOT/train/<a|b>/<i>.png, each a different random image."""
    image_folder(root / "train", per_class, seed, size=20)
    return root


def sigterm_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)


# -- inputs and weights that hold NaN are named as such, not as a divergence ------------------------------

class Tensors(torch.utils.data.Dataset):
    """Preprocessed CHW tensors; item `bad` holds `value`."""

    def __init__(self, n=12, bad=None, value=float("nan")):
        self.targets, self.classes, self.bad, self.value = [i % 3 for i in range(n)], ["x", "y", "z"], bad, value

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = torch.full((3, 12, 12), 0.1 * (i % 5))
        if i == self.bad:
            x[1, 2, 3] = self.value
        return x, self.targets[i]


def test_nan_or_inf_in_a_dataset_is_bad_input_naming_the_split_and_item():
    with pytest.raises(DataError, match=r"train dataset item 7: the image tensor holds NaN or infinite values"):
        fastdelta.fit(tiny_net(num_classes=3), Tensors(bad=7), None, **RUN)
    with pytest.raises(DataError, match=r"test dataset item 4: the image tensor holds NaN or infinite values"):
        fastdelta.fit(tiny_net(num_classes=3), Tensors(), Tensors(6, bad=4, value=float("inf")), **RUN)
    x = np.full((6, 3, 12, 12), 0.5, np.float32)
    x[4, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"train images: float images contain NaN or infinity \(items \[4\]\)"):
        fastdelta.fit(tiny_net(num_classes=3), (x, np.arange(6) % 3), None, **RUN)


def test_nan_weights_name_the_file_and_the_tensors(tmp_path):
    state = tiny_net().state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    state["bn2.running_var"][3] = float("inf")
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    with pytest.raises(fastdelta.ModelError, match=rf"weights file '{path}' holds NaN or infinite values in 2 "
                                                   r"tensors: conv1\.weight, bn2\.running_var"):
        fastdelta.fit(tiny_net(), arrays(), None, weights=str(path), **RUN)
    net = tiny_net()
    net.load_state_dict(state)
    with pytest.raises(fastdelta.ModelError, match=r"the given model's weights hold NaN or infinite values in 2 "
                                                   r"tensors: conv1\.weight, bn2\.running_var"):
        fastdelta.fit(net, arrays(), None, **RUN)


def test_a_batch_of_one_under_batch_norm_names_batch_size():
    with pytest.raises(fastdelta.SettingsError, match=r"batch_size=1: .*BatchNorm.*at least 2 images"):
        fastdelta.fit(tiny_net(), arrays(), None, **{**RUN, "batch_size": 1})
    with pytest.raises(fastdelta.SettingsError, match=r"attention_head_batch_size=1: .*BatchNorm"):
        fastdelta.fit(tiny_net(), arrays(), None, **{**RUN, "method": "delta", "attention_head_batch_size": 1})
    # BatchNorm in eval mode (L2-FE's frozen extractor), or none at all: a batch of one trains
    assert len(fastdelta.fit(tiny_net(), arrays(), None, **{**RUN, "batch_size": 1, "method": "l2_fe"}).history) == 4
    assert len(fastdelta.fit(tiny_net(bn=False), arrays(), None, **{**RUN, "batch_size": 1}).history) == 4


# -- `fastdelta fit --resume RUN` alone -------------------------------------------------------------------------

def test_cli_resume_reads_every_setting_from_the_run_folder(tmp_path, monkeypatch, capsys):
    folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # relative paths, resumed from another folder
    args = ["fit", "--data", "data", "--model", "resnet18", "--weights", "random", "--method", "l2_sp",
            "--iterations", "4", "--checkpoint-every", "2", "--batch-size", "4", "--resize", "16", "--crop", "16",
            "--lr", "0.02", "--seed", "3", "--no-progress", "--out", "run"]
    assert cli.main(args) == 0
    full = json.loads((tmp_path / "run" / "result.json").read_text())
    os.remove(tmp_path / "run" / "checkpoints" / "ckpt-00000004.pt")  # as if killed before its last checkpoint
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run = str(tmp_path / "run")
    assert cli.main(["fit", "--resume", run, "--lr", "0.05"]) == 2  # a flag that contradicts the run
    assert "settings.lr: checkpoint 0.02 vs now 0.05" in capsys.readouterr().err
    assert cli.main(["fit", "--resume", run, "--lr", "0.02", "--workers", "0", "--no-progress"]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["settings"]["resumed_from_iteration"] == 2 and result["iterations_run"] == 4
    assert {k: result["settings"][k] for k in ("method", "lr", "seed", "batch_size", "crop")} == \
           {"method": "l2_sp", "lr": 0.02, "seed": 3, "batch_size": 4, "crop": 16}
    assert result["final_loss_terms"] == full["final_loss_terms"]


def test_the_printed_resume_hint_is_shell_quoted_and_runs_alone(tmp_path, monkeypatch, capsys):
    data = folder(tmp_path / "data")
    run = tmp_path / "it's a run"
    append = loop.HistoryWriter.append

    def append_then_signal(self, record):
        append(self, record)
        if record["iteration"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with sigterm_must_be_handled(), monkeypatch.context() as m:
        m.setattr(loop.HistoryWriter, "append", append_then_signal)
        assert cli.main(["fit", "--data", str(data), "--model", "resnet18", "--weights", "random", "--method", "l2",
                         "--iterations", "5", "--batch-size", "4", "--resize", "16", "--crop", "16",
                         "--no-progress", "--out", str(run)]) == 4
    err = capsys.readouterr().err
    hint = err.split("(CLI: ")[1].rsplit(")", 1)[0]
    assert hint == f"fastdelta fit --resume {shlex.quote(str(run))}" and shlex.split(hint)[3] == str(run)
    assert cli.main(shlex.split(hint)[1:] + ["--no-progress"]) == 0
    assert json.loads((run / "result.json").read_text())["settings"]["resumed_from_iteration"] == 2
    from fastdelta.train.checkpoint import write_failed
    message = str(write_failed("x", OSError(28, "No space left on device"), run / "checkpoints"))
    assert f"(CLI: fastdelta fit --resume {shlex.quote(str(run))})" in message


# -- a stalled rank ---------------------------------------------------------------------------------------------

STALLING_RANK = """
import json, os, signal, sys, time
sys.path.insert(0, {tests!r})
os.environ.update(RANK="{rank}", WORLD_SIZE="2", LOCAL_RANK="{rank}", MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
import torch
torch.set_num_threads(1)
import fastdelta
from fastdelta.train import loop
from tiny import arrays, tiny_net

append = loop.HistoryWriter.append
def append_then_stall(self, record):  # rank 1 stops (SIGSTOP) after iteration 1, as a hung process would
    append(self, record)
    if {rank} == 1 and record["iteration"] == 1:
        os.kill(os.getpid(), signal.SIGSTOP)

loop.HistoryWriter.append = append_then_stall
open(os.path.join({tmp!r}, "ready{rank}"), "w").close()  # both start fit together: the rendezvous is timed too
while not os.path.exists(os.path.join({tmp!r}, "ready{other}")):
    time.sleep(0.01)
t0 = time.time()
try:
    fastdelta.fit(tiny_net(bn=False), arrays(), None, distributed=True, dist_timeout={timeout}, **{kw!r})
    print(json.dumps({{"error": None}}), flush=True)
except Exception as e:
    print(json.dumps({{"error": type(e).__name__, "message": str(e), "oserror": isinstance(e, OSError),
                      "seconds": time.time() - t0}}), flush=True)
os._exit(0)
"""


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stalled_rank_ends_the_job_after_dist_timeout_naming_it(tmp_path):
    port = _free_port()
    kw = {**RUN, "iterations": 30, "checkpoint_every": 1000}
    procs = [subprocess.Popen([sys.executable, "-c", STALLING_RANK.format(
        tests=TESTS, rank=r, other=1 - r, port=port, tmp=str(tmp_path), timeout=4, kw=kw)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=240)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": f"no output: {err[-2000:]}"}
    assert report["error"] == "CollectiveTimeout", report
    assert "dist_timeout=4 s" in report["message"] and "--dist-timeout" in report["message"]
    assert report["oserror"]  # the CLI reports it as an error (exit 2), not a traceback


def test_dist_timeout_is_validated():
    with pytest.raises(fastdelta.SettingsError, match="dist_timeout=0"):
        fastdelta.FitSettings(dist_timeout=0).validate()


# -- SIGTERM outside the training loop --------------------------------------------------------------------------

def test_cli_sigterm_while_scanning_the_data_exits_4_saying_nothing_was_kept(tmp_path, monkeypatch, capsys):
    data, out = folder(tmp_path / "data"), tmp_path / "run"
    from fastdelta.data import inputs
    scan = inputs.scan_image_folder

    def scan_then_signal(*args, **kwargs):
        sigterm_self()
        return scan(*args, **kwargs)

    monkeypatch.setattr(inputs, "scan_image_folder", scan_then_signal)
    with sigterm_must_be_handled():
        assert cli.main(["fit", "--data", str(data), "--model", "resnet18", "--weights", "random", "--method", "l2",
                         "--iterations", "2", "--batch-size", "4", "--resize", "16", "--crop", "16",
                         "--no-progress", "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert ("fastdelta: stopped by SIGTERM while reading the data, before training: nothing of this run was kept; "
            "start it again") in err
    assert "Traceback" not in err and not out.exists()  # the folder made for the run is gone again


def test_cli_sigterm_during_the_attention_exits_4(tmp_path, monkeypatch, capsys):
    data, out = folder(tmp_path / "data"), tmp_path / "run"
    monkeypatch.setattr(measure_module, "channel_loss_increase", sigterm_self)
    with sigterm_must_be_handled():
        assert cli.main(["fit", "--data", str(data), "--model", "resnet18", "--weights", "random", "--method",
                         "delta", "--layers", "layer1.1.conv2", "--iterations", "2", "--batch-size", "4", "--resize",
                         "16", "--crop", "16", "--no-progress", "--attention-cache", "off", "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert "fastdelta: stopped by SIGTERM while computing the channel attention, before training: nothing" in err
    assert "Traceback" not in err
    with sigterm_must_be_handled():  # `fastdelta attention` too
        assert cli.main(["attention", "--data", str(data), "--model", "resnet18", "--weights", "random", "--layers",
                         "layer1.1.conv2", "--batch-size", "4", "--resize", "16", "--crop", "16", "--head-epochs",
                         "1", "--no-progress", "--attention-cache", "off", "--out", str(tmp_path / "att")]) == 4
    assert "stopped by SIGTERM while computing the channel attention" in capsys.readouterr().err


def test_sigterm_after_the_attention_was_cached_says_it_is_kept(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(fit_module, "_prepare_images", sigterm_self)  # DELTA measures its source energy there
    kw = {**RUN, "method": "delta", "feature_scale": "source_energy", "attention_cache": str(cache)}
    with sigterm_must_be_handled(), pytest.raises(fastdelta.Preempted) as e:
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "run"), **kw)
    assert str(e.value) == (f"stopped by SIGTERM while preparing the training, before training: only the channel "
                            f"attention was kept, in the cache {cache} (the next run reads it); start the run again")
    assert e.value.checkpoint is None and len(list(cache.iterdir())) == 1


def test_sigterm_while_testing_keeps_the_last_checkpoint_and_resume_finishes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    evaluate = fit_module.evaluate

    def signal_then_evaluate(*args, **kwargs):
        sigterm_self()
        return evaluate(*args, **kwargs)

    with sigterm_must_be_handled(), monkeypatch.context() as m, pytest.raises(fastdelta.Preempted) as e:
        m.setattr(fit_module, "evaluate", signal_then_evaluate)
        fastdelta.fit(tiny_net(), arrays(), arrays(1, seed=1), run_dir=str(run), **RUN)
    assert str(e.value).startswith("stopped by SIGTERM while testing, after training: its last checkpoint "
                                   f"{run / 'checkpoints' / 'ckpt-00000004.pt'} was kept")
    res = fastdelta.fit(tiny_net(), arrays(), arrays(1, seed=1), run_dir=str(run), resume=True, **RUN)
    assert res.test["images"] == 3 and (run / "result.json").is_file()


# -- resuming a finished run ------------------------------------------------------------------------------------

def run_files(run) -> dict:
    """Every file of the run with its bytes and mtime, less the lock file that any run into the folder takes."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*")
            if p.is_file() and p.name != ".fastdelta-run"}


def test_resuming_a_finished_run_leaves_it_as_it_is(tmp_path, capsys):
    run = tmp_path / "run"
    full = fastdelta.fit(tiny_net(), arrays(), arrays(1, seed=1), run_dir=str(run), **RUN)
    files = run_files(run)
    time.sleep(0.01)
    with pytest.warns(UserWarning, match=rf"the run in {run} finished \(4 of 4 iterations\); nothing to resume: "
                                         r"its files are left as they are"):
        again = fastdelta.fit(tiny_net(), arrays(), arrays(1, seed=1), run_dir=str(run), resume=True, **RUN)
    assert again.test == full.test and again.timings == json.loads((run / "result.json").read_text())["timings_s"]
    assert [h["loss"] for h in again.history] == [h["loss"] for h in full.history]
    for k, v in full.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k
    assert run_files(run) == files
