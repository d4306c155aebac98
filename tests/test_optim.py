"""L2-SP / L2-SP(ATT) / weight decay applied in the optimizer update = the autograd formulation."""
import copy

import pytest
import torch

import fastdelta
from fastdelta.attention.weights import ChannelAttention
from fastdelta.methods import Pull
from fastdelta.train.optim import PullSGD
from fastdelta.methods import make_method
from tiny import TINY_LAYERS, arrays, tiny_net

QUICK = dict(layers=TINY_LAYERS, batch_size=4, resize=16, crop=12, progress=False, attention_cache=None)


def _attention():
    g = torch.Generator().manual_seed(3)
    return ChannelAttention(TINY_LAYERS, [torch.rand(8, generator=g, dtype=torch.float64),
                                          torch.rand(16, generator=g, dtype=torch.float64)])


@pytest.mark.parametrize("method", ["l2_sp", "l2_sp_att"])
def test_l2_sp_in_the_optimizer_matches_autograd_after_n_steps(method):
    """Same weights after 8 steps (fp32, 1e-6), with alpha large enough that the pull moves the weights."""
    att = _attention() if method == "l2_sp_att" else None
    kw = dict(QUICK, iterations=8, alpha=0.5, beta=0.3, lr=0.05, attention=att)
    ref = fastdelta.fit(tiny_net(), arrays(), None, method=method, step_engine="reference", **kw)
    fast = fastdelta.fit(tiny_net(), arrays(), None, method=method, step_engine="fast", **kw)
    free = fastdelta.fit(tiny_net(), arrays(), None, method=method, step_engine="fast", **{**kw, "alpha": 0.0})
    assert fast.settings["step_used"]["step_engine"] == "fast"
    assert ref.settings["step_used"] == {"step_engine": "reference"}
    moved = 0.0
    for (k, a), b, c in zip(ref.model.state_dict().items(), fast.model.state_dict().values(),
                            free.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (k, (a - b).abs().max())
        moved = max(moved, (a - c).abs().max().item())
    assert moved > 1e-3  # the L2-SP pull matters at this alpha: the comparison is not vacuous
    for h1, h2 in zip(ref.history, fast.history):  # the reg value is still logged, computed without graph
        for key in ("ce", "reg", "head", "loss", "grad_norm"):
            assert h2[key] == pytest.approx(h1[key], rel=1e-5, abs=1e-9), key
        assert h2["train_acc"] == h1["train_acc"]
    assert fast.history[-1]["reg"] > 0


@pytest.mark.parametrize("method", ["l2", "l2_fe"])
def test_weight_decay_in_the_optimizer_matches_autograd(method):
    kw = dict(QUICK, iterations=5, weight_decay=0.3, lr=0.05, attention_head_epochs=1)
    ref = fastdelta.fit(tiny_net(), arrays(), None, method=method, step_engine="reference", **kw)
    fast = fastdelta.fit(tiny_net(), arrays(), None, method=method, step_engine="fast", **kw)
    for (k, a), b in zip(ref.model.state_dict().items(), fast.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), k
    for h1, h2 in zip(ref.history, fast.history):
        assert h2["reg"] == pytest.approx(h1["reg"], rel=1e-5) and h2["head"] == pytest.approx(h1["head"], rel=1e-5)


def test_pull_gradient_and_value_equal_the_autograd_term():
    torch.manual_seed(0)
    target, source = tiny_net(), tiny_net(seed=1)
    att = [torch.softmax(torch.randn(8), 0), torch.softmax(torch.randn(16), 0)]
    reg = make_method("l2_sp_att", target, source, "fc", TINY_LAYERS, att, alpha=0.7, beta=0.2, weight_decay=1e-4)
    params = list(target.parameters())
    terms = reg.terms()
    (terms.reg + terms.head).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    opt = PullSGD(params, 0.1, 0.9, reg.pulls(params))
    values = opt.pull_()  # no grad present: the pull alone, as autograd would give
    for p, g in zip(params, expected):
        assert torch.allclose(p.grad, g, rtol=1e-6, atol=1e-9)
    assert values["reg"].item() == pytest.approx(terms.reg.item(), rel=1e-6)
    assert values["head"].item() == pytest.approx(terms.head.item(), rel=1e-6)


def test_optimizer_state_round_trips_with_the_grad_scaler():
    p = torch.nn.Parameter(torch.ones(3))
    opt = PullSGD([p], 0.1, 0.9, [Pull("head", [p], 0.5)])
    opt.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    p.grad = torch.ones(3)
    opt.pull_()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    assert state["grad_scaler"]["scale"] == 8.0
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = PullSGD([q], 0.1, 0.9)
    opt2.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    opt2.load_state_dict(state)
    assert opt2.scaler.get_scale() == 8.0
    assert torch.equal(opt2.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_fused_and_foreach_updates_agree():
    """CUDA runs take torch's fused SGD, CPU runs foreach: the same update (checked here on CPU)."""
    torch.manual_seed(0)
    results = []
    for fused in (False, True):
        target, source = tiny_net(), tiny_net(seed=1)
        reg = make_method("l2_sp", target, source, "fc", TINY_LAYERS, alpha=0.7, beta=0.2, weight_decay=1e-4)
        params = list(target.parameters())
        opt = PullSGD(params, 0.1, 0.9, reg.pulls(params), foreach=not fused, fused=fused or None)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.pull_()
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
