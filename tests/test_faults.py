"""Faults around a run: a bad output folder fails before any work, a write failing mid-run (disk full,
read-only) is an OutputError with nothing half-written, and SIGTERM/SIGINT stop with a checkpoint;
either way the run resumes to the weights of an uninterrupted one, bit for bit."""
import builtins
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import fastdelta
import fastdelta.fitting as fit_module
import fastdelta.run_setup as run_setup_module
from fastdelta.train import loop
from fastdelta.train.checkpoint import checkpoint_files
from tiny import TINY_LAYERS, arrays, tiny_net


RUN = dict(method="delta", layers=TINY_LAYERS, iterations=6, checkpoint_every=2, batch_size=4, resize=16, crop=12,
           progress=False, attention_cache=None, attention_head_epochs=1, eval_batch_size=8)
TESTS = os.path.dirname(os.path.abspath(__file__))


def no_work(monkeypatch):
    """Fail the test if fit gets as far as the data or the model."""
    def called(*args, **kwargs):
        raise AssertionError("fit started its work before checking the output folder")
    monkeypatch.setattr(run_setup_module, "resolve_data", called)
    monkeypatch.setattr(run_setup_module, "build_networks", called)


def tmp_files(root) -> list:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".tmp")]


def history_lines(run_dir) -> list:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the output folder, checked first -------------------------------------------------------------------------

def test_out_that_is_a_file_fails_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    no_work(monkeypatch)
    with pytest.raises(fastdelta.OutputError, match="is a file, not a folder") as e:
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(out), **RUN)
    assert str(out) in str(e.value) and isinstance(e.value, OSError)


def test_the_check_leaves_no_folder_behind_when_the_run_fails_early(tmp_path, monkeypatch):
    no_work(monkeypatch)
    with pytest.raises(AssertionError, match="started its work"):  # as a bad setting would, after the check
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "new" / "run"), **RUN)
    assert os.listdir(tmp_path) == []


def test_out_under_a_file_fails_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    no_work(monkeypatch)
    with pytest.raises(fastdelta.OutputError, match="cannot be created"):
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "file" / "run"), **RUN)


def test_read_only_out_fails_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    os.chmod(out, 0o500)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: a 0o500 folder is still writable")
        no_work(monkeypatch)
        with pytest.raises(fastdelta.OutputError, match="is not writable"):
            fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(out), **RUN)
        with pytest.raises(fastdelta.OutputError, match="cannot be created"):
            fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(out / "run"), **RUN)
    finally:
        os.chmod(out, 0o700)


