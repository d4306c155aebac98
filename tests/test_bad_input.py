"""Inputs that used to give a silent wrong result (or a loud but unhelpful one), each now refused with an
error that names the file, setting or option and what is wrong, before anything is written, or handled
correctly: one class, an --out inside the data, lr schedule values, Dataset labels and shapes, compare's
per-method alphas, the attention temperature, a resume on another thread count, EXIF orientation, and the
smaller cases (seed, --extra, attention cache, a network without Conv2d, a non-finite lr, an image changed
in place, stale temp files, SIGTERM during compare). Tiny data: 16 px images, 1-4 iterations."""
import json
import math
import os
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import fastdelta
from fastdelta.apps import cli
from fastdelta.apps.compare import CompareSettings, compare
from fastdelta.data import DataError, load_rgb, resolve_data, scan_image_folder
from fastdelta.data.dali import dali_import_error, image_size
from fastdelta.networks.models import ModelError
from fastdelta.output_files import RUN_MARKER, OutputError
from fastdelta.settings import SettingsError, make_settings
from fastdelta.train.loop import NonFiniteLossError
from tiny import TINY_LAYERS, arrays, image_folder, sigterm_must_be_handled, tiny_net

RUN = dict(method="l2", layers=TINY_LAYERS, iterations=2, checkpoint_every=2, batch_size=4, resize=16, crop=12,
           progress=False, attention_cache=None, attention_head_epochs=1, eval_batch_size=8)


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    """ROOT/data/{train,test}/{cat,dog} (4 random PNGs each) and w.pt (a randomly initialised resnet18)."""
    root = tmp_path_factory.mktemp("bad_input_cli")
    for k, split in enumerate(("train", "test")):
        image_folder(root / "data" / split, per_class=4, seed=k, size=20, classes=("cat", "dog"))
    torch.save(torchvision.models.resnet18().state_dict(), root / "w.pt")
    return root


def cli_fit(root, *more):
    return ["fit", "--data", str(root / "data"), "--model", "resnet18", "--weights", str(root / "w.pt"),
            "--resize", "16", "--crop", "16", "--batch-size", "4", "--no-progress", "--method", "l2",
            "--iterations", "2", *more]


# -- 1. one class ----------------------------------------------------------------------------------------------

def test_training_data_with_one_class_is_refused(tmp_path, capsys):
    one = image_folder(tmp_path / "one", per_class=4, classes=("a",))
    with pytest.raises(DataError, match=rf"train folder {re.escape(str(one))} has one class folder \('a'\): "
                                        "classification needs at least two classes"):
        fastdelta.fit(tiny_net(), str(one), None, **RUN)
    x, _ = arrays()
    with pytest.raises(DataError, match=r"train labels \(arrays\) hold one class \('0'\)"):
        fastdelta.fit(tiny_net(), (x, np.zeros(len(x), dtype=np.int64)), None, **RUN)
    out = tmp_path / "run"
    assert cli.main(["fit", "--data", str(one), "--model", "resnet18", "--weights", "random", "--out", str(out),
                     "--iterations", "1", "--no-progress"]) == 2
    assert f"train folder {one} has one class folder" in capsys.readouterr().err and not out.exists()


# -- 2. an output folder inside the data ------------------------------------------------------------------------

def test_an_output_folder_that_is_a_class_folder_or_the_data_folder_is_refused_before_writing(tmp_path, capsys):
    data = tmp_path / "data"
    image_folder(data / "train", classes=("a", "b", "c"))
    with pytest.raises(OutputError, match=rf"output folder {re.escape(str(data / 'train' / 'c'))} is the class "
                                          "folder 'c' of the training data folder"):
        fastdelta.fit(tiny_net(), str(data), None, run_dir=str(data / "train" / "c"), **RUN)
    image_folder(data / "test", per_class=1, seed=1, classes=("a", "b", "c"))
    for out, what in ((data / "test" / "b", "the class folder 'b' of the test data folder"),
                      (data / "train", "the training data folder")):
        with pytest.raises(OutputError, match=rf"output folder {re.escape(str(out))} is {what}"):
            fastdelta.fit(tiny_net(), str(data), None, run_dir=str(out), **RUN)
    assert cli.main(["fit", "--data", str(data), "--model", "resnet18", "--weights", "random", "--no-progress",
                     "--iterations", "1", "--out", str(data / "train" / "c"), "--overwrite"]) == 2
    assert "is the class folder 'c' of the training data folder" in capsys.readouterr().err
    assert not list(data.rglob(RUN_MARKER)), "nothing may be written into the data"
    assert resolve_data(str(data), resize=16, crop=12).classes == ["a", "b", "c"]
    # a class folder an earlier version marked (its images still there) is data, not an output folder
    (data / "train" / "b" / RUN_MARKER).write_text("{}")
    with pytest.raises(OutputError, match="is the class folder 'b'"):
        fastdelta.fit(tiny_net(), str(data), None, run_dir=str(data / "train" / "b"), overwrite=True, **RUN)


