"""The skeptical user's tries, run again: each bad input or fault and what fastdelta now does with it.

    python3 scripts/reliability_tries.py        # one line per try (about a minute on 2 cores)
    python3 scripts/reliability_tries.py bad_input edges   # only these groups (GROUPS below)

The tries run in this process, on a randomly initialised resnet18 at 16-32 px or the tests' tiny CNN
where only the plumbing matters, in a temporary folder that is removed afterwards; faults (a full
disk, a signal at a given point) are injected by patching the call that meets them. The stalled rank
runs two real gloo processes, one of them stopped with SIGSTOP.
"""
import contextlib
import errno
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import namedtuple
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's fastdelta, and the tests' tiny CNN
import fastdelta  # noqa: E402
import fastdelta.attention.measure as measure_module  # noqa: E402
import fastdelta.fitting as fit_module  # noqa: E402
from fastdelta.apps import cli  # noqa: E402
from fastdelta.apps.compare import CompareSettings, compare  # noqa: E402
from tiny import TINY_LAYERS, arrays, image_folder, sigterm_must_be_handled, tiny_net  # noqa: E402

warnings.simplefilter("ignore")
QUICK = dict(batch_size=4, resize=36, crop=32, progress=False, attention_cache=None)
TINY = dict(method="l2", layers=TINY_LAYERS, iterations=4, checkpoint_every=2, batch_size=4, resize=16, crop=12,
            progress=False, attention_cache=None, attention_head_epochs=1, eval_batch_size=8)
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
y = np.repeat(np.arange(3), 4)
TMP = Path(tempfile.mkdtemp(prefix="fastdelta-tries-"))


def outcome(label, fn):
    try:
        r = fn()
        if isinstance(r, fastdelta.FitResult):
            r = f"the fit ran ({len(r.history)} iterations, test {r.test or 'none'})"
        print(f"- {label}: {r}", flush=True)
    except Exception as e:  # noqa: BLE001 - the point is to show what each try raises
        print(f"- {label}: {type(e).__name__}: {one_line(str(e))}", flush=True)


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def folder(root, per_class=4, seed=0):
    return image_folder(root, per_class, seed, size=20)


