import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastdelta.attention.loss_increase import channel_loss_increase, loss_increase_masked_forward, loss_increase_prefix
from fastdelta.attention.prefix_reuse import PrefixReuse
from fastdelta.attention.weights import ChannelAttention, normalize_attention, spearman, top_overlap
from tiny import TINY_LAYERS, tiny_net


def brute_force(model, layer, batches):
    """Algorithm 1 literally: zero filter j's weights (and bias) in a copy, full forward, loss difference."""
    model = model.eval()
    conv = model.get_submodule(layer)
    raw = torch.zeros(conv.out_channels, dtype=torch.float64)
    with torch.no_grad():
        for x, y in batches:
            base = F.cross_entropy(model(x), y, reduction="none").double()
            for j in range(conv.out_channels):
                m = copy.deepcopy(model)
                c = m.get_submodule(layer)
                c.weight[j] = 0
                if c.bias is not None:
                    c.bias[j] = 0
                raw[j] += (F.cross_entropy(m(x), y, reduction="none").double() - base).sum()
    return raw


def make_batches(seed=1, n=3, b=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 12, 12, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("layer", TINY_LAYERS)
def test_masked_forward_and_prefix_equal_brute_force(layer):
    model, batches = tiny_net().eval(), make_batches()
    ref = brute_force(model, layer, batches)
    assert ref.abs().max() > 1e-3  # the test would be vacuous on an insensitive layer
    masked = loss_increase_masked_forward(model, layer, batches)
    prefix = loss_increase_prefix(PrefixReuse(model, TINY_LAYERS), layer, batches)
    scale = ref.abs().max()
    assert (masked - ref).abs().max() / scale < 1e-5
    assert (prefix - ref).abs().max() / scale < 1e-5


def test_prefix_reuse_leaves_model_untouched_and_reuses_residual():
    model = tiny_net().eval()
    before = copy.deepcopy(model.state_dict())
    reuse = PrefixReuse(model, TINY_LAYERS)
    needed = {n.name for n in reuse.needed["block.conv_b"]}
    assert any("relu" in n for n in needed)  # the block input feeds the residual add after the tap
    assert model.relu.inplace  # the user's model keeps its in-place ReLU; the traced copy does not
    loss_increase_prefix(reuse, "block.conv_b", make_batches())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_driver_falls_back_when_tracing_fails():
    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_net()

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace it
                return self.net(x)
            return self.net(-x)

    model, batches = Untraceable().eval(), make_batches(n=1)
    logs = []
    raws, ran, seconds = channel_loss_increase(model, ["net.conv2"], batches, "prefix", False, logs.append)
    assert ran == {"net.conv2": "masked_forward"} and logs
    ref = brute_force(model, "net.conv2", batches)
    assert torch.allclose(raws[0], ref, atol=1e-5 * ref.abs().max())


def test_normalisation_is_zscore_softmax():
    raw = torch.tensor([1.0, 2.0, 4.0, -3.0], dtype=torch.float64)
    z = (raw - raw.mean()) / raw.std(unbiased=False)
    expected = torch.exp(z / 5) / torch.exp(z / 5).sum()
    w = normalize_attention(raw, 5.0)
    assert torch.allclose(w.double(), expected, atol=1e-7)
    assert torch.allclose(normalize_attention(torch.ones(7)), torch.full((7,), 1 / 7))
    assert w.argmax() == 2  # a larger loss increase means a more important channel


def test_attention_json_roundtrip_and_public_layout(tmp_path):
    att = ChannelAttention(["a", "b"], [torch.tensor([1.0, 2.0], dtype=torch.float64),
                                        torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64)], 5.0, 8, "prefix")
    att.save(tmp_path / "att.json")
    back = ChannelAttention.load(tmp_path / "att.json")
    assert back.layers == att.layers and all(torch.equal(x, y) for x, y in zip(back.raw, att.raw))
    public = json.load(open(tmp_path / "att.json"))["public_layout"]
    from_public = ChannelAttention.from_dict(public, layers=["a", "b"])
    assert all(torch.allclose(x, y) for x, y in zip(from_public.weights, att.weights))
    with pytest.raises(ValueError, match="layer names"):
        ChannelAttention.from_dict(public)


def test_rank_agreement_measures():
    a = torch.tensor([0.5, 3.0, -1.0, 2.0, 0.0, 9.0, 4.0, 1.0, 7.0, 8.0])
    assert spearman(a, a * 2 + 1) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert top_overlap(a, a) == 1.0 and top_overlap(a, -a) == 0.0  # top 10% of 10 = the largest one


def test_paper_normalisation_is_a_softmax_of_the_summed_increases():
    raw = torch.tensor([0.5, -0.2, 3.0, 1.0], dtype=torch.float64)
    want = torch.exp(raw) / torch.exp(raw).sum()  # Algorithm 1's text: no z-score, no temperature
    for t in (0.1, 5.0):
        assert torch.allclose(normalize_attention(raw, t, "softmax").double(), want, atol=1e-7)
    assert not torch.allclose(normalize_attention(raw, 5.0).double(), want, atol=1e-3)
    with pytest.raises(ValueError, match="normalisation"):
        normalize_attention(raw, 5.0, "zscore")


def one_channel_decides(channel=3):
    """A tiny net whose logits read only conv2's channel `channel` (BN identity there, so zeroing the
    conv output zeroes the pooled feature), with every label the class that channel votes for."""
    model = tiny_net().eval()
    with torch.no_grad():
        model.bn2.running_mean[channel], model.bn2.running_var[channel] = 0.0, 1.0
        model.bn2.weight[channel], model.bn2.bias[channel] = 1.0, 0.0
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.weight[0, channel] = 10.0
    batches = [(x, torch.zeros_like(y)) for x, y in make_batches()]
    return model, batches


@pytest.mark.parametrize("impl", ["prefix", "masked_forward", "first_order"])
def test_removing_the_channel_that_decides_increases_the_loss(impl):
    """Algorithm 1's sign on every path (the closed form, the literal forward, the Taylor estimate):
    without the one channel the classifier reads the loss goes up; channels it ignores change nothing."""
    channel = 3
    model, batches = one_channel_decides(channel)
    raws, ran, _ = channel_loss_increase(model, ["conv2"], batches, impl, False)
    assert ran["conv2"] == {"prefix": "closed_form"}.get(impl, impl)
    raw = raws[0]
    pooled = [pooled_features(model, x)[:, channel] for x, _ in batches]
    assert all((p > 0).all() for p in pooled)  # the channel is active on every image
    assert raw[channel] > 0.1
    others = torch.cat([raw[:channel], raw[channel + 1:]])
    assert others.abs().max() < 1e-6 * raw[channel]
    if impl != "first_order":  # exact: per image, the loss without the channel (log 5) less the loss with it
        want = 0.0
        for p, (_, y) in zip(pooled, batches):
            logits = torch.zeros(len(y), 5)
            logits[:, 0] = 10 * p
            want += float((math.log(5) - F.cross_entropy(logits, y, reduction="none")).sum())
        assert float(raw[channel]) == pytest.approx(want, rel=1e-4)


def pooled_features(model, x):
    out = {}
    handle = model.pool.register_forward_hook(lambda m, i, o: out.__setitem__("f", o.flatten(1)))
    with torch.no_grad():
        model(x)
    handle.remove()
    return out["f"]
