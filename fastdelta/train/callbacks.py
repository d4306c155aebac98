"""Callbacks of the training loop (as Lightning's): what runs beside the steps without being part of them.

A `Callback` is told, by the loop (`fastdelta.train.loop._Run`, passed to every hook as `run`):

- `on_start(run)`: before the first step of this process (a resumed run: after its state was restored);
- `on_step(run, iteration, record)`: after each step, `iteration` the steps done (1-based) and `record` that
  step's history line, which it may add fields to (they reach history.jsonl and the loggers);
- `on_eval(run, iteration, metrics)`: when a callback evaluated the model (`run.evaluated(...)`), e.g. the
  validation top-1 (`{"val_top1": ..., "val_images": ...}`);
- `on_checkpoint(run, iteration, path)`: after a checkpoint was written (rank 0; `path` None on other ranks);
- `on_end(run, history)`: after the last step (also after an early stop), before the loop returns;
- `teardown(run)`: always, last, also when the training failed or was stopped (close files here).

A callback that evaluates the model names the iterations in `reads_model(iteration)`: the loop then finishes
that step before queuing the next one. `run.request_stop(reason)` ends the training after the current step
(early stopping) and writes a checkpoint there; with deferred reads (CUDA) a step is queued before the one
before it is read, so a stop requested after an iteration that `reads_model` does not name ends one step later. A callback with state to survive a resume sets `state_key` and implements `state_dict()`
/ `load_state_dict()`: the state is stored in every checkpoint, so it must hold only tensors, numbers,
strings, bools, None, lists and dicts (checkpoints are read with torch's weights_only allow-list). It must
leave the model's train/eval mode as it found it.

fastdelta's own: `ValidationEvaluator` (val_top1 every eval_every iterations and at the last one),
`BestWeights` (keep="best": the best validation state, in CPU memory), `EarlyStopping`
(early_stopping_patience), `CSVLogger` (RUN/history.csv) and `TensorBoardLogger` (RUN/tensorboard/).
"""
from __future__ import annotations

import csv
import io
import math
import numbers
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..output_files import atomic_write_text
from ..settings import SettingsError


class Callback:
    """A hook into the training loop; every method does nothing unless overridden (see the module doc)."""
    state_key: Optional[str] = None  # the name its state_dict() is checkpointed under (None: no state)

    def on_start(self, run) -> None:
        pass

    def on_step(self, run, iteration: int, record: dict) -> None:
        pass

    def on_eval(self, run, iteration: int, metrics: dict) -> None:
        pass

    def on_checkpoint(self, run, iteration: int, path: Optional[Path]) -> None:
        pass

    def on_end(self, run, history: list) -> None:
        pass

    def teardown(self, run) -> None:
        pass

    def reads_model(self, iteration: int) -> bool:
        """Whether on_step reads the model after `iteration` steps (the loop then waits for that step)."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ValidationEvaluator(Callback):
    """val_top1 (and val_images) in the history every `every` iterations (0: none but the last) and at the
    last one; each result is passed on to every callback's on_eval."""

    def __init__(self, loader, every: int, iterations: int):
        self.loader, self.every, self.iterations = loader, every, iterations

    def reads_model(self, iteration: int) -> bool:
        return (self.every > 0 and iteration % self.every == 0) or iteration == self.iterations

    def on_step(self, run, iteration: int, record: dict) -> None:
        if not self.reads_model(iteration):
            return
        from .evaluate import evaluate
        was_training = run.target.training  # evaluate() leaves eval mode; L2-FE trains in eval mode
        metrics = evaluate(run.target, self.loader, run.device, False, "val", run.ctx)
        run.target.train(was_training)
        record["val_top1"], record["val_images"] = metrics["top1"], metrics["images"]
        run.evaluated(iteration, {"val_top1": metrics["top1"], "val_images": metrics["images"]})


class _Best:
    """The best validation top-1 seen and its iteration (a strictly higher score is an improvement)."""

    def __init__(self):
        self.best_val_top1: Optional[float] = None
        self.best_iteration: Optional[int] = None

    def improves(self, metrics: dict) -> bool:
        score = metrics.get("val_top1")
        return score is not None and math.isfinite(score) and (self.best_val_top1 is None or score > self.best_val_top1)