def cli_try(*argv) -> str:
    """`fastdelta ARGV` in this process: its exit status and the `fastdelta:` lines it printed."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main([str(a) for a in argv])
    warnings.simplefilter("ignore")  # cli.main turns UserWarnings on
    said = []
    for line in err.getvalue().splitlines():
        if "UserWarning: fastdelta:" in line and "NO PRE-TRAINED WEIGHTS" not in line:  # random weights: meant
            said.append("warning: " + line.split("UserWarning: ", 1)[1])
        elif line.startswith("fastdelta:"):
            said.append(line)
    return f"exit {status}; " + one_line(" | ".join(said) or "nothing on stderr")


DATA = folder(TMP / "data" / "train")
folder(TMP / "data" / "test", per_class=2, seed=1)
CLI_FIT = ["fit", "--data", TMP / "data", "--model", "resnet18", "--weights", "random", "--batch-size", "4",
           "--resize", "16", "--crop", "16", "--no-progress"]


# -- earlier tries --------------------------------------------------------------------------------------------

def diverging_l2_sp():
    try:
        fastdelta.fit("resnet18", (x, y), None, method="l2_sp", alpha=1e6, iterations=20, weights="random", **QUICK)
    except fastdelta.NonFiniteLossError as e:
        m = e.partial_result.model.eval()
        bad = [n for n, b in m.named_buffers() if b.is_floating_point() and not torch.isfinite(b).all()]
        out = m(torch.randn(2, 3, 32, 32))
        return (f"stopped at iteration {e.iteration} ({e.term}); non-finite BN buffers: {len(bad)}; "
                f"eval output finite: {bool(torch.isfinite(out).all())}")


def symlink_loop():
    train = folder(TMP / "sym" / "train", per_class=3)
    os.symlink(".", train / "a" / "loop")
    from fastdelta.data import scan_image_folder
    index = scan_image_folder(train)
    counts = np.bincount([label for _, label in index.samples]).tolist()
    return f"class counts {counts}; skipped {index.skipped}"


def out_is_a_file():
    f = TMP / "a_file"
    f.write_text("x")
    return fastdelta.fit("resnet18", (x, y), None, method="l2", weights="random", iterations=2, run_dir=str(f), **QUICK)


def full_disk_at_checkpoint():
    real = os.replace

    def full(src, dst):
        if str(dst).endswith(".pt") and "ckpt-00000004" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)
    with mock.patch("os.replace", full):
        return fastdelta.fit("resnet18", (x, y), None, method="l2", weights="random", iterations=6,
                             checkpoint_every=2, run_dir=str(TMP / "full"), **QUICK)


def weights_file(content):
    p = TMP / "w.pt"
    p.write_bytes(content)
    return fastdelta.fit("resnet18", (x, y), None, method="l2", weights=str(p), iterations=1, **QUICK)


def earlier_tries():
    print("earlier tries", flush=True)
    outcome("l2_sp with alpha=1e6 on resnet18", diverging_l2_sp)
    outcome("`ln -s . train/a/loop` (3 real images in a)", symlink_loop)
    outcome("--out is an existing file", out_is_a_file)
    outcome("disk full at the second checkpoint", full_disk_at_checkpoint)
    outcome("array labels {0, 2}", lambda: fastdelta.fit("resnet18", (x[:8], np.array([0, 2] * 4)), None,
                                                         method="l2", weights="random", iterations=1, **QUICK))
    outcome("a 0-byte weights file", lambda: weights_file(b""))
    outcome("a random-bytes weights file", lambda: weights_file(os.urandom(256)))
    outcome("device='cuda' without a GPU", lambda: fastdelta.fit("resnet18", (x, y), None, method="l2",
                                                                  weights="random", device="cuda", **QUICK))
    outcome("momentum=1.5", lambda: fastdelta.fit("resnet18", (x, y), None, method="l2", weights="random",
                                                   momentum=1.5, **QUICK))


# -- run folders, contents, overlap ---------------------------------------------------------------------------

def compare_from_the_cli():
    out = TMP / "cmp"
    said = cli_try("compare", *CLI_FIT[1:], "--methods", "l2,delta", "--layers", "layer1.1.conv2", "--seeds", "1",
                   "--search", "none", "--iterations", "2", "--curve-points", "0", "--schedules", "step", "--out", out)
    runs = [(r["method"], r["status"]) for r in json.loads((out / "report.json").read_text())["runs"]]
    return f"{said}; report.md written: {(out / 'report.md').is_file()}; runs {runs}"


def two_fits_into_one_folder():
    from fastdelta.train import loop
    run, started, release = TMP / "two", threading.Event(), threading.Event()
    append = loop.HistoryWriter.append

    def append_then_wait(self, record):  # the first fit holds the folder mid-training
        append(self, record)
        if record["iteration"] == 1 and not started.is_set():
            started.set()
            release.wait(120)

    first = threading.Thread(target=lambda: fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **TINY))
    with mock.patch.object(loop.HistoryWriter, "append", append_then_wait):
        first.start()
        started.wait(120)
        try:
            return fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **TINY)
        finally:
            release.set()
            first.join()


def fit_into_a_folder_with_an_older_run():
    run = TMP / "older"
    fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **TINY)
    return fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **TINY)


def resume_on_a_replaced_image():
    data, run = folder(TMP / "edit"), TMP / "edit_run"
    fastdelta.fit(tiny_net(num_classes=2), str(data), None, run_dir=str(run), **TINY)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(data / "a" / "1.png")  # same name, same count
    return fastdelta.fit(tiny_net(num_classes=2), str(data), None, run_dir=str(run), resume=True, **TINY)


def resume_on_other_arrays():
    run = TMP / "arrays_run"
    fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **TINY)
    xa, ya = arrays()
    xa[5, 3, 3, 0] ^= 1  # one pixel
    return fastdelta.fit(tiny_net(), (xa, ya), None, run_dir=str(run), resume=True, **TINY)


def reuse_search_on_other_data():
    def search(train, reuse):
        cs = CompareSettings(alpha_grid=(0.01,), curve_points=0, map_images=1, schedules=("step",),
                             reuse_runs=reuse)
        report = compare(tiny_net(), train, arrays(seed=1), methods=["l2_sp"], seeds=1, out=TMP / "reuse",
                         compare_settings=cs, log=lambda *a, **k: None,
                         **{**{k: v for k, v in TINY.items() if k != "method"}, "iterations": 2})
        return report["search"]["results"][0]["reused"]
    search(arrays(5), False)
    xo, yo = arrays(5)
    xo[0, 0, 0, 0] ^= 1
    same, changed = search(arrays(5), True), search((xo, yo), True)
    return f"search fit reused on the same data: {same}; with one pixel changed: {changed}"


def hard_linked_test_file():
    train, test = folder(TMP / "ov" / "train"), folder(TMP / "ov" / "test", per_class=2, seed=1)
    os.link(train / "a" / "0.png", test / "a" / "linked.png")
    return fastdelta.fit(tiny_net(num_classes=2), str(train), str(test), **TINY)


def out_inside_the_data_root():
    data = folder(TMP / "root")
    fastdelta.fit(tiny_net(num_classes=2), str(data), None, run_dir=str(data / "out"), **TINY)
    again = fastdelta.fit(tiny_net(num_classes=2), str(data), None, **TINY)
    skipped = {os.path.relpath(k, data): v for k, v in again.data["skipped_files"]}
    return f"classes {again.data['classes']}, counts {again.data['train']['class_counts']}; skipped {skipped}"


def nan_attention_cache_entry():
    cache = TMP / "cache"
    kw = {**TINY, "method": "delta", "attention_cache": str(cache), "iterations": 2}
    fastdelta.fit(tiny_net(), arrays(), None, **kw)
    [entry] = list(cache.iterdir())
    poisoned = json.loads(entry.read_text())
    poisoned["raw"][poisoned["layers"][0]][0] = float("nan")
    entry.write_text(json.dumps(poisoned))
    again = fastdelta.fit(tiny_net(), arrays(), None, **kw)
    finite = all(bool(torch.isfinite(w).all()) for w in again.attention.weights)
    return f"cache hit: {bool(again.attention.timings.get('cache_hit'))}; recomputed weights finite: {finite}"


def umask_077():
    old = os.umask(0o077)
    try:
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(TMP / "umask"), **{**TINY, "iterations": 2})
    finally:
        os.umask(old)
    modes = sorted({oct(p.stat().st_mode & 0o777) for p in (TMP / "umask").rglob("*") if p.is_file()})
    return f"modes of the run's files under umask 077: {modes}"


def run_folder_tries():
    print("run folders, data contents, overlap, files", flush=True)
    outcome("compare from the CLI", compare_from_the_cli)
    outcome("two fits into one folder at once", two_fits_into_one_folder)
    outcome("a fit into a folder with an older run", fit_into_a_folder_with_an_older_run)
    outcome("resume after an image was replaced", resume_on_a_replaced_image)
    outcome("resume on arrays with one pixel changed", resume_on_other_arrays)
    outcome("compare --reuse-runs (--reuse-search) on other data", reuse_search_on_other_data)
    outcome("a test file hard-linked to a training file", hard_linked_test_file)
    outcome("--test equal to the training folder", lambda: cli_try(
        *CLI_FIT, "--test", DATA, "--method", "l2", "--iterations", "2", "--out", TMP / "same"))
    outcome("--out inside the data root, then a fit on that root", out_inside_the_data_root)
    outcome("a NaN in an attention cache entry", nan_attention_cache_entry)
    outcome("one (H, W, 3) image with 32 labels", lambda: fastdelta.fit(
        "resnet18", (x[0], np.arange(32) % 3), None, method="l2", weights="random", iterations=1, **QUICK))
    outcome("test arrays missing class 1", lambda: fastdelta.fit(
        tiny_net(num_classes=3), arrays(2, 3), (arrays(1, seed=1)[0][:2], np.array([0, 2])), **TINY))
    outcome("umask 077", umask_077)


# -- disks -----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def disk(free: int, full_at: str = ""):
    """The disk reports `free` bytes; torch.save of a path named .FULL_AT.* fails as on a full disk (a
    RuntimeError without errno); the run's own free-space check is passed (the disk fills late)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if full_at and isinstance(f, (str, os.PathLike)) and os.path.basename(str(f)).startswith(f".{full_at}."):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *args, **kwargs)
    usage = namedtuple("usage", "total used free")
    with mock.patch.object(torch, "save", save), \
            mock.patch.object(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - free, free)):
        yield


