"""The six methods of the DELTA paper as loss terms.

Every method's loss is  CE + reg + head, where (the paper's eq. 6-8, scaled as its public code):

- l2_fe        : extractor frozen;   reg = 0;                              head = wd/2 ||w_head||^2
- l2           : plain fine-tune;    reg = wd/2 ||w_shared||^2;             head = wd/2 ||w_head||^2
- l2_sp        : reg = alpha/2 ||w_shared - w*||^2;                         head = beta/2 ||w_head||^2
- l2_sp_att    : L2-SP with each regularised conv filter's distance weighted by c * W_j
- delta_no_att : reg = alpha * sum_l 0.5 sum_j ||FM_lj(w) - FM_lj(w*)||^2         (delta_no_att_scale "sum":
                 the public code's fea_map), or DELTA's term with W_j = 1/c, i.e. divided by h w
                 ("uniform_attention")
- delta        : reg = alpha * sum_l 0.5 sum_j c W_lj ||FM_lj(w) - FM_lj(w*)||^2 / (h w)
(feature-map distances summed over the batch, as in the public code; FM per `feature_map`, see
fastdelta/taps.py). With feature_scale "source_energy" (not in the paper) each layer's term is
divided by E_l, the mean per image of the same term between the source maps and zero, so that
alpha weighs a relative distance whatever the network's activation scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .kernels import dispatch, reference_distance
from .taps import rectifies, tap_modules


def feature_map_distance(target: torch.Tensor, source: torch.Tensor, channel_scale: torch.Tensor,
                         relu: bool = True, impl: str = "auto") -> torch.Tensor:
    """0.5 * sum_{b,j} scale_j * ||FM_bj(target) - FM_bj(source)||^2, accumulated in fp32.

    The fused kernels of fastdelta.kernels (Triton on CUDA, the native C++ library on CPU);
    ``impl="reference"`` (setting ``distance_impl``) forces the plain PyTorch composite."""
    return dispatch.fm_distance(target, source, channel_scale, relu, impl=impl)


def channel_scales(attention_weights: Optional[Sequence[torch.Tensor]], feats: Sequence[torch.Tensor],
                   uniform: str = "uniform_attention") -> List[torch.Tensor]:
    """scale_j = c * W_j / (h w); without attention W uniform (1/c) ("uniform_attention"), or
    scale_j = 1 ("sum": the public code's fea_map, no division by h w)."""
    scales = []
    for i, f in enumerate(feats):
        _, c, h, w = f.shape
        if attention_weights is None and uniform == "sum":
            scales.append(torch.ones(c, device=f.device))
            continue
        W = torch.full((c,), 1.0 / c, device=f.device) if attention_weights is None else attention_weights[i]
        if W.numel() != c:
            raise ValueError(f"attention for tap {i} has {W.numel()} weights but the layer has {c} channels")
        scales.append(c * W.float() / (h * w))
    return scales


def squared_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([p.float().pow(2).sum() for p in params]).sum()


@dataclass
class Terms:
    reg: torch.Tensor   # alpha-weighted (or weight-decay) regulariser of shared parameters / behaviour
    head: torch.Tensor  # beta-weighted (or weight-decay) L2 of target-only parameters


class Regularizer:
    """Base: knows which parameters are shared with the source and which belong to the head."""
    name = ""
    uses_source_features = False
    uses_attention = False
    freezes_extractor = False
    sum_scale = 1.0  # per-batch sums x world size under DDP, so averaged gradients match one process
    distance_impl = "auto"  # feature-map distance kernel (settings.distance_impl; fit sets it)

    def __init__(self, target: nn.Module, source: nn.Module, head_name: str, layers: Sequence[str],
                 alpha: float, beta: float, weight_decay: float, feature_map: str = "conv",
                 attention: Optional[Sequence[torch.Tensor]] = None, delta_no_att_scale: str = "sum"):
        self.alpha, self.beta, self.weight_decay = alpha, beta, weight_decay
        self.layers = list(layers)
        self.feature_map, self.delta_no_att_scale = feature_map, delta_no_att_scale
        self.relu = rectifies(feature_map)
        self.taps = tap_modules(target, self.layers, feature_map)  # the modules whose outputs are read
        self.tap_follows = {t: l for t, l in zip(self.taps, self.layers) if t != l}
        self.layer_scale: Optional[List[float]] = None  # feature_scale "source_energy": 1 / E_l per layer
        prefix = head_name + "."
        self.head_params = [p for n, p in target.named_parameters() if n.startswith(prefix)]
        self.shared = [(n, p) for n, p in target.named_parameters() if not n.startswith(prefix)]
        src = dict(source.named_parameters())
        self.source_params = {n: src[n].detach() for n, _ in self.shared}
        device = self.head_params[0].device  # once here, not a host-to-device copy every step
        self.attention = None if attention is None else [a.detach().float().to(device) for a in attention]

    def trainable_parameters(self, target: nn.Module) -> List[nn.Parameter]:
        return self.head_params if self.freezes_extractor else [p for p in target.parameters()]

    def zero(self) -> torch.Tensor:
        return self.head_params[0].new_zeros(()).float()

    def terms(self, target_feats=None, source_feats=None) -> Terms:
        raise NotImplementedError


class L2FE(Regularizer):
    name = "l2_fe"
    freezes_extractor = True

    def terms(self, target_feats=None, source_feats=None) -> Terms:
        return Terms(self.zero(), 0.5 * self.weight_decay * squared_norm(self.head_params))


class L2(Regularizer):
    name = "l2"

    def terms(self, target_feats=None, source_feats=None) -> Terms:
        return Terms(0.5 * self.weight_decay * squared_norm([p for _, p in self.shared]),
                     0.5 * self.weight_decay * squared_norm(self.head_params))


class L2SP(Regularizer):
    name = "l2_sp"

    def filter_weights(self) -> Dict[str, torch.Tensor]:
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


class L2SPAtt(L2SP):
    """L2-SP where filter j of a regularised conv layer has weight c * W_j (mean 1), others 1."""
    name = "l2_sp_att"
    uses_attention = True

    def __init__(self, target, source, head_name, layers, *args, **kwargs):
        super().__init__(target, source, head_name, layers, *args, **kwargs)
        if self.attention is None:
            raise ValueError("l2_sp_att needs channel attention")
        self._weights = {}
        for layer, W in zip(self.layers, self.attention):
            conv = _tapped_conv(target, layer, W.numel())
            c = W.numel()
            self._weights[conv + ".weight"] = c * W
            if target.get_submodule(conv).bias is not None:
                self._weights[conv + ".bias"] = c * W

    def filter_weights(self):
        return self._weights


def _tapped_conv(model: nn.Module, layer: str, channels: int) -> str:
    """The conv whose filters produce the tapped channels: the layer itself, or its last Conv2d."""
    m = model.get_submodule(layer)
    if isinstance(m, nn.Conv2d):
        return layer
    convs = [(n, c) for n, c in m.named_modules() if isinstance(c, nn.Conv2d)]
    if convs and convs[-1][1].out_channels == channels:
        return f"{layer}.{convs[-1][0]}"
    raise ValueError(f"l2_sp_att: layer {layer!r} is not a conv layer whose filters map one-to-one to its "
                     "output channels; choose Conv2d layers")


class Delta(Regularizer):
    name = "delta"
    uses_source_features = True
    uses_attention = True

    def weights(self):
        return self.attention

    def scales(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Per layer, the channel weights of the distance (layer_scale included)."""
        scales = channel_scales(self.weights(), feats, self.delta_no_att_scale)
        if self.layer_scale is not None:
            scales = [s * k for s, k in zip(scales, self.layer_scale)]
        return scales

    def terms(self, target_feats=None, source_feats=None) -> Terms:
        total = self.zero()
        for t, s, scale in zip(target_feats, source_feats, self.scales(target_feats)):
            total = total + feature_map_distance(t, s, scale, self.relu, self.distance_impl)
        return Terms(self.alpha * self.sum_scale * total, 0.5 * self.beta * squared_norm(self.head_params))

    @torch.no_grad()
    def source_energy(self, source_feats: Sequence[torch.Tensor]) -> List[float]:
        """Per layer, the distance between these source maps and zero, summed over their images (fp64)."""
        return [float(reference_distance(f.double(), torch.zeros_like(f, dtype=torch.float64), scale.double(),
                                         self.relu))
                for f, scale in zip(source_feats, channel_scales(self.weights(), source_feats, self.delta_no_att_scale))]


class DeltaNoAtt(Delta):
    name = "delta_no_att"
    uses_attention = False

    def weights(self):
        return None


REGULARIZERS = {cls.name: cls for cls in (L2FE, L2, L2SP, L2SPAtt, DeltaNoAtt, Delta)}


def make_regularizer(method: str, *args, **kwargs) -> Regularizer:
    return REGULARIZERS[method](*args, **kwargs)
