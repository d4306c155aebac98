"""DELTA in a loop of one's own (fastdelta.own_loop): the README's loop gives fit's reference-step losses, and
FeatureMapRegularizer's term is the DELTA methods' term."""
import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastdelta
from fastdelta.features.hooks import FeatureTaps
from fastdelta.kernels import reference_distance
from fastdelta.methods import make_method
from fastdelta.methods.delta_term import channel_scales
from fastdelta.train.steps import ReferenceStep, StepOutput
from tiny import TINY_LAYERS, tiny_net

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_loop() -> str:
    text = README.read_text()
    block = text.split("<!-- own-loop example -->", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def test_the_readme_loop_gives_the_reference_steps_losses(tmp_path, monkeypatch):
    """The README's loop, run as written on the README test's tiny image folder, gives fit's reference-step
    loss and gradients at every step: from the weights the loop had at that step, on its batch (each x the
    regulariser saw, each y the loop's cross-entropy took). Step by step, not along a whole trajectory: the
    README's randomly initialised network on batches of 4 tiny images is chaotic (a 1e-6 change in one
    input moves the loss two steps later by a percent), so float rounding alone would part two runs."""
    from test_readme import make_readme_data
    make_readme_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    start, live, xs, ys, states, grads = {}, [], [], [], [], []

    class Recording(fastdelta.FeatureMapRegularizer):
        def __init__(self, target, source, layers, **kwargs):
            start.update(target=copy.deepcopy(target), source=copy.deepcopy(source), layers=list(layers))
            super().__init__(target, source, layers, **kwargs)
            live.append(target)   # the loop's own target (an attribute would register it as a submodule)

        def forward(self, x):   # called after the target's forward, before the update: the step's weights
            xs.append(x.detach().clone())
            states.append({k: v.detach().clone() for k, v in live[0].state_dict().items()})
            return super().forward(x)

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            if live:   # the loop's optimizer, not the one of Algorithm 1's head training
                grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
            return super().step(closure)

    cross_entropy = F.cross_entropy

    def recording_cross_entropy(logits, y, *args, **kwargs):
        if start and len(ys) == len(xs):   # the loop's own call (before delta(x)), not Algorithm 1's head training
            ys.append(y.detach().clone())
        return cross_entropy(logits, y, *args, **kwargs)

    monkeypatch.setattr(fastdelta, "FeatureMapRegularizer", Recording)
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    monkeypatch.setattr(F, "cross_entropy", recording_cross_entropy)
    scope = {"__name__": "__main__"}
    exec(compile(readme_loop(), "README.md own-loop example", "exec"), scope)
    monkeypatch.undo()
    assert not any(m._forward_hooks for m in scope["target"].modules())  # delta.remove() took them off
    assert len(xs) == len(ys) == len(states) == len(grads) == len(scope["losses"]) > 1

    want, want_grads = [], []
    for x, y, state in zip(xs, ys, states):
        target, source = copy.deepcopy(start["target"]), start["source"]
        target.load_state_dict(state)
        reg = make_method("delta", target, source, "fc", start["layers"], scope["att"].weights,
                          alpha=scope["alpha"], beta=scope["beta"], weight_decay=0.0, feature_map="conv")
        target.train()
        step = ReferenceStep(target, source, reg, list(target.parameters()), torch.device("cpu"), 0.01, 0.9)
        out = StepOutput.read(step.forward_backward(x, y, 0.01))
        step.close()
        want.append(out.values["ce"] + out.values["reg"] + out.values["head"])
        want_grads.append([p.grad for p in target.parameters()])
    assert scope["losses"] == pytest.approx(want, rel=1e-5)
    for got, expected in zip(grads, want_grads):
        assert len(got) == len(expected)
        # float rounding, measured against each tensor's largest entry (about 1e-6 of it here)
        assert all(float((g - e).abs().max()) <= 1e-4 * float(e.abs().max()) + 1e-8 for g, e in zip(got, expected))
    assert len(set(round(v, 6) for v in want)) == len(want)  # the loss moves: the comparison is not vacuous


@pytest.mark.parametrize("feature_map", ["conv", "activation"])
def test_feature_map_regularizer_is_the_float64_distance(feature_map):
    torch.manual_seed(1)
    source = tiny_net().eval().requires_grad_(False)
    target = copy.deepcopy(source).requires_grad_(True).train()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    att = [torch.softmax(torch.randn(8), 0), torch.softmax(torch.randn(16), 0)]
    t64, s64 = copy.deepcopy(target).double(), copy.deepcopy(source).double()  # before the hooks go on
    reg = fastdelta.FeatureMapRegularizer(target, source, TINY_LAYERS, attention=att, feature_map=feature_map)
    x = torch.randn(3, 3, 12, 12)
    target(x)
    term = reg(x)
    # float64 reference on the copies, hooks on the full networks
    m = make_method("delta", t64, s64, "fc", TINY_LAYERS, att, alpha=1.0, beta=0.0, weight_decay=0.0,
                    feature_map=feature_map)
    rectify = feature_map == "activation"
    with FeatureTaps(t64, m.taps, rectify=rectify) as tt, FeatureTaps(s64, m.taps, rectify=rectify) as st:
        tf, sf = tt(x.double())[1], st(x.double())[1]
    want = sum(reference_distance(t, s, sc.double(), m.relu) for t, s, sc in zip(tf, sf, channel_scales(
        [a.double() for a in att], tf, "sum")))
    assert float(term) == pytest.approx(float(want), rel=1e-5) and float(want) > 0
    term.backward()
    assert target.conv1.weight.grad is not None and target.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="run the model's forward first"):
        reg(x)  # the maps of a forward are used once
    reg.remove()


