"""Validation set and model selection, the callback protocol, the CSV/TensorBoard loggers, AdamW and the cosine
schedule with warm-up, and resuming with all of them: through fastdelta.fit and `fastdelta fit` on tiny data."""
import csv
import json
import os
import sys

import numpy as np
import pytest
import torch

import fastdelta
from fastdelta import SettingsError
from fastdelta.apps import cli
from fastdelta.data.inputs import resolve_data
from fastdelta.train.callbacks import Callback, LoggerUnavailableError
from fastdelta.train.loop import lr_at
from tiny import TINY_LAYERS, arrays, image_folder, tiny_net

QUICK = dict(batch_size=4, resize=16, crop=12, progress=False, attention_head_epochs=1, eval_batch_size=8,
             layers=TINY_LAYERS)


def _fit(iterations=4, method="l2_sp", train=None, **kw):
    return fastdelta.fit(tiny_net(), train or arrays(6), arrays(1, seed=1), method=method, iterations=iterations,
                         **{**QUICK, **kw})


class Recorder(Callback):
    """Every hook call, and a copy of the weights at each evaluation."""

    def __init__(self):
        self.calls, self.weights = [], {}

    def on_start(self, run):
        self.calls.append(("start", len(run.history)))

    def on_step(self, run, iteration, record):
        self.calls.append(("step", iteration))
        record["seen_by_callback"] = iteration  # a field a callback adds reaches the history

    def on_eval(self, run, iteration, metrics):
        self.calls.append(("eval", iteration, dict(metrics)))
        self.weights[iteration] = {k: v.detach().clone() for k, v in run.target.state_dict().items()}

    def on_checkpoint(self, run, iteration, path):
        self.calls.append(("checkpoint", iteration, path is not None and path.is_file()))

    def on_end(self, run, history):
        self.calls.append(("end", len(history)))

    def teardown(self, run):
        self.calls.append(("teardown",))


def test_val_fraction_holds_out_a_stratified_seeded_part_before_the_attention_and_the_training():
    x, y = arrays(6)  # 3 classes x 6
    a = resolve_data((x, y), val_fraction=0.25, seed=3, resize=16, crop=12)
    b = resolve_data((x, y), val_fraction=0.25, seed=3, resize=16, crop=12)
    c = resolve_data((x, y), val_fraction=0.25, seed=4, resize=16, crop=12)
    assert len(a.val) == 4 and len(a.train) == len(a.train_eval) == 14
    assert sorted(a.description["val"]["class_counts"]) == [1, 1, 2]  # round(0.25 x 18), spread over the classes
    images = lambda d: {d.images[i].tobytes() for i in range(len(d))}  # noqa: E731
    assert not images(a.val) & images(a.train) and images(a.val) | images(a.train) == images(resolve_data((x, y)).train)
    assert images(a.val) == images(b.val) and images(a.val) != images(c.val)  # seeded
    # through fit: the attention measured the 14 images left, the training set is those 14, the test set not used
    res = _fit(2, method="delta", attention_max_images="all", val_fraction=0.25, seed=3, eval_every=1)
    assert res.attention.images == 14 and res.data["val"]["train_images_left"] == 14
    assert [h["val_images"] for h in res.history] == [4, 4] and all("test_top1" not in h for h in res.history)
    with pytest.raises(SettingsError, match=r"batch_size=16 is larger than the training set \(14 images\)"):
        _fit(1, val_fraction=0.25, batch_size=16)


def test_without_a_validation_set_the_test_curve_is_as_before_and_choosing_needs_one():
    res = _fit(2, eval_every=1)
    assert [h["test_images"] for h in res.history] == [3, 3] and all("val_top1" not in h for h in res.history)
    assert "best_iteration" not in res.summary()
    with pytest.raises(SettingsError, match="keep='best' chooses the weights by validation top-1, but there is no"):
        fastdelta.fit(tiny_net(), arrays(), keep="best")
    with pytest.raises(SettingsError, match="early_stopping_patience=2 watches validation top-1"):
        fastdelta.fit(tiny_net(), arrays(), early_stopping_patience=2, eval_every=1)
    with pytest.raises(SettingsError, match="early_stopping_patience=2 counts validation evaluations"):
        fastdelta.fit(tiny_net(), arrays(), early_stopping_patience=2, val_fraction=0.2)
    with pytest.raises(SettingsError, match="val_fraction and val both"):
        fastdelta.fit(tiny_net(), arrays(), val_fraction=0.2, val=arrays(1))
    with pytest.raises(SettingsError, match=r"val_fraction=1: must be a number in \[0, 1\)"):
        fastdelta.fit(tiny_net(), arrays(), val_fraction=1)


