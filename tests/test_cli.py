"""The command line, as a user runs it: --help, fit and attention round trips."""
import json
import subprocess
import sys

import pytest
import torch
import torchvision
from tiny import image_folder


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastdelta", *args], capture_output=True, text=True, timeout=300)


def test_the_module_door_prints_help():
    out = run("fit", "--help")
    assert out.returncode == 0 and "usage: fastdelta fit" in out.stdout


@pytest.mark.parametrize("command", ["fit", "attention", "demo", "compare", "bench"])
def test_help(command, capsys):
    """Every subcommand's --help, through the entry point's main (one process: the import is the cost)."""
    from fastdelta.apps.cli import main
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0 and "usage: fastdelta " + command in capsys.readouterr().out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for k, split in enumerate(("train", "test")):
        image_folder(root / split, per_class=4, seed=k, size=40, classes=("cat", "dog"), suffix="jpg")
    return root


def test_fit_round_trip(folder, tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pt")
    out = run("fit", "--data", str(folder), "--model", "resnet18", "--weights", str(tmp_path / "w.pt"),
              "--method", "delta", "--iterations", "2", "--batch-size", "4", "--resize", "36", "--crop", "32",
              "--no-progress", "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    result = json.load(open(tmp_path / "run" / "result.json"))
    assert printed["test"] == result["test"] and result["test"]["images"] == 8
    assert result["method"] == "delta" and result["model"]["arch"] == "resnet18"
    model = torchvision.models.resnet18(num_classes=2)
    model.load_state_dict(torch.load(tmp_path / "run" / "model.pt"))
    att = json.load(open(tmp_path / "run" / "channel_attention.json"))
    assert [len(v) for v in att["public_layout"]] == [64, 128, 256, 512]


def test_attention_command_and_clear_errors(folder, tmp_path):
    out = run("attention", "--data", str(folder), "--model", "resnet18", "--weights", "random", "--batch-size", "4",
              "--resize", "36", "--crop", "32", "--head-epochs", "1", "--no-progress", "--out", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    assert "NO PRE-TRAINED WEIGHTS" in out.stderr
    att = json.load(open(tmp_path / "a" / "channel_attention.json"))
    assert att["images"] == 8 and len(att["weights"]["layer4.1.conv2"]) == 512
    bad = run("fit", "--data", str(folder), "--model", "resnet18", "--weights", "random", "--layers", "layer9.conv",
              "--iterations", "1", "--batch-size", "4", "--no-progress", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "layer9.conv" in bad.stderr and "valid conv layers" in bad.stderr
    assert not (tmp_path / "b").exists()  # nothing half-written
