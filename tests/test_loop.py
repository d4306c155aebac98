"""The training loop: deferred reads (no per-step host read), and a failed step that leaves no trace."""
import copy
import itertools
import threading

import pytest
import torch

from fastdelta.methods import make_method
from fastdelta.train.deferred_reads import DeferredStats
from fastdelta.train.loop import NonFiniteLossError, TrainSpec, train_loop
from fastdelta.train.steps import StepOptions
from tiny import TINY_LAYERS, tiny_net

CPU = torch.device("cpu")
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def batches(n=6, poison_at=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]
    if poison_at is not None:
        out[poison_at][0][0, 0, 0, 0] = float("nan")
    return out


def run(method="delta", iterations=6, deferred=False, poison_at=None, fast=False, alpha=0.05, device=CPU,
        **spec_kw):
    torch.manual_seed(0)
    source = tiny_net().eval().requires_grad_(False)
    target = copy.deepcopy(source)
    target.fc = torch.nn.Linear(16, 3)
    att = [torch.softmax(torch.randn(8), 0), torch.softmax(torch.randn(16), 0)]
    source, target, att = source.to(device), target.to(device), [a.to(device) for a in att]
    reg = make_method(method, target, source, "fc", TINY_LAYERS, att if method in ("delta", "l2_sp_att") else None,
                      alpha=alpha, beta=0.01, weight_decay=1e-4, feature_map="conv")
    data = batches(max(iterations, 6), poison_at)
    spec = TrainSpec(iterations, 0.01, 0.9, 4, progress=False, deferred_reads=deferred,
                     loader=lambda start, ctx: itertools.islice(itertools.cycle(data), start, None),
                     step=StepOptions() if fast else None, **spec_kw)
    error = None
    try:
        history = train_loop(target, source, reg, None, spec, device)
    except NonFiniteLossError as e:
        history, error = e.history, e
    return target, history, error


def values(history):
    return [{k: v for k, v in h.items() if k not in ("data_s", "step_s", "elapsed_s")} for h in history]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("method", ["delta", "l2_sp"])
def test_deferred_reads_train_bitwise_as_the_checked_step(method, fast):
    a, ha, _ = run(method, fast=fast)
    b, hb, _ = run(method, fast=fast, deferred=True)
    assert values(ha) == values(hb)  # every history line: the same values, of the same iteration
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.fixture
def host_reads(monkeypatch):
    """Counts conversions of tensors to host values made by the loop's thread (other threads, such as a
    previous test's leftovers, do not count), except the loop's own deferred stats buffers."""
    counted = {"n": 0}
    allowed, kept = set(), []  # kept: the allowed tensors stay alive, so their ids are never reused
    loop_thread = threading.get_ident()
    real_init = DeferredStats.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        allowed.update(id(t) for t in self.host)
        kept.extend(self.host)
    monkeypatch.setattr(DeferredStats, "__init__", init)
    for name in READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, **k):
            if id(self) not in allowed and threading.get_ident() == loop_thread:
                counted["n"] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    return counted


@pytest.mark.parametrize("fast", [False, True])
def test_no_host_read_per_step_with_deferred_reads(host_reads, fast):
    """Reads counted over 4 and over 10 iterations: the same number (building and compiling a step may
    read once, a cold compile cache more than a warm one, hence the uncounted warm-up run)."""
    def reads(iterations, deferred):
        host_reads["n"] = 0
        run("delta", iterations=iterations, fast=fast, deferred=deferred)
        return host_reads["n"]
    reads(2, True)
    assert reads(10, True) == reads(4, True)
    assert reads(10, False) - reads(4, False) >= 6  # the counter sees the checked step's read of every step


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("method", ["delta", "l2"])
def test_a_failed_step_leaves_the_state_of_the_step_before(method, deferred):
    """Parameters, momentum buffers and BN statistics (batch counts included) equal those of a run
    stopped one step before the failure."""
    good, hist, _ = run(method, iterations=3, deferred=deferred)
    bad, partial, error = run(method, iterations=6, deferred=deferred, poison_at=3)
    assert error is not None and error.iteration == 3 and error.term == "ce"
    assert values(partial) == values(hist)
    for (k, v), w in zip(good.state_dict().items(), bad.state_dict().values()):
        assert torch.equal(v, w), k
    assert all(torch.isfinite(b).all() for b in bad.buffers() if b.is_floating_point())


def test_a_diverging_l2_sp_keeps_finite_bn_statistics():
    """A huge alpha blows the weights up step by step; the first non-finite step must not write NaN
    into the BN running statistics (the partial model must still evaluate)."""
    target, history, error = run("l2_sp", iterations=20, alpha=1e6)
    assert error is not None
    stopped = error.iteration
    again, _, _ = run("l2_sp", iterations=stopped, alpha=1e6)
    for (k, v), w in zip(again.state_dict().items(), target.state_dict().values()):
        assert torch.equal(v, w) or (torch.isnan(v).any() and torch.equal(v.isnan(), w.isnan())), k
    assert all(torch.isfinite(b).all() for b in target.buffers() if b.is_floating_point())
