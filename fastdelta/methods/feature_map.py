"""The behavioural methods: DELTA and DELTA w/o ATT pull the target's feature maps towards the source's.

Feature-map distances are summed over the batch (the public code's convention, the cross-entropy
being a batch mean); FM per the `feature_map` form (fastdelta.methods.taps). With feature_scale
"source_energy" (not in the paper) each layer's term is divided by E_l, the mean per image of the
same term between the source maps and zero, so that alpha weighs a relative distance whatever the
network's activation scale.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..kernels import dispatch, reference_distance
from .base import Method, Terms, register, squared_norm


def feature_map_distance(target: torch.Tensor, source: torch.Tensor, channel_scale: torch.Tensor,
                         relu: bool = True, impl: str = "auto") -> torch.Tensor:
    """0.5 * sum_{b,j} scale_j * ||FM_bj(target) - FM_bj(source)||^2, accumulated in fp32.

    The fused kernels of fastdelta.kernels (Triton on CUDA, the native C++ library on CPU);
    ``impl="reference"`` (setting ``distance_impl``) forces the plain PyTorch composite."""
    return dispatch.fm_distance(target, source, channel_scale, relu, impl=impl)


def channel_scales(attention_weights: Optional[Sequence[torch.Tensor]], feats: Sequence[torch.Tensor],
                   uniform: str) -> List[torch.Tensor]:
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


def feature_map_term(target_feats: Sequence[torch.Tensor], source_feats: Sequence[torch.Tensor],
                     scales: Sequence[torch.Tensor], relu: bool, impl: str = "auto") -> torch.Tensor:
    """sum_l 0.5 sum_{b,j} scale_lj ||FM_bj(target_l) - FM_bj(source_l)||^2 (fp32): DELTA's behavioural
    term before alpha, for DeltaNoAtt/Delta and for blocks.FeatureMapRegularizer alike."""
    total = target_feats[0].new_zeros((), dtype=torch.float32)
    for t, s, scale in zip(target_feats, source_feats, scales):
        total = total + feature_map_distance(t, s, scale, relu, impl)
    return total


@register
class DeltaNoAtt(Method):
    """DELTA w/o ATT: feature-map distillation without attention.

        reg = alpha * sum_l 0.5 sum_j ||FM_lj(w) - FM_lj(w*)||^2          (delta_no_att_scale "sum": the
              public code's fea_map), or DELTA's term with W_j = 1/c ("uniform_attention": / (h w))
        head = beta/2 ||w_head||^2"""
    name, label, color = "delta_no_att", "DELTA w/o ATT", "tab:purple"
    uses_source_features = True
    tuned = ("alpha", "beta")
    activation_map = True

    def weights(self) -> Optional[List[torch.Tensor]]:
        return None

    def scales(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Per layer, the channel weights of the distance (layer_scale included)."""
        scales = channel_scales(self.weights(), feats, self.delta_no_att_scale)
        if self.layer_scale is not None:
            scales = [s * k for s, k in zip(scales, self.layer_scale)]
        return scales

    def terms(self, target_feats=None, source_feats=None) -> Terms:
        total = feature_map_term(target_feats, source_feats, self.scales(target_feats), self.relu, self.distance_impl)
        return Terms(self.alpha * self.sum_scale * total, 0.5 * self.beta * squared_norm(self.head_params))

    def pulls(self, trainable):
        return []  # the feature-map term needs autograd; the head's small beta term goes with it in `terms`

    @torch.no_grad()
    def source_energy(self, source_feats: Sequence[torch.Tensor]) -> List[float]:
        """Per layer, the distance between these source maps and zero, summed over their images (fp64)."""
        return [float(reference_distance(f.double(), torch.zeros_like(f, dtype=torch.float64), scale.double(),
                                         self.relu))
                for f, scale in zip(source_feats, channel_scales(self.weights(), source_feats, self.delta_no_att_scale))]


@register
class Delta(DeltaNoAtt):
    """DELTA: feature maps weighted by supervised channel attention W (Algorithm 1).

        reg = alpha * sum_l 0.5 sum_j c W_lj ||FM_lj(w) - FM_lj(w*)||^2 / (h w),   head = beta/2 ||w_head||^2"""
    name, label, color = "delta", "DELTA", "tab:red"
    uses_attention = True
    learning_curve = True

    def weights(self):
        return self.attention
