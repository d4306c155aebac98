"""Supervised channel attention (Algorithm 1 of the paper).

With the L2-FE model (source extractor + trained head, eval mode), the raw weight of channel j of
a regularised layer is the loss increase when filter j is removed, summed over the images:

    raw_j = sum_i  L(z(x_i; w*\\j), y_i) - L(z(x_i; w*), y_i)

Removing filter j equals zeroing output channel j of the tapped layer (its bias included), so the
tapped output is masked and no weight is mutated. The normalised weights are, per layer,
W = softmax(zscore(raw) / T) (public code) or softmax(raw) (the paper's text): NORMALISATIONS.

Implementations (`channel_loss_increase(..., impl=...)`), each per layer and batch:
- "masked_forward": one full forward per channel (the literal algorithm);
- "prefix" (default, exact): the network is traced with torch.fx and everything that does not
  depend on the tapped layer is computed once per batch; then either
  * closed form, when the suffix is channel-separable up to a global average pool (e.g. ResNet's
    last conv -> bn -> +identity -> relu -> avgpool -> fc): pooled channel j with tap channel j
    zeroed equals pooled channel j with the whole tap zeroed, so two suffix passes give every
    channel's pooled features, and only the head runs per channel; or
  * K masked copies of the tap stacked into one suffix pass (K from free memory);
- "first_order" (an estimate, not exact): -sum(a_j * dL/da_j) from one forward + backward.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import operator
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..ioutil import atomic_write_text
from ..progress import progress_bar


# How a layer's raw loss increases become weights W (per layer):
# "zscore_softmax": softmax(zscore(raw) / T), the public code (channel_eval.py / train.py), T = temperature;
# "softmax": softmax(raw), the paper's text (Algorithm 1: the loss increases summed over the training set,
# then a softmax; no standardisation and no temperature, so the temperature is not used)
NORMALISATIONS = ("zscore_softmax", "softmax")
NORMALISATION_TEXT = {"zscore_softmax": "per layer softmax(zscore(raw) / temperature), population std",
                      "softmax": "per layer softmax(raw) (the paper's text: no z-score, no temperature)"}


def normalize_attention(raw: torch.Tensor, temperature: float = 5.0,
                        normalisation: str = "zscore_softmax") -> torch.Tensor:
    """W from raw loss increases (NORMALISATIONS); for "zscore_softmax" the z-score uses the population
    std and a constant vector gives uniform weights."""
    raw = raw.double()
    if normalisation == "softmax":
        return torch.softmax(raw, dim=0).float()
    if normalisation != "zscore_softmax":
        raise ValueError(f"attention normalisation {normalisation!r}: expected one of {NORMALISATIONS}")
    std = raw.std(unbiased=False)
    z = (raw - raw.mean()) / std if std > 0 else torch.zeros_like(raw)
    return torch.softmax(z / temperature, dim=0).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two per-channel vectors (ties broken by position)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_overlap(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.1) -> float:
    """Share of a's top `fraction` channels that are also among b's."""
    k = max(1, int(len(a) * fraction))
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k


@dataclass
class ChannelAttention:
    layers: List[str]
    raw: List[torch.Tensor]        # per layer: summed loss increase per channel (float64)
    temperature: float = 5.0
    images: int = 0
    impl: object = ""             # what ran, per layer (closed_form / prefix_batched / masked_forward / first_order)
    timings: Dict[str, float] = field(default_factory=dict)
    head: Dict[str, float] = field(default_factory=dict)  # how the L2-FE head was trained
    device: str = ""              # where it was computed (its timings are only comparable there)
    normalisation: str = "zscore_softmax"  # NORMALISATIONS: how raw becomes W
    sample: Dict[str, object] = field(default_factory=dict)  # which images Algorithm 1 measured

    @property
    def weights(self) -> List[torch.Tensor]:
        return [normalize_attention(r, self.temperature, self.normalisation) for r in self.raw]

    def normalised(self, temperature: float, normalisation: str) -> "ChannelAttention":
        """The same measurement normalised another way (raw is what is measured; W follows the settings)."""
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"attention normalisation {normalisation!r}: expected one of {NORMALISATIONS}")
        return dataclasses.replace(self, temperature=temperature, normalisation=normalisation)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "temperature": self.temperature, "images": self.images, "impl": self.impl,
                "normalisation": self.normalisation, "normalisation_text": NORMALISATION_TEXT[self.normalisation],
                "sample": self.sample,
                "raw": {l: r.tolist() for l, r in zip(self.layers, self.raw)},
                "weights": {l: w.tolist() for l, w in zip(self.layers, self.weights)},
                "public_layout": [r.tolist() for r in self.raw],
                "timings_s": self.timings, "head": self.head, "device": self.device}

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
        # files written before the paper's normalisation existed hold a description, not a name
        normalisation = d.get("normalisation", "zscore_softmax")
        normalisation = normalisation if normalisation in NORMALISATIONS else "zscore_softmax"
        return cls(list(d["layers"]), [torch.tensor(raw[l], dtype=torch.float64) for l in d["layers"]],
                   temperature or d.get("temperature", 5.0), d.get("images", 0), d.get("impl", ""),
                   d.get("timings_s", {}), d.get("head", {}), d.get("device", ""), normalisation,
                   d.get("sample", {}))

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
        self.needed, self.suffix, self.separable = {}, {}, {}
        for layer, tap in self.tap_nodes.items():
            self.needed[layer], self.suffix[layer] = self._split_at(tap)
            self.separable[layer] = channel_separable_split(self.suffix[layer])

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


def masked_copies(tap: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """(K*B, C, H, W): K copies of the batch's tap, copy k with channel channels[k] zeroed."""
    k = len(channels)
    out = tap.unsqueeze(0).repeat(k, *([1] * tap.dim()))
    out[torch.arange(k), :, torch.as_tensor(channels)] = 0
    out = out.flatten(0, 1)
    return out.contiguous(memory_format=torch.channels_last) if out.is_cuda and out.dim() == 4 else out


