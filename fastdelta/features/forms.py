"""The feature-map forms: which tensor a regularised layer contributes (setting `feature_map`).

A regularised layer is named by the user (or the architecture defaults) as a module, usually a
conv. Its feature map FM has one of three forms:

- "conv": the layer's raw output (for a conv: before its BN, before any residual add), as the
  public code taps it;
- "relu_conv": ReLU of that raw output (pre-BN): neither the paper nor the public code;
- "activation": the network's own rectified map, ReLU of the BN that directly follows the conv
  (for timm's BatchNormAct layers, ReLU of their activated output), the paper's "rectified output
  of the filter" in a BN network. A layer that is not a conv followed by a BN is rectified as is.

`tap_modules` gives the module whose output is read per layer; `rectifies` whether FM is ReLU of it.
"""
from __future__ import annotations

from typing import List, Sequence

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
