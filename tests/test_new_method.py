"""A method registered after import, with a hyperparameter of its own (l1_eps), reaches every door: compare's
grid (Python and --grid), its search, report.md's Table 1 and Fig. 4 (each grid point its own cell), the
demo's settings, and the attention command leaves it out. Without alpha, too."""
import argparse
import dataclasses

import pytest
import torch

from fastdelta.apps.cli import build_parser, given_fields
from fastdelta.apps.compare import CompareSettings, compare
from fastdelta.apps.compare.figures import search_figure, search_panels
from fastdelta.apps.compare.search import search_grid
from fastdelta.apps.demo import DemoConfig
from fastdelta.methods import METHODS, Method, Terms, register
from fastdelta.methods.base import squared_norm, unregister
from fastdelta.methods.hyperparameters import BETA, PAPER_GRID, Hyperparameter
from fastdelta.settings import FitSettings, SettingsError
from tiny import TINY_LAYERS, arrays, tiny_net

QUICK = dict(iterations=2, batch_size=4, resize=16, crop=12, eval_batch_size=8, layers=TINY_LAYERS, progress=False)
L1_EPS = Hyperparameter("l1_eps", 1e-3, "smoothing of |w - w*| (sqrt(d^2 + eps^2) - eps)", grid=(1e-3, 1e-2))
EPS = [1e-3, 0.1]


def _smooth_l1(method, params) -> torch.Tensor:
    return sum(((p.float() - method.source_params[n].float()).pow(2) + method.l1_eps ** 2).sqrt().sum()
               - method.l1_eps * p.numel() for n, p in params)


@pytest.fixture
def l1_methods():
    """l1_sp (alpha, l1_eps, beta) and l1_pull (l1_eps, beta: no alpha), as a user would add them."""
    @register
    class L1SP(Method):
        """L1-SP: reg = alpha sum sqrt((w - w*)^2 + eps^2) - eps,   head = beta/2 ||w_head||^2"""
        name, label, color = "l1_sp", "L1-SP", "tab:olive"
        pulls_to_source = True
        hyperparameters = (Hyperparameter("alpha", 0.01, "weight of the L1 pull", grid=PAPER_GRID), L1_EPS, BETA)

        def terms(self, target_feats=None, source_feats=None) -> Terms:
            return Terms(self.alpha * _smooth_l1(self, self.shared), 0.5 * self.beta * squared_norm(self.head_params))

    @register
    class L1Pull(Method):
        """L1 pull of unit weight: reg = sum sqrt((w - w*)^2 + eps^2) - eps,   head = beta/2 ||w_head||^2"""
        name, label, color = "l1_pull", "L1 pull", "tab:cyan"
        pulls_to_source = True
        hyperparameters = (L1_EPS, BETA)

        def terms(self, target_feats=None, source_feats=None) -> Terms:
            return Terms(1e-3 * _smooth_l1(self, self.shared), 0.5 * self.beta * squared_norm(self.head_params))

    yield L1SP, L1Pull
    unregister(L1Pull.name)
    unregister(L1SP.name)
    assert "l1_eps" not in {f.name for f in dataclasses.fields(FitSettings)}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--data", "D", "--out", "O", "--l1-eps", "0.1"])


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _options(name: str) -> set:
    return {o for a in _subparser(name)._actions for o in a.option_strings}


def test_its_hyperparameter_reaches_the_report_table_the_search_figure_and_the_grid(l1_methods, tmp_path):
    # grid from the new spelling (l1_eps) and the older aliases (alpha_grid, beta_grid), searched over all
    cs = CompareSettings(grid={"l1_eps": EPS}, alpha_grid=(0.01,), beta_grid=(0.01,), curve_points=0, map_images=1,
                         schedules=("step",))
    report = compare(tiny_net(), arrays(n_per_class=5), arrays(seed=1), methods=["l1_sp", "l1_pull"], seeds=1,
                     search="grid", out=tmp_path, compare_settings=cs, **QUICK)
    results = report["search"]["results"]
    assert [(r["method"], r.get("alpha"), r["l1_eps"], r["beta"]) for r in results] == [
        ("l1_sp", 0.01, e, 0.01) for e in EPS] + [("l1_pull", None, e, 0.01) for e in EPS]
    assert all(r["status"] == "ok" for r in results)
    # each grid point fitted in its own folder
    assert (tmp_path / "runs" / "search" / "l1_sp_a0.01_l1_eps0.1_b0.01" / "result.json").is_file()
    assert (tmp_path / "runs" / "search" / "l1_pull_l1_eps0.001_b0.01" / "result.json").is_file()
    chosen = report["chosen"]
    assert set(chosen["l1_sp"]) == {"alpha", "l1_eps", "beta"} and set(chosen["l1_pull"]) == {"l1_eps", "beta"}
    assert all(r["l1_eps"] == chosen[r["method"]]["l1_eps"] for r in report["runs"])
    # Table 1: a column per tuned hyperparameter, '-' where a method has none
    md = (tmp_path / "report.md").read_text()
    assert "| method | alpha | l1_eps | beta | test top-1 | seeds |" in md
    assert f"| L1-SP | 0.01 | {chosen['l1_sp']['l1_eps']} | 0.01 |" in md
    assert f"| L1 pull | - | {chosen['l1_pull']['l1_eps']} | 0.01 |" in md
    # Fig. 4: every grid point its own cell (none folded into another), and the figure written
    assert "fig4_search.png" in report["figures"] and (tmp_path / "fig4_search.png").stat().st_size > 0
    (panel,) = search_panels(report["search"])
    assert panel["x"] == "l1_eps" and panel["xs"] == EPS
    assert len(panel["cells"]) == len(results) == 4
    assert panel["rows"] == ["L1-SP (alpha = 0.01)", "L1 pull"] and panel["title"] == "l1_eps search (beta = 0.01)"
    assert sorted(panel["cells"].values()) == sorted(r["val_top1"] for r in results)


