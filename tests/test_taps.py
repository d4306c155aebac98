"""Feature taps: right tensors, no state left behind, and traceable by torch.compile in one graph."""
import copy

import torch
import torch.nn.functional as F

from fastdelta.methods import make_method
from fastdelta.features.hooks import FeatureTaps
from tiny import TINY_LAYERS, tiny_net


def test_taps_return_the_layer_outputs_and_clean_up():
    net = tiny_net().eval()
    x = torch.randn(2, 3, 12, 12)
    with FeatureTaps(net, TINY_LAYERS) as taps:
        logits, feats = taps(x)
    expected_block = net.block.conv_b(net.block.relu(net.block.bn_a(net.block.conv_a(
        net.relu(net.bn1(net.conv1(x)))))))
    assert torch.allclose(feats[0], expected_block) and torch.allclose(logits, net(x))
    assert feats[1].shape == (2, 16, 3, 3)
    assert not net.block.conv_b._forward_hooks and not net.conv2._forward_hooks


def test_delta_loss_compiles_as_one_graph():
    source = tiny_net().eval().requires_grad_(False)
    target = copy.deepcopy(source).requires_grad_(True).train()
    reg = make_method("delta_no_att", target, source, "fc", TINY_LAYERS, alpha=0.01, beta=0.01, weight_decay=1e-4)
    t_taps, s_taps = FeatureTaps(target, TINY_LAYERS), FeatureTaps(source, TINY_LAYERS)

    def loss_fn(x, y):
        logits, t_feats = t_taps(x)
        with torch.no_grad():
            _, s_feats = s_taps(x)
        terms = reg.terms(t_feats, s_feats)
        return F.cross_entropy(logits, y) + terms.reg + terms.head

    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 5, (4,))
    eager = loss_fn(x, y)
    compiled = torch.compile(loss_fn, fullgraph=True)(x, y)  # fullgraph: a graph break is an error
    assert torch.allclose(eager, compiled, rtol=1e-5)
    compiled.backward()
    assert target.conv1.weight.grad.abs().sum() > 0