# -- 3. lr schedule, 6. temperature, 9. seed and extra: settings ------------------------------------------------

@pytest.mark.parametrize("given, message", [
    (dict(lr_gamma=math.nan), r"lr_gamma=nan: must be a finite number in \(0, 1\]"),
    (dict(lr_gamma=-1), r"lr_gamma=-1: must be a finite number in \(0, 1\]"),
    (dict(lr_gamma=0.0), r"lr_gamma=0.0: must be"),
    (dict(lr_gamma=10.0), r"lr_gamma=10.0: must be"),
    (dict(lr_step=-3), r"lr_step=-3: must be an integer >= 1 \(the iterations of the step lr schedule's step\)"),
    (dict(lr_schedule="exp", lr_step=0), r"lr_step=0: must be an integer >= 1 \(the iterations of the exp lr"),
    (dict(attention_temperature=math.inf), r"attention_temperature=inf: must be a finite number > 0"),
    (dict(attention_temperature=math.nan), r"attention_temperature=nan: must be a finite number > 0"),
    (dict(seed=-1), r"seed=-1: must be an integer from 0 to 2\*\*32 - 1"),
    (dict(extra={"a": math.nan}), r"extra=\{'a': nan\}: holds a NaN or infinite number"),
    (dict(extra={"a": [1, {"b": -math.inf}]}), r"extra=.*: holds a NaN or infinite number"),
])
def test_settings_that_cannot_work_are_named(given, message):
    with pytest.raises(SettingsError, match=message):
        make_settings(**given)


def test_the_defaults_and_edge_values_still_resolve():
    s = make_settings(lr_gamma=1.0, lr_step=1, lr_schedule="exp", seed=2 ** 32 - 1, extra={"note": "nan"},
                      attention_temperature=0.5).resolved()
    assert (s.lr_gamma, s.lr_step, s.seed) == (1.0, 1, 2 ** 32 - 1)
    assert make_settings(iterations=1).resolved().lr_step == 1


@pytest.mark.parametrize("option, message", [
    (["--lr-gamma", "nan"], "lr_gamma=nan"), (["--lr-gamma", "-1"], "lr_gamma=-1"),
    (["--lr-step", "-3"], "lr_step=-3"), (["--lr-schedule", "exp", "--lr-step", "0"], "lr_step=0"),
    (["--temperature", "inf"], "attention_temperature=inf"), (["--seed", "-1"], "seed=-1"),
    (["--extra", '{"a": NaN}'], "extra={'a': nan}"),
])
def test_the_command_line_names_the_option_and_writes_nothing(cli_data, tmp_path, capsys, option, message):
    out = tmp_path / "run"
    assert cli.main(cli_fit(cli_data, *option, "--out", str(out))) == 2
    assert f"fastdelta: error: {message}" in capsys.readouterr().err
    assert not out.exists()


# -- 4. a Dataset's labels and shapes ---------------------------------------------------------------------------

class Items(torch.utils.data.Dataset):
    """12 preprocessed (3, 16, 16) tensors with the given labels; `odd` = {index: shape} for other shapes;
    `classes` declared when given (then its labels are only seen as items are read)."""

    def __init__(self, labels, odd=None, classes=None):
        self.labels, self.odd = list(labels), odd or {}
        if classes is not None:
            self.classes = classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.rand(self.odd.get(i, (3, 16, 16)), generator=torch.Generator().manual_seed(i)), self.labels[i]


