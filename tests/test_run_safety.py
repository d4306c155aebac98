"""What a careful user finds on tiny data: two runs in one folder, a resume on edited data, test images
that are training images, output folders taken for classes, a poisoned cache entry, an unbatched image,
file modes, and a disk that fills late. Each goes through fastdelta.fit / compare / the CLI."""
import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

import fastdelta
import fastdelta.fitting as fit_module
from fastdelta.apps.compare import CompareSettings, compare
from fastdelta.data import DataError, resolve_data
from tiny import TINY_LAYERS, arrays, image_folder, tiny_net

TESTS = os.path.dirname(os.path.abspath(__file__))
RUN = dict(method="l2", layers=TINY_LAYERS, iterations=4, checkpoint_every=2, batch_size=4, resize=16, crop=12,
           progress=False, attention_cache=None, attention_head_epochs=1, eval_batch_size=8)
TEST = arrays(1, seed=1)  # no image in common with arrays()


def folder(root, per_class=3, seed=0):
    return image_folder(root, per_class, seed, size=14)


# -- a run folder has an owner ---------------------------------------------------------------------------------

HOLDER = """
import sys, time
sys.path.insert(0, {tests!r})
import fastdelta
from fastdelta.train import loop
from tiny import arrays, tiny_net

append = loop.HistoryWriter.append
def append_then_wait(self, record):  # the run holds its folder, mid-training, until killed
    append(self, record)
    if record["iteration"] == 1:
        print("training", flush=True)
        time.sleep(600)

loop.HistoryWriter.append = append_then_wait
fastdelta.fit(tiny_net(), arrays(), None, run_dir={run!r}, **{kw!r})
"""


def test_a_second_run_fails_at_once_naming_the_holder_and_kill_9_frees_the_folder(tmp_path):
    run = tmp_path / "run"
    kw = {**RUN, "iterations": 50}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(tests=TESTS, run=str(run), kw=kw)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "training", "the holding run did not start"
        with pytest.raises(fastdelta.OutputError, match=rf"output folder {run} is in use by another fastdelta run "
                                                        rf"\(pid {holder.pid} on host .*, started "):
            fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **kw)
    finally:
        holder.kill()  # SIGKILL: no handler runs, the kernel drops the lock
        holder.wait()
    res = fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), overwrite=True, **RUN)
    assert len(res.history) == 4
    assert json.loads((run / ".fastdelta-run").read_text())["pid"] == os.getpid()


def test_a_new_run_refuses_an_earlier_runs_files_and_overwrite_clears_them(tmp_path):
    run = tmp_path / "run"
    fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **{**RUN, "iterations": 6})
    with pytest.raises(fastdelta.OutputError, match=r"holds the files of an earlier run \(result\.json, "
                                                    r"history\.jsonl, model\.pt, checkpoints/ckpt-00000004\.pt"):
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **RUN)
    assert len((run / "history.jsonl").read_text().splitlines()) == 6  # untouched
    with pytest.raises(fastdelta.SettingsError, match="choose one"):
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), resume=True, overwrite=True, **RUN)
    fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), overwrite=True, **RUN)
    # the old run's checkpoint 6 would have been the newest file: gone, so resume continues this run
    assert sorted(os.listdir(run / "checkpoints")) == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    assert len((run / "history.jsonl").read_text().splitlines()) == 4
    assert json.loads((run / "result.json").read_text())["iterations_run"] == 4


# -- resume checks contents, not counts ------------------------------------------------------------------------

def test_resume_on_an_edited_image_file_names_it(tmp_path):
    data, run = folder(tmp_path / "data"), tmp_path / "run"
    fastdelta.fit(tiny_net(num_classes=2), str(data), None, run_dir=str(run), **RUN)
    before = os.path.getsize(data / "a" / "1.png")
    Image.fromarray(np.zeros((14, 14, 3), np.uint8)).save(data / "a" / "1.png")  # same name, same count
    after = os.path.getsize(data / "a" / "1.png")
    with pytest.raises(fastdelta.SettingsError, match=rf"cannot resume {run}: train data: 1 file changed: "
                                                      rf"a/1\.png \(size {before} -> {after}\)"):
        fastdelta.fit(tiny_net(num_classes=2), str(data), None, run_dir=str(run), resume=True, **RUN)
    os.remove(data / "b" / "2.png")
    Image.fromarray(np.zeros((14, 14, 3), np.uint8)).save(data / "b" / "9.png")
    with pytest.raises(fastdelta.SettingsError, match=r"1 file added: b/9\.png; 1 file removed: b/2\.png"):
        fastdelta.fit(tiny_net(num_classes=2), str(data), None, run_dir=str(run), resume=True, **RUN)


