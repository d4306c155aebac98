"""The conventions where the paper and its public code differ (recipes), and the options beside them."""
import copy

import pytest
import torch
import torch.nn as nn

import fastdelta
from fastdelta.attention.weights import ChannelAttention
from fastdelta.train.loop import TrainSpec, param_groups, train_loop
from fastdelta.networks.models import build_architecture
from fastdelta.methods import L2FE, make_method
from fastdelta.settings import RECIPES, SettingsError, make_settings
from fastdelta.features.forms import following_norm, tap_modules
from fastdelta.features.hooks import FeatureTaps
from fastdelta.features.source import batch_statistics_copy
from tiny import TINY_LAYERS, arrays, tiny_net

QUICK = dict(layers=TINY_LAYERS, batch_size=4, resize=16, crop=12, progress=False, attention_cache=None,
             attention_head_epochs=1, eval_batch_size=8, iterations=3)


def _attention():
    g = torch.Generator().manual_seed(3)
    return ChannelAttention(TINY_LAYERS, [torch.rand(8, generator=g, dtype=torch.float64),
                                          torch.rand(16, generator=g, dtype=torch.float64)])


def test_recipes_fill_only_what_is_left_unset():
    public = make_settings().resolved()
    assert (public.recipe, public.feature_map, public.delta_no_att_scale, public.attention_head_bn,
            public.attention_max_images, public.attention_augmented) == ("public", "conv", "sum", "train", 128, True)
    paper = make_settings(recipe="paper").resolved()
    assert (paper.feature_map, paper.delta_no_att_scale, paper.attention_head_bn, paper.attention_max_images,
            paper.attention_augmented) == ("activation", "paper_eq5", "frozen", "all", False)
    assert (paper.delta_scale, paper.attention_normalisation) == ("paper_eq8", "softmax")
    assert (public.delta_scale, public.attention_normalisation) == ("public", "zscore_softmax")
    mixed = make_settings(recipe="paper", feature_map="conv", attention_max_images=7).resolved()
    assert (mixed.feature_map, mixed.attention_max_images, mixed.attention_head_bn) == ("conv", 7, "frozen")
    assert set(RECIPES["public"]) == set(RECIPES["paper"])


@pytest.mark.parametrize("bad, word", [(dict(recipe="tllib"), "recipe"), (dict(feature_map="relu"), "feature_map"),
                                       (dict(attention_max_images=0), "attention_max_images"),
                                       (dict(attention_max_images="most"), "attention_max_images"),
                                       (dict(source_bn="mixed"), "source_bn"), (dict(momentum=1.5), "momentum"),
                                       (dict(backbone_lr_mult=-1.0), "backbone_lr_mult"),
                                       (dict(nesterov=True, momentum=0.0), "nesterov"),
                                       (dict(feature_relu=True), "feature_map")])
def test_bad_convention_settings_name_themselves(bad, word):
    with pytest.raises(SettingsError, match=word):
        make_settings(**bad).resolved()


def test_tap_modules_find_the_bn_after_each_default_layer():
    resnet = build_architecture("resnet50")
    assert tap_modules(resnet, ["layer1.2.conv3", "layer4.2.conv3"], "activation") == ["layer1.2.bn3", "layer4.2.bn3"]
    lite0 = build_architecture("efficientnet_lite0")
    assert tap_modules(lite0, ["blocks.1.1.conv_pwl", "conv_head"], "activation") == ["blocks.1.1.bn3", "bn2"]
    assert tap_modules(lite0, ["conv_head"], "conv") == ["conv_head"] == tap_modules(lite0, ["conv_head"], "relu_conv")
    assert following_norm(lite0, "bn2") is None  # not a conv: an activation tap reads the layer itself


def test_activation_taps_hold_the_bn_output_before_the_in_place_residual_add():
    """The tiny block does `out = bn_b(conv_b(..)); out += x; relu_(out)`: the tap must be ReLU(bn_b output)."""
    net = tiny_net().eval()
    x = torch.randn(2, 3, 12, 12)
    with FeatureTaps(net, ["block.bn_b"], rectify=True, follows={"block.bn_b": "block.conv_b"}) as taps:
        _, (fm,) = taps(x)
    b = net.block
    inner = net.relu(net.bn1(net.conv1(x)))
    expected = torch.relu(b.bn_b(b.conv_b(b.relu(b.bn_a(b.conv_a(inner))))))
    assert torch.allclose(fm, expected)


