"""A cheap source network: the frozen w* network reduced to what DELTA needs from it.

The source network only ever runs in eval mode without gradients, to give the feature maps of the
regularised layers. So:

- it is traced with torch.fx and **truncated after the last regularised layer** (the graph keeps only
  the nodes the taps depend on; the head and the last stages never run);
- a BN that directly follows a conv is **folded** into it where that is exact and leaves every tap as
  it was (fastdelta.features.bn_folding);
- it is a copy: the user's source module is left as it was; no parameter requires grad.

A tap is the value of the tapped node in the traced graph. Where the full forward later modifies a
tapped tensor in place (e.g. a tapped BN followed by ReLU(inplace=True)), truncation would change what
the tap sees, so such a source falls back to hooks on a full forward. (torch.fx records `out += x` as
an out-of-place add, so a tap before it sees the value before the addition, on the target's fx
extractor and on the source alike; forward hooks in the reference step see it after. The default
layers -- conv outputs followed by BN -- are not affected.)

`SourceFeatures(x) -> [feature map per layer, in layer order]`. When a network cannot be traced by
torch.fx, `HookedSource` (forward hooks on a full forward, no folding) gives the same maps.
`batch_statistics_copy` is the source for setting source_bn="batch".
"""
from __future__ import annotations

import copy
from typing import List, Sequence

import torch
import torch.nn as nn

from .bn_folding import fold_batchnorm
from .hooks import FeatureTaps
from .tracing import output_node_name, trace_extractor


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