def test_a_dataset_with_float_or_string_labels_is_refused_naming_the_item():
    with pytest.raises(DataError, match=r"train dataset item 0: label 0.7 \(float\) is not an integer class index"):
        fastdelta.fit(tiny_net(), Items([0.7, 1.7] * 6), None, **RUN)
    with pytest.raises(DataError, match=r"train dataset item 0: label 'cat' \(str\) is not an integer class index"):
        fastdelta.fit(tiny_net(), Items(["cat", "dog"] * 6), None, **RUN)
    data = Items([0, 1] * 6)
    data.targets = [0.0, 1.0] * 6
    with pytest.raises(DataError, match=r"train dataset's targets: item 0 has label 0.0 \(dtype float64\)"):
        resolve_data(data, resize=16, crop=12)
    numpy_labels = resolve_data(Items(list(np.arange(12) % 3)), resize=16, crop=12)  # numpy and 0-d tensors are fine
    assert numpy_labels.train[0][1] == 0 and resolve_data(Items([torch.tensor(i % 2) for i in range(12)]),
                                                          resize=16, crop=12).classes == ["0", "1"]


def test_a_dataset_label_out_of_range_or_an_item_of_another_shape_is_named():
    labels = [i % 3 for i in range(12)]
    labels[5] = 7
    whole_set = {**RUN, "batch_size": 12, "iterations": 1}  # item 5 is in the first batch
    with pytest.raises(DataError, match=r"train dataset item 5: label 7 is out of range for the 3 classes "
                                        r"\(labels 0..2\)"):
        fastdelta.fit(tiny_net(), Items(labels, classes=["x", "y", "z"]), None, **whole_set)
    with pytest.raises(DataError, match=r"train dataset item 5: image of shape \(3, 20, 20\), but item 0's is "
                                        r"\(3, 16, 16\)"):
        fastdelta.fit(tiny_net(), Items([i % 3 for i in range(12)], odd={5: (3, 20, 20)}), None, **whole_set)


# -- 5. compare's per-method alphas -----------------------------------------------------------------------------

@pytest.mark.parametrize("alphas, message", [
    ({"l2_spp": 0.1}, r"alphas=\{'l2_spp': 0.1\}: 'l2_spp' is not a method"),
    ({"l2_sp": math.nan}, r"alphas=\{'l2_sp': nan\}: l2_sp's alpha nan must be a finite number > 0"),
    ({"l2_sp": 0}, r"l2_sp's alpha 0 must be a finite number > 0"),
    ({"l2": 0.1}, r"l2 has no alpha"),
    ({"delta": 0.1}, r"'delta' is not among the compared methods"),
])
def test_compare_alphas_are_checked_before_any_fit(tmp_path, monkeypatch, alphas, message):
    from fastdelta.apps.compare import runs

    def no_fit(*args, **kwargs):
        raise AssertionError("a fit ran before the alphas were checked")
    monkeypatch.setattr(runs, "fit", no_fit)
    cs = CompareSettings(alphas=alphas, curve_points=0, schedules=("step",))
    with pytest.raises(SettingsError, match=message):
        compare(tiny_net(), arrays(), arrays(1, seed=1), methods=["l2", "l2_sp"], seeds=1, search="none",
                out=tmp_path / "cmp", compare_settings=cs, log=lambda *a, **k: None,
                **{k: v for k, v in RUN.items() if k != "method"})
    assert not (tmp_path / "cmp").exists()


def test_compare_alphas_from_the_command_line(cli_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    base = cli_fit(cli_data)[1:-4] + ["--methods", "l2,l2_sp", "--seeds", "1", "--iterations", "1", "--curve-points",
                                      "0", "--schedules", "step", "--out", str(out)]
    assert cli.main(["compare", *base, "--search", "none", "--alphas", '{"l2_spp": 0.1}']) == 2
    assert "fastdelta: error: alphas={'l2_spp': 0.1}: 'l2_spp' is not a method" in capsys.readouterr().err
    assert cli.main(["compare", *base, "--alphas", '{"l2_sp": 0.1}']) == 2  # searched: the alpha would be unused
    assert "used only with search='none'" in capsys.readouterr().err and not out.exists()


# -- 7. resume on another thread count ---------------------------------------------------------------------------

def test_resuming_with_another_thread_count_warns_and_records_both(tmp_path):
    run, before = tmp_path / "run", torch.get_num_threads()
    other = 2 if before == 1 else 1
    kw = {**RUN, "iterations": 4}
    fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **kw)
    os.remove(run / "checkpoints" / "ckpt-00000004.pt")  # as if killed before its last checkpoint
    torch.set_num_threads(other)
    try:
        with pytest.warns(UserWarning, match=rf"resuming {re.escape(str(run))} with {other} CPU threads, but it ran "
                                             rf"with {before} up to its checkpoint"):
            fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), resume=True, **kw)
    finally:
        torch.set_num_threads(before)
    saved = json.loads((run / "result.json").read_text())
    assert saved["settings"]["resumed_cpu_threads"] == {"checkpoint": before, "now": other}
    assert saved["environment"]["cpu_threads"] == other


