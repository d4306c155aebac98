"""A finished run put to use, through the doors a user takes: fastdelta.fit writes a run (a randomly
initialised resnet18, one iteration on 20x20 PNGs of 6 classes), fastdelta.load rebuilds it, predict and
evaluate run it, `fastdelta predict / evaluate / export` do the same from the command line, and every
export is loaded back and compared with the eager network. Bad run folders and inputs fail by name."""
import csv
import json
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms as T

import fastdelta
import fastdelta.inference
from fastdelta.apps import cli
from fastdelta.inference import (ClassMismatchError, ExportDependencyError, ExportError, InputError, RunFolderError,
                                 WeightsMismatchError)
from tiny import arrays, image_folder, tiny_net

CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox")  # more than 5: top-5 is not always 100%


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(root, FitResult): ROOT/data/{train,test}/<class>/*.png and the run in ROOT/run."""
    root = tmp_path_factory.mktemp("inference")
    for k, split in enumerate(("train", "test")):
        image_folder(root / "data" / split, per_class=2, seed=k, size=20, classes=CLASSES)
    with pytest.warns(UserWarning, match="NO PRE-TRAINED WEIGHTS"):
        result = fastdelta.fit("resnet18", str(root / "data"), weights="random", method="l2", iterations=1,
                               batch_size=4, resize=18, crop=16, progress=False, run_dir=str(root / "run"))
    return root, result


@pytest.fixture(scope="module")
def model(run):
    return fastdelta.load(run[0] / "run")


def saved(root) -> dict:
    return json.loads((root / "run" / "result.json").read_text())


def image_paths(root) -> list:
    return sorted(str(p) for p in (root / "data" / "test").rglob("*.png"))


def by_hand(path) -> torch.Tensor:
    """The run's eval preprocessing written out: squash to 18x18, centre crop 16, ImageNet normalisation."""
    tf = T.Compose([T.Resize((18, 18)), T.CenterCrop(16), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return tf(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("command", ["predict", "evaluate", "export"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0 and "usage: fastdelta " + command in capsys.readouterr().out


def test_load_rebuilds_the_fitted_network_classes_and_transform(run, model):
    root, result = run
    assert model.classes == list(CLASSES) and not model.network.training
    fitted = result.model.state_dict()
    assert model.network.state_dict().keys() == fitted.keys()
    assert all(torch.equal(v, fitted[k]) for k, v in model.network.state_dict().items())
    path = image_paths(root)[0]
    assert torch.equal(model.transform(Image.open(path).convert("RGB")), by_hand(path))
    assert "load" in fastdelta.__all__ and fastdelta.load is fastdelta.inference.load


def test_evaluate_gives_the_runs_top1_and_agrees_with_predict(run, model):
    root, result = run
    evaluation = model.evaluate(str(root / "data" / "test"))
    assert evaluation.top1 == saved(root)["test"]["top1"] == result.test_top1
    assert evaluation.images == 12 and evaluation.classes == list(CLASSES)
    truth = [Path(p).parent.name for p in image_paths(root)]
    predictions = model.predict(str(root / "data" / "test"), top_k=5)
    assert evaluation.top1 == 100.0 * sum(p.label == t for p, t in zip(predictions, truth)) / 12
    assert evaluation.top5 == 100.0 * sum(t in p.labels for p, t in zip(predictions, truth)) / 12
    matrix = np.zeros((6, 6), dtype=int)
    for p, t in zip(predictions, truth):
        matrix[CLASSES.index(t), CLASSES.index(p.label)] += 1
    assert evaluation.confusion_matrix == matrix.tolist()
    for c, name in enumerate(CLASSES):
        assert evaluation.per_class[name] == {"accuracy": 100.0 * matrix[c, c] / 2, "images": 2}


def test_predict_takes_every_input_form_with_the_fitted_networks_probabilities(run, model):
    root, result = run
    paths = image_paths(root)
    with torch.no_grad():
        expected = F.softmax(result.model(torch.stack([by_hand(p) for p in paths])), dim=1)
    folder = model.predict(str(root / "data" / "test"), top_k=100)
    assert [p.path for p in folder] == paths
    for p, want in zip(folder, expected):
        assert p.labels == [CLASSES[i] for i in want.argsort(descending=True).tolist()]
        assert np.allclose(p.probabilities, want.sort(descending=True).values.numpy(), atol=1e-5)
        assert p.probabilities == sorted(p.probabilities, reverse=True) and abs(sum(p.probabilities) - 1) < 1e-5
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[:3]])
    forms = {"one path": paths[0], "a list of paths": paths[:3], "a PIL image": Image.open(paths[0]),
             "a uint8 batch": pixels, "a float tensor batch": torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255.0}
    for form, given in forms.items():
        got = model.predict(given, top_k=2)
        n = len(got)
        assert n == (1 if form in ("one path", "a PIL image") else 3), form
        assert all(len(p.labels) == 2 for p in got), form
        assert [p.labels for p in got] == [p.labels[:2] for p in folder[:n]], form
        assert np.allclose([p.probabilities for p in got], [p.probabilities[:2] for p in folder[:n]], atol=1e-5), form
        assert [p.path for p in got] == (paths[:n] if "path" in form else [None] * n), form


def test_predict_refuses_unusable_inputs_by_name(run, model, tmp_path):
    with pytest.raises(InputError, match=re.escape(f"image {tmp_path / 'nope.png'} does not exist")):
        model.predict(str(tmp_path / "nope.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=re.escape(f"folder {tmp_path / 'empty'} holds no image files")):
        model.predict(str(tmp_path / "empty"))
    with pytest.raises(InputError, match=r"looks like one colour image"):
        model.predict(np.zeros((20, 20, 3), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=re.escape(f"image {tmp_path / 'broken.png'} cannot be read")):
        model.predict([str(tmp_path / "broken.png")])
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        model.predict(np.zeros((1, 20, 20, 3), dtype=np.uint8), top_k=0)


def test_predict_command_writes_one_row_per_image(run, model, tmp_path, capsys):
    root, _ = run
    folder, paths = str(root / "data" / "test"), image_paths(root)
    api = model.predict(folder, top_k=3)
    assert cli.main(["predict", str(root / "run"), folder, "--top-k", "3", "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["path"] for r in rows] == paths
    assert [[r[f"label_{i}"] for i in (1, 2, 3)] for r in rows] == [p.labels for p in api]
    assert cli.main(["predict", str(root / "run"), folder, "--top-k", "3", "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text()) == [p.to_dict() for p in api]
    capsys.readouterr()
    assert cli.main(["predict", str(root / "run"), paths[0], paths[5], "--top-k", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[1].startswith(paths[0]) and table[2].startswith(paths[5])
    assert f"{api[5].label} ({api[5].probability:.3f})" in table[2]
    assert cli.main(["predict", str(root / "run"), folder, "--out", str(tmp_path / "p.txt")]) == 2
    assert "give a .csv or a .json file" in capsys.readouterr().err and not (tmp_path / "p.txt").exists()


def test_evaluate_command_writes_evaluation_json_and_the_confusion_matrix(run, tmp_path, capsys):
    root, _ = run
    assert cli.main(["evaluate", str(root / "run"), "--test", str(root / "data" / "test"),
                     "--out", str(tmp_path / "ev")]) == 0
    written = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert written["top1"] == saved(root)["test"]["top1"] and written["images"] == 12
    assert sum(map(sum, written["confusion_matrix"])) == 12 and set(written["per_class"]) == set(CLASSES)
    assert (tmp_path / "ev" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(capsys.readouterr().out)["top1"] == written["top1"]
    assert cli.main(["evaluate", str(root / "run"), "--test", str(root / "data" / "test")]) == 0
    assert (root / "run" / "evaluation" / "evaluation.json").is_file()


def test_evaluate_refuses_a_test_set_of_other_classes(run, model, tmp_path, capsys):
    root, _ = run
    image_folder(tmp_path / "other", per_class=1, classes=("cat", "zebra"))
    message = f"test folder {tmp_path / 'other'} has class folders ['zebra'] that the run was not fitted on"
    with pytest.raises(ClassMismatchError, match=re.escape(message)):
        model.evaluate(str(tmp_path / "other"))
    assert cli.main(["evaluate", str(root / "run"), "--test", str(tmp_path / "other"),
                     "--out", str(tmp_path / "ev")]) == 2
    assert "zebra" in capsys.readouterr().err and not (tmp_path / "ev").exists()
    with pytest.raises(ClassMismatchError, match=r"test labels range over \[0, 6\]"):
        model.evaluate((np.zeros((2, 20, 20, 3), dtype=np.uint8), np.array([0, 6])))
    image_folder(tmp_path / "some", per_class=1, classes=("cat", "dog"))  # a subset of the classes is fine
    subset = model.evaluate(str(tmp_path / "some"))
    assert subset.images == 2 and subset.per_class["ant"] == {"accuracy": None, "images": 0}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "pt2"])
def test_export_command_writes_a_file_that_gives_the_eager_logits(run, model, tmp_path, fmt, capsys):
    root, _ = run
    out = tmp_path / f"model.{fmt}"
    assert cli.main(["export", str(root / "run"), "--format", fmt, "--out", str(out)]) == 0
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["classes"] == list(CLASSES) and sidecar["format"] == fmt
    assert {k: sidecar["transform"][k] for k in ("augmentation", "resize", "crop", "mean", "std")} == {
        "augmentation": "default", "resize": 18, "crop": 16, "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225]}
    assert sidecar["check"]["max_abs_diff"] <= sidecar["check"]["allowed"]
    x = torch.stack([model.transform(Image.open(p).convert("RGB")) for p in image_paths(root)])
    with torch.no_grad():
        eager = model.network(x)
        if fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                exported = torch.jit.load(str(out))(x)
        elif fmt == "pt2":
            exported = torch.export.load(str(out)).module()(x)
        else:
            import onnxruntime
            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            exported = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert exported.shape == (12, 6)
    assert (exported - eager).abs().max() <= 1e-4 * max(1.0, eager.abs().max().item())
    assert sorted(os.listdir(tmp_path)) == sorted([out.name, f"{out.name}.json"])  # no temporary file left


def test_an_export_that_differs_from_the_eager_network_is_not_written(model, tmp_path, monkeypatch):
    from fastdelta.inference import export
    real = export._LOADERS["torchscript"]
    monkeypatch.setitem(export._LOADERS, "torchscript", lambda data: (lambda x: real(data)(x) + 1e-2))
    with pytest.raises(ExportError, match=r"differs from the eager network by 0\.01.*nothing was written"):
        model.export("torchscript", tmp_path / "m.ts")
    assert os.listdir(tmp_path) == []


def test_onnx_export_without_its_packages_says_what_to_install(run, model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails, as when not installed
    with pytest.raises(ExportDependencyError, match="onnxruntime is not installed: pip install onnx") as e:
        model.export("onnx", tmp_path / "m.onnx")
    assert isinstance(e.value, ValueError) and isinstance(e.value, ImportError)
    assert cli.main(["export", str(run[0] / "run"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install onnx" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_folders_that_are_not_usable_runs_fail_by_name(run, tmp_path, capsys):
    root, _ = run
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(RunFolderError, match=re.escape(f"run folder {bad} has no result.json")):
        fastdelta.load(bad)
    (bad / "result.json").write_text((root / "run" / "result.json").read_text())
    with pytest.raises(RunFolderError, match=re.escape(f"run folder {bad} has no model.pt")):
        fastdelta.load(bad)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), bad / "model.pt")  # 3 classes, not 6
    with pytest.raises(WeightsMismatchError,
                       match=re.escape(f"{bad / 'model.pt'} does not match") + r".* shape mismatch: \['fc\.weight"):
        fastdelta.load(bad)
    (bad / "result.json").write_text("{not json")
    with pytest.raises(RunFolderError, match=re.escape(f"{bad / 'result.json'} could not be read as JSON")):
        fastdelta.load(bad)
    assert cli.main(["predict", str(bad), str(root / "data" / "test")]) == 2
    assert f"{bad / 'result.json'} could not be read as JSON" in capsys.readouterr().err


class RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_model_pt_is_refused_without_running_its_code(run, tmp_path):
    root, _ = run
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    (crafted / "result.json").write_text((root / "run" / "result.json").read_text())
    torch.save({"fc.weight": RunsCode(tmp_path / "pwned")}, crafted / "model.pt")
    with pytest.raises(RunFolderError, match=re.escape(f"{crafted / 'model.pt'} was refused")):
        fastdelta.load(crafted)
    assert not (tmp_path / "pwned").exists()


def test_a_custom_network_fitted_with_ten_crops(tmp_path):
    """A run of a user's nn.Module needs it given back; its 10-crop evaluation gives both of fit's top-1s."""
    test = arrays(2, seed=1)
    result = fastdelta.fit(tiny_net(), arrays(), test, method="l2", iterations=2, batch_size=4, resize=18, crop=14,
                           augmentation="improved", progress=False, run_dir=str(tmp_path / "run"))
    with pytest.raises(RunFolderError, match="fine-tuned a custom nn.Module.*architecture=module"):
        fastdelta.load(tmp_path / "run")
    model = fastdelta.load(tmp_path / "run", architecture=tiny_net())
    assert model.transform(Image.fromarray(test[0][0])).shape == (10, 3, 14, 14)
    evaluation = model.evaluate(test)
    assert (evaluation.top1, evaluation.top1_10crop) == (result.test["top1"], result.test["top1_10crop"])
    x = model.transform(Image.fromarray(test[0][0]))
    with torch.no_grad():
        want = F.softmax(result.model.eval()(x), dim=1).mean(0)
    (got,) = model.predict(test[0][:1], top_k=3)
    assert np.allclose(got.probabilities, want.sort(descending=True).values.numpy(), atol=1e-6)
