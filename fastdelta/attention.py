"""Supervised channel attention (Algorithm 1 of the paper).

With the L2-FE model (source extractor + trained head, eval mode), the raw weight of channel j of
a regularised layer is the loss increase when filter j is removed, summed over the images:

    raw_j = sum_i  L(z(x_i; w*\\j), y_i) - L(z(x_i; w*), y_i)

Removing filter j equals zeroing output channel j of the tapped layer (its bias included), so the
tapped output is masked and no weight is mutated. The normalised weights are, per layer (public
code), W = softmax(zscore(raw) / T).

Two exact implementations share one interface (`loss_increase(model, layer, batches)`):
- "masked_forward": one full forward per channel and batch (the literal algorithm);
- "prefix": the network is traced with torch.fx, everything that does not depend on the tapped
  layer is computed once per batch, and only the part after the tap is re-run per channel.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .ioutil import atomic_write_text
from .progress import progress_bar


def normalize_attention(raw: torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    """softmax(zscore(raw) / T): z-score with the population std; a constant vector gives uniform weights."""
    raw = raw.double()
    std = raw.std(unbiased=False)
    z = (raw - raw.mean()) / std if std > 0 else torch.zeros_like(raw)
    return torch.softmax(z / temperature, dim=0).float()


@dataclass
class ChannelAttention:
    layers: List[str]
    raw: List[torch.Tensor]        # per layer: summed loss increase per channel (float64)
    temperature: float = 5.0
    images: int = 0
    impl: str = ""
    timings: Dict[str, float] = field(default_factory=dict)
    head: Dict[str, float] = field(default_factory=dict)  # how the L2-FE head was trained

    @property
    def weights(self) -> List[torch.Tensor]:
        return [normalize_attention(r, self.temperature) for r in self.raw]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "temperature": self.temperature, "images": self.images, "impl": self.impl,
                "normalisation": "per layer softmax(zscore(raw) / temperature), population std",
                "raw": {l: r.tolist() for l, r in zip(self.layers, self.raw)},
                "weights": {l: w.tolist() for l, w in zip(self.layers, self.weights)},
                "public_layout": [r.tolist() for r in self.raw],
                "timings_s": self.timings, "head": self.head}

    def save(self, path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d, layers: Optional[Sequence[str]] = None, temperature: Optional[float] = None) -> "ChannelAttention":
        """From our JSON, or from the public code's layout (a list of raw vectors per layer)."""
        if isinstance(d, list):
            if layers is None or len(layers) != len(d):
                raise ValueError(f"public-layout attention has {len(d)} layers; pass the {len(d)} layer names")
            return cls(list(layers), [torch.tensor(v, dtype=torch.float64) for v in d], temperature or 5.0)
        raw = d["raw"]
        return cls(list(d["layers"]), [torch.tensor(raw[l], dtype=torch.float64) for l in d["layers"]],
                   temperature or d.get("temperature", 5.0), d.get("images", 0), d.get("impl", ""),
                   d.get("timings_s", {}), d.get("head", {}))

    @classmethod
    def load(cls, path, layers=None, temperature=None) -> "ChannelAttention":
        with open(path) as f:
            return cls.from_dict(json.load(f), layers, temperature)


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none").double()


# ---------------------------------------------------------------- literal algorithm (full forward)

@torch.no_grad()
def loss_increase_masked_forward(model: nn.Module, layer: str, batches: Sequence, progress=None) -> torch.Tensor:
    """raw_j by one full forward per channel and batch with channel j of `layer` zeroed."""
    module = model.get_submodule(layer)
    state = {"channel": None}

    def mask(_, __, out):
        if state["channel"] is None:
            return out
        out = out.clone()
        out[:, state["channel"]] = 0
        return out

    handle = module.register_forward_hook(mask)
    try:
        raw = None
        for x, y in batches:
            state["channel"] = None
            base = per_sample_loss(model(x), y)
            channels = _channels_of(model, layer, x)
            raw = torch.zeros(channels, dtype=torch.float64) if raw is None else raw
            for j in range(channels):
                state["channel"] = j
                raw[j] += (per_sample_loss(model(x), y) - base).sum().cpu()
                if progress is not None:
                    progress.update(1)
        return raw
    finally:
        handle.remove()


def _channels_of(model, layer, x) -> int:
    out = {}

    def record(module, inputs, output):  # returns None: the output is left unchanged
        out["c"] = output.shape[1]

    h = model.get_submodule(layer).register_forward_hook(record)
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        h.remove()
    return out["c"]


# ---------------------------------------------------------------- prefix reuse (torch.fx)

class _TapLeafTracer(fx.Tracer):
    """Keeps the tapped layers as single graph nodes so their outputs can be replaced."""

    def __init__(self, leaves: Iterable[str]):
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


