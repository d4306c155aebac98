"""What every method is: a loss `CE + reg + head`, its metadata, and its registry.

A method is one subclass of `Method`, registered once with `@register`. It owns its formula (in its
docstring), its loss terms in autograd form (`terms`: the reference step), the same parameter-norm
terms as optimizer-side pulls (`pulls`: the fast step), and what the rest of fastdelta needs to know
about it (class attributes below). Nothing else names a method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..features.forms import rectified_at_tap, rectifies, tap_modules


@dataclass
class Terms:
    reg: torch.Tensor   # alpha-weighted (or weight-decay) regulariser of shared parameters / behaviour
    head: torch.Tensor  # beta-weighted (or weight-decay) L2 of target-only parameters


@dataclass
class Pull:
    """A parameter-norm term applied in the optimizer: grad += coef * scale * (param - anchor);
    value 0.5 * coef * sum scale * (param - anchor)^2 (fastdelta.train.optim.PullSGD applies it)."""
    term: str                                  # the history term it belongs to: "reg" or "head"
    params: List[torch.Tensor]
    coef: float
    anchors: Optional[List[torch.Tensor]] = None          # None: anchor 0 (weight decay)
    scales: Optional[List[Optional[torch.Tensor]]] = None  # per-filter scale, broadcastable, or None


def squared_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([p.float().pow(2).sum() for p in params]).sum()


class Method:
    """Base: knows which parameters are shared with the source and which belong to the head."""
    name = ""                      # the `method` setting
    label = ""                     # the paper's name, for tables and figures
    uses_source_features = False   # needs the frozen source network's feature maps every step
    uses_attention = False         # needs channel attention (Algorithm 1) before training
    freezes_extractor = False      # only the head trains
    uses_weight_decay = False      # regularised by `weight_decay` (else by alpha / beta)
    pulls_to_source = False        # its reg term pulls parameters towards w*
    tuned = ()                     # hyperparameters `compare` chooses on a validation split
    learning_curve = False         # one of the pair the paper's Fig. 3 compares
    activation_map = False         # a column of the paper's Fig. 6
    color = "tab:gray"             # its colour in figures
    alpha_default = 0.01           # alpha when the settings leave it at None (the paper's fixed value)

    @classmethod
    def default_alpha(cls, settings) -> float:
        """alpha for these (resolved) settings when the user gives none; a method whose term's scale
        depends on a convention overrides this."""
        return cls.alpha_default

    def __init__(self, target: nn.Module, source: nn.Module, head_name: str, layers: Sequence[str],
                 alpha: float = 0.01, beta: float = 0.01, weight_decay: float = 1e-4, feature_map: str = "conv",
                 attention: Optional[Sequence[torch.Tensor]] = None, delta_no_att_scale: str = "sum", *,
                 delta_scale: str = "public", distance_impl: str = "auto", world_size: int = 1):
        self.alpha, self.beta, self.weight_decay = alpha, beta, weight_decay
        self.layers = list(layers)
        self.feature_map, self.delta_no_att_scale, self.delta_scale = feature_map, delta_no_att_scale, delta_scale
        self.distance_impl = distance_impl  # which fused kernel computes feature-map distances
        # per-batch sums x world size under DDP, so that gradients averaged over ranks match one process
        self.sum_scale = float(world_size)
        self.world_size = world_size
        self.relu = rectifies(feature_map)
        self.rectify_at_tap = rectified_at_tap(feature_map)
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
        if self.uses_attention and self.attention is None:
            raise ValueError(f"{self.name} needs channel attention")

    def trainable_parameters(self, target: nn.Module) -> List[nn.Parameter]:
        return self.head_params if self.freezes_extractor else [p for p in target.parameters()]

    def zero(self) -> torch.Tensor:
        return self.head_params[0].new_zeros(()).float()

    def terms(self, target_feats=None, source_feats=None) -> Terms:
        """The loss terms in autograd form (feature maps given when uses_source_features)."""
        raise NotImplementedError

    def pulls(self, trainable: Sequence[torch.Tensor]) -> Optional[List[Pull]]:
        """The parameter-norm terms as optimizer pulls, which the fast step applies after its backward
        instead of evaluating `terms` in its graph; [] when `terms` holds everything the graph needs
        (feature-map methods), None (this default) when a method has no pull form: the fast step then
        evaluates `terms` in its graph, so a new method with only `terms` trains the same on both steps."""
        return None

    def head_pull(self, trainable: Sequence[torch.Tensor], coef: float) -> Pull:
        ids = {id(p) for p in trainable}
        return Pull("head", [p for p in self.head_params if id(p) in ids], coef)


METHODS: Dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a Method subclass available by its name (the order is the tables' order)."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"method={name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def make_method(name: str, *args, **kwargs) -> Method:
    return method_class(name)(*args, **kwargs)
