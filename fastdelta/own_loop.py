"""DELTA for a training loop of one's own: the regulariser, Algorithm 1 and the L2-SP pull.

`fit` is one way to train. These blocks give the same terms to any loop (a plain PyTorch script, a
Trainer, a Lightning module); the README shows a 25-line loop whose losses equal fit's reference step.

- `FeatureMapRegularizer(target, source, layers, attention=None)`: an nn.Module. Hooks on `target`
  record its feature maps during your forward; `reg(x)` then runs the frozen source network on the
  same batch and returns the behavioural term (summed over the batch), the DELTA methods' own before
  alpha (fastdelta.methods.delta_term):

      with attention W:    sum_l 0.5 sum_j c W_lj ||FM_lj(target) - FM_lj(source)||^2 / (h w)   (DELTA)
      without:             sum_l 0.5 sum_j ||FM_lj(target) - FM_lj(source)||^2                (DELTA w/o ATT)

  (the public code's scaling; `delta_scale="paper_eq8"` / `delta_no_att_scale="paper_eq5"` give the
  paper's per-image forms, averaged over the batch). Under DDP pass `world_size`: the term is then
  scaled so that the gradients averaged over ranks are the global batch's, as in fit.
  `scale_by_source_energy(images)` is fit's feature_scale="source_energy" (each layer's term divided
  by its source maps' own per image; or give `layer_scale` directly).

  FM per `feature_map` ("conv", "relu_conv", "activation"; see fastdelta.features.forms). The source is
  a frozen copy truncated after the last regularised layer with BN folded where exact, it moves with
  `.to()`, runs under your autocast, and the distance is the fused kernel (fastdelta.kernels).
- `channel_attention(model, layers, batches)`: Algorithm 1's channel weights for a classifier whose
  head is already trained on the target task with the source extractor frozen (`fastdelta.compute_attention`
  trains that head first).
- `SourcePull(model, source, alpha)`: alpha/2 ||w - w*||^2 over the non-head parameters (L2-SP) added
  to the gradients after your backward, for any optimizer.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from .attention.loss_increase import channel_loss_increase
from .attention.weights import ChannelAttention
from .features.forms import rectified_at_tap, rectifies, tap_modules
from .features.hooks import FeatureTaps
from .features.source import source_features
from .methods.base import Pull
from .methods.delta_term import DeltaTerm
from .methods.parameter_norm import L2SP
from .networks.models import find_head
from .train.optim import apply_pulls


class FeatureMapRegularizer(DeltaTerm, nn.Module):
    """DELTA's behavioural term for the batch the target last ran on (formula: the module docstring)."""

    def __init__(self, target: nn.Module, source: nn.Module, layers: Sequence[str],
                 attention: Optional[Sequence[torch.Tensor]] = None, feature_map: str = "conv",
                 delta_no_att_scale: str = "sum", distance_impl: str = "auto", fold_source_bn: bool = True,
                 delta_scale: str = "public", *, world_size: int = 1,
                 layer_scale: Optional[Sequence[float]] = None):
        super().__init__()
        self.layers, self.feature_map, self.delta_no_att_scale = list(layers), feature_map, delta_no_att_scale
        self.delta_scale, self.world_size = delta_scale, world_size
        self.layer_scale = None if layer_scale is None else [float(k) for k in layer_scale]
        self.relu, self.distance_impl = rectifies(feature_map), distance_impl
        taps = tap_modules(target, self.layers, feature_map)
        rectify = rectified_at_tap(feature_map)
        self.source = source_features(source, taps, fold_source_bn, rectify)
        self._taps = FeatureTaps(target, taps, rectify=rectify,
                                 follows={t: l for t, l in zip(taps, self.layers) if t != l})
        self.n_attention = 0 if attention is None else len(attention)
        for i, a in enumerate(attention or []):  # buffers: they move with .to() and are not trained
            self.register_buffer(f"attention_{i}", torch.as_tensor(a).detach().float())

    def weights(self) -> Optional[List[torch.Tensor]]:
        return [getattr(self, f"attention_{i}") for i in range(self.n_attention)] or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target_maps = self._taps.collect()
        with torch.no_grad():
            source_maps = self.source(x)
        return self.delta_term(target_maps, source_maps)

    @torch.no_grad()
    def scale_by_source_energy(self, images: Iterable[torch.Tensor]) -> List[float]:
        """feature_scale="source_energy" as fit applies it: E_l, each layer's term between the source maps
        and zero per image over `images` (batches of inputs; fit takes up to 256 training images, centre
        crop), and from now on each layer's term divided by its E_l. Returns E_l per layer."""
        totals, n = [0.0] * len(self.layers), 0
        for x in images:
            totals = [t + e for t, e in zip(totals, self.source_energy(self.source(x)))]
            n += len(x)
        energy = [t / n for t in totals]
        self.scale_by_energy(energy)
        return energy

    def remove(self) -> None:
        """Take the hooks off the target network."""
        self._taps.close()


def channel_attention(model: nn.Module, layers: Sequence[str], batches: Iterable, temperature: float = 5.0,
                      impl: str = "prefix", progress: bool = False,
                      normalisation: str = "zscore_softmax") -> ChannelAttention:
    """Algorithm 1 on `model` (eval mode): per channel of each layer, the loss increase when its filter is
    removed, summed over `batches` of (images, labels); `.weights` per layer = softmax(zscore / temperature)
    (public code) or, with normalisation="softmax", softmax(raw) (the paper's text)."""
    batches = list(batches)
    raws, ran, seconds = channel_loss_increase(model, list(layers), batches, impl, progress, lambda *_: None)
    return ChannelAttention(list(layers), raws, temperature, sum(len(y) for _, y in batches), ran, seconds,
                            normalisation=normalisation)


class SourcePull:
    """L2-SP for any optimizer: `apply_()` after backward adds alpha * (w - w*) to every non-head
    parameter's gradient (the gradient of alpha/2 ||w - w*||^2) and returns that term's value."""

    def __init__(self, model: nn.Module, source: nn.Module, alpha: float, head_name: Optional[str] = None):
        l2sp = L2SP(model, source, head_name or find_head(model), [], alpha=alpha, beta=0.0)
        # L2-SP's own pull: the anchors w* in each parameter's layout and device (copied only if they differ)
        self.pulls: List[Pull] = [p for p in l2sp.pulls(trainable=[]) if p.term == "reg"]

    def apply_(self) -> torch.Tensor:
        return apply_pulls(self.pulls)["reg"]
