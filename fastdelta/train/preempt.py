"""Preemption: SIGTERM (how clusters stop a job, SIGKILL following after a grace period) or SIGINT
(Ctrl-C) while training ends the step in progress; the loop then writes a checkpoint at that
iteration and raises Preempted, and `fit(..., resume=True)` continues bit for bit.

Handlers are installed for the training loop only, in the main thread only (the only one Python
delivers signals to), and the previous ones are put back afterwards.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import checkpoint_path
from .distributed import DistContext

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint; resume=True continues it."""

    def __init__(self, signal_name: str, iteration: int, checkpoint: Path, run_dir: Path):
        super().__init__(f"stopped by {signal_name} at iteration {iteration}; checkpoint written to {checkpoint}; "
                         f"resume with resume=True (CLI: fastdelta fit --resume {run_dir})")
        self.signal_name, self.iteration, self.checkpoint, self.run_dir = signal_name, iteration, checkpoint, run_dir


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: a scheduler signals every process of the job, and a worker killed
    by it would fail the main process mid-step; the main process stops its workers itself."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


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
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
        try:
            yield self
        finally:
            for s, handler in previous.items():  # None: a handler set outside Python, not restorable
                signal.signal(s, signal.SIG_DFL if handler is None else handler)

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