class PrefixReuse:
    """A traced copy of an eval-mode model that re-runs only what depends on a tapped layer."""

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        model = copy.deepcopy(model).eval()
        for m in model.modules():  # cached values are reused across runs: nothing may write into them
            if hasattr(m, "inplace"):
                m.inplace = False
        graph = _TapLeafTracer(layers).trace(model)
        for node in graph.nodes:
            if node.kwargs.get("inplace"):
                node.kwargs = {**node.kwargs, "inplace": False}
            if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
                raise NotImplementedError(f"in-place tensor method {node.target!r} in the traced graph")
        self.gm = fx.GraphModule(model, graph)
        self.tap_nodes = {}
        for node in graph.nodes:
            if node.op == "call_module" and node.target in layers:
                self.tap_nodes[node.target] = node
        missing = [l for l in layers if l not in self.tap_nodes]
        if missing:
            raise NotImplementedError(f"layers {missing} are not single nodes of the traced graph")
        self.needed, self.suffix = {}, {}
        for layer, tap in self.tap_nodes.items():
            self.needed[layer], self.suffix[layer] = self._split_at(tap)

    def _split_at(self, tap: fx.Node):
        """(prefix values the suffix reads, GraphModule of everything that depends on the tap).

        The suffix module takes (tap value, *needed values) and returns the network output."""
        desc, todo = set(), [tap]
        while todo:
            for user in todo.pop().users:
                if user not in desc:
                    desc.add(user)
                    todo.append(user)
        needed = [n for n in self.gm.graph.nodes if n not in desc and n is not tap and n.op != "get_attr"
                  and any(u in desc for u in n.users)]
        graph, env = fx.Graph(), {}
        for n in [tap] + needed:
            env[n] = graph.placeholder(f"in_{n.name}")
        for n in self.gm.graph.nodes:
            if n.op == "get_attr" and any(u in desc for u in n.users):
                env[n] = graph.node_copy(n, lambda a: env[a])
        for n in self.gm.graph.nodes:
            if n in desc:
                env[n] = graph.node_copy(n, lambda a: env[a])
        return needed, fx.GraphModule(self.gm, graph)

    @torch.no_grad()
    def full_run(self, x: torch.Tensor):
        """Network output and every intermediate value (fx node -> tensor) for one batch."""
        interp = fx.Interpreter(self.gm, garbage_collect_values=False)
        logits = interp.run(x)
        return logits, interp.env

    @torch.no_grad()
    def suffix_run(self, layer: str, env: dict, tap_value: torch.Tensor) -> torch.Tensor:
        return self.suffix[layer](tap_value, *[env[n] for n in self.needed[layer]])


@torch.no_grad()
def loss_increase_prefix(reuse: PrefixReuse, layer: str, batches: Sequence, progress=None) -> torch.Tensor:
    raw = None
    for x, y in batches:
        logits, env = reuse.full_run(x)
        base = per_sample_loss(logits, y)
        tap = env[reuse.tap_nodes[layer]]
        raw = torch.zeros(tap.shape[1], dtype=torch.float64) if raw is None else raw
        for j in range(tap.shape[1]):
            masked = tap.clone()
            masked[:, j] = 0
            raw[j] += (per_sample_loss(reuse.suffix_run(layer, env, masked), y) - base).sum().cpu()
            if progress is not None:
                progress.update(1)
        del env
    return raw


# ---------------------------------------------------------------- driver

def channel_loss_increase(model: nn.Module, layers: Sequence[str], batches: Sequence, impl: str = "prefix",
                          show_progress: bool = True, log: Callable[[str], None] = print) -> tuple:
    """Raw loss-increase vectors for every layer, the implementation that ran, and per-layer seconds."""
    model = model.eval()
    reuse = None
    if impl == "prefix":
        try:
            reuse = PrefixReuse(model, layers)
        except Exception as e:  # an untraceable network still gets the exact literal algorithm
            log(f"attention: torch.fx tracing failed ({type(e).__name__}: {str(e)[:120]}); "
                "using one full forward per channel")
            impl = "masked_forward"
    raws, seconds = [], {}
    for layer in layers:
        channels = _channels_of(model, layer, batches[0][0])
        t0 = time.perf_counter()
        with progress_bar(total=channels * len(batches), desc=f"attention {layer}", unit="ch·batch",
                          enabled=show_progress) as bar:
            if reuse is not None:
                raws.append(loss_increase_prefix(reuse, layer, batches, bar))
            else:
                raws.append(loss_increase_masked_forward(model, layer, batches, bar))
        seconds[layer] = round(time.perf_counter() - t0, 3)
    return raws, impl, seconds