# -- 8. EXIF orientation -----------------------------------------------------------------------------------------

def test_a_jpeg_with_an_exif_orientation_is_read_upright(tmp_path):
    stored = np.zeros((8, 16, 3), np.uint8)  # 16 wide, 8 high as stored; red on the left half
    stored[:, :8] = (255, 0, 0)
    (tmp_path / "data" / "a").mkdir(parents=True)
    image_folder(tmp_path / "data", per_class=2, classes=("b",))
    path = tmp_path / "data" / "a" / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = np.asarray(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270), dtype=float)
    image = load_rgb(path)
    assert image.size == (8, 16) and np.abs(np.asarray(image, dtype=float) - upright).mean() < 8
    index = scan_image_folder(tmp_path / "data")
    assert (str(path), 0) in index.samples and image_size(str(path)) == (8, 16)  # DALI's resize sees it upright


@pytest.mark.skipif(dali_import_error() is not None, reason=f"needs NVIDIA DALI: {dali_import_error()}")
@pytest.mark.parametrize("augmentation", ["default", "improved"])
def test_dali_reads_an_exif_oriented_jpeg_upright_as_the_pil_path_does(tmp_path, augmentation):
    from fastdelta.data import ImageListDataset, build_center_transform
    from fastdelta.data.dali import DaliLoader
    yy, xx = np.mgrid[0:24, 0:40]  # a smooth picture 40 wide, 24 high as stored
    stored = np.stack([xx * 6, yy * 10, (xx + yy) * 3], -1).astype(np.uint8)
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = tmp_path / "upright.png"  # the picture as it is meant to be seen, without a tag
    Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270).save(upright)
    expected = ImageListDataset([(str(upright), 0)], build_center_transform(augmentation, 20, 16))[0][0]
    samples = [(str(path), 0)]
    pil = ImageListDataset(samples, build_center_transform(augmentation, 20, 16))[0][0]
    dali = next(iter(DaliLoader(samples, train=False, batch_size=1, augmentation=augmentation, resize=20, crop=16,
                                num_threads=1, ten_crop=False)))[0][0]
    for x in (pil, dali):  # JPEG and resampling differ by a grey level or two; read sideways by about 1
        assert (x - expected).abs().mean() < 0.05


# -- 9. the smaller cases ----------------------------------------------------------------------------------------

def test_an_attention_cache_that_cannot_be_written_costs_only_the_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FASTDELTA_CACHE", str(blocker))
    with pytest.warns(UserWarning, match=rf"could not store the channel attention in the cache folder "
                                         rf"{re.escape(str(blocker / 'attention'))} .*--attention-cache off"):
        res = fastdelta.fit(tiny_net(), arrays(), None, **{**RUN, "method": "delta", "attention_cache": "auto"})
    assert res.status == "ok" and len(res.history) == 2 and res.attention is not None


class NoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 8), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.body(x))


def test_a_network_without_conv2d_trains_with_l2_and_is_refused_by_feature_map_methods():
    res = fastdelta.fit(NoConv(), arrays(), None, **{**RUN, "layers": None})
    assert res.status == "ok" and res.model_info["layers"] == [] and len(res.history) == 2
    with pytest.raises(ModelError, match="model has no Conv2d layer to regularise"):
        fastdelta.fit(NoConv(), arrays(), None, **{**RUN, "method": "delta_no_att", "layers": None})