def test_resume_on_other_array_contents_or_other_source_weights_is_refused(tmp_path):
    run = tmp_path / "run"
    fastdelta.fit(tiny_net(), arrays(), TEST, run_dir=str(run), **RUN)
    x, y = arrays()
    x[5, 3, 3, 0] ^= 1  # one pixel: same shape, same labels, same counts
    with pytest.raises(fastdelta.SettingsError, match="train data: content hash differs"):
        fastdelta.fit(tiny_net(), (x, y), TEST, run_dir=str(run), resume=True, **RUN)
    xt, yt = TEST
    with pytest.raises(fastdelta.SettingsError, match="test data: content hash differs"):
        fastdelta.fit(tiny_net(), arrays(), (xt[::-1].copy(), yt), run_dir=str(run), resume=True, **RUN)
    with pytest.raises(fastdelta.SettingsError, match=r"source weights: sha256 \w+\.\.\. in the checkpoint"):
        fastdelta.fit(tiny_net(seed=1), arrays(), TEST, run_dir=str(run), resume=True, **RUN)
    os.remove(run / "checkpoints" / "ckpt-00000004.pt")  # unfinished: a finished run is left as it is
    res = fastdelta.fit(tiny_net(), arrays(), TEST, run_dir=str(run), resume=True, **RUN)
    assert res.settings["resumed_from_iteration"] == 2


SEARCH = dict(iterations=2, batch_size=4, resize=16, crop=12, layers=TINY_LAYERS, eval_batch_size=8, progress=False)


def _search_once(out, train=None, model=None, reuse=False):
    cs = CompareSettings(alpha_grid=(0.01,), curve_points=0, map_images=1, schedules=("step",), reuse_runs=reuse)
    report = compare(model or tiny_net(), train or arrays(n_per_class=5), arrays(seed=1), methods=["l2_sp"],
                     seeds=1, out=out, compare_settings=cs, **SEARCH)
    return report["search"]["results"][0]["reused"]


def test_reuse_search_takes_only_runs_on_the_same_data_and_source_weights(tmp_path):
    out = tmp_path / "cmp"
    assert not _search_once(out)
    saved = out / "runs" / "search" / "l2_sp_a0.01_b0.01" / "result.json"
    record = json.loads(saved.read_text())
    assert record["data"]["train"]["fingerprint"]["sha256"] and record["model"]["source_sha256"]
    assert _search_once(out, reuse=True)
    x, y = arrays(n_per_class=5)
    x[0, 0, 0, 0] ^= 1
    assert not _search_once(out, train=(x, y), reuse=True)  # one pixel of the training data
    assert not _search_once(out, model=tiny_net(seed=3), reuse=True)  # other source weights
    _search_once(out)  # back to the original
    record = json.loads(saved.read_text())
    del record["data"]["train"]["fingerprint"]  # a result saved before fingerprints
    saved.write_text(json.dumps(record))
    assert not _search_once(out, reuse=True)


# -- train/test overlap ----------------------------------------------------------------------------------------

def test_a_hard_linked_or_copied_test_file_is_an_overlap(tmp_path):
    train = folder(tmp_path / "train")
    test = folder(tmp_path / "test", per_class=2, seed=1)
    os.link(train / "a" / "0.png", test / "a" / "linked.png")
    shutil.copy(train / "b" / "1.png", test / "b" / "copied.png")
    with pytest.raises(DataError, match=rf"2 test images are also in the training set \(same file \(inode\) or same "
                                        rf"bytes\), e\.g\. train {train / 'a' / '0.png'} = test "
                                        rf"{test / 'a' / 'linked.png'}; .*allow_overlap=True"):
        fastdelta.fit(tiny_net(num_classes=2), str(train), str(test), **RUN)
    res = fastdelta.fit(tiny_net(num_classes=2), str(train), str(test), allow_overlap=True, **RUN)
    assert res.data["overlap"]["images"] == 2


