"""Pre-trained weights by name (torchvision's DEFAULT / IMAGENET1K_V1, timm's `pretrained`): read from a
temporary TORCH_HOME / HF_HOME cache, never downloaded; a missing file names where to put which file."""
import json
import os
import re
from urllib.parse import urlparse

import pytest
import torch
import torch.hub
import torchvision

import fastdelta
import fastdelta.run_setup as run_setup
from fastdelta.apps import cli
from fastdelta.networks.models import ModelError, build_networks
from tiny import image_folder

RUN = dict(method="l2", iterations=1, batch_size=2, resize=16, crop=16, progress=False, attention_cache=None,
           eval_batch_size=4)
URL = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # an earlier torch.hub.set_dir would win over TORCH_HOME
    assert torch.hub.get_dir() == str(home / "hub")
    return home


@pytest.fixture
def resnet18_file(torch_home):
    """A randomly initialised resnet18's state dict where torchvision's IMAGENET1K_V1 url maps to."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()
    path = torch_home / "hub" / "checkpoints" / os.path.basename(urlparse(URL).path)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path, state


@pytest.fixture
def data(tmp_path):
    return image_folder(tmp_path / "data", per_class=2, size=16)


@pytest.fixture
def built(monkeypatch):
    """The Networks each fit builds."""
    nets = []

    def spy(*a, **k):
        nets.append(build_networks(*a, **k))
        return nets[-1]
    monkeypatch.setattr(run_setup, "build_networks", spy)
    return nets


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT"])
def test_torchvision_name_loads_the_cached_file(name, resnet18_file, data, built):
    path, state = resnet18_file
    result = fastdelta.fit("resnet18", str(data), None, weights=name, **RUN)
    assert torch.equal(built[0].source.conv1.weight, state["conv1.weight"])
    assert torch.equal(built[0].source.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert not torch.equal(state["conv1.weight"], torchvision.models.resnet18().conv1.weight)  # not by chance
    assert result.model_info["weights"].startswith(name)
    assert str(path) in result.model_info["weights"]


def test_missing_file_names_the_path_and_url(torch_home, data):
    expected = torch_home / "hub" / "checkpoints" / os.path.basename(urlparse(URL).path)
    with pytest.raises(ModelError, match=re.escape(f"put the file {URL} at {expected}")):
        fastdelta.fit("resnet18", str(data), None, weights="IMAGENET1K_V1", **RUN)


def test_unknown_name_lists_the_models_weights(torch_home):
    with pytest.raises(ModelError, match=r"no such weights for 'resnet18'.*\['IMAGENET1K_V1', 'DEFAULT'\]"):
        build_networks("resnet18", 2, weights="IMAGENET1K_V9")


def test_cli_weights_name(resnet18_file, tmp_path, built):
    path, state = resnet18_file
    root = tmp_path / "cli"
    image_folder(root / "train", per_class=2, size=16)
    out = tmp_path / "run"
    assert cli.main(["fit", "--data", str(root), "--model", "resnet18", "--weights", "IMAGENET1K_V1", "--method",
                     "l2", "--out", str(out), "--resize", "16", "--crop", "16", "--batch-size", "2",
                     "--iterations", "1", "--no-progress"]) == 0
    assert torch.equal(built[0].source.conv1.weight, state["conv1.weight"])
    saved = json.loads((out / "result.json").read_text())
    assert saved["model"]["weights"] == f"IMAGENET1K_V1 ({path})"


# -- timm -------------------------------------------------------------------------------------------------------

timm = pytest.importorskip("timm")


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


TIMM_ONLY = "resnet10t"  # a timm-only model: "resnet18" is torchvision's first


def hf_repo(hf_home, hub_id):
    return hf_home / "hub" / ("models--" + hub_id.replace("/", "--"))


def test_timm_pretrained_from_the_hf_cache(hf_home, torch_home):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    pytest.importorskip("huggingface_hub")
    hub_id = timm.models.get_pretrained_cfg(TIMM_ONLY).hf_hub_id
    repo = hf_repo(hf_home, hub_id)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    torch.manual_seed(7)
    state = timm.create_model(TIMM_ONLY).state_dict()
    file = repo / "snapshots" / "0123abcd" / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    nets = build_networks(TIMM_ONLY, 3, weights="pretrained")
    first = next(n for n, m in nets.source.named_modules() if isinstance(m, torch.nn.Conv2d))
    assert torch.equal(nets.source.get_submodule(first).weight, state[first + ".weight"])
    assert nets.weights == f"pretrained (timm {hub_id}: {file})"


def test_timm_pretrained_missing_names_the_cache(hf_home, torch_home):
    name = TIMM_ONLY
    assert name not in torchvision.models.list_models(module=torchvision.models)
    hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    repo = hf_repo(hf_home, hub_id)
    with pytest.raises(ModelError, match=re.escape(f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors "
                                                   f"in the Hugging Face cache as {repo}/snapshots/REVISION/")):
        build_networks(name, 3, weights="pretrained")
