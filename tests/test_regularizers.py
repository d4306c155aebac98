"""Each method's loss terms against a float64 reference written straight from the formulas."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastdelta.methods import METHODS, make_method
from fastdelta.features.hooks import FeatureTaps
from fastdelta.methods.delta_term import feature_map_distance
from tiny import TINY_LAYERS, tiny_net

ALPHA, BETA, WD = 0.3, 0.2, 0.05


def nets(seed=0):
    """source (w*) and a perturbed target with a new 3-class head, like build_networks makes them."""
    source = tiny_net(seed).eval().requires_grad_(False)
    target = copy.deepcopy(source).requires_grad_(True)
    target.fc = torch.nn.Linear(16, 3)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return source, target.train()


# the module each form reads in the tiny net (a BN output that `out += x` later changes in place)
TAPPED = {"conv": {l: l for l in TINY_LAYERS}, "relu_conv": {l: l for l in TINY_LAYERS},
          "activation": {"block.conv_b": "block.bn_b", "conv2": "bn2"}}


def reference_terms(method, source, target, x, weights, feature_map="conv", no_att_scale="sum"):
    """Float64, from the formulas (the paper's eq. 6-8 as scaled by its public code), on float64 copies."""
    s64, t64 = copy.deepcopy(source).double(), copy.deepcopy(target).double()
    return reference_terms_of(method, s64, t64, x, weights, feature_map, no_att_scale)


def reference_terms_of(method, s64, t64, x, weights, feature_map="conv", no_att_scale="sum"):
    """reference_terms on given float64 networks (autograd reaches t64's parameters)."""
    shared = {n: p for n, p in t64.named_parameters() if not n.startswith("fc.")}
    src = dict(s64.named_parameters())
    head = sum(p.pow(2).sum() for n, p in t64.named_parameters() if n.startswith("fc."))
    if method == "l2_fe":
        return 0.0, 0.5 * WD * head
    if method == "l2":
        return 0.5 * WD * sum(p.pow(2).sum() for p in shared.values()), 0.5 * WD * head
    if method in ("l2_sp", "l2_sp_att"):
        total = 0.0
        for n, p in shared.items():
            d2 = (p - src[n]).pow(2)
            layer = n.rsplit(".", 1)[0]
            if method == "l2_sp_att" and layer in TINY_LAYERS:
                w = weights[TINY_LAYERS.index(layer)].double()
                d2 = d2 * (len(w) * w).view(-1, *([1] * (d2.dim() - 1)))
            total = total + d2.sum()
        return 0.5 * ALPHA * total, 0.5 * BETA * head
    # delta: 0.5 * sum_j c W_j ||FM_j(w) - FM_j(w*)||^2 / (h w), summed over the batch;
    # delta_no_att: 0.5 * sum_j ||FM_j(w) - FM_j(w*)||^2 ("sum") or the delta formula with W_j = 1/c
    ft, fs = {}, {}
    for model, store in ((t64, ft), (s64, fs)):
        hooks = [model.get_submodule(TAPPED[feature_map][l]).register_forward_hook(
            lambda m, i, o, l=l, st=store: st.__setitem__(l, o.clone())) for l in TINY_LAYERS]
        model(x.double())
        for h in hooks:
            h.remove()
    total = 0.0
    for i, l in enumerate(TINY_LAYERS):
        a, b = (F.relu(ft[l]), F.relu(fs[l])) if feature_map != "conv" else (ft[l], fs[l])
        _, c, h, w = a.shape
        for j in range(c):
            d2 = (a[:, j] - b[:, j]).pow(2).sum()
            if method == "delta_no_att" and no_att_scale == "sum":
                total = total + 0.5 * d2
            else:
                W = 1.0 / c if method == "delta_no_att" else weights[i].double()[j]
                total = total + 0.5 * c * W * d2 / (h * w)
    return ALPHA * total, 0.5 * BETA * head


def regularizer_terms(reg, source, target, x):
    if not reg.uses_source_features:
        return reg.terms()
    rectify = reg.feature_map == "activation"
    with FeatureTaps(target, reg.taps, rectify=rectify, follows=reg.tap_follows) as tt, \
            FeatureTaps(source, reg.taps, rectify=rectify) as ts:
        _, t_feats = tt(x)
        _, s_feats = ts(x)
    return reg.terms(t_feats, s_feats)


@pytest.mark.parametrize("feature_map", ["conv", "relu_conv", "activation"])
@pytest.mark.parametrize("method", list(METHODS))
def test_terms_match_float64_reference(method, feature_map):
    torch.manual_seed(3)
    source, target = nets()
    x = torch.randn(4, 3, 12, 12)
    weights = [torch.softmax(torch.randn(8), 0), torch.softmax(torch.randn(16), 0)]
    for no_att_scale in (["sum", "uniform_attention"] if method == "delta_no_att" else ["sum"]):
        reg = make_method(method, target, source, "fc", TINY_LAYERS,
                          weights if METHODS[method].uses_attention else None, alpha=ALPHA, beta=BETA,
                          weight_decay=WD, feature_map=feature_map, delta_no_att_scale=no_att_scale)
        terms = regularizer_terms(reg, source, target, x)
        ref_reg, ref_head = reference_terms(method, source, target, x, weights, feature_map, no_att_scale)
        ref_reg = torch.as_tensor(ref_reg, dtype=torch.float64)
        assert float(torch.as_tensor(ref_head).detach()) > 0
        if method != "l2_fe":
            assert float(ref_reg.detach()) > 0  # a zero reference would make the comparison vacuous
        assert torch.allclose(terms.reg.double(), ref_reg, rtol=2e-5, atol=1e-9), (no_att_scale, terms.reg, ref_reg)
        assert torch.allclose(terms.head.double(), torch.as_tensor(ref_head, dtype=torch.float64), rtol=2e-5)


def test_feature_map_forms_read_different_tensors():
    """The three forms give three different terms (the activation form is not the conv form renamed)."""
    torch.manual_seed(4)
    source, target = nets()
    x = torch.randn(4, 3, 12, 12)
    values = {form: float(regularizer_terms(make_method("delta_no_att", target, source, "fc", TINY_LAYERS, alpha=1.0,
                                                        beta=0.0, weight_decay=0.0, feature_map=form),
                                            source, target, x).reg)
              for form in ("conv", "relu_conv", "activation")}
    assert len({round(v, 6) for v in values.values()}) == 3, values


def test_source_energy_float64():
    """E_l = the term between source maps and zero, per image; with layer_scale = 1/E_l the source
    maps against zero give exactly one per layer per image."""
    torch.manual_seed(5)
    source, target = nets()
    x = torch.randn(3, 3, 12, 12)
    for form in ("conv", "activation"):
        reg = make_method("delta_no_att", target, source, "fc", TINY_LAYERS, alpha=1.0, beta=0.0, weight_decay=0.0,
                          feature_map=form)
        with FeatureTaps(source, reg.taps, rectify=form == "activation") as ts:
            _, s_feats = ts(x)
        energy = [e / 3 for e in reg.source_energy(s_feats)]
        a = F.relu(s_feats[1].double()) if form != "conv" else s_feats[1].double()
        assert energy[1] == pytest.approx(float(0.5 * a.pow(2).sum() / 3), rel=1e-12)
        reg.layer_scale = [1.0 / e for e in energy]
        zeros = [torch.zeros_like(f) for f in s_feats]
        assert float(reg.terms(zeros, s_feats).reg) == pytest.approx(len(TINY_LAYERS) * 3, rel=1e-5)
        # any target maps: reg = alpha * sum_l d_l / E_l, d_l the layer's distance (fp64 from the formula)
        t_feats = [torch.randn_like(f) for f in s_feats]
        fm = (lambda v: F.relu(v.double())) if form != "conv" else (lambda v: v.double())
        want = sum(0.5 * (fm(t) - fm(f)).pow(2).sum() / e for t, f, e in zip(t_feats, s_feats, energy))
        assert float(reg.terms(t_feats, s_feats).reg) == pytest.approx(float(want), rel=1e-5)


def test_feature_distance_gradient_float64():
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    scale = torch.rand(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: feature_map_distance(t.double(), s, scale.double(), True).double(), (t,))
    # d/dt of 0.5 * scale * (relu t - relu s)^2 = scale * (relu t - relu s) * (t > 0)
    feature_map_distance(t, s, scale, True).backward()
    expected = scale.view(1, 3, 1, 1) * (t.relu() - s.relu()) * (t > 0)
    assert torch.allclose(t.grad, expected.to(t.grad.dtype), atol=1e-6)


def test_delta_without_attention_uniform_form_is_uniform_attention():
    source, target = nets()
    x = torch.randn(2, 3, 12, 12)
    with FeatureTaps(target, TINY_LAYERS) as tt, FeatureTaps(source, TINY_LAYERS) as ts:
        t_feats, s_feats = tt(x)[1], ts(x)[1]
    uniform = [torch.full((8,), 1 / 8), torch.full((16,), 1 / 16)]
    a = make_method("delta_no_att", target, source, "fc", TINY_LAYERS, None, alpha=1.0, beta=0.0, weight_decay=0.0,
                    feature_map="relu_conv", delta_no_att_scale="uniform_attention").terms(t_feats, s_feats)
    b = make_method("delta", target, source, "fc", TINY_LAYERS, uniform, alpha=1.0, beta=0.0, weight_decay=0.0,
                    feature_map="relu_conv").terms(t_feats, s_feats)
    assert torch.allclose(a.reg, b.reg)


def paper_reference(source, target, x, weights, feature_map):
    """The paper's eq. 8 (weights given) or eq. 5 (weights None) as written, in float64: for each image
    Omega'_i = sum_l sum_j W_lj ||FM_lj(w, x_i) - FM_lj(w*, x_i)||^2, and the loss takes its mean over
    the images (eq. 1 sums L + alpha Omega over images; the cross-entropy is a batch mean)."""
    s64, t64 = copy.deepcopy(source).double(), copy.deepcopy(target).double()
    per_image = []
    for i in range(x.shape[0]):
        ft, fs = {}, {}
        for model, store in ((t64, ft), (s64, fs)):
            hooks = [model.get_submodule(TAPPED[feature_map][l]).register_forward_hook(
                lambda m, inp, o, l=l, st=store: st.__setitem__(l, o.clone())) for l in TINY_LAYERS]
            model(x[i:i + 1].double())
            for h in hooks:
                h.remove()
        omega = 0.0
        for k, l in enumerate(TINY_LAYERS):
            a, b = (F.relu(ft[l]), F.relu(fs[l])) if feature_map != "conv" else (ft[l], fs[l])
            for j in range(a.shape[1]):
                W = 1.0 if weights is None else weights[k].double()[j]
                omega = omega + W * (a[0, j] - b[0, j]).pow(2).sum()
        per_image.append(omega)
    return ALPHA * sum(per_image) / len(per_image)


@pytest.mark.parametrize("feature_map", ["conv", "activation"])
@pytest.mark.parametrize("method", ["delta", "delta_no_att"])
def test_paper_forms_are_equations_5_and_8(method, feature_map):
    torch.manual_seed(6)
    source, target = nets()
    source.eval(), target.eval()  # per-image forwards must see what the batch forward sees
    x = torch.randn(5, 3, 12, 12)
    weights = [torch.softmax(torch.randn(8), 0), torch.softmax(torch.randn(16), 0)]
    att = weights if method == "delta" else None
    reg = make_method(method, target, source, "fc", TINY_LAYERS, att, alpha=ALPHA, beta=BETA, weight_decay=WD,
                      feature_map=feature_map, delta_no_att_scale="paper_eq5", delta_scale="paper_eq8")
    want = paper_reference(source, target, x, att, feature_map)
    assert float(want) > 0
    assert float(regularizer_terms(reg, source, target, x).reg) == pytest.approx(float(want), rel=2e-5)
    # under DDP each rank's term is its shard's mean, so the averaged gradient is the global mean's
    reg2 = make_method(method, target, source, "fc", TINY_LAYERS, att, alpha=ALPHA, beta=BETA, weight_decay=WD,
                       feature_map=feature_map, delta_no_att_scale="paper_eq5", delta_scale="paper_eq8", world_size=2)
    assert float(regularizer_terms(reg2, source, target, x).reg) == pytest.approx(float(want), rel=2e-5)


def test_paper_source_energy_is_per_image_too():
    torch.manual_seed(7)
    source, target = nets()
    x = torch.randn(3, 3, 12, 12)
    reg = make_method("delta_no_att", target, source, "fc", TINY_LAYERS, None, alpha=1.0, beta=0.0, weight_decay=0.0,
                      feature_map="conv", delta_no_att_scale="paper_eq5")
    with FeatureTaps(source, reg.taps) as ts:
        _, s_feats = ts(x)
    energy = [e / 3 for e in reg.source_energy(s_feats)]
    assert energy[1] == pytest.approx(float(s_feats[1].double().pow(2).sum() / 3), rel=1e-6)  # 2/B in fp32
    reg.layer_scale = [1.0 / e for e in energy]
    zeros = [torch.zeros_like(f) for f in s_feats]
    assert float(reg.terms(zeros, s_feats).reg) == pytest.approx(len(TINY_LAYERS), rel=1e-5)  # a batch mean: 1 a layer


@pytest.mark.parametrize("method", ["delta", "delta_no_att"])
def test_delta_term_gradient_reaches_the_target_and_matches_float64_autograd(method):
    """The feature-map term pulls the target's backbone: its gradient wrt every regularised layer's
    weights is nonzero and equals autograd of the float64 formula (a detached target map gives zero)."""
    torch.manual_seed(6)
    source, target = nets()
    x = torch.randn(4, 3, 12, 12)
    weights = [torch.softmax(torch.randn(8), 0), torch.softmax(torch.randn(16), 0)]
    reg = make_method(method, target, source, "fc", TINY_LAYERS, weights if method == "delta" else None,
                      alpha=ALPHA, beta=0.0, weight_decay=0.0)
    names = [f"{l}.weight" for l in TINY_LAYERS] + ["conv1.weight"]  # the taps and a layer before them
    params = dict(target.named_parameters())
    term = regularizer_terms(reg, source, target, x).reg
    assert term.requires_grad, "the term is cut off from the target network"
    grads = torch.autograd.grad(term, [params[n] for n in names])
    s64, t64 = copy.deepcopy(source).double(), copy.deepcopy(target).double()
    ref_reg, _ = reference_terms_of(method, s64, t64, x, weights)
    params64 = dict(t64.named_parameters())
    refs = torch.autograd.grad(ref_reg, [params64[n] for n in names])
    for name, g, ref in zip(names, grads, refs):
        assert ref.abs().max() > 1e-6, name  # a zero reference would make the comparison vacuous
        assert torch.allclose(g.double(), ref, rtol=1e-4, atol=1e-6 * ref.abs().max()), name