def test_the_training_folder_as_test_folder_and_identical_arrays_are_overlaps(tmp_path):
    train = folder(tmp_path / "train")
    with pytest.raises(DataError, match="6 test images are also in the training set"):
        fastdelta.fit(tiny_net(num_classes=2), str(train), str(train), **RUN)
    x, y = arrays()
    with pytest.raises(DataError, match=r"3 test images are also in the training set \(identical images\), "
                                        r"e\.g\. train image 3 = test image 0"):
        resolve_data((x, y), (x[[3, 4, 8]], y[[3, 4, 8]]), resize=16, crop=12)
    assert resolve_data((x, y), TEST, resize=16, crop=12).description["overlap"]["images"] == 0


# -- smaller silent cases ---------------------------------------------------------------------------------------

def test_output_folders_inside_the_data_root_are_not_classes(tmp_path):
    data = folder(tmp_path / "data")
    first = fastdelta.fit(tiny_net(num_classes=2), str(data), None, run_dir=str(data / "out"), **RUN)
    fastdelta.fit(tiny_net(num_classes=2), str(data), None, run_dir=str(data / "a" / "nested"), **RUN)
    assert (data / "out" / "history.png").is_file() and (data / "a" / "nested" / "history.png").is_file()
    again = fastdelta.fit(tiny_net(num_classes=2), str(data), None, **RUN)
    assert again.data["classes"] == ["a", "b"] == first.data["classes"]
    assert again.data["train"]["class_counts"] == [3, 3]
    skipped = dict(again.data["skipped_files"])
    assert "a fastdelta output folder" in skipped[str(data / "out")]
    assert "a fastdelta output folder" in skipped[str(data / "a" / "nested")]


def test_a_cached_attention_with_nan_is_recomputed(tmp_path):
    cache = tmp_path / "cache"
    kw = {**RUN, "method": "delta", "attention_cache": str(cache), "iterations": 2}
    first = fastdelta.fit(tiny_net(), arrays(), None, **kw)
    [entry] = list(cache.iterdir())
    poisoned = json.loads(entry.read_text())
    layer = poisoned["layers"][0]
    poisoned["raw"][layer] = [float("nan")] * len(poisoned["raw"][layer])
    entry.write_text(json.dumps(poisoned))
    again = fastdelta.fit(tiny_net(), arrays(), None, **kw)
    assert not again.attention.timings.get("cache_hit")
    for a, b in zip(again.attention.weights, first.attention.weights):
        assert torch.isfinite(a).all() and torch.allclose(a, b)
    assert all(np.isfinite(v) for v in json.loads(entry.read_text())["raw"][layer])  # stored again, whole


def test_an_unbatched_colour_image_with_as_many_labels_as_rows_is_refused():
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(DataError, match=r"train images has shape \(16, 16, 3\) \(H, W, C\): that looks like one "
                                        r"colour image; pass a batch .*x\[None\].*or grey images of width 3 as "
                                        r"\(N, H, W, 1\)"):
        fastdelta.fit(tiny_net(), (image, np.arange(16) % 5), None, **RUN)