def test_a_method_without_alpha_gets_a_search_figure(l1_methods, tmp_path):
    """search 'grid' over two hyperparameters of a method without alpha: one panel, l1_eps across, beta down."""
    results = [{"method": "l1_pull", "l1_eps": e, "beta": b, "val_top1": 50 + 100 * e + b, "status": "ok",
                "seconds": 1.0, "reused": False} for b in (0.01, 0.1) for e in EPS]
    results[-1].update(val_top1=None, status="diverged at iteration 1 (reg)")
    search = {"seed": 0, "split": {"fit": 8, "val": 2, "val_fraction": 0.2}, "results": results}
    (panel,) = search_panels(search)
    assert (panel["x"], panel["xs"], panel["ylabel"], panel["rows"]) == ("l1_eps", EPS, "beta", ["0.01", "0.1"])
    assert panel["cells"][("0.1", 0.1)] is None and len(panel["cells"]) == 4
    assert search_figure({"search": search}, tmp_path / "fig4.png") == "fig4.png"
    # its search varies its first tuned hyperparameter, l1_eps
    _, l1_pull = l1_methods
    fixed = {"l1_eps": 1e-3, "beta": 0.01}
    assert search_grid(CompareSettings(), l1_pull, fixed) == [{"l1_eps": e, "beta": 0.01} for e in L1_EPS.grid]
    assert search_grid(CompareSettings(grid={"l1_eps": EPS}), l1_pull, fixed) == [{"l1_eps": e, "beta": 0.01}
                                                                                 for e in EPS]


def test_the_command_line_offers_its_hyperparameter_where_it_applies(l1_methods):
    args = build_parser().parse_args(["compare", "--data", "D", "--methods", "l1_sp", "--search", "grid",
                                      "--grid", "l1_eps=0.001,0.1", "--grid", "beta=0.01", "--alpha-grid", "0.01"])
    cs = CompareSettings(**given_fields(args, CompareSettings))
    assert cs.grid == {"l1_eps": EPS, "beta": [0.01]} and cs.grids() == {"alpha": [0.01], "l1_eps": EPS,
                                                                           "beta": [0.01]}
    cs.validate()
    assert "--l1-eps" in _options("fit") and "--l1-eps" in _options("compare")
    assert "--l1-eps" not in _options("attention") and "--alpha" not in _options("attention")
    assert "--weight-decay" in _options("attention")  # the attention head's (L2-FE's)
    demo = build_parser().parse_args(["demo", "--methods", "l1_sp,l2", "--alpha", "0.2", "--set", "l1_eps=0.05"])
    cfg = DemoConfig(**given_fields(demo, DemoConfig))
    cfg.validate()
    assert cfg.values("l1_sp") == {"l1_eps": 0.05, "alpha": 0.2} and cfg.values("l2") == {}


def test_a_grid_nobody_searches_is_an_error(l1_methods):
    with pytest.raises(SettingsError, match="no compared method declares 'l1_eps'"):
        CompareSettings(methods=["delta"], grid={"l1_eps": EPS}).validate()
    with pytest.raises(SettingsError, match="search='alpha' does not vary l1_eps"):
        CompareSettings(methods=["l1_sp"], grid={"l1_eps": EPS}).validate()  # alpha is l1_sp's first
    CompareSettings(methods=["l1_pull"], grid={"l1_eps": EPS}).validate()  # l1_eps is l1_pull's first
    with pytest.raises(SettingsError, match=r"l1_eps=-1: must be a finite number >= 0"):
        CompareSettings(methods=["l1_pull"], grid={"l1_eps": [-1]}).validate()
    assert "l1_sp" in METHODS