def disk_full_at_model_pt():
    with disk(0, "model.pt"), mock.patch.object(fit_module, "require_free_space", lambda *a, **k: None):
        return fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(TMP / "model_pt"), **TINY)


def attention_on_a_full_disk():
    real_open = open

    def open_(file, mode="r", *args, **kwargs):
        if "w" in mode and os.path.basename(str(file)).startswith(".channel_attention.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)
    with mock.patch("builtins.open", open_):
        return cli_try("attention", *CLI_FIT[1:], "--layers", "layer1.1.conv2", "--head-epochs", "1",
                       "--attention-cache", "off", "--out", TMP / "att_full")


def divergence_on_a_full_disk():
    with disk(0, "model.pt"), mock.patch.object(fit_module, "require_free_space", lambda *a, **k: None):
        return cli_try(*CLI_FIT, "--resize", "36", "--crop", "32", "--method", "l2_sp", "--alpha", "1e6",
                       "--iterations", "20", "--out", TMP / "diverged")


def small_disk():
    with disk(2000):
        return fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(TMP / "small"), **TINY)


def disk_tries():
    print("disks", flush=True)
    outcome("disk full at model.pt", disk_full_at_model_pt)
    outcome("`fastdelta attention` on a full disk", attention_on_a_full_disk)
    outcome("a diverged fit whose partial result meets a full disk", divergence_on_a_full_disk)
    outcome("a disk with 2 kB free", small_disk)


