"""Feature taps: the regularised layers' outputs, returned next to the logits.

Hooks are owned by one `FeatureTaps` object (no module-level state), write into a per-call
dict, and are removed by `close()` so the user's model is left as it was.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn


class FeatureTaps:
    """`taps(x) -> (logits, [feature maps in layer order])` for a model and layer names."""

    def __init__(self, model: nn.Module, layers: Sequence[str], forward=None):
        self.model = model
        self.forward = forward if forward is not None else model  # e.g. a DDP wrapper of `model`
        self.layers = list(layers)
        self._store: dict = {}
        self._handles = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.layers]

    def _hook(self, name: str):
        def store(module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                raise ValueError(f"layer {name!r} must output a 4-D (N, C, H, W) tensor to be regularised, got "
                                 f"{type(output).__name__}{'' if not isinstance(output, torch.Tensor) else tuple(output.shape)}")
            self._store[name] = output
        return store

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        self._store = {}
        logits = self.forward(x)
        feats = [self._store[name] for name in self.layers]
        self._store = {}
        return logits, feats

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
