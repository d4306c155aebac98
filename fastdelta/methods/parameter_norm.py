"""The methods whose regulariser is a norm of the parameters: L2-FE, L2, L2-SP, L2-SP(ATT)."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from .base import Method, Pull, Terms, register, squared_norm
from .hyperparameters import BETA, PAPER_GRID, WEIGHT_DECAY, Hyperparameter

# L2-SP's alpha: the paper's fixed 0.01, searched over the paper's grid
ALPHA_SP = Hyperparameter("alpha", 0.01, "weight of the regulariser (feature maps or the pull to the source weights)",
                          grid=PAPER_GRID)


@register
class L2FE(Method):
    """L2-FE: the source feature extractor frozen (BN statistics included), only a new head trains.

        reg = 0,   head = wd/2 ||w_head||^2"""
    name, label = "l2_fe", "L2-FE"
    freezes_extractor = True
    uses_weight_decay = True
    hyperparameters = (WEIGHT_DECAY,)

    def terms(self, target_feats=None, source_feats=None) -> Terms:
        return Terms(self.zero(), 0.5 * self.weight_decay * squared_norm(self.head_params))

    def pulls(self, trainable):
        return [self.head_pull(trainable, self.weight_decay)]


@register
class L2(Method):
    """L2: the plain fine-tune with weight decay.

        reg = wd/2 ||w_shared||^2,   head = wd/2 ||w_head||^2"""
    name, label, color = "l2", "L2", "tab:blue"
    uses_weight_decay = True
    hyperparameters = (WEIGHT_DECAY,)
    activation_map = True

    def terms(self, target_feats=None, source_feats=None) -> Terms:
        return Terms(0.5 * self.weight_decay * squared_norm([p for _, p in self.shared]),
                     0.5 * self.weight_decay * squared_norm(self.head_params))

    def pulls(self, trainable):
        return [Pull("reg", [p for _, p in self.shared], self.weight_decay), self.head_pull(trainable, self.weight_decay)]


@register
class L2SP(Method):
    """L2-SP: the shared parameters pulled towards the source weights w*.

        reg = alpha/2 ||w_shared - w*||^2   (BN affine included),   head = beta/2 ||w_head||^2"""
    name, label, color = "l2_sp", "L2-SP", "tab:orange"
    pulls_to_source = True
    hyperparameters = (ALPHA_SP, BETA)
    learning_curve = True
    activation_map = True

    def filter_weights(self) -> Dict[str, torch.Tensor]:
        """Per-filter weights of named parameters (none for plain L2-SP)."""
        return {}

    def terms(self, target_feats=None, source_feats=None) -> Terms:
        weights = self.filter_weights()
        total = self.zero()
        for n, p in self.shared:
            d2 = (p.float() - self.source_params[n].float()).pow(2)
            if n in weights:  # per-filter weight broadcast over the filter's elements
                d2 = d2.reshape(d2.shape[0], -1) * weights[n][:, None]
            total = total + d2.sum()
        return Terms(0.5 * self.alpha * total, 0.5 * self.beta * squared_norm(self.head_params))

    def pulls(self, trainable):
        weights = self.filter_weights()
        params, anchors, scales = [], [], []
        for n, p in self.shared:
            params.append(p)
            # the anchor in the parameter's own layout (channels_last) so foreach ops stay on the fast path;
            # w* itself where it already is (no copy)
            a = self.source_params[n]
            same = a.device == p.device and a.dtype == p.dtype and a.stride() == p.stride()
            anchors.append(a if same else torch.empty_like(p).copy_(a))
            scales.append(_filter_scale(weights[n], p) if n in weights else None)
        return [Pull("reg", params, self.alpha, anchors, scales), self.head_pull(trainable, self.beta)]


@register
class L2SPAtt(L2SP):
    """L2-SP(ATT): L2-SP where filter j of a regularised conv has weight c * W_j (mean 1), others 1."""
    name, label, color = "l2_sp_att", "L2-SP(ATT)", "tab:brown"
    uses_attention = True
    learning_curve = False
    activation_map = False

    def __init__(self, target, source, head_name, layers, attention=None, **kwargs):
        super().__init__(target, source, head_name, layers, attention, **kwargs)
        self._weights = {}
        for layer, W in zip(self.layers, self.attention):
            conv = tapped_conv(target, layer, W.numel())
            c = W.numel()
            self._weights[conv + ".weight"] = c * W
            if target.get_submodule(conv).bias is not None:
                self._weights[conv + ".bias"] = c * W

    def filter_weights(self):
        return self._weights


def _filter_scale(weight: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(c,) per-filter weights shaped to broadcast over a conv weight (c, ...) or bias (c,)."""
    return weight.to(p.device, torch.float32).reshape((-1,) + (1,) * (p.dim() - 1))


def tapped_conv(model: nn.Module, layer: str, channels: int) -> str:
    """The conv whose filters produce the tapped channels: the layer itself, or its last Conv2d."""
    m = model.get_submodule(layer)
    if isinstance(m, nn.Conv2d):
        return layer
    convs = [(n, c) for n, c in m.named_modules() if isinstance(c, nn.Conv2d)]
    if convs and convs[-1][1].out_channels == channels:
        return f"{layer}.{convs[-1][0]}"
    raise ValueError(f"l2_sp_att: layer {layer!r} is not a conv layer whose filters map one-to-one to its "
                     "output channels; choose Conv2d layers")
