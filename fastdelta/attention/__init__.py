"""Channel attention (Algorithm 1 of the paper): how much the loss grows when each channel of a regularised
layer is removed, and the per-layer weights DELTA's feature-map term takes from it.

- weights: ChannelAttention (the measured loss increases, their normalisation into weights, its file),
  and spearman / top_overlap to compare two attentions;
- loss_increase: the measurement, channel_loss_increase and its implementations (masked forward,
  prefix reuse with K masked copies, closed form, first order);
- prefix_reuse: the network traced with torch.fx and split at a tapped layer, for the exact fast paths;
- cache: measured attentions kept on disk, keyed by what determines them.
"""
from .weights import ChannelAttention, normalize_attention  # noqa: F401
