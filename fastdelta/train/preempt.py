"""Preemption: SIGTERM (how clusters stop a job, SIGKILL following after a grace period) or SIGINT
(Ctrl-C) while training ends the step in progress; the loop then writes a checkpoint at that
iteration and raises Preempted, and `fit(..., resume=True)` continues bit for bit.

Outside the training loop (reading the data, the channel attention, the test) there is no step to
finish and nothing to checkpoint: `StopOutsideTraining` stops at once with a Preempted that says what
was kept. Handlers are installed in the main thread only (the only one Python delivers signals to), never
over an ignored signal, and the previous ones are put back afterwards.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import checkpoint_files, checkpoint_path, resume_command
from .distributed import DistContext

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """A run stopped by SIGTERM/SIGINT: while training after writing a checkpoint at `iteration`, which
    resume=True continues; outside the training loop at once (`iteration` None, `checkpoint` the last
    one kept, if any), the message saying what was kept."""

    def __init__(self, signal_name: str, iteration: Optional[int], checkpoint: Optional[Path], run_dir,
                 message: Optional[str] = None):
        super().__init__(message or f"stopped by {signal_name} at iteration {iteration}; checkpoint written to "
                                    f"{checkpoint}; resume with resume=True (CLI: {resume_command(run_dir)})")
        self.signal_name, self.iteration, self.checkpoint, self.run_dir = signal_name, iteration, checkpoint, run_dir


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: a scheduler signals every process of the job, and a worker killed
    by it would fail the main process mid-step; the main process stops its workers itself."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _installed(handler):
    """`handler` for SIGTERM and SIGINT, in the main thread only and not over an ignored signal (a job
    started with nohup or `&` keeps ignoring it); the previous handlers are put back on exit."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}


def _restore(previous: dict) -> None:
    for s, handler in previous.items():  # None: a handler set outside Python, not restorable
        signal.signal(s, signal.SIG_DFL if handler is None else handler)


class StopOutsideTraining:
    """SIGTERM/SIGINT while a run reads its data, measures the channel attention or tests: stop at once
    (the work in progress cannot be checkpointed) with a Preempted naming the phase and what was kept.
    The training loop installs its own handler over this one while it runs."""

    def __init__(self, run_dir=None, phase: str = "reading the data, before training"):
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.phase = phase  # what the run is doing, as in "stopped by SIGTERM while <phase>"
        self.cached_attention: Optional[Path] = None  # the attention cache folder, once it holds this run's

    def _handle(self, signum, _frame) -> None:
        raise self.preempted(signal.Signals(signum).name)

    @contextmanager
    def installed(self):
        previous = _installed(self._handle)
        try:
            yield self
        finally:
            _restore(previous)

    def preempted(self, signal_name: str) -> Preempted:
        # a new run refuses a folder with another run's checkpoints: any there are this run's
        files = checkpoint_files(self.run_dir / "checkpoints") if self.run_dir is not None else []
        if files:
            kept = (f"its last checkpoint {files[-1]} was kept: resume with resume=True "
                    f"(CLI: {resume_command(self.run_dir)})")
        elif self.cached_attention is not None:
            kept = (f"only the channel attention was kept, in the cache {self.cached_attention} (the next run "
                    "reads it); start the run again")
        else:
            kept = "nothing of this run was kept; start it again"
        return Preempted(signal_name, None, files[-1] if files else None, self.run_dir,
                         f"stopped by {signal_name} while {self.phase}: {kept}")


class StopRequest:
    """A SIGTERM/SIGINT received while installed, for the loop to stop between two steps. Under
    torch.distributed each rank's flag is summed over the ranks every iteration, so that all of them
    stop at the same one."""

    def __init__(self, ctx: DistContext, device: torch.device, enabled: bool = True):
        self.ctx, self.device, self.enabled = ctx, device, enabled
        self.signum: Optional[int] = None
        self.inflight = None  # the previous iteration's summed flag, on its way to the host

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once, without a checkpoint
        self.signum = signum

    @contextmanager
    def installed(self):
        """Never over an ignored signal (a job started with nohup or `&` keeps ignoring it)."""
        previous = _installed(self._handle) if self.enabled else {}
        try:
            yield self
        finally:
            _restore(previous)

    def poll(self) -> bool:
        """Whether to stop now; called by every rank before each step. Under torch.distributed the
        sum started one iteration earlier is acted on, so that on a GPU the loop never waits for it."""
        if not self.enabled:
            return False
        if not self.ctx.active:
            return self.signum is not None
        previous, self.inflight = self.inflight, self._summed()
        return previous is not None and self._read(previous)

    def final(self) -> bool:
        """Whether to stop after the last step (a signal during it): the same answer on every rank."""
        if not self.enabled:
            return False
        if not self.ctx.active:
            return self.signum is not None
        previous, self.inflight = self.inflight, None
        now = self._read(self._summed())
        return now or (previous is not None and self._read(previous))

    def _summed(self):
        flag = torch.full((1,), float(self.signum is not None), device=self.device)
        self.ctx.all_reduce_sum(flag)
        if flag.device.type != "cuda":
            return flag, None
        host = torch.empty(1, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(flag.device))
        return host, ready

    @staticmethod
    def _read(summed) -> bool:
        host, ready = summed
        if ready is not None:
            ready.synchronize()
        return host.item() > 0

    def preempted(self, iteration: int, checkpoint_dir: Path) -> Preempted:
        name = signal.Signals(self.signum).name if self.signum is not None else "a signal to another rank"
        return Preempted(name, iteration, checkpoint_path(checkpoint_dir, iteration), Path(checkpoint_dir).parent)