def test_keep_best_and_early_stopping_follow_the_validation_top1_and_the_callbacks_see_it(tmp_path):
    rec = Recorder()
    its = 12
    res = _fit(its, val=arrays(2, seed=5), eval_every=1, keep="best", early_stopping_patience=2, lr=0.05,
               run_dir=str(tmp_path / "run"), checkpoint_every=3, callbacks=[rec])
    scores = [h.get("val_top1") for h in res.history]
    assert None not in scores and all("test_top1" not in h for h in res.history)
    # the stop the rule gives on these scores: 2 evaluations in a row without a strictly better one
    best, since, stop = -1, 0, its
    for i, v in enumerate(scores, 1):
        best, since = (v, 0) if v > best else (best, since + 1)
        if since >= 2:
            stop = i
            break
    assert stop < its, "the tiny run should stop early (else pick another lr)"
    assert len(res.history) == stop
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    best_it = scores.index(max(scores)) + 1
    assert (result["best_iteration"], result["best_val_top1"], result["stopped_early"]) == (best_it, max(scores), True)
    assert result["iterations_run"] == stop
    saved = torch.load(tmp_path / "run" / "model.pt")
    for k, v in saved.items():  # model.pt and the returned model: the weights of the best evaluation
        assert torch.equal(v, rec.weights[best_it][k]) and torch.equal(res.model.state_dict()[k], v), k
    assert not all(torch.equal(v, rec.weights[stop][k]) for k, v in saved.items())
    # the protocol: start, a step per iteration, an eval after each, checkpoints (the early stop writes one), end
    kinds = [c[0] for c in rec.calls]
    assert rec.calls[0] == ("start", 0) and kinds[-2:] == ["end", "teardown"] and rec.calls[-2] == ("end", stop)
    assert [c[1] for c in rec.calls if c[0] == "step"] == list(range(1, stop + 1))
    assert [c[2]["val_top1"] for c in rec.calls if c[0] == "eval"] == scores
    assert [c[1:] for c in rec.calls if c[0] == "checkpoint"] == [(i, True) for i in range(3, stop + 1, 3)] + \
        ([(stop, True)] if stop % 3 else [])
    assert [h["seen_by_callback"] for h in res.history] == list(range(1, stop + 1))
    # keep="last" with the same run: the weights of the last step instead
    last = _fit(its, val=arrays(2, seed=5), eval_every=1, early_stopping_patience=2, lr=0.05, callbacks=[Recorder()])
    assert len(last.history) == stop and any(not torch.equal(v, saved[k]) for k, v in last.model.state_dict().items())
    with pytest.raises(SettingsError, match="is not a fastdelta.train.callbacks.Callback"):
        _fit(1, callbacks=[object()])


class StopAt(Callback):
    def on_step(self, run, iteration, record):
        if iteration == 2:
            run.request_stop("enough")


def test_a_user_callback_can_stop_the_training():
    assert len(_fit(5, callbacks=[StopAt()]).history) == 2


def test_csv_and_tensorboard_loggers_beside_history_jsonl(tmp_path, monkeypatch):
    out = tmp_path / "run"
    res = _fit(4, val_fraction=0.3, eval_every=2, run_dir=str(out), loggers="csv,tensorboard")
    rows = list(csv.DictReader(open(out / "history.csv")))
    jsonl = [json.loads(line) for line in open(out / "history.jsonl")]
    assert len(rows) == len(jsonl) == 4 and set(rows[0]) == set().union(*jsonl)
    for row, h in zip(rows, jsonl):
        assert {k: float(row[k]) for k in h} == pytest.approx(h)
        assert ("val_top1" in h) == (row["val_top1"] != "")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([h["loss"] for h in res.history])
    assert [e.step for e in events.Scalars("val_top1")] == [1, 3]
    # a new run over it (overwrite): the old run's history.csv and events are gone
    again = _fit(2, run_dir=str(out), loggers="tensorboard", overwrite=True, lr=0.02)
    assert not (out / "history.csv").exists()
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([h["loss"] for h in again.history])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(LoggerUnavailableError, match="pip install tensorboard"):
        _fit(1, run_dir=str(tmp_path / "other"), loggers=["tensorboard"])
    assert not (tmp_path / "other").exists()  # refused before any work
    with pytest.raises(SettingsError, match="loggers=.*unknown \\['wandb'\\]"):
        _fit(1, run_dir=str(tmp_path / "other"), loggers="csv,wandb")
    with pytest.raises(SettingsError, match="write into the run folder: set run_dir"):
        _fit(1, loggers="csv")


