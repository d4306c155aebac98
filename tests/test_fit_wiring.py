"""Settings that `fastdelta.fit` must wire into the run, checked through fit against float64 computations
written from the definitions: attention_head_bn (how Algorithm 1's L2-FE head trains), source_bn (which
BN statistics the source maps use) and feature_scale="source_energy" (each layer's term divided by E_l)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastdelta
import fastdelta.attention.measure as measure_module
import fastdelta.fitting as fit_module
from fastdelta.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastdelta.features.source import SourceFeatures, batch_statistics_copy
from tiny import TINY_LAYERS, arrays, tiny_net


SMALL = dict(iterations=2, batch_size=4, resize=16, crop=16, layers=TINY_LAYERS, progress=False,
             attention_cache=None)


def mirrored_arrays():
    """arrays() made left-right symmetric: the training flip leaves every image as it is, so with a batch
    of the whole set (resize = crop = image size) the first training batch is known exactly."""
    x, y = arrays()
    x[:, :, 8:] = x[:, :, :8][:, :, ::-1]
    return x, y


def as_input(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> what the centre-crop transform gives at resize = crop = H, in float64."""
    t = torch.from_numpy(x).double().permute(0, 3, 1, 2) / 255
    mean, std = torch.tensor(IMAGENET_MEAN).double(), torch.tensor(IMAGENET_STD).double()
    return (t - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def conv_maps(net, x: torch.Tensor) -> list:
    """The raw outputs of TINY_LAYERS (the "conv" feature map form) for one forward of `net`."""
    store = {}
    hooks = [net.get_submodule(l).register_forward_hook(lambda m, i, o, l=l: store.__setitem__(l, o.clone()))
             for l in TINY_LAYERS]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return [store[l] for l in TINY_LAYERS]


# ------------------------------------------------------------------ attention_head_bn

def raw_loss_increases(model, layer: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 by brute force in float64: per channel j, sum over images of CE with channel j of
    `layer` zeroed minus CE as is."""
    model = copy.deepcopy(model).double().eval()
    channel = {"j": None}

    def mask(module, inputs, out):
        if channel["j"] is not None:
            out = out.clone()
            out[:, channel["j"]] = 0
        return out

    handle = model.get_submodule(layer).register_forward_hook(mask)
    with torch.no_grad():
        base = F.cross_entropy(model(x), y, reduction="none")
        raw = []
        for j in range(model.get_submodule(layer).out_channels):
            channel["j"] = j
            raw.append(float((F.cross_entropy(model(x), y, reduction="none") - base).sum()))
    handle.remove()
    return torch.tensor(raw, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["train", "frozen"])
def test_attention_head_bn_reaches_the_head_training(mode, monkeypatch):
    """The L2-FE head of Algorithm 1 trains with the extractor's BN statistics adapting ("train") or
    fixed ("frozen"), as the setting says, and the attention is measured on that trained copy."""
    heads = []
    original = measure_module.train_loop

    def spy(target, source, reg, dataset, spec, *args, **kwargs):
        before = copy.deepcopy(target.state_dict())
        history = original(target, source, reg, dataset, spec, *args, **kwargs)
        if reg.freezes_extractor:  # the head training, not the fine-tuning
            heads.append((before, copy.deepcopy(target)))
        return history

    monkeypatch.setattr(measure_module, "train_loop", spy)
    x, y = arrays()
    res = fastdelta.fit(tiny_net(), (x, y), None, method="delta", attention_head_bn=mode, attention_augmented=False,
                        attention_head_epochs=3, **SMALL)
    assert len(heads) == 1 and res.attention.head["bn"] == mode
    before, trained = heads[0]
    after = trained.state_dict()
    statistics = [k for k in before if "running" in k or "num_batches" in k]
    moved = [k for k in statistics if not torch.equal(before[k], after[k])]
    assert moved == (statistics if mode == "train" else []), moved
    for k in before:  # the extractor's weights stay w* either way; only the head learns
        if k not in statistics:
            assert torch.equal(before[k], after[k]) != k.startswith("fc."), k
    # all 12 images, centre crop (attention_augmented=False): the loss increases of the trained copy
    images, labels = as_input(x), torch.as_tensor(y, dtype=torch.long)
    assert res.attention.images == len(labels)
    for layer, raw in zip(TINY_LAYERS, res.attention.raw):
        want = raw_loss_increases(trained, layer, images, labels)
        assert torch.allclose(raw, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), (layer, raw, want)


# ------------------------------------------------------------------ source_bn

@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_source_bn_decides_the_statistics_of_the_source_maps(engine):
    """At iteration 0 target and source have the same weights and the target normalises with the batch's
    statistics: with source_bn="batch" the source does too and the term is exactly 0, with "running" not."""
    kw = dict(SMALL, iterations=1, alpha=1.0, step_engine=engine)
    batch = fastdelta.fit(tiny_net(), arrays(), None, method="delta_no_att", source_bn="batch", **kw)
    running = fastdelta.fit(tiny_net(), arrays(), None, method="delta_no_att", source_bn="running", **kw)
    assert batch.history[0]["reg"] == 0.0
    assert running.history[0]["reg"] > 1e-3


def test_a_batch_statistics_source_is_truncated_for_the_fast_step_without_folding_its_bn():
    """A BN on batch statistics is no affine map: the fast step's source must keep it. (Folding it fails,
    and fastdelta then falls back to a full hooked forward: the same maps, so only this shows it.)"""
    source = SourceFeatures(batch_statistics_copy(tiny_net().eval()), TINY_LAYERS)
    assert source.folded == []
    x = torch.randn(6, 3, 16, 16)
    for got, want in zip(source(x), conv_maps(tiny_net().train(), x)):
        assert torch.allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------ feature_scale="source_energy"

@pytest.mark.parametrize("source_bn", ["running", "batch"])
def test_source_energy_is_the_mean_source_term_per_image_and_divides_each_layer(source_bn, monkeypatch):
    """E_l = mean over the first PREPARE_IMAGES training images (centre crop) of 0.5 sum_j ||FM_j(w*, x_i)||^2
    (the public "sum" form), with the source maps the run uses; the iteration-0 term is then
    alpha * sum_l d_l / E_l, d_l = 0.5 sum_{i,j} ||FM_j(w, x_i) - FM_j(w*, x_i)||^2 over the first batch."""
    monkeypatch.setattr(fit_module, "PREPARE_IMAGES", 5)  # fewer than the 12 images: "first n" and "/ n" show
    x, y = mirrored_arrays()
    alpha = 0.5
    kw = dict(SMALL, iterations=1, batch_size=len(y), alpha=alpha, source_bn=source_bn)
    plain = fastdelta.fit(tiny_net(), (x, y), None, method="delta_no_att", **kw)
    scaled = fastdelta.fit(tiny_net(), (x, y), None, method="delta_no_att", feature_scale="source_energy", **kw)

    images = as_input(x)
    source = tiny_net().double().train(source_bn == "batch")  # train mode: BN on the batch's statistics
    energy = [float(0.5 * f.pow(2).sum()) / 5 for f in conv_maps(source, images[:5])]
    assert plain.settings["source_energy"] is None
    got = scaled.settings["source_energy"]
    assert list(got) == TINY_LAYERS
    for layer, e in zip(TINY_LAYERS, energy):
        assert got[layer] == pytest.approx(e, rel=1e-4), (layer, got[layer], e)

    # the first batch is the whole (flip-invariant) set; the target trains with batch statistics
    target = tiny_net().double().train()
    source = tiny_net().double().train(source_bn == "batch")
    d = [float(0.5 * (t - s).pow(2).sum()) for t, s in zip(conv_maps(target, images), conv_maps(source, images))]
    if source_bn == "batch":
        assert plain.history[0]["reg"] == 0.0 == scaled.history[0]["reg"]
        return
    assert plain.history[0]["reg"] == pytest.approx(alpha * sum(d), rel=1e-4)  # the batch is the one assumed
    want = alpha * sum(dl / e for dl, e in zip(d, energy))
    assert scaled.history[0]["reg"] == pytest.approx(want, rel=1e-4)
