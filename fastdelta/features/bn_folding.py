"""Eval-mode BatchNorm folded into the conv before it, in a traced graph.

Eval-mode BN is an affine map per channel, so a BN that directly follows a conv is folded into that
conv's weight and bias (exact up to float rounding), except where the conv's own output is needed
(a tap: the public code taps the conv output *before* BN, and folding would make that tap see the BN
output). A tap on the BN itself stays exact: the folded conv computes the BN output.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class _PostNormAct(nn.Module):
    """What is left of timm's BatchNormAct2d once its BN is folded into the conv: drop + act."""

    def __init__(self, bn_act: nn.Module):
        super().__init__()
        self.drop = getattr(bn_act, "drop", nn.Identity())
        self.act = getattr(bn_act, "act", nn.Identity())

    def forward(self, x):
        return self.act(self.drop(x))


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
