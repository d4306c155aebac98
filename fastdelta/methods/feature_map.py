"""The behavioural methods: DELTA and DELTA w/o ATT pull the target's feature maps towards the source's.

Their term, its scale forms (the public code's and the paper's eq. 5 and 8), the layer scale of
feature_scale "source_energy" and the DDP sum scale are fastdelta.methods.delta_term's, shared with
FeatureMapRegularizer; here are the methods' formulas, defaults and loss terms.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..features.forms import FEATURE_MAPS, rectified_at_tap, rectifies, tap_modules
from ..features.hooks import FeatureTaps
from ..features.source import batch_statistics_copy
from .base import Method, Terms, register, squared_norm
from .delta_term import DELTA_NO_ATT_SCALES, DELTA_SCALES, DeltaTerm
from .hyperparameters import BETA, PAPER_GRID, Hyperparameter, depends_on

SOURCE_BN_MODES = ("running", "batch")
FEATURE_SCALES = ("none", "source_energy")


def _alpha_by_scale(form_setting: str, paper_alpha: float) -> Hyperparameter:
    """alpha whose default follows the term's scale form: 1e-4 for the public scaling, whose term is large
    from step 0 (target BN on batch statistics, source BN on running ones); `paper_alpha` for the paper's
    per-image forms, about B c / (2 h w) times smaller (the evidence: benchmarks/results)."""
    def rule(values):
        form = values[form_setting] if isinstance(values, dict) else getattr(values, form_setting)
        return paper_alpha if str(form).startswith("paper") else 1e-4
    return Hyperparameter("alpha", depends_on(f"1e-4, or {paper_alpha:g} with {form_setting}=paper_*", rule),
                          "weight of the regulariser (feature maps or the pull to the source weights)",
                          grid=PAPER_GRID)


# The paper forms' defaults: DELTA's eq. 8 the paper's 0.01; DELTA w/o ATT's eq. 5 has no attention weights
# summing to 1, so its term is about ten times DELTA's at equal alpha: a tenth of it.
DELTA_PAPER_ALPHA, DELTA_NO_ATT_PAPER_ALPHA = 0.01, 1e-3


FEATURE_MAP = Hyperparameter(
    "feature_map", "conv", "FM of a regularised layer: conv (raw output, public code), activation (ReLU after "
    "the conv's BN, the paper's rectified map) or relu_conv (ReLU of the pre-BN output: in neither)",
    type=str, choices=FEATURE_MAPS, recipe=True)
SOURCE_BN = Hyperparameter(
    "source_bn", "running", "source maps with running BN statistics (public, paper) or the batch's own "
    "(not in the paper)", type=str, choices=SOURCE_BN_MODES)
FEATURE_SCALE = Hyperparameter(
    "feature_scale", "none", "source_energy: each layer's term divided by the source maps' energy per image "
    "(not in the paper)", type=str, choices=FEATURE_SCALES)
DELTA_NO_ATT_SCALE = Hyperparameter(
    "delta_no_att_scale", "sum", "DELTA w/o ATT's term: sum (public fea_map, 0.5 sum ||d||^2), "
    "uniform_attention (DELTA's public term with W = 1/c) or paper_eq5 (sum_j ||d_j||^2 per image, mean over "
    "the batch)", type=str, choices=DELTA_NO_ATT_SCALES, recipe=True)
DELTA_SCALE = Hyperparameter(
    "delta_scale", "public", "DELTA's term: public (0.5 sum_j c W_j ||d_j||^2 / (h w), summed over the batch) "
    "or paper_eq8 (sum_j W_j ||d_j||^2 per image, mean over the batch)", type=str, choices=DELTA_SCALES,
    recipe=True)


@register
class DeltaNoAtt(DeltaTerm, Method):
    """DELTA w/o ATT: feature-map distillation without attention.

        reg = alpha * sum_l 0.5 sum_j ||FM_lj(w) - FM_lj(w*)||^2          (delta_no_att_scale "sum": the
              public code's fea_map, summed over the batch), DELTA's public term with W_j = 1/c
              ("uniform_attention": / (h w)), or alpha * mean_i sum_l sum_j ||FM_lj(w, x_i) - FM_lj(w*, x_i)||^2
              ("paper_eq5", the paper's eq. 5)
        head = beta/2 ||w_head||^2"""
    name, label, color = "delta_no_att", "DELTA w/o ATT", "tab:purple"
    uses_source_features = True
    activation_map = True
    hyperparameters = (_alpha_by_scale("delta_no_att_scale", DELTA_NO_ATT_PAPER_ALPHA), BETA, FEATURE_MAP,
                       DELTA_NO_ATT_SCALE, SOURCE_BN, FEATURE_SCALE)

    def __init__(self, target, source, head_name, layers, attention=None, **kwargs):
        super().__init__(target, source, head_name, layers, attention, **kwargs)
        self.relu = rectifies(self.feature_map)
        self.rectify_at_tap = rectified_at_tap(self.feature_map)
        self.taps = tap_modules(target, self.layers, self.feature_map)  # the modules whose outputs are read
        self.tap_follows = {t: l for t, l in zip(self.taps, self.layers) if t != l}

    def source_network(self, source: nn.Module) -> nn.Module:
        return source if self.source_bn == "running" else batch_statistics_copy(source)

    @torch.no_grad()
    def prepare(self, source: nn.Module, images: Iterable[torch.Tensor]) -> dict:
        """feature_scale "source_energy": E_l per image of the source maps over `images` (batches), and each
        layer's term divided by it from now on."""
        energy = None
        if self.feature_scale == "source_energy":
            totals, n = [0.0] * len(self.taps), 0
            with FeatureTaps(source, self.taps, rectify=self.rectify_at_tap) as taps:
                for x in images:
                    _, feats = taps(x)
                    totals = [t + e for t, e in zip(totals, self.source_energy(feats))]
                    n += len(x)
            energy = [t / n for t in totals]
            self.scale_by_energy(energy)
        return {"feature_map_taps": dict(zip(self.layers, self.taps)),
                "source_energy": None if energy is None else dict(zip(self.layers, energy))}

    def explain_divergence(self) -> str:
        if self.feature_map == "conv" and self.feature_scale == "none":
            return ("with raw conv taps the feature-map term grows with the network's pre-BN activations, so an "
                    "alpha tuned elsewhere can diverge here: lower alpha, or use feature_map='activation' "
                    "(recipe='paper') or feature_scale='source_energy'")
        return ""

    def terms(self, target_feats=None, source_feats=None) -> Terms:
        return Terms(self.delta_term(target_feats, source_feats, coef=self.alpha),
                     0.5 * self.beta * squared_norm(self.head_params))

    def pulls(self, trainable):
        return []  # the feature-map term needs autograd; the head's small beta term goes with it in `terms`


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
    hyperparameters = (_alpha_by_scale("delta_scale", DELTA_PAPER_ALPHA), BETA, FEATURE_MAP, DELTA_SCALE, SOURCE_BN,
                       FEATURE_SCALE)

    def weights(self):
        return self.attention
