"""Smoke tests of the figures a user opens: history.png (fastdelta.result) and a comparison's table1.png and
Fig. 6 (fastdelta.apps.compare.figures), drawn from small synthetic inputs."""
import numpy as np
import pytest

from fastdelta.apps.compare.figures import maps_figure, table_figure
from fastdelta.result import history_figure, plot_history


def synthetic_history(n=100, curves=False, reg=1e-7):
    rows = []
    for it in range(n):
        lr = 0.01 * (0.1 if it >= 2 * n // 3 else 1.0)
        row = {"iteration": it, "ce": 1.5 * np.exp(-it / 30), "reg": reg, "head": 1e-3, "lr": lr}
        row["loss"] = row["ce"] + row["reg"] + row["head"]
        if curves and (it % 25 == 24 or it == n - 1):
            row["test_top1"], row["val_top1"] = 40.0 + it / 5, 38.0 + it / 5
        rows.append(row)
    return rows


@pytest.mark.parametrize("curves, panels", [(False, 3), (True, 4)])
def test_history_png_has_a_panel_each_for_loss_regulariser_lr_and_accuracy(tmp_path, curves, panels):
    import matplotlib.pyplot as plt
    history = synthetic_history(curves=curves)
    fig = history_figure(history, "l2 — tiny", "l2")
    try:
        titled = [ax for ax in fig.axes if ax.get_title()]  # the panels; the total loss is on a twin axis
        assert len(titled) == panels
        assert [ax.get_ylabel() for ax in fig.axes if not ax.get_title()] == ["total loss"]
        loss, reg, lr = titled[:3]
        assert [line.get_label() for line in loss.get_lines()][0] == "cross-entropy"
        assert {line.get_label() for line in reg.get_lines()} == {"weight decay (shared layers)", "weight decay (head)"}
        assert lr.get_lines()[0].get_drawstyle() == "steps-post"
        ce = loss.get_lines()[0].get_ydata()
        low, high = loss.get_ylim()
        assert high - low < 10 * (max(ce) - min(ce))  # the CE fills its own axis, whatever the regulariser
    finally:
        plt.close(fig)
    plot_history(history, tmp_path / "history.png", "l2 — tiny", "l2")
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_history_names_an_alpha_regulariser_for_delta():
    import matplotlib.pyplot as plt
    fig = history_figure(synthetic_history(n=5), "delta", "delta")
    try:
        assert "alpha·regulariser" in {line.get_label() for line in fig.axes[1].get_lines()}
    finally:
        plt.close(fig)


def synthetic_report(colour=True):
    rng = np.random.default_rng(0)
    image = rng.random((8, 8, 3)) if colour else rng.random((8, 8))
    return {"compare": {"methods": ["l2_sp", "delta"], "seeds": 3},
            "model": {"arch": "tiny", "weights": "random"}, "data": {"train": {"num_samples": 30}},
            "settings": {"recipe": "paper"},
            "table": {"l2_sp": {"mean": 85.0, "std": 1.0, "values": [84.0, 85.0, 86.0]},
                      "delta": {"mean": 86.0, "std": 0.5, "values": [85.5, 86.0, 86.5]}},
            "activation_maps": {"layer": "conv2", "classes": ["a", "b"], "filters": [1, 2],
                                "images": [image.tolist()] * 2,
                                "maps": {n: [rng.random((4, 4)).tolist()] * 2 for n in ("source", "l2_sp", "delta")}}}


def test_table1_and_fig6_are_drawn(tmp_path):
    report = synthetic_report()
    assert table_figure(report, tmp_path / "table1.png") == "table1.png"
    assert maps_figure(report, tmp_path / "fig6.png") == "fig6.png"
    grey = synthetic_report(colour=False)  # a report from before colour inputs
    assert maps_figure(grey, tmp_path / "fig6_grey.png") == "fig6_grey.png"
    for name in ("table1.png", "fig6.png", "fig6_grey.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