def test_read_only_file_system_fails_before_any_work(tmp_path, monkeypatch):
    """What a read-only mount answers, for a root user too (who may write into a 0o500 folder)."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    no_work(monkeypatch)
    with pytest.raises(fastdelta.OutputError, match=f"{tmp_path} is not writable: Read-only file system") as e:
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path), **RUN)
    assert e.value.errno == errno.EROFS


def test_resume_in_a_missing_folder_fails_before_any_work(tmp_path, monkeypatch):
    no_work(monkeypatch)
    with pytest.raises(fastdelta.OutputError, match="does not exist, so there is no run to resume"):
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "typo"), resume=True, **RUN)
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("command", ["fit", "attention"])
def test_cli_out_that_is_a_file_is_a_clear_error_before_the_data(tmp_path, command, capsys):
    from fastdelta.apps.cli import main
    out = tmp_path / "results.txt"
    out.write_text("")
    try:  # the entry point's main, in-process: an uncaught exception would fail the test here
        code = main([command, "--data", str(tmp_path / "no-such-data"), "--model", "resnet18", "--weights", "random",
                     "--out", str(out)])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "fastdelta: error: output folder" in err and "is a file, not a folder" in err


def test_little_free_space_allowed_is_a_warning_naming_folder_and_sizes(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10 ** 6, 10 ** 6 - 2000, 2000))
    with pytest.warns(UserWarning, match=r"has 2\.0 kB free, but this run's checkpoints and model\.pt need about"
                                         r" [0-9.]+ kB") as record:
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "new"), allow_low_disk=True,
                      **{**RUN, "iterations": 2})
    assert any(f"output folder {tmp_path / 'new'} has" in str(w.message) for w in record)


# -- a write failing during the run ---------------------------------------------------------------------------

class PartialFile:
    """A file whose write, once `fault` fires, puts half the data down and then fails, as a filling disk does."""

    def __init__(self, f, fault):
        self._f, self._fault = f, fault

    def write(self, data):
        if not self._fault.fires():
            return self._f.write(data)
        self._f.write(data[: len(data) // 2])
        raise self._fault.error()

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class Fault:
    """OSError(code) at one write point (`how`: open, write or replace of a file whose name starts with
    `name`), once: armed when the run's first checkpoint is on disk, so that there is one to resume from."""

    def __init__(self, run_dir, how, name, code):
        self.checkpoints = run_dir / "checkpoints"
        self.how, self.name, self.code = how, name, code
        self.fired = 0

    def error(self):
        return OSError(self.code, os.strerror(self.code))

    def fires(self) -> bool:
        if self.fired or not checkpoint_files(self.checkpoints):
            return False
        self.fired += 1
        return True

    def hits(self, how, path) -> bool:
        return how == self.how and os.path.basename(str(path)).startswith(self.name)

    def install(self, m):
        real_open, real_replace, real_save = builtins.open, os.replace, torch.save

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and ("w" in mode or "a" in mode):
                if self.hits("open", file) and self.fires():
                    raise self.error()
                if self.hits("write", file):  # history.jsonl is opened before the fault is armed
                    return PartialFile(real_open(file, mode, *args, **kwargs), self)
            return real_open(file, mode, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            if self.hits("replace", dst) and self.fires():
                raise self.error()
            return real_replace(src, dst, *args, **kwargs)

        def save(obj, f, *args, **kwargs):  # model.pt: torch writes to a path with its own C++ writer
            if isinstance(f, (str, os.PathLike)) and self.hits("write", f) and self.fires():
                with real_open(f, "wb") as out:
                    out.write(b"PK\x03\x04 half a zip")
                raise self.error()
            return real_save(obj, f, *args, **kwargs)

        m.setattr(builtins, "open", open_)
        m.setattr(os, "replace", replace)
        m.setattr(torch, "save", save)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    res = fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **RUN)
    return res.model.state_dict(), [h["loss"] for h in res.history]


# (how, file name part, the checkpoint the message must name)
WRITE_POINTS = [
    ("open", ".ckpt-00000004.pt.", "ckpt-00000002.pt"),
    ("write", ".ckpt-00000004.pt.", "ckpt-00000002.pt"),
    ("replace", "ckpt-00000004.pt", "ckpt-00000002.pt"),
    ("write", "history.jsonl", "ckpt-00000002.pt"),       # the line of iteration 2, streamed
    ("open", ".history.jsonl.", "ckpt-00000006.pt"),      # result.save's copy of it
    ("write", ".model.pt.", "ckpt-00000006.pt"),
    ("replace", "model.pt", "ckpt-00000006.pt"),
    ("write", ".result.json.", "ckpt-00000006.pt"),
    ("replace", "result.json", "ckpt-00000006.pt"),
]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
@pytest.mark.parametrize("how,name,resume_from", WRITE_POINTS, ids=[f"{h}-{n.strip('.')}" for h, n, _ in WRITE_POINTS])
def test_write_failure_is_an_output_error_and_the_run_resumes_exactly(tmp_path, monkeypatch, uninterrupted,
                                                                       how, name, resume_from, code):
    run = tmp_path / "run"
    fault = Fault(run, how, name, code)
    with monkeypatch.context() as m:
        fault.install(m)
        with pytest.raises(fastdelta.OutputError) as e:
            fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **RUN)
    assert fault.fired == 1
    message = str(e.value)
    assert e.value.errno == code and os.strerror(code) in message
    assert f"last complete checkpoint {run / 'checkpoints' / resume_from}" in message
    assert f"fastdelta fit --resume {run}" in message
    assert tmp_files(run) == []
    assert not (run / "result.json").exists()
    lines = history_lines(run)  # every line whole: a failed append is cut back
    assert [h["iteration"] for h in lines] == list(range(len(lines)))
    resumed = fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), resume=True, **RUN)
    assert resumed.settings["resumed_from_iteration"] == int(resume_from[5:13])
    weights, losses = uninterrupted
    assert same_weights(resumed.model.state_dict(), weights)
    assert same_weights(torch.load(run / "model.pt"), weights)
    assert [h["loss"] for h in resumed.history] == losses
    assert [h["loss"] for h in history_lines(run)] == losses  # rewritten from the checkpoint, then continued
    assert tmp_files(run) == []