def test_cosine_schedule_with_linear_warmup():
    assert [lr_at(i, 0.1, "cosine", 1, 0.1, 2, 10) for i in (0, 1, 2, 6)] == pytest.approx([0, 0.05, 0.1, 0.05])
    assert lr_at(9, 0.1, "cosine", 1, 0.1, 2, 10) == pytest.approx(0.05 * (1 + np.cos(np.pi * 7 / 8)))
    assert [lr_at(i, 0.1, "step", 5, 0.1, 2, 10) for i in (0, 1, 2, 5)] == pytest.approx([0, 0.05, 0.1, 0.01])
    res = _fit(6, lr=0.02, lr_schedule="cosine", warmup_iterations=2)
    assert [h["lr"] for h in res.history] == pytest.approx(
        [0.0, 0.01] + [0.01 * (1 + np.cos(np.pi * t / 4)) for t in range(4)])
    with pytest.raises(SettingsError, match="warmup_iterations=6: must be an integer >= 0 and below iterations=6"):
        _fit(6, warmup_iterations=6)


def test_pull_adamw_adds_the_pulls_as_gradients_before_torchs_adamw_step():
    from fastdelta.methods import METHODS
    from fastdelta.train.optim import PullAdamW
    target, source = tiny_net(), tiny_net()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))  # away from w*: the pull is not zero
    reg = METHODS["l2_sp"](target, source, "fc", TINY_LAYERS, alpha=0.5, beta=0.3)
    params = reg.trainable_parameters(target)
    start = [p.detach().clone() for p in params]
    x, y = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 3])
    results = []
    for pulled in (True, False):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        if pulled:
            opt = PullAdamW(params, 0.01, 0.02, reg.pulls(params))
        else:
            opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.02)
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(target(x), y)
            if not pulled:
                terms = reg.terms()
                loss = loss + terms.reg + terms.head  # the reference: the terms in autograd
            loss.backward()
            if pulled:
                opt.pull_()
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", [dict(step_engine="reference"),
                                    dict(precision="fp32", channels_last=True, compile=False)])
def test_adamw_trains_with_both_step_engines_and_keeps_the_method_terms(engine):
    kw = dict(optimizer="adamw", lr=0.01, alpha=1.0, beta=1.0)
    ref = _fit(5, step_engine="reference", **kw)
    res = ref if engine.get("step_engine") == "reference" else _fit(5, **engine, **kw)
    assert res.settings["step_used"]["step_engine"] == ("reference" if engine.get("step_engine") else "fast")
    assert res.settings["optimizer"] == "adamw"
    sgd = _fit(5, step_engine="reference", lr=0.01, alpha=1.0, beta=1.0)
    assert [h["reg"] for h in res.history] != pytest.approx([h["reg"] for h in sgd.history], rel=1e-3)
    # the fast step's pulls (gradients added before AdamW's step) match the reference's autograd terms
    for key in ("loss", "reg", "head"):
        assert [h[key] for h in res.history] == pytest.approx([h[key] for h in ref.history], rel=2e-3, abs=1e-6), key
    # AdamW's decoupled decay (torch's weight_decay) shrinks the weights beyond the method's terms
    decayed = _fit(5, **engine, **kw, adamw_weight_decay=5.0)
    norm = lambda m: sum(p.norm() ** 2 for p in m.parameters()).item()  # noqa: E731
    assert norm(decayed.model) < norm(res.model)
    with pytest.raises(SettingsError, match="adamw_weight_decay=0.1 is AdamW's decoupled decay"):
        _fit(1, adamw_weight_decay=0.1)


