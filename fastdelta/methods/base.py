"""What every method is: a loss `CE + reg + head`, its metadata, and its registry.

A method is one subclass of `Method`, registered once with `@register`. It owns its formula (in its
docstring), its loss terms in autograd form (`terms`: the reference step), the same parameter-norm
terms as optimizer-side pulls (`pulls`: the fast step), and what the rest of fastdelta needs to know
about it (class attributes below). Nothing else names a method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .hyperparameters import Hyperparameter, SettingField, setting_fields


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
    learning_curve = False         # one of the pair the paper's Fig. 3 compares
    activation_map = False         # a column of the paper's Fig. 6
    color = "tab:gray"             # its colour in figures
    # what it can be tuned by: each a setting (FitSettings field, CLI option); those with a grid are
    # what `compare` chooses on a validation split (`tuned`, filled in by @register)
    hyperparameters: Tuple[Hyperparameter, ...] = ()
    tuned: Tuple[str, ...] = ()

    @classmethod
    def declared(cls) -> Dict[str, Hyperparameter]:
        return {h.name: h for h in cls.hyperparameters}

    @classmethod
    def hyperparameter_values(cls, given: Mapping[str, object]) -> Dict[str, object]:
        """Each declared hyperparameter's value: given (not None), else its default (which may depend on
        the others: a scale form first, then the alpha that depends on it); each checked."""
        values = {h.name: given.get(h.name) for h in cls.hyperparameters}
        for h in sorted(cls.hyperparameters, key=lambda h: callable(h.default)):
            if values[h.name] is None:
                values[h.name] = h.default_for(values)
            h.check(values[h.name])
        return values

    def __init__(self, target: nn.Module, source: nn.Module, head_name: str, layers: Sequence[str],
                 attention: Optional[Sequence[torch.Tensor]] = None, *, distance_impl: str = "auto",
                 world_size: int = 1, **hyperparameters):
        """hyperparameters: this method's (`hyperparameters`), each set as an attribute; the ones other
        registered methods declare are ignored (one set of settings serves every method), any other
        name is an error."""
        unknown = sorted(set(hyperparameters) - set(all_hyperparameters()))
        if unknown:
            raise TypeError(f"{self.name}: unknown hyperparameter(s) {unknown}; registered methods declare "
                            f"{sorted(all_hyperparameters())}")
        for key, value in self.hyperparameter_values(hyperparameters).items():
            setattr(self, key, value)
        self.layers = list(layers)
        self.distance_impl = distance_impl  # which fused kernel computes feature-map distances
        # per-batch sums x world size under DDP, so that gradients averaged over ranks match one process
        self.sum_scale = float(world_size)
        self.world_size = world_size
        prefix = head_name + "."
        self.head_params = [p for n, p in target.named_parameters() if n.startswith(prefix)]
        self.shared = [(n, p) for n, p in target.named_parameters() if not n.startswith(prefix)]
        src = dict(source.named_parameters())
        self.source_params = {n: src[n].detach() for n, _ in self.shared}
        device = self.head_params[0].device  # once here, not a host-to-device copy every step
        self.attention = None if attention is None else [a.detach().float().to(device) for a in attention]
        if self.uses_attention and self.attention is None:
            raise ValueError(f"{self.name} needs channel attention")

    def source_network(self, source: nn.Module) -> nn.Module:
        """The network whose feature maps the step compares with the target's (methods with source features)."""
        return source

    def prepare(self, source: nn.Module, images: Iterable[torch.Tensor]) -> dict:
        """Work before training that needs the data (`images`: batches of training images on the device,
        read only if iterated; e.g. measuring a scale); what to record in the run's settings."""
        return {}

    def explain_divergence(self) -> str:
        """What to add to the message when this method's loss diverged ('' for nothing)."""
        return ""

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
    cls.tuned = tuple(h.name for h in cls.hyperparameters if h.grid)
    setting_fields({**METHODS, cls.name: cls})  # a clash with another method's declaration fails here
    METHODS[cls.name] = cls
    _registry_changed()
    return cls


def unregister(name: str) -> None:
    """Remove method `name` (and the settings only it declared)."""
    METHODS.pop(name)
    _registry_changed()


# told after the registry changed: FitSettings takes a new method's hyperparameters as fields
_LISTENERS: List[Callable[[], None]] = []


def on_registry_change(listener: Callable[[], None]) -> None:
    _LISTENERS.append(listener)


def _registry_changed() -> None:
    for listener in _LISTENERS:
        listener()


def all_hyperparameters() -> Dict[str, SettingField]:
    """Every registered method's hyperparameters, one setting per name."""
    return setting_fields(METHODS)


def method_class(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"method={name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def make_method(name: str, *args, **kwargs) -> Method:
    """The method `name` built with Method's arguments (target, source, head_name, layers, attention,
    keyword hyperparameters)."""
    return method_class(name)(*args, **kwargs)