def test_failed_atomic_write_leaves_no_temp_file_even_when_cleanup_fails(tmp_path, monkeypatch):
    from fastdelta.output_files import atomic_write
    real_unlink = os.unlink

    def write(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "a.json", write)
    assert e.value.errno == errno.ENOSPC and tmp_files(tmp_path) == []

    def unlink(path, *args, **kwargs):  # the folder turned read-only under the run
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "a.json", write)
    assert e.value.errno == errno.ENOSPC  # the first error, not the cleanup's
    monkeypatch.setattr(os, "unlink", real_unlink)


def test_no_checkpoint_yet_is_said(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if "ckpt-" in os.path.basename(str(file)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    with pytest.raises(fastdelta.OutputError, match="no complete checkpoint to resume from"):
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **RUN)
    assert tmp_files(run) == []


def test_cli_write_failure_exits_2_with_the_message(monkeypatch, capsys):
    from fastdelta.apps import cli

    def failing_fit(*args, **kwargs):
        raise fastdelta.OutputError("could not write checkpoint x: No space left on device; the run can be resumed")
    monkeypatch.setattr("fastdelta.fitting.fit", failing_fit)  # the CLI imports fit when a command runs
    assert cli.main(["fit", "--data", "d", "--out", "o", "--no-progress"]) == 2
    assert "fastdelta: error: could not write checkpoint x: No space left on device" in capsys.readouterr().err


# -- SIGTERM / SIGINT -----------------------------------------------------------------------------------------

LONG = {**RUN, "iterations": 40, "checkpoint_every": 1000}  # no checkpoint but the one the signal writes
STOP_AFTER = 12  # the signal arrives while iteration 12 is logged: the run stops with 13 done

SIGNALLED_FIT = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads({threads})  # as in the uninterrupted run, for the same float sums
import fastdelta
from fastdelta.train import loop
from tiny import TINY_LAYERS, arrays, tiny_net

append = loop.HistoryWriter.append
def append_then_signal(self, record):  # a real signal, at a known iteration
    append(self, record)
    if record["iteration"] == {stop_after}:
        os.kill(os.getpid(), signal.{signal})

loop.HistoryWriter.append = append_then_signal
# a job started with `&` from a script inherits SIGINT ignored, which fit rightly keeps: start from the defaults
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
try:
    fastdelta.fit(tiny_net(), arrays(), None, run_dir={run!r}, **{kw!r})
except fastdelta.Preempted as e:
    print(json.dumps({{"iteration": e.iteration, "message": str(e), "checkpoint": str(e.checkpoint)}}))
    sys.exit(4)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_stops_with_a_checkpoint_and_resume_is_bitwise_exact(tmp_path, sig):
    run = tmp_path / "run"
    code = SIGNALLED_FIT.format(tests=TESTS, threads=torch.get_num_threads(), stop_after=STOP_AFTER, signal=sig,
                                run=str(run), kw=LONG)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stderr
    stopped = json.loads(proc.stdout.strip().splitlines()[-1])
    done = STOP_AFTER + 1
    assert stopped["iteration"] == done
    assert stopped["message"] == (f"stopped by {sig} at iteration {done}; checkpoint written to "
                                  f"{run / 'checkpoints' / f'ckpt-{done:08d}.pt'}; resume with resume=True "
                                  f"(CLI: fastdelta fit --resume {run})")
    assert sorted(os.listdir(run / "checkpoints")) == [f"ckpt-{done:08d}.pt"]
    assert len(history_lines(run)) == done and not (run / "result.json").exists()
    resumed = fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), resume=True, **LONG)
    full = fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "full"), **LONG)
    assert resumed.settings["resumed_from_iteration"] == done
    assert same_weights(resumed.model.state_dict(), full.model.state_dict())
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    strip = lambda h: {k: v for k, v in h.items() if not k.endswith("_s")}  # timings differ
    assert [strip(h) for h in history_lines(run)] == [strip(h) for h in history_lines(tmp_path / "full")]


