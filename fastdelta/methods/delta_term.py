"""DELTA's feature-map term, built in one place for the DELTA methods and FeatureMapRegularizer.

    term = world_size * sum_l k_l * 0.5 sum_{b,j} scale_lj ||FM_bj(target_l) - FM_bj(source_l)||^2

- scale_lj, the scale form (`channel_scales`): the public code's (summed over the batch while the
  cross-entropy is a batch mean, DELTA with c W_j / (h w)) or the paper's text (eq. 5 and 8: per image,
  so a mean over the batch, and sum_j W_j ||d_j||^2 with no other factor);
- k_l, the layer scale: 1 unless feature_scale="source_energy" (not in the paper) sets it to 1 / E_l,
  E_l the mean per image of the same term between the source maps and zero (`source_energy`), so that
  alpha weighs a relative distance whatever the network's activation scale;
- world_size: under DDP each rank's term is its shard's and the gradients are averaged over ranks, so
  the term times the world size gives the global batch's gradient.

FM per the `feature_map` form (fastdelta.features.forms); the distance is the fused kernel
(fastdelta.kernels), accumulated in fp32.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..kernels import dispatch, reference_distance

# DELTA's term: "public" = 0.5 sum_b sum_j c W_j ||d_j||^2 / (h w) (train.py); "paper_eq8" = the paper's eq. 8,
# sum_j W_j ||d_j||^2 per image, mean over the batch
DELTA_SCALES = ("public", "paper_eq8")
# DELTA w/o ATT's term: "sum" = 0.5 sum_b sum_j ||d_j||^2 (public fea_map); "uniform_attention" = DELTA's
# public term with W_j = 1/c; "paper_eq5" = the paper's eq. 5, sum_j ||d_j||^2 per image, mean over the batch
DELTA_NO_ATT_SCALES = ("sum", "uniform_attention", "paper_eq5")


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
    """sum_l 0.5 sum_{b,j} scale_lj ||FM_bj(target_l) - FM_bj(source_l)||^2 (fp32), scales given."""
    total = target_feats[0].new_zeros((), dtype=torch.float32)
    for t, s, scale in zip(target_feats, source_feats, scales):
        total = total + feature_map_distance(t, s, scale, relu, impl)
    return total


class DeltaTerm:
    """What computes DELTA's term (the module docstring): the DELTA methods and FeatureMapRegularizer.

    The settings are the owner's attributes, so that changing one later (fit sets `layer_scale` once the
    source energy is measured) changes the term: `relu` (FM is ReLU of the tap), `delta_no_att_scale`,
    `delta_scale`, `world_size`, `distance_impl`, `layer_scale` (None or k_l per layer), and `weights()`
    (the channel attention per layer, or None)."""
    layer_scale: Optional[List[float]] = None
    world_size: int = 1
    # the scale forms (each owner sets the one its term uses: with attention delta_scale, else delta_no_att_scale)
    delta_scale: str = "public"
    delta_no_att_scale: str = "sum"

    def weights(self) -> Optional[List[torch.Tensor]]:
        return None

    def scales(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Per layer, the channel weights of the distance (layer_scale included)."""
        scales = channel_scales(self.weights(), feats, self.delta_no_att_scale, self.delta_scale, self.world_size)
        if self.layer_scale is not None:
            scales = [s * k for s, k in zip(scales, self.layer_scale)]
        return scales

    def delta_term(self, target_feats: Sequence[torch.Tensor], source_feats: Sequence[torch.Tensor],
                   coef: float = 1.0) -> torch.Tensor:
        """coef (the methods' alpha) x the term; coef x world_size is one factor, as the methods always had it."""
        total = feature_map_term(target_feats, source_feats, self.scales(target_feats), self.relu, self.distance_impl)
        return coef * float(self.world_size) * total

    def per_image_form(self) -> bool:
        """Whether the term is the paper's per-image form (a batch mean) rather than a batch sum."""
        form = self.delta_no_att_scale if self.weights() is None else self.delta_scale
        return form.startswith("paper")

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

    def scale_by_energy(self, energy: Sequence[float]) -> None:
        """feature_scale="source_energy": each layer's term divided by its E_l from now on (a zero E_l, a layer
        whose source maps are all zero, is left as it is)."""
        self.layer_scale = [1.0 / e if e > 0 else 1.0 for e in energy]