class BestWeights(_Best, Callback):
    """Tracks the best validation top-1; with keep=True holds a CPU copy of that state dict and puts it in
    the model at the end (model.pt, the test and the returned model are then the best weights)."""
    state_key = "best_weights"

    def __init__(self, keep: bool):
        super().__init__()
        self.keep = keep
        self.state: Optional[Dict[str, torch.Tensor]] = None

    def on_eval(self, run, iteration: int, metrics: dict) -> None:
        if not self.improves(metrics):
            return
        self.best_val_top1, self.best_iteration = float(metrics["val_top1"]), iteration
        if self.keep:
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in run.target.state_dict().items()}

    def on_end(self, run, history: list) -> None:
        if self.keep and self.state is not None:
            run.target.load_state_dict(self.state)

    def state_dict(self) -> dict:
        return {"best_val_top1": self.best_val_top1, "best_iteration": self.best_iteration, "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.best_val_top1, self.best_iteration = state.get("best_val_top1"), state.get("best_iteration")
        self.state = state.get("state") if self.keep else None


class EarlyStopping(_Best, Callback):
    """Stops the training once validation top-1 has not improved for `patience` evaluations in a row."""
    state_key = "early_stopping"

    def __init__(self, patience: int):
        super().__init__()
        self.patience = patience
        self.since = 0  # evaluations since the last improvement
        self.stopped_at: Optional[int] = None

    def on_start(self, run) -> None:
        if self.stopped_at is not None:  # a resumed run that had stopped: no further step
            run.request_stop(f"early stopping at iteration {self.stopped_at}")

    def on_eval(self, run, iteration: int, metrics: dict) -> None:
        if "val_top1" not in metrics:
            return
        if self.improves(metrics):
            self.best_val_top1, self.best_iteration, self.since = float(metrics["val_top1"]), iteration, 0
            return
        self.since += 1
        if self.since >= self.patience and iteration < run.spec.iterations:
            self.stopped_at = iteration
            run.request_stop(f"early stopping: validation top-1 has not improved for {self.since} evaluations "
                             f"(best {self.best_val_top1:.2f}% at iteration {self.best_iteration})")

    def state_dict(self) -> dict:
        return {"best_val_top1": self.best_val_top1, "best_iteration": self.best_iteration, "since": self.since,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.best_val_top1, self.best_iteration = state.get("best_val_top1"), state.get("best_iteration")
        self.since, self.stopped_at = state.get("since", 0), state.get("stopped_at")


def selection_record(callbacks: Sequence[Callback]) -> dict:
    """result.json's best_iteration, best_val_top1 and stopped_early (empty without a validation set)."""
    best = next((c for c in callbacks if isinstance(c, BestWeights)), None)
    early = next((c for c in callbacks if isinstance(c, EarlyStopping)), None)
    if best is None:
        return {}
    return {"best_iteration": best.best_iteration, "best_val_top1": best.best_val_top1,
            "stopped_early": early is not None and early.stopped_at is not None}


def saved_selection(states: Optional[dict]) -> dict:
    """selection_record from a checkpoint's callback states (a finished run's)."""
    states = states or {}
    best, early = states.get("best_weights"), states.get("early_stopping")
    if best is None:
        return {}
    return {"best_iteration": best.get("best_iteration"), "best_val_top1": best.get("best_val_top1"),
            "stopped_early": bool(early and early.get("stopped_at") is not None)}


def stopped_early(states: Optional[dict]) -> bool:
    """Whether a checkpoint's callback states say the run stopped early (so it has finished)."""
    early = (states or {}).get("early_stopping")
    return bool(early and early.get("stopped_at") is not None)


# ---- loggers: the history beside history.jsonl ----

class LoggerUnavailableError(SettingsError):
    """A logger in `loggers` needs a package that is not installed; the message says which to install."""


def _scalar(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class CSVLogger(Callback):
    """RUN/history.csv: one row per iteration, the fields of history.jsonl (a field first seen later, e.g.
    val_top1, adds a column: the file is then rewritten whole, otherwise rows are appended). Rewritten from
    the checkpoint's history on resume, as history.jsonl is."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.columns: List[str] = []

    def on_start(self, run) -> None:
        self._rewrite(run)

    def on_step(self, run, iteration: int, record: dict) -> None:
        if any(k not in self.columns for k in record):
            self._rewrite(run)
            return
        with self._failures(run):
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(record)

    def _rewrite(self, run) -> None:
        for h in run.history:
            self.columns += [k for k in h if k not in self.columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns)
        writer.writeheader()
        writer.writerows(run.history)
        with self._failures(run):
            atomic_write_text(self.path, buf.getvalue())

    def _failures(self, run):
        from contextlib import contextmanager

        from .checkpoint import write_failed

        @contextmanager
        def failures():
            try:
                yield
            except OSError as e:
                raise write_failed(str(self.path), e, run.spec.checkpoint_dir) from e
        return failures()


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's module imports the tensorboard package
        raise LoggerUnavailableError("loggers=tensorboard needs the tensorboard package, which is not installed: "
                                     "pip install tensorboard (or leave tensorboard out of loggers)") from e
    return SummaryWriter


class TensorBoardLogger(Callback):
    """RUN/tensorboard/: every numeric field of each history line as a scalar at its iteration (a resumed run
    purges what the interrupted one logged after its checkpoint)."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.writer = None
        _summary_writer()  # a missing package is an error now, before any training

    def on_start(self, run) -> None:
        start = len(run.history)
        if not start and self.log_dir.is_dir():  # a new run in this folder: an earlier run's events go
            for old in self.log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = _summary_writer()(str(self.log_dir), purge_step=start if start else None)

    def on_step(self, run, iteration: int, record: dict) -> None:
        step = record.get("iteration", iteration - 1)
        for k, v in record.items():
            if k != "iteration" and _scalar(v) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def on_checkpoint(self, run, iteration: int, path) -> None:
        self.writer.flush()  # what a resume keeps is on disk

    def teardown(self, run) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


LOGGER_CLASSES = {"csv": lambda run_dir: CSVLogger(Path(run_dir) / "history.csv"),
                  "tensorboard": lambda run_dir: TensorBoardLogger(Path(run_dir) / "tensorboard")}


def check_loggers(names: Optional[Sequence[str]]) -> None:
    """A LoggerUnavailableError now, before any work, for a logger whose package is missing."""
    if names and "tensorboard" in names:
        _summary_writer()


def make_loggers(names: Optional[Sequence[str]], run_dir) -> List[Callback]:
    return [LOGGER_CLASSES[n](run_dir) for n in (names or [])]
