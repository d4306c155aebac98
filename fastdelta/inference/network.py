"""The fine-tuned network of a run: the architecture fit built (networks.models: the same builder, head
finder and head), with model.pt loaded into it through the allow-list reader, so a run folder from
someone else cannot run code when loaded."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from ..networks.models import ModelError, build_architecture, find_head, new_head, set_module
from ..safe_load import UnsafeFileError, load_tensors, unpickler_reason
from .errors import RunFolderError, WeightsMismatchError
from .record import RunRecord


def build_network(record: RunRecord, architecture: Optional[nn.Module] = None) -> nn.Module:
    """The run's target network in eval mode, weights from model.pt. `architecture`: the nn.Module the run
    was fitted from, needed when result.json names no buildable architecture ("custom")."""
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the caller's RNG alone
        network = _architecture(record, architecture)
        head = record.head or find_head(network)
        if head not in dict(network.named_modules()) or not isinstance(network.get_submodule(head), nn.Linear):
            raise RunFolderError(f"{record.run_dir}: result.json names the classifier {head!r}, which the "
                                 f"{record.arch} network does not have as an nn.Linear", record.run_dir)
        set_module(network, head, new_head(network.get_submodule(head), len(record.classes)))
    load_weights(network, record)
    return network.eval().requires_grad_(False)


def _architecture(record: RunRecord, architecture: Optional[nn.Module]) -> nn.Module:
    if architecture is not None:
        return copy.deepcopy(architecture)
    if record.arch == "custom":
        raise RunFolderError(f"{record.run_dir}: the run fine-tuned a custom nn.Module, which result.json cannot "
                             "rebuild; pass it: fastdelta.load(run_dir, architecture=module)", record.run_dir)
    try:
        return build_architecture(record.arch)
    except ModelError as e:
        raise RunFolderError(f"{record.run_dir}: cannot rebuild its network: {e}", record.run_dir) from e


def read_weights(record: RunRecord) -> dict:
    """model.pt's state dict, read with torch's allow-list unpickler (tensors and containers only)."""
    path = record.weights_path
    if path.stat().st_size == 0:
        raise RunFolderError(f"{path} is empty (0 bytes)", path)
    try:
        state = load_tensors(path, str(path))
    except UnsafeFileError as e:
        raise RunFolderError(str(e), path) from e
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise RunFolderError(f"{path} is not a PyTorch state dict (torch.load failed: {unpickler_reason(e)})",
                             path) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunFolderError(f"{path} does not hold a state dict of tensors", path)
    return state


def load_weights(network: nn.Module, record: RunRecord) -> None:
    """model.pt into `network`, every key and shape matched; a mismatch names the first offenders."""
    path = record.weights_path
    state = read_weights(record)
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{what}: {items[:5]}" + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
                 for what, items in (("missing in file", missing), ("not in network", unexpected),
                                     ("shape mismatch", shapes)) if items]
        raise WeightsMismatchError(f"{path} does not match the {record.arch} network with {len(record.classes)} "
                                   f"classes that result.json describes: " + "; ".join(parts), path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsMismatchError(f"{path} holds NaN or infinite values in {len(bad)} tensor(s), e.g. {bad[:3]}: "
                                   f"the run (status {record.status!r}) diverged or the file is damaged", path)
    network.load_state_dict(state)
