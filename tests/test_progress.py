"""Progress in a log file: plain lines (start, every FASTDELTA_LOG_EVERY_S seconds, end), never a bar's
carriage returns; nothing at all with progress=False."""
import fastdelta
from fastdelta import progress
from tiny import TINY_LAYERS, arrays, tiny_net


def test_progress_outside_a_terminal_is_plain_lines(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with progress.progress_bar(3, "train l2", "it") as bar:
        for _ in range(3):
            bar.update(1)
            bar.set_postfix(loss="0.5")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and lines[0].startswith("train l2: 0/3 it (0%)") and lines[0].endswith("[started]")
    assert lines[-1].startswith("train l2: 3/3 it (100%)") and "loss=0.5 [done]" in lines[-1]
    assert any(line.endswith("[running]") for line in lines[1:-1])


def test_a_fit_logs_lines_and_is_silent_without_progress(capsys):
    kw = dict(method="l2", layers=TINY_LAYERS, iterations=2, batch_size=4, resize=16, crop=12)
    fastdelta.fit(tiny_net(), arrays(), arrays(2, seed=1), progress=True, **kw)
    err = capsys.readouterr().err
    assert "\r" not in err and "train l2: 2/2 it (100%)" in err and "[done]" in err
    fastdelta.fit(tiny_net(), arrays(), arrays(2, seed=1), progress=False, **kw)
    assert "[done]" not in capsys.readouterr().err