# -- messages that named the wrong cause ----------------------------------------------------------------------

class NaNItem(torch.utils.data.Dataset):
    """Preprocessed CHW tensors of 3 classes; item 7 holds a NaN."""
    targets, classes = [i % 3 for i in range(12)], ["x", "y", "z"]

    def __len__(self):
        return 12

    def __getitem__(self, i):
        image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i))
        if i == 7:
            image[0, 0, 0] = float("nan")
        return image, self.targets[i]


def nan_weights():
    from fastdelta.networks.models import build_architecture
    state = build_architecture("resnet18").state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["bn1.running_var"][0] = float("inf")
    torch.save(state, TMP / "nan.pt")
    return fastdelta.fit("resnet18", (x, y), None, method="l2", weights=str(TMP / "nan.pt"), iterations=1, **QUICK)


def resume_from_the_folder_alone():
    run = TMP / "alone"
    cli_try(*CLI_FIT, "--method", "l2_sp", "--lr", "0.02", "--seed", "3", "--iterations", "4", "--checkpoint-every",
            "2", "--out", run)
    os.remove(run / "checkpoints" / "ckpt-00000004.pt")  # as if killed before its last checkpoint
    said = cli_try("fit", "--resume", run)
    result = json.loads((run / "result.json").read_text())
    r = result["settings"]
    return (f"{said}; resumed from iteration {r['resumed_from_iteration']} with method {r['method']}, lr {r['lr']}, "
            f"seed {r['seed']}, data {os.path.relpath(result['data']['train']['root'], TMP)}")