def test_feature_map_regularizer_without_attention_is_the_public_fea_map():
    source = tiny_net().eval().requires_grad_(False)
    target = copy.deepcopy(source).train()
    plain = copy.deepcopy(target)  # before the hooks go on
    reg = fastdelta.FeatureMapRegularizer(target, source, TINY_LAYERS)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        target(x)
        term = reg(x)
    with FeatureTaps(plain, TINY_LAYERS) as tt, FeatureTaps(source, TINY_LAYERS) as st:
        tf, sf = tt(x)[1], st(x)[1]
    want = sum(0.5 * (t.double() - s.double()).pow(2).sum() for t, s in zip(tf, sf))
    assert float(term) == pytest.approx(float(want), rel=1e-5)


# (method, delta_scale, delta_no_att_scale): every scale form, with attention (delta) and without
FORMS = [("delta", "public", "sum"), ("delta", "paper_eq8", "sum"), ("delta_no_att", "public", "sum"),
         ("delta_no_att", "public", "uniform_attention"), ("delta_no_att", "public", "paper_eq5")]


def perturbed_pair(seed=11):
    """A float64 source and a perturbed float64 target of it."""
    torch.manual_seed(seed)
    source = tiny_net().double().eval().requires_grad_(False)
    target = copy.deepcopy(source).requires_grad_(True).train()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return source, target