class Labelled(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.targets, self.classes = list(labels), ["x", "y", "z"]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.zeros(3, 12, 12), self.targets[i]


def test_test_data_missing_a_class_is_refused_in_every_form(tmp_path):
    with pytest.raises(DataError, match=r"test labels \(arrays\) have no images for classes \['1'\]"):
        fastdelta.fit(tiny_net(num_classes=3), arrays(2, 3), (TEST[0][:2], np.array([0, 2])), **RUN)
    with pytest.raises(DataError, match=r"test labels \(dataset\) have no images for classes \['z'\]"):
        resolve_data(Labelled([0, 1, 2, 0, 1, 2]), Labelled([0, 1]), resize=16, crop=12)
    train, test = folder(tmp_path / "train"), folder(tmp_path / "test", per_class=1, seed=1)
    shutil.rmtree(test / "b")
    with pytest.raises(DataError, match=r"has class folders|has no images for classes \['b'\]"):
        resolve_data(str(train), str(test), resize=16, crop=12)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "run"), **{**RUN, "iterations": 2})
    finally:
        os.umask(old)
    run = tmp_path / "run"
    files = [run / n for n in ("result.json", "history.jsonl", "model.pt", "history.png", ".fastdelta-run")]
    files += list((run / "checkpoints").iterdir())
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(mode) for f in files}


# -- late write failures ---------------------------------------------------------------------------------------

def _disk_full_at(monkeypatch, name, free=0):
    """torch.save of a path named .NAME.* fails as it does on a full disk (a RuntimeError without errno),
    and the disk reports `free` bytes."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.path.basename(str(f)).startswith(f".{name}."):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *args, **kwargs)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - free, free))


def test_disk_full_at_model_pt_is_an_output_error_naming_the_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _disk_full_at(monkeypatch, "model.pt")
    monkeypatch.setattr(fit_module, "require_free_space", lambda *a, **k: None)  # the disk fills late
    with pytest.raises(fastdelta.OutputError) as e:
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **RUN)
    assert e.value.errno == errno.ENOSPC and "No space left on device" in str(e.value)
    assert f"last complete checkpoint {run / 'checkpoints' / 'ckpt-00000004.pt'}" in str(e.value)
    assert not (run / "model.pt").exists() and not [p for p in os.listdir(run) if p.endswith(".tmp")]


def test_cli_attention_on_a_full_disk_exits_2(tmp_path, monkeypatch, capsys):
    from fastdelta.apps import cli
    data = folder(tmp_path / "data", per_class=4)
    att = fastdelta.compute_attention(tiny_net(num_classes=2), str(data), layers=TINY_LAYERS, batch_size=4, resize=16,
                                      crop=12, progress=False, attention_cache=None, attention_head_epochs=1)
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if "w" in mode and os.path.basename(str(file)).startswith(".channel_attention.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("fastdelta.attention.measure.compute_attention", lambda *a, **k: att)
    monkeypatch.setattr(builtins, "open", open_)
    assert cli.main(["attention", "--data", str(data), "--out", str(tmp_path / "att"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"fastdelta: error: could not write {tmp_path / 'att' / 'channel_attention.json'}: No space left" in err
    assert "Traceback" not in err


def test_cli_divergence_with_a_full_disk_still_exits_3_with_a_note(tmp_path, monkeypatch, capsys):
    from fastdelta.apps import cli
    from fastdelta.train.loop import NonFiniteLossError

    class Unsaveable:
        def save(self, directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def diverging_fit(*args, **kwargs):
        e = NonFiniteLossError(3, "ce", float("nan"), [])
        e.partial_result = Unsaveable()
        raise e

    monkeypatch.setattr("fastdelta.fitting.fit", diverging_fit)
    assert cli.main(["fit", "--data", "d", "--out", str(tmp_path / "o"), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "fastdelta: error: non-finite loss term 'ce' at iteration 3" in err
    assert f"the partial result could not be saved in {tmp_path / 'o'}: No space left on device" in err


def test_a_disk_known_to_be_too_small_is_refused_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 6, 10 ** 6 - 2000, 2000))

    def no_training(*args, **kwargs):
        raise AssertionError("fit trained on a disk it knew to be too small")
    monkeypatch.setattr(fit_module, "train_loop", no_training)
    with pytest.raises(fastdelta.OutputError, match=rf"output folder {tmp_path / 'run'} has 2\.0 kB free, but this "
                                                    r"run's checkpoints and model\.pt need about [0-9.]+ kB: .*"
                                                    r"allow_low_disk=True \(CLI: --allow-low-disk\)") as e:
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "run"), **RUN)
    assert e.value.errno == errno.ENOSPC
    assert not (tmp_path / "run").exists()  # nothing was written: the folder made for the run is gone again