def test_a_non_finite_lr_from_the_schedule_stops_before_its_update(tmp_path, monkeypatch):
    from fastdelta.train import loop
    real = loop.lr_at
    monkeypatch.setattr(loop, "lr_at", lambda it, *rest: math.nan if it >= 1 else real(it, *rest))
    with pytest.raises(NonFiniteLossError, match=r"non-finite learning rate from the lr schedule at iteration 1 "
                                                 r"\(nan\); training stopped, the model keeps its state after "
                                                 r"iteration 0") as caught:
        fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(tmp_path / "run"), **{**RUN, "iterations": 3})
    assert all(torch.isfinite(t).all() for t in caught.value.partial_result.model.state_dict().values()
               if t.is_floating_point())


def test_an_update_that_made_the_weights_non_finite_is_said_and_no_model_pt_is_written(tmp_path, monkeypatch):
    from fastdelta.train import steps
    real = steps.Step.update

    def overflowing(self, ok=None):  # as an lr too large for the gradient would
        real(self, ok)
        with torch.no_grad():
            self.opt.param_groups[0]["params"][0].fill_(math.inf)
    monkeypatch.setattr(steps.Step, "update", overflowing)
    with pytest.raises(NonFiniteLossError, match=r"at iteration 1 \(nan\); training stopped, but the update of "
                                                 r"iteration 0 \(lr 0.01\) had already made the weights NaN or "
                                                 "infinite: the model holds no good state") as caught:
        fastdelta.fit(tiny_net(), arrays(), None, **{**RUN, "iterations": 3})
    partial = caught.value.partial_result
    partial.save(tmp_path / "partial")  # what the CLI does with a diverged run
    assert not (tmp_path / "partial" / "model.pt").exists()
    saved = json.loads((tmp_path / "partial" / "result.json").read_text())
    assert saved["model_file"].startswith("not written") and saved["status"].startswith("diverged")


def test_an_image_corrupted_in_place_is_named_when_read(tmp_path):
    data = image_folder(tmp_path / "data", per_class=2, size=16)
    scan_image_folder(data)  # the manifest now holds every file's verdict under its size and mtime
    path = data / "a" / "1.png"
    st, damaged = path.stat(), bytearray(path.read_bytes())
    damaged[len(damaged) // 2:len(damaged) // 2 + 40] = bytes(40)  # pixel data, same size
    path.write_bytes(bytes(damaged))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match=rf"image file {re.escape(str(path))} can no longer be read \(.*\); it was "
                                        "readable when the folder was scanned"):
        fastdelta.fit(tiny_net(), str(data), None, **RUN)


def test_overwrite_removes_the_temp_files_a_killed_write_left(tmp_path):
    run = tmp_path / "run"
    fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), **RUN)
    stale = [run / ".model.pt.k3j_x9a1.tmp", run / ".result.json.0a9b8c7d.tmp",
             run / "checkpoints" / ".ckpt-00000002.pt.q8w2e7r6.tmp"]
    others = [run / ".notes.tmp", run / "draft.tmp", run / "checkpoints" / "mine.tmp"]
    for p in stale + others:
        p.write_bytes(b"partial")
    fastdelta.fit(tiny_net(), arrays(), None, run_dir=str(run), overwrite=True, **RUN)
    assert [p.name for p in stale if p.exists()] == [] and all(p.exists() for p in others)


def test_sigterm_during_compare_names_the_finished_runs_and_exits_143(cli_data, tmp_path, capsys, monkeypatch):
    from fastdelta.apps.compare import runs
    real = runs.Runner.fit

    def fit_then_sigterm(self, *args, **kwargs):
        done = real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return done
    monkeypatch.setattr(runs.Runner, "fit", fit_then_sigterm)
    out = tmp_path / "cmp"
    with sigterm_must_be_handled():
        status = cli.main(["compare", *cli_fit(cli_data)[1:-4], "--iterations", "1", "--methods", "l2,l2_sp",
                           "--seeds", "1", "--search", "none", "--curve-points", "0", "--schedules", "step",
                           "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 143
    assert (f"fastdelta: stopped by SIGTERM while comparing: 1 run finished in {out / 'runs'} (l2_seed0); run the "
            "same command again with --reuse-runs") in err
    assert (out / "runs" / "l2_seed0" / "result.json").is_file()
