"""The behavioural methods: DELTA and DELTA w/o ATT pull the target's feature maps towards the source's.

Two scalings of the same distance: the public code's (summed over the batch while the cross-entropy
is a batch mean, DELTA with c W_j / (2 h w)) and the paper's text (eq. 5 and 8: per image, so a mean
over the batch, and sum_j W_j ||d_j||^2 with no other factor). FM per the `feature_map` form
(fastdelta.methods.taps). With feature_scale
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
                   uniform: str, delta_scale: str = "public", world_size: int = 1) -> List[torch.Tensor]:
    """scale_j of 0.5 sum_{b,j} scale_j ||d_bj||^2 (the kernels' form), per layer.

    With attention W: "public" c W_j / (h w); "paper_eq8" 2 W_j / B (sum_j W_j ||d_j||^2 per image,
    averaged over the global batch B = per-rank batch x world_size). Without attention (`uniform`):
    "sum" 1 (the public code's fea_map), "uniform_attention" the public DELTA scale with W_j = 1/c,
    "paper_eq5" 2 / B (sum_j ||d_j||^2 per image)."""
    scales = []
    for i, f in enumerate(feats):
        b, c, h, w = f.shape
        per_image = 2.0 / (b * world_size)
        if attention_weights is None:
            if uniform == "sum":
                scales.append(torch.ones(c, device=f.device))
                continue
            if uniform == "paper_eq5":
                scales.append(torch.full((c,), per_image, device=f.device))
                continue
            W = torch.full((c,), 1.0 / c, device=f.device)  # "uniform_attention": DELTA's public term
            delta_scale = "public"
        else:
            W = attention_weights[i]
        if W.numel() != c:
            raise ValueError(f"attention for tap {i} has {W.numel()} weights but the layer has {c} channels")
        scales.append(c * W.float() / (h * w) if delta_scale == "public" else per_image * W.float())
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
              public code's fea_map, summed over the batch), DELTA's public term with W_j = 1/c
              ("uniform_attention": / (h w)), or alpha * mean_i sum_l sum_j ||FM_lj(w, x_i) - FM_lj(w*, x_i)||^2
              ("paper_eq5", the paper's eq. 5)
        head = beta/2 ||w_head||^2"""
    name, label, color = "delta_no_att", "DELTA w/o ATT", "tab:purple"
    uses_source_features = True
    tuned = ("alpha", "beta")
    activation_map = True
    # With the public scaling the term is large from step 0 (target BN on batch statistics, source BN on
    # running ones): at the paper's 0.01 it diverged on every committed raw-tap run, 1e-4 trained on all
    # and was the validation choice in 26 of 30 searches (benchmarks/results). The paper's per-image
    # forms are about B c / (2 h w) times smaller: there the paper's fixed 0.01.
    alpha_default = 1e-4
    paper_alpha_default = 0.01

    @classmethod
    def scale_form(cls, settings) -> str:
        return settings.delta_no_att_scale

    @classmethod
    def default_alpha(cls, settings) -> float:
        return cls.paper_alpha_default if cls.scale_form(settings).startswith("paper") else cls.alpha_default

    def weights(self) -> Optional[List[torch.Tensor]]:
        return None

    def scales(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Per layer, the channel weights of the distance (layer_scale included)."""
        scales = channel_scales(self.weights(), feats, self.delta_no_att_scale, self.delta_scale, self.world_size)
        if self.layer_scale is not None:
            scales = [s * k for s, k in zip(scales, self.layer_scale)]
        return scales

    def terms(self, target_feats=None, source_feats=None) -> Terms:
        total = feature_map_term(target_feats, source_feats, self.scales(target_feats), self.relu, self.distance_impl)
        return Terms(self.alpha * self.sum_scale * total, 0.5 * self.beta * squared_norm(self.head_params))

    def pulls(self, trainable):
        return []  # the feature-map term needs autograd; the head's small beta term goes with it in `terms`

    def per_image_form(self) -> bool:
        """Whether the term is the paper's per-image form (a batch mean) rather than a batch sum."""
        return self.scale_form(self).startswith("paper")

    @torch.no_grad()
    def source_energy(self, source_feats: Sequence[torch.Tensor]) -> List[float]:
        """Per layer, the distance between these source maps and zero, summed over their images (fp64)."""
        energies = []
        for f, scale in zip(source_feats, channel_scales(self.weights(), source_feats, self.delta_no_att_scale,
                                                         self.delta_scale, self.world_size)):
            e = float(reference_distance(f.double(), torch.zeros_like(f, dtype=torch.float64), scale.double(),
                                         self.relu))
            # a per-image form is a mean over the (global) batch: back to a sum over these images
            energies.append(e * f.shape[0] * self.world_size if self.per_image_form() else e)
        return energies


@register
class Delta(DeltaNoAtt):
    """DELTA: feature maps weighted by supervised channel attention W (Algorithm 1).

        reg = alpha * sum_l 0.5 sum_j c W_lj ||FM_lj(w) - FM_lj(w*)||^2 / (h w)   (delta_scale "public",
              summed over the batch), or alpha * mean_i sum_l sum_j W_lj ||FM_lj(w, x_i) - FM_lj(w*, x_i)||^2
              ("paper_eq8", the paper's eq. 8)
        head = beta/2 ||w_head||^2"""
    name, label, color = "delta", "DELTA", "tab:red"
    uses_attention = True
    learning_curve = True

    @classmethod
    def scale_form(cls, settings) -> str:
        return settings.delta_scale

    def weights(self):
        return self.attention