def test_an_activation_tap_on_a_bn_that_does_not_read_the_conv_is_refused():
    class Odd(nn.Module):  # conv then a BN registered next to it that reads something else
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.other = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x) + self.bn(self.other(x))
            return self.fc(y.mean((2, 3)))

    net = Odd()
    assert tap_modules(net, ["conv"], "activation") == ["bn"]
    with pytest.raises(ValueError, match="does not read the output of 'conv'"):
        FeatureTaps(net, ["bn"], follows={"bn": "conv"})(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("feature_map", ["conv", "activation"])
def test_source_with_batch_statistics_makes_the_step0_term_exactly_zero(feature_map):
    source = tiny_net().eval().requires_grad_(False)
    target = copy.deepcopy(source).train()  # batch statistics, as during training
    before = {k: v.clone() for k, v in source.state_dict().items()}
    x = torch.randn(6, 3, 12, 12)
    reg = make_method("delta_no_att", target, source, "fc", TINY_LAYERS, alpha=1.0, beta=0.0, weight_decay=0.0,
                      feature_map=feature_map)
    rectify = feature_map == "activation"
    batch_source = batch_statistics_copy(source)
    for src, zero in ((source, False), (batch_source, True)):
        with FeatureTaps(target, reg.taps, rectify=rectify) as tt, FeatureTaps(src, reg.taps, rectify=rectify) as st:
            with torch.no_grad():
                term = float(reg.terms(tt(x)[1], st(x)[1]).reg)
        assert (term == 0.0) == zero, (feature_map, term)
    for k, v in source.state_dict().items():
        assert torch.equal(v, before[k]), k  # the user's source keeps its running statistics
    assert all(m.running_mean is None for m in batch_source.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("mode", ["train", "frozen"])
def test_attention_head_bn_mode(mode):
    """L2-FE head training: the extractor's weights never move; its BN statistics adapt only in "train"."""
    source = tiny_net().eval().requires_grad_(False)
    target = copy.deepcopy(source)
    target.fc = nn.Linear(16, 3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    reg = L2FE(target, source, "fc", TINY_LAYERS, weight_decay=1e-4)
    from fastdelta.data import resolve_data
    data = resolve_data(arrays(), None, resize=16, crop=12)
    train_loop(target, source, reg, data.train, TrainSpec(3, 0.01, 0.9, 4, progress=False, extractor_bn=mode),
               torch.device("cpu"))
    after = target.state_dict()
    for k, v in before.items():
        if k.startswith("fc."):
            assert not torch.equal(v, after[k]), k
        elif "running" in k or "num_batches" in k:
            assert torch.equal(v, after[k]) == (mode == "frozen"), k
        else:
            assert torch.equal(v, after[k]), k


def test_public_attention_uses_augmented_images_and_records_how(tmp_path):
    a = fastdelta.compute_attention(tiny_net(), arrays(), **{k: v for k, v in QUICK.items() if k != "iterations"},
                                    attention_max_images=5)
    b = fastdelta.compute_attention(tiny_net(), arrays(), **{k: v for k, v in QUICK.items() if k != "iterations"},
                                    attention_max_images=5, attention_augmented=False, attention_head_bn="frozen")
    assert a.images == b.images == 5
    assert a.head["bn"] == "train" and a.head["images_augmented"] is True and a.head["batch_size"] == 12  # public 32, capped at 12 images
    assert b.head["bn"] == "frozen" and b.head["images_augmented"] is False
    assert not all(torch.equal(x, y) for x, y in zip(a.raw, b.raw))
    again = fastdelta.compute_attention(tiny_net(), arrays(), **{k: v for k, v in QUICK.items() if k != "iterations"},
                                        attention_max_images=5)
    assert all(torch.equal(x, y) for x, y in zip(a.raw, again.raw))  # the augmentation is seeded


def test_backbone_lr_multiplier_and_nesterov_reach_the_update():
    """One SGD step from zero momentum: head parameters move by lr * grad, the rest by mult * lr * grad."""
    kw = dict(QUICK, iterations=1, method="l2", weight_decay=0.0)
    plain = fastdelta.fit(tiny_net(), arrays(), None, **kw)
    slow = fastdelta.fit(tiny_net(), arrays(), None, backbone_lr_mult=0.1, **kw)
    start = tiny_net().state_dict()
    for name, p in plain.model.state_dict().items():
        if name.startswith("fc.") or "running" in name or "num_batches" in name:
            continue
        q = slow.model.state_dict()[name]
        assert torch.allclose(q - start[name], 0.1 * (p - start[name]), rtol=1e-2, atol=3e-8), name  # float32 rounding of w
    assert torch.equal(plain.model.fc.weight, slow.model.fc.weight)
    nest = fastdelta.fit(tiny_net(), arrays(), None, nesterov=True, **dict(kw, iterations=3))
    mom = fastdelta.fit(tiny_net(), arrays(), None, **dict(kw, iterations=3))
    assert not torch.equal(nest.model.conv1.weight, mom.model.conv1.weight)
    assert nest.settings["nesterov"] is True


def test_param_groups_split_only_when_needed():
    source = tiny_net().eval()
    target = copy.deepcopy(source)
    reg = make_method("l2", target, source, "fc", TINY_LAYERS, alpha=0.0, beta=0.0, weight_decay=0.0)
    params = list(target.parameters())
    assert len(param_groups(reg, params)) == 1
    head, rest = param_groups(reg, params, 0.1)
    assert head["lr_mult"] == 1.0 and rest["lr_mult"] == 0.1
    assert len(head["params"]) == 2 and len(head["params"]) + len(rest["params"]) == len(params)


@pytest.mark.parametrize("settings", [dict(feature_map="activation"), dict(source_bn="batch"),
                                      dict(feature_scale="source_energy", backbone_lr_mult=0.1, nesterov=True)])
def test_fast_step_matches_the_reference_step_for_each_convention(settings):
    kw = dict(QUICK, iterations=4, alpha=0.05, attention=_attention(), **settings)
    ref = fastdelta.fit(tiny_net(), arrays(), None, method="delta", step_engine="reference", **kw)
    fast = fastdelta.fit(tiny_net(), arrays(), None, method="delta", step_engine="fast", **kw)
    for (k, a), b in zip(ref.model.state_dict().items(), fast.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (k, (a - b).abs().max())
    for h1, h2 in zip(ref.history, fast.history):
        assert h2["reg"] == pytest.approx(h1["reg"], rel=1e-4, abs=1e-7)
    assert ref.history[-1]["reg"] > 0  # (source_bn="batch": exactly 0 at step 0, by design)


def test_feature_scale_records_the_energy_and_makes_the_term_relative():
    kw = dict(QUICK, iterations=1, alpha=1.0, attention=_attention())
    raw = fastdelta.fit(tiny_net(), arrays(), None, method="delta_no_att", **kw)
    scaled = fastdelta.fit(tiny_net(), arrays(), None, method="delta_no_att", feature_scale="source_energy", **kw)
    energy = scaled.settings["source_energy"]
    assert set(energy) == set(TINY_LAYERS) and all(e > 0 for e in energy.values())
    assert raw.settings["source_energy"] is None
    assert scaled.history[0]["reg"] != pytest.approx(raw.history[0]["reg"])


def test_a_changed_convention_is_never_labelled_as_its_recipe():
    from fastdelta.settings import describe_conventions
    plain = describe_conventions(make_settings().resolved().to_dict())
    assert plain.startswith("recipe public; feature maps: raw conv output")
    relu = describe_conventions(make_settings(feature_map="relu_conv").resolved().to_dict())
    assert relu.startswith("recipe public with feature_map='relu_conv' (so not the public conventions)")
    assert "neither paper nor public code" in relu
    paper = describe_conventions(make_settings(recipe="paper").resolved().to_dict())
    assert paper.startswith("recipe paper; feature maps: ReLU after the conv's BN")


def test_attention_head_min_iterations_trains_the_head_longer():
    kw = {k: v for k, v in QUICK.items() if k != "iterations"}
    short = fastdelta.compute_attention(tiny_net(), arrays(), **kw)
    longer = fastdelta.compute_attention(tiny_net(), arrays(), attention_head_min_iterations=7, **kw)
    assert short.head["iterations"] == 1 and longer.head["iterations"] == 7  # 1 epoch: 12 images, one batch