def _repeat_batch(value, k: int, batch: int):
    """A prefix value read by the suffix, repeated for K stacked copies (batch-first tensors only)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        return value.repeat(k, *([1] * (value.dim() - 1)))
    return value


def auto_chunk(tap: torch.Tensor, channels: int, budget_bytes: Optional[int] = None) -> int:
    """How many masked copies to stack per suffix pass: on a GPU, a quarter of free memory over ~8x
    the tap's bytes per copy (the suffix's activations), at most 256. On the CPU one copy per pass:
    a batch already keeps the cores busy, and stacking measured 3-4x slower on the demo (2 cores)."""
    if budget_bytes is None:
        if not tap.is_cuda:
            return 1
        budget_bytes = torch.cuda.mem_get_info(tap.device)[0] // 4
    per_copy = 8 * tap.numel() * tap.element_size()
    return int(max(1, min(channels, 256, budget_bytes // max(per_copy, 1))))


# ---------------------------------------------------------------- closed form (channel-separable suffix)

# Modules and functions that act on each channel separately (elementwise, per-channel affine, or
# per-channel spatial averaging); shape checks (getattr/eq/_assert) carry no data.
_PER_CHANNEL_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Tanh,
                        nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Flatten)
_PER_CHANNEL_FUNCTIONS = {operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.relu, F.relu, F.relu6,
                          F.silu, F.hardswish, torch.sigmoid, torch.flatten, F.dropout}
_SHAPE_ONLY_FUNCTIONS = {getattr, operator.eq, operator.getitem, torch._assert}


def _is_global_pool(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return node.args[1] in (1, (1, 1)) if len(node.args) > 1 else node.kwargs.get("output_size") in (1, (1, 1))
    if node.op == "call_method" and node.target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return tuple(dims) in ((2, 3), (-2, -1), (-1, -2), (3, 2)) if isinstance(dims, (tuple, list)) else False
    return False


def _is_per_channel(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PER_CHANNEL_MODULES)
    if node.op == "call_function":
        if node.target is F.batch_norm:  # eval-mode BN: a per-channel affine map
            training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
            return training is False
        return node.target in _PER_CHANNEL_FUNCTIONS or node.target in _SHAPE_ONLY_FUNCTIONS
    if node.op == "call_method":
        return node.target in ("relu", "flatten", "sigmoid", "size", "dim")
    return node.op in ("placeholder", "get_attr")


def channel_separable_split(suffix: fx.GraphModule):
    """(to_pool, head) GraphModules when the suffix is per-channel up to a global average pool,
    else None. to_pool(tap, *needed) -> pooled (B, C, 1, 1); head(pooled) -> network output."""
    modules = dict(suffix.named_modules())
    nodes = list(suffix.graph.nodes)
    pool = None
    for node in nodes:
        if _is_global_pool(node, modules):
            pool = node
            break
        if not _is_per_channel(node, modules):
            return None
    if pool is None:
        return None
    after = nodes[nodes.index(pool) + 1:]
    allowed = set(after) | {pool} | {n for n in nodes if n.op == "get_attr"}
    for node in after:  # the head may read only the pooled values and parameters
        if any(isinstance(a, fx.Node) and a not in allowed for a in node.all_input_nodes):
            return None
    to_pool = fx.Graph()
    env = {}
    for node in nodes[:nodes.index(pool) + 1]:
        env[node] = to_pool.node_copy(node, lambda a: env[a])
    to_pool.output(env[pool])
    head = fx.Graph()
    env = {pool: head.placeholder("pooled")}
    for node in nodes:
        if node.op == "get_attr" and any(u in after for u in node.users):
            env[node] = head.node_copy(node, lambda a: env[a])
    for node in after:
        env[node] = head.node_copy(node, lambda a: env[a])
    return fx.GraphModule(suffix, to_pool), fx.GraphModule(suffix, head)


@torch.no_grad()
def loss_increase_closed_form(reuse: "PrefixReuse", layer: str, batches: Sequence, progress=None,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """raw_j from one pass per batch when the suffix is channel-separable up to global pooling:
    zeroing tap channel j changes only pooled channel j, to its value with the whole tap zeroed."""
    to_pool, head = reuse.separable[layer]
    raw = None
    for x, y in batches:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits, env = reuse.full_run(x)
            base = per_sample_loss(logits, y)
            tap = env[reuse.tap_nodes[layer]]
            needed = [env[n] for n in reuse.needed[layer]]
            pooled = to_pool(tap, *needed)
            pooled_zero = to_pool(torch.zeros_like(tap), *needed)
            b, c = pooled.shape[:2]
            raw = torch.zeros(c, dtype=torch.float64) if raw is None else raw
            step = max(1, min(c, 2 ** 24 // max(1, pooled.numel())))
            for start in range(0, c, step):
                channels = torch.arange(start, min(c, start + step), device=pooled.device)
                k = len(channels)
                masked = pooled.unsqueeze(0).repeat(k, *([1] * pooled.dim()))
                masked[torch.arange(k), :, channels] = pooled_zero[:, channels].movedim(1, 0)
                increase = per_sample_loss(head(masked.flatten(0, 1)), y.repeat(k)).view(k, b) - base
                raw[channels.cpu()] += increase.sum(1).cpu()
            if progress is not None:
                progress.update(c)
        del env
    return raw


@torch.no_grad()
def loss_increase_prefix(reuse: PrefixReuse, layer: str, batches: Sequence, progress=None,
                         chunk: Optional[int] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """raw_j with the prefix computed once per batch and K masked copies per suffix pass."""
    raw = None
    for x, y in batches:
        device_type = x.device.type
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            logits, env = reuse.full_run(x)
            base = per_sample_loss(logits, y)
            tap = env[reuse.tap_nodes[layer]]
            c, b = tap.shape[1], tap.shape[0]
            raw = torch.zeros(c, dtype=torch.float64) if raw is None else raw
            k_max = chunk or auto_chunk(tap, c)
            # in reduced precision, the reference loss comes from an unmasked copy in the same pass,
            # so that both sides of each difference see the same kernels and rounding
            with_ref = dtype != torch.float32
            for start in range(0, c, k_max):
                channels = list(range(start, min(c, start + k_max)))
                k = len(channels) + with_ref
                copies = masked_copies(tap, ([-1] if with_ref else []) + channels)
                if with_ref:
                    copies[:b] = tap
                needed = [_repeat_batch(env[n], k, b) for n in reuse.needed[layer]]
                losses = per_sample_loss(reuse.suffix[layer](copies, *needed), y.repeat(k)).view(k, b)
                increase = losses[1:] - losses[:1] if with_ref else losses - base
                raw[channels] += increase.sum(1).cpu()
                if progress is not None:
                    progress.update(k)
        del env
    return raw


# ---------------------------------------------------------------- first-order estimator

def loss_increase_first_order(model: nn.Module, layers: Sequence[str], batches: Sequence) -> List[torch.Tensor]:
    """Taylor estimate of every layer's raw_j from one forward + backward per batch:
    L(a with a_j = 0) - L(a) ~= -sum over images and positions of a_j * dL/da_j."""
    store = {}
    handles = [model.get_submodule(l).register_forward_hook(lambda m, i, o, l=l: store.__setitem__(l, o))
               for l in layers]
    raws = [None] * len(layers)
    try:
        for x, y in batches:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)  # a graph through the taps without parameter grads
                loss = per_sample_loss(model(x), y).sum()
                acts = [store[l] for l in layers]
                grads = torch.autograd.grad(loss, acts)
            for i, (a, g) in enumerate(zip(acts, grads)):
                est = -(a.detach().double() * g.double()).sum(dim=(0, 2, 3)).cpu()
                raws[i] = est if raws[i] is None else raws[i] + est
            store.clear()
    finally:
        for h in handles:
            h.remove()
    return raws


# ---------------------------------------------------------------- driver

def channel_loss_increase(model: nn.Module, layers: Sequence[str], batches: Sequence, impl: str = "prefix",
                          show_progress: bool = True, log: Callable[[str], None] = print,
                          chunk: Optional[int] = None, dtype: torch.dtype = torch.float32) -> tuple:
    """Raw loss-increase vectors for every layer, what ran (per layer), and per-layer seconds.

    impl "prefix" (exact): closed form where the suffix is channel-separable, else K masked copies
    per suffix pass; "masked_forward" (exact, literal): one full forward per channel;
    "first_order": the Taylor estimate (not exact)."""
    model = model.eval()
    if impl == "first_order":
        t0 = time.perf_counter()
        raws = loss_increase_first_order(model, layers, batches)
        seconds = round(time.perf_counter() - t0, 3)
        return raws, {l: "first_order" for l in layers}, {"all layers": seconds}
    reuse = None
    if impl == "prefix":
        try:
            reuse = PrefixReuse(model, layers)
        except Exception as e:  # an untraceable network still gets the exact literal algorithm
            log(f"attention: torch.fx tracing failed ({type(e).__name__}: {str(e)[:120]}); "
                "using one full forward per channel")
    raws, ran, seconds = [], {}, {}
    for layer in layers:
        channels = _channels_of(model, layer, batches[0][0])
        t0 = time.perf_counter()
        with progress_bar(total=channels * len(batches), desc=f"attention {layer}", unit="ch·batch",
                          enabled=show_progress) as bar:
            if reuse is not None and reuse.separable[layer] is not None:
                ran[layer] = "closed_form"
                raws.append(loss_increase_closed_form(reuse, layer, batches, bar, dtype))
            elif reuse is not None:
                ran[layer] = "prefix_batched"
                raws.append(loss_increase_prefix(reuse, layer, batches, bar, chunk, dtype))
            else:
                ran[layer] = "masked_forward"
                raws.append(loss_increase_masked_forward(model, layer, batches, bar))
        seconds[layer] = round(time.perf_counter() - t0, 3)
    return raws, ran, seconds
