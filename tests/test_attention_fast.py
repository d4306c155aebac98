"""The fast attention paths against brute force / masked evaluation."""
import pytest
import timm
import torch
import torchvision

import fastdelta
from fastdelta.attention.loss_increase import (channel_loss_increase, loss_increase_closed_form,
                                               loss_increase_first_order, loss_increase_prefix)
from fastdelta.attention.prefix_reuse import PrefixReuse
from fastdelta.attention.weights import spearman, top_overlap
from test_attention import brute_force, make_batches
from tiny import TINY_LAYERS, tiny_net


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_stacked_masked_copies_equal_brute_force(chunk):
    model, batches = tiny_net().eval(), make_batches()
    reuse = PrefixReuse(model, TINY_LAYERS)
    assert reuse.separable["block.conv_b"] is None  # a conv follows: the batched path must run
    ref = brute_force(model, "block.conv_b", batches)
    got = loss_increase_prefix(reuse, "block.conv_b", batches, chunk=chunk)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


def _random_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.mark.parametrize("name,layer,size", [
    ("tiny", "conv2", 12),
    ("resnet18", "layer4.1.conv2", 64),             # conv -> bn -> +identity -> relu -> avgpool -> fc
    ("efficientnet_lite0", "conv_head", 64),         # conv -> bn -> relu6 -> pool -> flatten -> fc
])
def test_closed_form_equals_masked_evaluation(name, layer, size):
    torch.manual_seed(0)
    model = tiny_net() if name == "tiny" else _random_bn(
        torchvision.models.resnet18(num_classes=5) if name == "resnet18" else timm.create_model(name, num_classes=5))
    model.eval()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(3, 3, size, size, generator=g), torch.randint(0, 5, (3,), generator=g))]
    reuse = PrefixReuse(model, [layer])
    assert reuse.separable[layer] is not None
    # masked evaluation: every channel zeroed in the tap, the rest of the network run on it
    masked = loss_increase_prefix(reuse, layer, batches, chunk=128)
    closed = loss_increase_closed_form(reuse, layer, batches)
    assert masked.abs().max() > 0
    assert (closed - masked).abs().max() / masked.abs().max() < 1e-4


def test_non_separable_suffixes_are_recognised():
    model = torchvision.models.resnet18().eval()
    reuse = PrefixReuse(model, ["layer3.1.conv2", "layer4.1.conv1"])
    assert reuse.separable["layer3.1.conv2"] is None and reuse.separable["layer4.1.conv1"] is None


def test_bf16_ranks_channels_like_fp32():
    """On CPU with a random network the loss changes are small next to bf16's rounding, so the bar
    here (0.95, 80% of the top 10%) is below the GPU target (0.99, same top 10%) measured on real data."""
    torch.manual_seed(0)
    model = _random_bn(torchvision.models.resnet18(num_classes=5))
    g = torch.Generator().manual_seed(3)
    # 32 px: bf16 convolutions are emulated on CPUs without bf16 units, ~4x the time at 48 px
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g))]
    layer = "layer3.1.conv2"
    reuse = PrefixReuse(model, [layer])
    fp32 = loss_increase_prefix(reuse, layer, batches, chunk=64)
    bf16 = loss_increase_prefix(reuse, layer, batches, chunk=64, dtype=torch.bfloat16)
    assert spearman(fp32, bf16) > 0.95
    overlap = top_overlap(fp32, bf16)
    assert overlap >= 0.8, overlap


def test_first_order_is_the_taylor_term_and_tracks_the_exact_ranking():
    model, batches = tiny_net().eval(), make_batches(n=2, b=6)
    est = loss_increase_first_order(model, TINY_LAYERS, batches)
    # reference: -sum a_j dL/da_j written out with a float64 copy of the network
    m64 = tiny_net().double().eval()
    for i, layer in enumerate(TINY_LAYERS):
        ref = torch.zeros(est[i].numel(), dtype=torch.float64)
        for x, y in batches:
            out = {}
            h = m64.get_submodule(layer).register_forward_hook(lambda m, a, o: out.setdefault("a", o))
            loss = torch.nn.functional.cross_entropy(m64(x.double()), y, reduction="sum")
            h.remove()
            grad, = torch.autograd.grad(loss, out["a"])
            ref -= (out["a"] * grad).sum(dim=(0, 2, 3)).detach()
        assert torch.allclose(est[i], ref, rtol=1e-4, atol=1e-6)
    exact = brute_force(model, "conv2", batches)
    assert spearman(exact, est[1]) > 0.5  # an estimate: it must at least rank like the exact values


def test_second_fit_reads_the_cached_attention(tmp_path):
    x = torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8).numpy()
    y = torch.arange(12).remainder(3).numpy()
    kw = dict(method="delta", layers=TINY_LAYERS, iterations=2, batch_size=4, resize=16, crop=12, progress=False,
              attention_head_epochs=1, attention_cache=str(tmp_path))
    first = fastdelta.fit(tiny_net(), (x, y), **kw)
    assert "cache_hit" not in first.attention.timings and len(list(tmp_path.iterdir())) == 1
    second = fastdelta.fit(tiny_net(), (x, y), **kw)
    assert second.attention.timings.get("cache_hit") is True
    assert all(torch.equal(a, b) for a, b in zip(first.attention.raw, second.attention.raw))
    other = fastdelta.fit(tiny_net(), (x[::-1].copy(), y[::-1].copy()), **kw)  # other data: recomputed
    assert "cache_hit" not in other.attention.timings and len(list(tmp_path.iterdir())) == 2
    for f in tmp_path.iterdir():  # a damaged entry is recomputed, not trusted
        f.write_text("{not json")
    again = fastdelta.fit(tiny_net(), (x, y), **kw)
    assert "cache_hit" not in again.attention.timings
    assert all(torch.equal(a, b) for a, b in zip(first.attention.raw, again.attention.raw))
    off = fastdelta.fit(tiny_net(), (x, y), **{**kw, "attention_cache": None})
    assert "cache_hit" not in off.attention.timings


def test_driver_reports_what_ran_per_layer():
    model, batches = tiny_net().eval(), make_batches(n=1)
    _, ran, seconds = channel_loss_increase(model, TINY_LAYERS, batches, "prefix", False)
    assert ran == {"block.conv_b": "prefix_batched", "conv2": "closed_form"} and set(seconds) == set(TINY_LAYERS)
    raws, ran, _ = channel_loss_increase(model, TINY_LAYERS, batches, "first_order", False)
    assert set(ran.values()) == {"first_order"} and [len(r) for r in raws] == [8, 16]