def preempted_hint_run_as_printed():
    from fastdelta.train import loop
    run, append = TMP / "it's a run", loop.HistoryWriter.append

    def append_then_signal(self, record):
        append(self, record)
        if record["iteration"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    with sigterm_must_be_handled(), mock.patch.object(loop.HistoryWriter, "append", append_then_signal):
        said = cli_try(*CLI_FIT, "--method", "l2", "--iterations", "5", "--out", run)
    hint = said.split("(CLI: ")[1].rsplit(")", 1)[0]
    return f"{said.split(';')[0]}, hint `{hint}`, run as printed: {cli_try(*shlex.split(hint)[1:])}"


def message_tries():
    print("messages that named the wrong cause", flush=True)
    outcome("a Dataset whose item 7 holds a NaN", lambda: fastdelta.fit(
        "resnet18", NaNItem(), None, method="l2", weights="random", iterations=4, **QUICK))
    outcome("a weights file with a NaN and an inf", nan_weights)
    outcome("batch_size=1 on resnet18 (BatchNorm) at 32 px", lambda: fastdelta.fit(
        "resnet18", (x, y), None, method="l2", weights="random", iterations=1, **{**QUICK, "batch_size": 1}))
    outcome("`fastdelta fit --resume RUN` alone", resume_from_the_folder_alone)
    outcome("SIGTERM into a folder named \"it's a run\"", preempted_hint_run_as_printed)


# -- distributed and preemption edges -------------------------------------------------------------------------

STALLING_RANK = """
import json, os, signal, sys, time
sys.path[:0] = [{root!r}, {tests!r}]
os.environ.update(RANK="{rank}", WORLD_SIZE="2", LOCAL_RANK="{rank}", MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
import torch
torch.set_num_threads(1)
import fastdelta
from fastdelta.train import loop
from tiny import arrays, tiny_net

append = loop.HistoryWriter.append
def append_then_stall(self, record):  # rank 1 stops (SIGSTOP) after iteration 1
    append(self, record)
    if {rank} == 1 and record["iteration"] == 1:
        os.kill(os.getpid(), signal.SIGSTOP)

loop.HistoryWriter.append = append_then_stall
open(os.path.join({tmp!r}, "ready{rank}"), "w").close()  # start fit together: the rendezvous is timed too
while not os.path.exists(os.path.join({tmp!r}, "ready{other}")):
    time.sleep(0.01)
t0 = time.time()
try:
    fastdelta.fit(tiny_net(bn=False), arrays(), None, distributed=True, dist_timeout=3, **{kw!r})
    print("rank 0 finished: the stall went unnoticed", flush=True)
except Exception as e:
    print(f"rank 0 after {{time.time() - t0:.0f}} s: {{type(e).__name__}}: {{e}}", flush=True)
os._exit(0)
"""


def stalled_rank():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kw = {**TINY, "iterations": 30, "checkpoint_every": 1000, "run_dir": str(TMP / "ddp")}
    procs = [subprocess.Popen([sys.executable, "-c", STALLING_RANK.format(
        root=str(ROOT), tests=str(ROOT / "tests"), rank=r, other=1 - r, port=port, tmp=str(TMP), kw=kw)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        for r in (0, 1)]
    try:
        out, _ = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()  # the stopped rank too (SIGKILL ends a stopped process)
            p.wait()
    return out.strip().splitlines()[-1] if out.strip() else "rank 0 printed nothing"


def sigterm_during(owner, name, *argv):
    """`fastdelta ARGV` with a SIGTERM sent to itself as owner.name starts."""
    real = getattr(owner, name)

    def signal_then_call(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    with sigterm_must_be_handled(), mock.patch.object(owner, name, signal_then_call):
        return cli_try(*argv)


def resume_a_finished_run():
    run = TMP / "finished"
    cli_try(*CLI_FIT, "--method", "l2", "--iterations", "2", "--out", run)
    before = (run / "result.json").read_bytes()
    said = cli_try("fit", "--resume", run)
    return f"{said}; result.json unchanged: {(run / 'result.json').read_bytes() == before}"


def edge_tries():
    from fastdelta.data import inputs
    print("distributed and preemption edges", flush=True)
    outcome("one of two gloo ranks stopped (SIGSTOP), dist_timeout=3", stalled_rank)
    outcome("SIGTERM while the data is scanned", lambda: sigterm_during(
        inputs, "scan_image_folder", *CLI_FIT, "--method", "l2", "--iterations", "2", "--out", TMP / "scan"))
    outcome("SIGTERM during the channel attention", lambda: sigterm_during(
        measure_module, "channel_loss_increase", *CLI_FIT, "--method", "delta", "--layers", "layer1.1.conv2",
        "--iterations", "2", "--attention-cache", "off", "--out", TMP / "att_stop"))
    outcome("`fastdelta fit --resume RUN` on a finished run", resume_a_finished_run)


# -- bad inputs that gave a silent wrong result (or a loud but unhelpful one) ------------------------------------

class Items(torch.utils.data.Dataset):
    """12 preprocessed (3, 16, 16) tensors with these labels; `odd` {index: shape}; `classes` if given."""

    def __init__(self, labels, odd=None, classes=None):
        self.labels, self.odd = list(labels), odd or {}
        if classes is not None:
            self.classes = classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.rand(self.odd.get(i, (3, 16, 16)), generator=torch.Generator().manual_seed(i)), self.labels[i]


class NoConv(torch.nn.Module):
    """A network without Conv2d (an MLP on 12 px crops)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 8), torch.nn.ReLU())
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def warned(fn) -> str:
    """fn()'s outcome and the fastdelta UserWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = fn()
    said = [str(w.message) for w in caught if str(w.message).startswith("fastdelta:")]
    if isinstance(r, fastdelta.FitResult):
        r = f"the fit ran ({len(r.history)} iterations, status {r.status})"
    return f"{r}; " + (" | ".join(said) if said else "no warning")


def one_class_folder():
    one = image_folder(TMP / "one", per_class=4, classes=("a",), size=20)
    return cli_try("fit", "--data", one, *CLI_FIT[3:], "--method", "l2", "--iterations", "2", "--out", TMP / "one_run")


def out_is_a_class_folder():
    said = cli_try(*CLI_FIT, "--method", "l2", "--iterations", "2", "--out", TMP / "data" / "train" / "a")
    from fastdelta.data import resolve_data
    classes = resolve_data(str(TMP / "data"), resize=16, crop=16).classes
    return f"{said}; classes of the data afterwards: {classes}"


def resume_on_other_threads():
    run, before = TMP / "threads", torch.get_num_threads()
    other = 2 if before == 1 else 1
    fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **TINY)
    os.remove(run / "checkpoints" / "ckpt-00000004.pt")
    torch.set_num_threads(other)
    try:
        said = warned(lambda: fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), resume=True, **TINY))
    finally:
        torch.set_num_threads(before)
    recorded = json.loads((run / "result.json").read_text())["settings"].get("resumed_cpu_threads")
    return f"{said}; result.json settings.resumed_cpu_threads: {recorded}"


def exif_rotated_jpeg():
    from fastdelta.data import load_rgb
    path = TMP / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(path, exif=exif)
    return f"stored 16 x 8 with EXIF orientation 6, read (W x H): {' x '.join(map(str, load_rgb(path).size))}"


def unwritable_attention_cache():
    blocker = TMP / "cache_file"
    blocker.write_text("a file where the cache folder should be")
    with mock.patch.dict(os.environ, {"FASTDELTA_CACHE": str(blocker)}):
        return warned(lambda: fastdelta.fit(tiny_net(), arrays(), None, **{**TINY, "method": "delta",
                                                                           "attention_cache": "auto"}))


def schedule_gives_nan():
    from fastdelta.train import loop
    real = loop.lr_at
    with mock.patch.object(loop, "lr_at", lambda it, *rest: float("nan") if it >= 2 else real(it, *rest)):
        try:
            fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(TMP / "nan_lr"), **TINY)
        except fastdelta.NonFiniteLossError as e:
            finite = all(bool(torch.isfinite(t).all()) for t in e.partial_result.model.state_dict().values()
                         if t.is_floating_point())
            return f"NonFiniteLossError: {one_line(str(e), 160)}; partial model finite: {finite}"


