"""The cheap source network: truncated, BN folded where exact (never into a tapped conv), frozen."""
import copy

import pytest
import torch
import torch.nn as nn

from fastdelta.features.hooks import FeatureTaps
from fastdelta.features.source import HookedSource, SourceFeatures, source_features
from fastdelta.features.target import TargetFeatures
from tiny import TINY_LAYERS, tiny_net


def _hooked(model, layers, x):
    with FeatureTaps(model, layers) as taps, torch.no_grad():
        return taps(x)[1]


def _close(a, b, rel=1e-5):
    for u, v in zip(a, b):
        assert u.shape == v.shape
        assert (u - v).abs().max() <= rel * v.abs().max() + 1e-7, (u - v).abs().max()


def test_folded_truncated_source_gives_the_same_taps_and_keeps_tapped_convs():
    net = tiny_net().eval()
    before = copy.deepcopy(net.state_dict())
    sf = SourceFeatures(net, TINY_LAYERS)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        _close(sf(x), _hooked(net, TINY_LAYERS, x))
    # BN folded into the untapped convs only: conv_b and conv2 are taps (their pre-BN output is the quantity)
    assert sorted(sf.folded) == ["block.conv_a", "conv1"]
    modules = dict(sf.net.named_modules())
    assert "block.bn_b" in modules and isinstance(modules["block.bn_b"], nn.BatchNorm2d)
    assert "bn1" not in modules and "block.bn_a" not in modules
    # truncated after the last tap: nothing of bn2 / pool / fc runs
    assert not {"bn2", "pool", "fc"} & set(modules)
    assert all(not p.requires_grad for p in sf.parameters()) and not sf.training
    sf.train()
    assert not sf.training  # always eval mode
    # the user's source module is untouched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_tapped_conv_output_is_the_same_quantity_as_the_targets_tap():
    """With w = w* and the target in eval mode, the source's taps equal the target's taps exactly
    (what DELTA's distance compares): folding must not turn a tapped conv's output into BN output."""
    net = tiny_net().eval()
    layers = ["conv1", "block.conv_b", "conv2"]  # every one of them is followed by a BN
    sf = SourceFeatures(net, layers)
    assert sf.folded == ["block.conv_a"]
    target = copy.deepcopy(net).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _, t_feats = TargetFeatures(target, layers)(x)
        _close(sf(x), t_feats)


def test_a_tap_on_the_bn_itself_stays_exact_when_folded():
    net = tiny_net().eval()
    layers = ["block.bn_b"]  # conv_b -> bn_b (tapped) -> + identity
    sf = SourceFeatures(net, layers)
    assert sorted(sf.folded) == ["block.conv_a", "block.conv_b", "conv1"]  # the fused conv_b computes bn_b's output
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _close(sf(x), TargetFeatures(copy.deepcopy(net).eval(), layers)(x)[1])


def test_a_tap_modified_in_place_later_is_not_truncated():
    """bn1 is followed by ReLU(inplace=True): the full forward changes the tapped tensor after the tap, so
    a truncated graph would see another value; the source falls back to hooks on a full forward."""
    net = tiny_net().eval()
    with pytest.raises(NotImplementedError, match="in place"):
        SourceFeatures(net, ["bn1"])
    sf = source_features(net, ["bn1", "conv2"])
    assert isinstance(sf, HookedSource)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _close(sf(x), TargetFeatures(copy.deepcopy(net).eval(), ["bn1", "conv2"])(x)[1])


def test_torchvision_resnet_and_timm_efficientnet_fold_exactly():
    import timm
    import torchvision
    from fastdelta.networks.models import DEFAULT_LAYERS
    torch.manual_seed(0)
    for model, layers in ((torchvision.models.resnet18(), DEFAULT_LAYERS["resnet18"]),
                          (timm.create_model("efficientnet_lite0"), DEFAULT_LAYERS["efficientnet_lite0"])):
        model.eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        sf = SourceFeatures(model, layers)
        assert len(sf.folded) > 10 and not set(sf.folded) & set(layers)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            _close(sf(x), _hooked(model, layers, x), rel=1e-4)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = h * 2
        return self.fc(h.mean((2, 3)))


def test_untraceable_network_falls_back_to_hooks():
    net = _Untraceable().eval()
    sf = source_features(net, ["conv"])
    assert isinstance(sf, HookedSource) and sf.folded == []
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        _close(sf(x), _hooked(net, ["conv"], x))


def test_target_features_share_the_targets_parameters_and_follow_train_mode():
    net = tiny_net().train()
    tf = TargetFeatures(net, TINY_LAYERS)
    assert {id(p) for p in tf.parameters()} <= {id(p) for p in net.parameters()}
    x = torch.randn(4, 3, 16, 16)
    ref = copy.deepcopy(net)
    logits, feats = tf(x)
    with FeatureTaps(ref, TINY_LAYERS) as taps:
        ref_logits, ref_feats = taps(x)
    assert torch.equal(logits, ref_logits)
    _close(feats, ref_feats, rel=0)
    tf.net.eval()
    net.eval()
    with torch.no_grad():
        assert torch.equal(tf(x)[0], net(x))
