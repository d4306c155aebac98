"""A cheap source network: the frozen w* network reduced to what DELTA needs from it.

The source network only ever runs in eval mode without gradients, to give the feature maps of the
regularised layers. So:

- it is traced with torch.fx and **truncated after the last regularised layer** (the graph keeps only
  the nodes the taps depend on; the head and the last stages never run);
- eval-mode BatchNorm is an affine map per channel, so a BN that directly follows a conv is **folded**
  into that conv's weight and bias (exact up to float rounding) -- **except** where the conv's own output
  is a tap: the public code taps the conv output *before* BN, and folding would make that tap see the
  BN output, a different quantity from the target's tap. A tap on the BN itself stays exact (the folded
  conv computes the BN output);
- it is a copy: the user's source module is left as it was; no parameter requires grad.

A tap is the value of the tapped node in the traced graph. Where the full forward later modifies a
tapped tensor in place (e.g. a tapped BN followed by ReLU(inplace=True)), truncation would change what
the tap sees, so such a source falls back to hooks on a full forward. (torch.fx records `out += x` as
an out-of-place add, so a tap before it sees the value before the addition, on the target's fx
extractor and on the source alike; forward hooks in the reference step see it after. The default
layers -- conv outputs followed by BN -- are not affected.)

`SourceFeatures(x) -> [feature map per layer, in layer order]`. When a network cannot be traced by
torch.fx, `HookedSource` (forward hooks on a full forward, no folding) gives the same maps.
"""
from __future__ import annotations

import copy
from typing import List, Sequence

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..methods.taps import FeatureTaps


class _PostNormAct(nn.Module):
    """What is left of timm's BatchNormAct2d once its BN is folded into the conv: drop + act."""

    def __init__(self, bn_act: nn.Module):
        super().__init__()
        self.drop = getattr(bn_act, "drop", nn.Identity())
        self.act = getattr(bn_act, "act", nn.Identity())

    def forward(self, x):
        return self.act(self.drop(x))


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def trace_extractor(model: nn.Module, return_nodes: dict):
    """torch.fx feature extractor (timm's wrapper for timm models: it knows timm's leaf modules)."""
    if is_timm_model(model):
        from timm.models._features_fx import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor
    return create_feature_extractor(model, return_nodes)


def output_node_name(model: nn.Module) -> str:
    """The qualified name of the node whose value the model returns (the logits)."""
    if is_timm_model(model):
        from timm.models._features_fx import get_graph_node_names
    else:
        from torchvision.models.feature_extraction import get_graph_node_names
    train_nodes, _ = get_graph_node_names(model)
    return train_nodes[-1]


def fold_batchnorm(gm: torch.fx.GraphModule, keep: Sequence[torch.fx.Node] = ()) -> List[str]:
    """Fold every eval-mode BN that is the only user of a Conv2d output into that conv, in place.

    Convs whose node is in `keep` (a tap: its own output is needed) are left alone. Returns the names
    of the folded convs."""
    keep = set(keep)
    modules = dict(gm.named_modules())
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d)):
            continue
        if src in keep or len(src.users) != 1:
            continue  # a tapped conv, or its output used elsewhere: folding would change what they see
        conv, bn = modules[src.target], modules[node.target]
        if bn.training or not bn.track_running_stats or bn.running_mean is None:
            continue  # only eval-mode BN with running statistics is an affine map
        fused = fuse_conv_bn_eval(conv.eval(), bn)
        _set_submodule(gm, src.target, fused)
        rest = _PostNormAct(bn)
        if type(bn) is nn.BatchNorm2d or (isinstance(rest.drop, nn.Identity) and isinstance(rest.act, nn.Identity)):
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
        else:  # BN with an activation fused in (timm BatchNormAct2d): keep the activation
            _set_submodule(gm, node.target, rest)
        folded.append(src.target)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return folded


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _is_inplace(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Does this node modify its input in place (ReLU(inplace=True), x.add_(...), F.relu(x, inplace=True))?"""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        return bool(node.kwargs.get("inplace", False)) or getattr(node.target, "__name__", "").endswith("_")
    return False


class SourceFeatures(nn.Module):
    """The source network truncated after its last regularised layer, BN folded where exact, frozen."""

    def __init__(self, source: nn.Module, layers: Sequence[str], fold_bn: bool = True, rectified: bool = False):
        """rectified: the taps are only used through ReLU, so a later in-place nn.ReLU on them changes nothing."""
        super().__init__()
        self.layers = list(layers)
        net = copy.deepcopy(source).eval().requires_grad_(False)
        # trace the whole network (taps + output) in eval mode, check the taps, then truncate
        ext = trace_extractor(net, {**{l: l for l in self.layers}, output_node_name(net): "__logits__"})
        graph = copy.deepcopy(getattr(ext, "eval_graph", ext.graph))
        gm = torch.fx.GraphModule(ext, graph, class_name="SourceFeatureGraph")
        out = next(n for n in gm.graph.nodes if n.op == "output")
        outputs = dict(out.args[0])
        taps = [outputs[l] for l in self.layers]
        harmless = (lambda u: rectified and u.op == "call_module" and type(gm.get_submodule(u.target)) is nn.ReLU)
        mutated = [l for l, n in zip(self.layers, taps) if any(_is_inplace(gm, u) and not harmless(u) for u in n.users)]
        if mutated:  # the full forward changes these taps in place later: truncating would not
            raise NotImplementedError(f"taps {mutated} are modified in place by a later operation")
        out.args = ({l: outputs[l] for l in self.layers},)
        gm.graph.eliminate_dead_code()  # truncation: only what the taps depend on is left
        gm.eval().requires_grad_(False)
        self.folded = fold_batchnorm(gm, keep=taps) if fold_bn else []
        self.net = gm
        self.train(False)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.net(x)
        return [feats[l] for l in self.layers]

    def train(self, mode: bool = True):
        return super().train(False)  # always eval mode


class HookedSource(nn.Module):
    """Fallback for networks torch.fx cannot trace: full forward of a frozen copy with hooks."""

    def __init__(self, source: nn.Module, layers: Sequence[str], rectified: bool = False):
        super().__init__()
        self.net = copy.deepcopy(source).eval().requires_grad_(False)
        self.layers = list(layers)
        self.folded: List[str] = []
        # a BN output tap (the "activation" form) may be changed in place later: keep ReLU of it at once
        self._taps = FeatureTaps(self.net, self.layers, rectify=rectified)
        self.train(False)

    def forward(self, x):
        return self._taps(x)[1]

    def train(self, mode: bool = True):
        return super().train(False)


def source_features(source: nn.Module, layers: Sequence[str], fold_bn: bool = True,
                    rectified: bool = False) -> nn.Module:
    """SourceFeatures when the network traces with torch.fx, else HookedSource."""
    try:
        return SourceFeatures(source, layers, fold_bn, rectified)
    except Exception:  # noqa: BLE001 - any tracing failure falls back to hooks
        return HookedSource(source, layers, rectified)


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


def batch_statistics_copy(source: nn.Module) -> nn.Module:
    """A frozen copy of `source` whose BN layers normalise with each batch's own statistics, in eval
    mode too, and hold no running statistics to update (setting source_bn="batch", not in the paper):
    the source maps of a batch then see the same normalisation as the target's in train mode."""
    net = copy.deepcopy(source).eval().requires_grad_(False)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return net
