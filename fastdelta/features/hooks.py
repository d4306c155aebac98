"""Forward hooks that record the feature maps of the tapped modules during a model's forward.

Hooks are owned by one `FeatureTaps` object (no module-level state), write into a per-call dict,
and are removed by `close()` so the user's model is left as it was. Used by the reference step (target
and source), fit's source energy, `compare`'s analysis, FeatureMapRegularizer and HookedSource.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn


class FeatureTaps:
    """`taps(x) -> (logits, [feature maps in layer order])` for a model and tapped module names.

    `rectify=True` stores ReLU of each output, computed out of place at once: a BN output tapped for
    the "activation" form is modified in place later by residual blocks (`out += identity`), and the
    stored map must be the value the BN produced. `follows` maps a tapped module to the conv whose
    output it must read; that is checked at the first forward."""

    def __init__(self, model: nn.Module, layers: Sequence[str], forward=None, rectify: bool = False,
                 follows: dict | None = None):
        self.model = model
        self.forward = forward if forward is not None else model  # e.g. a DDP wrapper of `model`
        self.layers = list(layers)
        self.rectify = rectify
        self._store: dict = {}
        self._handles = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.layers]
        self._unchecked = dict(follows or {})
        self._check_handles = []
        if self._unchecked:
            self._check_handles = [model.get_submodule(conv).register_forward_hook(self._conv_hook(conv))
                                   for conv in set(self._unchecked.values())]
            self._check_handles += [model.get_submodule(norm).register_forward_pre_hook(self._norm_hook(norm))
                                    for norm in self._unchecked]

    def _hook(self, name: str):
        def store(module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                raise ValueError(f"layer {name!r} must output a 4-D (N, C, H, W) tensor to be regularised, got "
                                 f"{type(output).__name__}{'' if not isinstance(output, torch.Tensor) else tuple(output.shape)}")
            self._store[name] = torch.relu(output) if self.rectify else output
        return store

    def _conv_hook(self, conv: str):
        def record(module, inputs, output):
            self._store["conv:" + conv] = output
        return record

    def _norm_hook(self, norm: str):
        def check(module, inputs):
            conv = self._unchecked[norm]
            if inputs[0] is not self._store.get("conv:" + conv):
                raise ValueError(f"feature_map='activation': {norm!r} does not read the output of {conv!r} "
                                 "directly, so it is not that conv's BN; regularise another layer or use "
                                 "feature_map='conv'")
        return check

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        self._store = {}
        logits = self.forward(x)
        return logits, self.collect()

    def collect(self) -> List[torch.Tensor]:
        """The maps recorded by the model's last forward, in layer order (then forgotten)."""
        missing = [name for name in self.layers if name not in self._store]
        if missing:
            raise RuntimeError(f"no feature maps recorded for {missing}: run the model's forward first")
        feats = [self._store[name] for name in self.layers]
        self._store = {}
        if self._check_handles:  # checked once: the model's structure does not change between calls
            for h in self._check_handles:
                h.remove()
            self._check_handles = []
        return feats

    def close(self) -> None:
        for h in self._handles + self._check_handles:
            h.remove()
        self._handles, self._check_handles = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
