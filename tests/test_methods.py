"""The method registry: the paper's order, metadata that fits each method, and a new method in one class."""
import pytest
import torch

import fastdelta
from fastdelta.methods import METHODS, Method, Terms, register
from fastdelta.methods.base import squared_norm, unregister
from fastdelta.methods.hyperparameters import BETA, PAPER_GRID, Hyperparameter
from tiny import TINY_LAYERS, arrays, tiny_net

QUICK = dict(layers=TINY_LAYERS, batch_size=4, resize=16, crop=12, progress=False, attention_cache=None,
             attention_head_epochs=1, eval_batch_size=8, iterations=4)


# the paper's Table 1 order: the only place these names are listed; every other check reads the registry
PAPER = ["l2_fe", "l2", "l2_sp", "l2_sp_att", "delta_no_att", "delta"]


def test_the_papers_methods_come_first_in_its_table_order():
    assert list(METHODS)[:len(PAPER)] == PAPER
    paper = {m: METHODS[m] for m in PAPER}
    assert [c.label for c in paper.values()] == ["L2-FE", "L2", "L2-SP", "L2-SP(ATT)", "DELTA w/o ATT", "DELTA"]
    assert [m for m, c in paper.items() if c.uses_attention] == ["l2_sp_att", "delta"]
    assert [m for m, c in paper.items() if c.uses_source_features] == ["delta_no_att", "delta"]
    assert [m for m, c in paper.items() if c.tuned] == ["l2_sp", "l2_sp_att", "delta_no_att", "delta"]
    assert [m for m, c in paper.items() if c.learning_curve] == ["l2_sp", "delta"]  # the pair of Fig. 3
    assert len({c.color for c in paper.values()}) == len(paper)


@pytest.mark.parametrize("name", list(METHODS))
def test_each_registered_method_has_consistent_metadata(name):
    from fastdelta.apps.compare.figures import color, label
    from fastdelta.settings import make_settings
    cls = METHODS[name]
    assert cls.name == name and cls.label and (label(name), color(name)) == (cls.label, cls.color)
    names = [h.name for h in cls.hyperparameters]
    assert len(set(names)) == len(names) and cls.tuned == tuple(h.name for h in cls.hyperparameters if h.grid)
    assert not (cls.freezes_extractor and (cls.uses_source_features or cls.pulls_to_source))
    assert not cls.uses_weight_decay or "weight_decay" in names
    resolved = make_settings(name).resolved()  # every declared hyperparameter gets a default that works
    for h in cls.hyperparameters:
        h.check(getattr(resolved, h.name))


@pytest.fixture
def l1_sp():
    """A method written as a user would add one: one class, only its formula."""
    @register
    class L1SP(Method):
        """L1-SP: reg = alpha ||w_shared - w*||_1,   head = beta/2 ||w_head||^2"""
        name, label, color = "l1_sp_test", "L1-SP", "tab:olive"
        pulls_to_source = True
        hyperparameters = (Hyperparameter("alpha", 0.01, "weight of the L1 pull", grid=PAPER_GRID), BETA)

        def terms(self, target_feats=None, source_feats=None) -> Terms:
            total = sum((p.float() - self.source_params[n].float()).abs().sum() for n, p in self.shared)
            return Terms(self.alpha * total, 0.5 * self.beta * squared_norm(self.head_params))
    yield L1SP
    unregister(L1SP.name)


def test_a_new_method_is_one_class_and_trains_the_same_on_both_steps(l1_sp):
    from fastdelta.apps.cli import build_parser
    kw = dict(QUICK, method=l1_sp.name, alpha=0.05)
    ref = fastdelta.fit(tiny_net(), arrays(), None, step_engine="reference", **kw)
    fast = fastdelta.fit(tiny_net(), arrays(), None, step_engine="fast", **kw)
    assert ref.history[-1]["reg"] > 0
    for h1, h2 in zip(ref.history, fast.history):  # its terms run in the fast step's graph (it has no pulls)
        assert h2["reg"] == pytest.approx(h1["reg"], rel=1e-5)
    for (k, a), b in zip(ref.model.state_dict().items(), fast.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), k
    args = build_parser().parse_args(["fit", "--data", "D", "--out", "O", "--method", l1_sp.name])
    assert args.method == l1_sp.name
    from fastdelta.apps.compare.figures import color, label
    assert (label(l1_sp.name), color(l1_sp.name)) == ("L1-SP", "tab:olive")
