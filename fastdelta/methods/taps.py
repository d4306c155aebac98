"""Feature taps: which tensor a regularised layer contributes, and hooks that collect them.

A regularised layer is named by the user (or the architecture defaults) as a module, usually a
conv. Its feature map FM has one of three forms (setting `feature_map`):

- "conv": the layer's raw output (for a conv: before its BN, before any residual add), as the
  public code taps it;
- "relu_conv": ReLU of that raw output (pre-BN): neither the paper nor the public code;
- "activation": the network's own rectified map, ReLU of the BN that directly follows the conv
  (for timm's BatchNormAct layers, ReLU of their activated output), the paper's "rectified output
  of the filter" in a BN network. A layer that is not a conv followed by a BN is rectified as is.

`tap_modules` gives the module whose output is read per layer; `rectifies` whether FM is ReLU of it.
Hooks are owned by one `FeatureTaps` object (no module-level state), write into a per-call dict,
and are removed by `close()` so the user's model is left as it was.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm



FEATURE_MAPS = ("conv", "relu_conv", "activation")  # the feature_map setting


def rectifies(feature_map: str) -> bool:
    """Is FM the ReLU of the tapped output?"""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map={feature_map!r}: expected one of {FEATURE_MAPS}")
    return feature_map != "conv"


def rectified_at_tap(feature_map: str) -> bool:
    """Is the ReLU taken as the tap reads the map? For "activation" the tapped BN output can be changed
    in place later in the forward (an in-place ReLU or residual add), so its ReLU is kept at once."""
    return rectifies(feature_map) and feature_map == "activation"


def following_norm(model: nn.Module, layer: str) -> str | None:
    """The BN registered right after conv `layer` in the same parent, over the same channels, or None.

    torchvision and timm blocks register a conv and the BN that reads its output one after the other
    (conv3/bn3, conv_pwl/bn3, conv_head/bn2); FeatureTaps checks at the first forward that the BN
    really reads this conv's output."""
    conv = model.get_submodule(layer)
    if not isinstance(conv, nn.Conv2d):
        return None
    parent = layer.rpartition(".")[0]
    names = [n for n, _ in model.named_modules()]
    after = names[names.index(layer) + 1:]
    after = [n for n in after if not n.startswith(layer + ".")]
    if not after or after[0].rpartition(".")[0] != parent:
        return None
    norm = model.get_submodule(after[0])
    if isinstance(norm, _BatchNorm) and norm.num_features == conv.out_channels:
        return after[0]
    return None


def tap_modules(model: nn.Module, layers: Sequence[str], feature_map: str) -> List[str]:
    """Per regularised layer, the module whose output is read for this feature map form."""
    rectifies(feature_map)  # validates the name
    if feature_map != "activation":
        return list(layers)
    return [following_norm(model, layer) or layer for layer in layers]


class FeatureTaps:
    """`taps(x) -> (logits, [feature maps in layer order])` for a model and tapped module names.

    `rectify=True` stores ReLU of each output, computed out of place at once: a BN output tapped for
    the "activation" form is modified in place later by residual blocks (`out += identity`), and the
    stored map must be the value the BN produced. `follows` maps a tapped module to the conv whose
    output it must read; that is checked at the first forward."""

    def __init__(self, model: nn.Module, layers: Sequence[str], forward=None, rectify: bool = False,
                 follows: dict | None = None):
        self.model = model
        self.forward = forward if forward is not None else model  # e.g. a DDP wrapper of `model`
        self.layers = list(layers)
        self.rectify = rectify
        self._store: dict = {}
        self._handles = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.layers]
        self._unchecked = dict(follows or {})
        self._check_handles = []
        if self._unchecked:
            self._check_handles = [model.get_submodule(conv).register_forward_hook(self._conv_hook(conv))
                                   for conv in set(self._unchecked.values())]
            self._check_handles += [model.get_submodule(norm).register_forward_pre_hook(self._norm_hook(norm))
                                    for norm in self._unchecked]

    def _hook(self, name: str):
        def store(module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                raise ValueError(f"layer {name!r} must output a 4-D (N, C, H, W) tensor to be regularised, got "
                                 f"{type(output).__name__}{'' if not isinstance(output, torch.Tensor) else tuple(output.shape)}")
            self._store[name] = torch.relu(output) if self.rectify else output
        return store

    def _conv_hook(self, conv: str):
        def record(module, inputs, output):
            self._store["conv:" + conv] = output
        return record

    def _norm_hook(self, norm: str):
        def check(module, inputs):
            conv = self._unchecked[norm]
            if inputs[0] is not self._store.get("conv:" + conv):
                raise ValueError(f"feature_map='activation': {norm!r} does not read the output of {conv!r} "
                                 "directly, so it is not that conv's BN; regularise another layer or use "
                                 "feature_map='conv'")
        return check

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        self._store = {}
        logits = self.forward(x)
        return logits, self.collect()

    def collect(self) -> List[torch.Tensor]:
        """The maps recorded by the model's last forward, in layer order (then forgotten)."""
        missing = [name for name in self.layers if name not in self._store]
        if missing:
            raise RuntimeError(f"no feature maps recorded for {missing}: run the model's forward first")
        feats = [self._store[name] for name in self.layers]
        self._store = {}
        if self._check_handles:  # checked once: the model's structure does not change between calls
            for h in self._check_handles:
                h.remove()
            self._check_handles = []
        return feats

    def close(self) -> None:
        for h in self._handles + self._check_handles:
            h.remove()
        self._handles, self._check_handles = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