def image_changed_in_place():
    data = image_folder(TMP / "inplace", per_class=2, size=16)
    fastdelta.fit(tiny_net(), str(data), None, **TINY)
    path = data / "a" / "1.png"
    st, damaged = path.stat(), bytearray(path.read_bytes())
    damaged[len(damaged) // 2:len(damaged) // 2 + 40] = bytes(40)
    path.write_bytes(bytes(damaged))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the manifest's verdict stands
    return fastdelta.fit(tiny_net(), str(data), None, **TINY)


def stale_temp_files():
    run = TMP / "stale"
    fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **TINY)
    for p in (run / ".model.pt.k3j_x9a1.tmp", run / "checkpoints" / ".ckpt-00000004.pt.q8w2e7r6.tmp",
              run / "notes.tmp"):
        p.write_bytes(b"partial")  # as a kill -9 during atomic_write leaves them (and a file of the user's)
    fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), overwrite=True, **TINY)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*.tmp"))
    return f"*.tmp files after --overwrite: {left}"


def sigterm_during_compare():
    from fastdelta.apps.compare import runs
    real = runs.Runner.fit

    def fit_then_sigterm(self, *args, **kwargs):
        done = real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return done
    with sigterm_must_be_handled(), mock.patch.object(runs.Runner, "fit", fit_then_sigterm):
        return cli_try("compare", *CLI_FIT[1:], "--methods", "l2,l2_sp", "--seeds", "1", "--search", "none",
                       "--iterations", "1", "--curve-points", "0", "--schedules", "step", "--out", TMP / "cmp_term")