def test_signal_with_deferred_reads_reads_the_queued_step_first(tmp_path, monkeypatch):
    """The GPU loop's order on the CPU: step t is read once step t+1 is queued, so a stop must first
    read (and log) the queued step before its checkpoint."""
    def deferred_loop(target, source, reg, dataset, spec, *args, **kwargs):
        if spec.checkpoint_dir is not None:
            spec.deferred_reads = True
        return real_loop(target, source, reg, dataset, spec, *args, **kwargs)

    def not_ours(signum, frame):  # fails the test instead of ending pytest if fit's handler is missing
        raise AssertionError("SIGTERM reached the test's handler")

    real_loop, append = fit_module.train_loop, loop.HistoryWriter.append
    monkeypatch.setattr(fit_module, "train_loop", deferred_loop)
    kw = {**LONG, "iterations": 20}
    full = fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "full"), **kw)

    def append_then_signal(self, record):
        append(self, record)
        if record["iteration"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, not_ours)
    try:
        with monkeypatch.context() as m:
            m.setattr(loop.HistoryWriter, "append", append_then_signal)
            with pytest.raises(fastdelta.Preempted, match="stopped by SIGTERM at iteration 9;"):
                fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "run"), **kw)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(history_lines(tmp_path / "run")) == 9  # iteration 7 is logged while step 8 is queued
    resumed = fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "run"), resume=True, **kw)
    assert same_weights(resumed.model.state_dict(), full.model.state_dict())
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_cli_sigterm_to_the_process_group_exits_4_after_a_checkpoint(tmp_path):
    """A scheduler signals every process of the job, data loader workers included (were they to die of
    it, the main process would fail mid-step)."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        folder = tmp_path / "data" / "train" / c
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastdelta", "fit", "--data", str(tmp_path / "data"),
                             "--model", "resnet18", "--weights", "random", "--method", "l2_sp", "--iterations",
                             "100000", "--batch-size", "4", "--resize", "16", "--crop", "16", "--workers", "1",
                             "--checkpoint-every", "100000", "--no-progress", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run / "history.jsonl").exists() or len(history_lines(run)) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, err
    assert "fastdelta: stopped by SIGTERM at iteration" in err and f"fastdelta fit --resume {run}" in err
    assert "Traceback" not in err
    done = int(err.split("at iteration ")[1].split(";")[0])
    assert (run / "checkpoints" / f"ckpt-{done:08d}.pt").exists() and len(history_lines(run)) == done


def test_fit_help_documents_exit_status_4(capsys):
    from fastdelta.apps.cli import main
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "4 stopped by SIGTERM or SIGINT" in " ".join(capsys.readouterr().out.split())


def test_handlers_are_restored_and_fit_runs_outside_the_main_thread(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "a"), **{**RUN, "iterations": 2})
    assert {s: signal.getsignal(s) for s in before} == before
    errors = []

    def run():
        try:
            fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "b"), **{**RUN, "iterations": 2})
        except BaseException as e:  # noqa: B902 (reported below)
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == [] and (tmp_path / "b" / "result.json").exists()
    assert {s: signal.getsignal(s) for s in before} == before


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, run, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    append = loop.HistoryWriter.append

    def append_then_signal(self, record):  # only rank 1 is signalled
        append(self, record)
        if rank == 1 and record["iteration"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    loop.HistoryWriter.append = append_then_signal
    try:
        fastdelta.fit(tiny_net(bn=False), arrays(), None, distributed=True, run_dir=run,
                      **{**LONG, "iterations": 12})
        stopped = None
    except fastdelta.Preempted as e:
        stopped = {"iteration": e.iteration, "signal": e.signal_name}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(stopped, f)
    dist.destroy_process_group()


def test_ranks_agree_on_the_stop_iteration(tmp_path):
    run = tmp_path / "run"
    mp.spawn(_rank, args=(2, _free_port(), str(run), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 is not None and r1 is not None
    assert r0["iteration"] == r1["iteration"] == 4  # signalled while iteration 2 ends; the sum is read one later
    assert r1["signal"] == "SIGTERM" and r0["signal"] == "a signal to another rank"
    assert sorted(os.listdir(run / "checkpoints")) == [f"ckpt-{r0['iteration']:08d}.pt"]  # written by rank 0
