"""Prefix reuse, what makes Algorithm 1's exact paths fast (fastdelta.attention.loss_increase): the
network traced with torch.fx and split at a tapped layer into a prefix, computed once per batch, and a
suffix, run again per masked channel (`PrefixReuse`); and whether that suffix acts on each channel
separately up to a global average pool (`channel_separable_split`), which allows the closed form:
pooled channel j with tap channel j zeroed equals pooled channel j with the whole tap zeroed.
"""
from __future__ import annotations

import copy
import operator
from typing import Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


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


# ---------------------------------------------------------------- channel-separable suffix (closed form)

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