def bad_input_tries():
    print("bad inputs that gave a silent wrong result", flush=True)
    fit2 = [*CLI_FIT, "--method", "l2", "--iterations", "2"]
    outcome("1. one class folder", one_class_folder)
    outcome("1. arrays with one label", lambda: fastdelta.fit(tiny_net(), (x, np.zeros(12, np.int64)), None, **TINY))
    outcome("2. --out DATA/train/a (a class folder)", out_is_a_class_folder)
    for option in (["--lr-gamma", "nan"], ["--lr-gamma", "-1"], ["--lr-step", "-3"],
                   ["--lr-schedule", "exp", "--lr-step", "0"]):
        outcome(f"3. {' '.join(option)}", lambda option=option: cli_try(*fit2, *option, "--out", TMP / "lr"))
    outcome("4. a Dataset with labels 0.7, 1.7", lambda: fastdelta.fit(tiny_net(), Items([0.7, 1.7] * 6), None, **TINY))
    outcome("4. a Dataset with labels 'cat', 'dog'", lambda: fastdelta.fit(
        tiny_net(), Items(["cat", "dog"] * 6), None, **TINY))
    outcome("4. a Dataset of 3 classes whose item 5 has label 7", lambda: fastdelta.fit(
        tiny_net(), Items([7 if i == 5 else i % 3 for i in range(12)], classes=["x", "y", "z"]), None,
        **{**TINY, "batch_size": 12, "iterations": 1}))
    outcome("4. a Dataset whose item 5 is (3, 20, 20)", lambda: fastdelta.fit(
        tiny_net(), Items([i % 3 for i in range(12)], odd={5: (3, 20, 20)}), None,
        **{**TINY, "batch_size": 12, "iterations": 1}))
    cmp = ["compare", *CLI_FIT[1:], "--methods", "l2,l2_sp", "--seeds", "1", "--search", "none", "--iterations", "1",
           "--curve-points", "0", "--schedules", "step", "--out", TMP / "cmp_alphas"]
    outcome("5. compare --alphas '{\"l2_spp\": 0.1}'", lambda: cli_try(*cmp, "--alphas", '{"l2_spp": 0.1}'))
    outcome("5. compare --alphas '{\"l2_sp\": NaN}'", lambda: cli_try(*cmp, "--alphas", '{"l2_sp": NaN}'))
    outcome("6. --temperature inf", lambda: cli_try(*fit2, "--temperature", "inf", "--out", TMP / "temp"))
    outcome("7. resume with another thread count", resume_on_other_threads)
    outcome("8. a JPEG with EXIF orientation 6", exif_rotated_jpeg)
    outcome("9. --seed -1", lambda: cli_try(*fit2, "--seed", "-1", "--out", TMP / "seed"))
    outcome("9. --extra '{\"a\": NaN}'", lambda: cli_try(*fit2, "--extra", '{"a": NaN}', "--out", TMP / "extra"))
    outcome("9. FASTDELTA_CACHE is a file (delta fit)", unwritable_attention_cache)
    outcome("9. l2 on a network without Conv2d", lambda: fastdelta.fit(NoConv(), arrays(), None,
                                                                       **{**TINY, "layers": None}))
    outcome("9. the lr schedule gives NaN at iteration 2", schedule_gives_nan)
    outcome("9. an image corrupted in place (same size and mtime)", image_changed_in_place)
    outcome("9. --overwrite over a killed write's temp files", stale_temp_files)
    outcome("9. SIGTERM after compare's first run", sigterm_during_compare)


GROUPS = {"earlier": earlier_tries, "run_folders": run_folder_tries, "disks": disk_tries,
          "messages": message_tries, "edges": edge_tries, "bad_input": bad_input_tries}


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(GROUPS)
    unknown = [g for g in chosen if g not in GROUPS]
    if unknown:
        sys.exit(f"unknown group(s) {unknown}; groups: {', '.join(GROUPS)}")
    t0 = time.time()
    try:
        for group in chosen:
            GROUPS[group]()
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    print(f"({time.time() - t0:.0f} s)")