def test_resume_with_validation_selection_adamw_cosine_and_loggers_is_the_uninterrupted_run(tmp_path):
    kw = dict(val_fraction=0.3, eval_every=1, keep="best", early_stopping_patience=3, optimizer="adamw", lr=0.03,
              lr_schedule="cosine", warmup_iterations=2, checkpoint_every=2, loggers="csv", iterations=10)
    full = _fit(run_dir=str(tmp_path / "full"), **kw)
    stop = len(full.history)
    files = sorted(os.listdir(tmp_path / "full" / "checkpoints"))
    # killed just before its last checkpoint: resumed from the one before, with the best weights and counters
    os.remove(tmp_path / "full" / "checkpoints" / files[-1])
    resumed = _fit(run_dir=str(tmp_path / "full"), resume=True, **kw)
    assert resumed.settings["resumed_from_iteration"] == int(files[-2][5:13]) < stop
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert resumed.selection == full.selection and resumed.selection["best_iteration"] is not None
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(v, w), k
    rows = list(csv.DictReader(open(tmp_path / "full" / "history.csv")))
    assert [float(r["loss"]) for r in rows] == pytest.approx([h["loss"] for h in full.history])
    # resuming the finished run: its result, its best weights, no training
    with pytest.warns(UserWarning, match="finished"):
        again = _fit(run_dir=str(tmp_path / "full"), resume=True, **kw)
    assert again.selection == full.selection
    for (k, v), w in zip(full.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_cli_fit_with_a_validation_folder_keep_best_loggers_adamw_and_resume(tmp_path, monkeypatch, capsys):
    import torchvision
    for k, split in enumerate(("train", "test", "val")):
        image_folder(tmp_path / "data" / split, per_class=4, seed=k, size=14, classes=("a", "b"))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # --val relative: recorded absolute, so --resume works from anywhere
    assert cli.main(["fit", "--data", "data/train", "--test", "data/test", "--val", "data/val", "--keep", "best",
                     "--eval-every", "2", "--loggers", "csv", "--optimizer", "adamw", "--lr-schedule", "cosine",
                     "--warmup-iterations", "1", "--iterations", "4", "--checkpoint-every", "2", "--method", "l2",
                     "--model", "resnet18", "--weights", "w.pt", "--resize", "16", "--crop", "16", "--batch-size",
                     "4", "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    history = [json.loads(line) for line in open(out / "history.jsonl")]
    scores = [h.get("val_top1") for h in history]
    assert [h.get("val_images") for h in history] == [None, 8, None, 8] and "test_top1" not in history[1]
    assert result["best_val_top1"] == max(s for s in scores if s is not None) and result["stopped_early"] is False
    assert result["settings"]["val"] == "data/val" and result["data"]["val"]["num_samples"] == 8
    assert len(list(csv.DictReader(open(out / "history.csv")))) == 4
    os.remove(out / "checkpoints" / "ckpt-00000004.pt")
    monkeypatch.chdir(tmp_path / "data")
    capsys.readouterr()
    assert cli.main(["fit", "--resume", str(out)]) == 0
    resumed = json.loads((out / "result.json").read_text())
    assert resumed["settings"]["resumed_from_iteration"] == 2
    assert {k: resumed[k] for k in ("best_iteration", "best_val_top1")} == \
        {k: result[k] for k in ("best_iteration", "best_val_top1")}
    given = cli.given_settings(cli.build_parser().parse_args(
        ["fit", "--data", "D", "--val", "V", "--val-fraction", "0.2", "--keep", "best", "--early-stopping-patience",
         "3", "--loggers", "csv,tensorboard", "--optimizer", "adamw", "--adamw-weight-decay", "0.01",
         "--lr-schedule", "cosine", "--warmup-iterations", "5"]))
    assert given == {"val": "V", "val_fraction": 0.2, "keep": "best", "early_stopping_patience": 3,
                     "loggers": ["csv", "tensorboard"], "optimizer": "adamw", "adamw_weight_decay": 0.01,
                     "lr_schedule": "cosine", "warmup_iterations": 5}


class StopAtThree(Callback):
    def on_step(self, run, iteration, record):
        if iteration == 3:
            run.request_stop("three")


@pytest.mark.parametrize("deferred", [False, True])
def test_with_deferred_reads_adamw_cancels_a_failed_step_and_a_stop_is_checkpointed_where_it_is(deferred, tmp_path):
    """The training loop's CUDA mode (deferred reads, guarded fused update) on the CPU, below fit."""
    from fastdelta.train.checkpoint import load_latest
    from test_loop import run
    checked, _, error = run("l2_sp", optimizer="adamw", poison_at=3)
    guarded, history, error = run("l2_sp", optimizer="adamw", poison_at=3, deferred=deferred)
    assert error is not None and len(history) == 3  # the poisoned step 3 cancelled, its update never applied
    # conv1's bias feeds batch norm, so its gradient is zero up to rounding, and Adam scales that rounding
    # noise to a full lr-sized step: fused and foreach AdamW round differently there (and in bn1's running
    # mean, which sees that bias); every parameter with a real gradient must agree
    noise_only = {"conv1.bias", "bn1.running_mean"}
    for (k, v), w in zip(checked.state_dict().items(), guarded.state_dict().values()):
        if k not in noise_only:
            torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)
    target, history, _ = run("l2_sp", optimizer="adamw", iterations=6, deferred=deferred, callbacks=[StopAtThree()],
                             checkpoint_dir=tmp_path, checkpoint_every=100)
    # checked: right after step 3; deferred: step 4 was queued before step 3 was read, so it ends after it
    assert len(history) == (4 if deferred else 3)
    assert os.listdir(tmp_path) == [f"ckpt-{len(history):08d}.pt"]  # none written while a step was queued
    ckpt = load_latest(tmp_path)
    assert ckpt["iteration"] == len(history) and ckpt["history"] == history
    for k, v in target.state_dict().items():
        assert torch.equal(ckpt["model"][k], v), k