@pytest.mark.parametrize("feature_map", ["conv", "activation"])
@pytest.mark.parametrize("world_size,layer_scale", [(1, None), (3, [0.7, 1.9])])
@pytest.mark.parametrize("method,delta_scale,no_att_scale", FORMS)
def test_feature_map_regularizer_term_is_the_delta_methods(method, delta_scale, no_att_scale, world_size,
                                                            layer_scale, feature_map):
    """For the same maps FeatureMapRegularizer gives the DELTA method's term at alpha = 1: its scale form,
    attention or none, layer scale (feature_scale="source_energy") and DDP world-size factor."""
    source, target = perturbed_pair()
    att = [torch.softmax(torch.randn(8), 0), torch.softmax(torch.randn(16), 0)] if method == "delta" else None
    plain = copy.deepcopy(target)  # before the hooks go on
    m = make_method(method, plain, source, "fc", TINY_LAYERS, att, alpha=1.0, beta=0.0, weight_decay=0.0,
                    feature_map=feature_map, delta_no_att_scale=no_att_scale, delta_scale=delta_scale,
                    world_size=world_size)
    m.layer_scale = layer_scale
    reg = fastdelta.FeatureMapRegularizer(target, source, TINY_LAYERS, attention=att, feature_map=feature_map,
                                          delta_no_att_scale=no_att_scale, delta_scale=delta_scale,
                                          world_size=world_size, layer_scale=layer_scale)
    # random maps, the same for both: one code path, so exactly one value
    shapes = [(3, 8, 12, 12), (3, 16, 6, 6)]
    tf = [torch.randn(s, dtype=torch.float64) for s in shapes]
    sf = [torch.randn(s, dtype=torch.float64) for s in shapes]
    assert torch.equal(reg.delta_term(tf, sf), m.terms(tf, sf).reg)
    # the networks' own maps: the regulariser's (hooks on the target, the traced source) against the method's
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    target(x)
    term = reg(x)
    with FeatureTaps(plain, m.taps, rectify=m.rectify_at_tap) as tt, \
            FeatureTaps(source, m.taps, rectify=m.rectify_at_tap) as st:
        want = m.terms(tt(x)[1], st(x)[1]).reg
    assert float(want) > 0
    assert float(term) == pytest.approx(float(want), rel=1e-6)
    reg.remove()


@pytest.mark.parametrize("method,delta_scale,no_att_scale", FORMS)
def test_feature_map_regularizer_source_energy_is_fits(method, delta_scale, no_att_scale):
    """scale_by_source_energy: E_l per image as fit measures it (the method's source_energy over the images,
    divided by their number), and each layer's term divided by it from then on."""
    source, target = perturbed_pair(12)
    att = [torch.softmax(torch.randn(8), 0), torch.softmax(torch.randn(16), 0)] if method == "delta" else None
    m = make_method(method, copy.deepcopy(target), source, "fc", TINY_LAYERS, att, alpha=1.0, beta=0.0,
                    weight_decay=0.0, feature_map="conv", delta_no_att_scale=no_att_scale, delta_scale=delta_scale,
                    world_size=2)
    reg = fastdelta.FeatureMapRegularizer(target, source, TINY_LAYERS, attention=att, delta_scale=delta_scale,
                                          delta_no_att_scale=no_att_scale, world_size=2)
    batches = [torch.randn(3, 3, 12, 12, dtype=torch.float64), torch.randn(2, 3, 12, 12, dtype=torch.float64)]
    energy = reg.scale_by_source_energy(batches)
    totals = [0.0, 0.0]
    with FeatureTaps(source, m.taps) as st:
        for x in batches:
            totals = [t + e for t, e in zip(totals, m.source_energy(st(x)[1]))]
    assert energy == pytest.approx([t / 5 for t in totals], rel=1e-9) and min(energy) > 0
    assert reg.layer_scale == pytest.approx([1 / e for e in energy])
    reg.remove()


def test_source_pull_is_the_l2_sp_gradient():
    source = tiny_net().eval()
    model = copy.deepcopy(source)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    pull = fastdelta.SourcePull(model, source, alpha=0.3)
    value = pull.apply_()
    shared = [(n, p) for n, p in model.named_parameters() if not n.startswith("fc.")]
    want = sum(0.5 * 0.3 * (p.double() - dict(source.named_parameters())[n].double()).pow(2).sum() for n, p in shared)
    assert float(value) == pytest.approx(float(want), rel=1e-5)
    for n, p in model.named_parameters():
        if n.startswith("fc."):
            assert p.grad is None
        else:
            assert torch.allclose(p.grad, 0.3 * (p - dict(source.named_parameters())[n]), atol=1e-7)


def test_channel_attention_equals_the_fits_algorithm():
    model = tiny_net().eval()
    data = batches(2, seed=3)
    a = fastdelta.channel_attention(model, TINY_LAYERS, data)
    b = fastdelta.channel_attention(model, TINY_LAYERS, data, impl="masked_forward")
    assert a.images == 8 and [len(w) for w in a.weights] == [8, 16]
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a.raw, b.raw))
