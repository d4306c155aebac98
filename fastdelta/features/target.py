"""The target's logits and feature maps without hooks, for the fast step (hooks would break its
compiled graph): a torch.fx extractor over the target's own modules."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from .tracing import output_node_name, trace_extractor


class TargetFeatures(nn.Module):
    """`(logits, [tap per layer])` from the target without hooks: a torch.fx extractor whose modules and
    parameters ARE the target's (no copy), traced in train and eval mode."""

    def __init__(self, target: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.layers = list(layers)
        logits = output_node_name(target)
        if logits in self.layers:
            raise ValueError(f"the output node {logits!r} is also a regularised layer")
        self.net = trace_extractor(target, {**{l: l for l in self.layers}, logits: "__logits__"})
        self.net.train(target.training)

    def forward(self, x):
        out = self.net(x)
        return out["__logits__"], [out[l] for l in self.layers]
