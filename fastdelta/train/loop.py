"""The training loop shared by every method (evaluation: `train.evaluate`).

One step: target forward (with taps), source forward (no grad, eval mode) when the method needs
its feature maps, loss = CE + reg + head, SGD with momentum, lr from the schedule. Each step's
stats (the terms, the gradient norm, the norm of the BN statistics) are checked for non-finite
values so that the model keeps its last good state: on the CPU before the update; on CUDA they are
read a step later (`train.deferred_reads`) while a device flag cancels a bad update and the BN statistics
are restored from a snapshot (`train.bn_buffers`).
"""
from __future__ import annotations

import errno
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..data.sampling import GlobalBatchSampler, SeededSamples
from ..methods import Method
from ..output_files import atomic_write_text
from ..progress import progress_bar
from .bn_buffers import BufferSnapshots
from .checkpoint import rng_state, save_checkpoint, set_rng_state, write_failed
from .deferred_reads import DeferredStats, StepTimer
from .distributed import DistContext
from .evaluate import flush_denormals
from .preempt import Preempted, StopRequest, ignore_stop_signals
from .prefetch import DevicePrefetcher
from .steps import STATS, FastStep, ReferenceStep, Step, StepOptions, StepOutput, mean_over_ranks


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/inf loss term; the model holds the last good weights."""

    def __init__(self, iteration: int, term: str, value: float, history: list, weights_finite: bool = True):
        what = {"gradient": "gradient norm", "bn_statistics": "BatchNorm running statistics",
                "lr": "learning rate from the lr schedule"}.get(term, f"loss term {term!r}")
        state = f"its state after iteration {iteration - 1}" if iteration else "its starting state (no step was taken)"
        if weights_finite:
            hint = "check lr_schedule, lr_step and lr_gamma" if term == "lr" else "try a smaller alpha or lr"
            super().__init__(f"non-finite {what} at iteration {iteration} ({value}); training stopped, the model "
                             f"keeps {state}, BN statistics included ({hint})")
        else:  # a step with finite terms whose update overflowed (e.g. a too large lr): nothing good is left
            lr = history[-1].get("lr") if history else None
            super().__init__(f"non-finite {what} at iteration {iteration} ({value}); training stopped, but the update "
                             f"of iteration {iteration - 1} (lr {lr}) had already made the weights NaN or infinite: "
                             "the model holds no good state and is not saved (try a smaller lr)")
        self.iteration, self.term, self.value, self.history = iteration, term, value, history
        self.weights_finite = weights_finite
        self.partial_result = None  # filled in by fit()


def resolve_workers(num_workers: Optional[int]) -> int:
    """None: no worker processes on a 2-core machine (they only compete with the model), else up to 8."""
    if num_workers is None:
        cores = os.cpu_count() or 1
        return 0 if cores <= 2 else min(8, cores - 1)
    return num_workers


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: Optional[int]) -> DataLoader:
    """Evaluation / attention loader (training batches come from make_train_loader)."""
    num_workers = resolve_workers(num_workers)
    g = torch.Generator().manual_seed(seed)
    # workers ignore SIGTERM/SIGINT as the training loader's do: the main process stops them
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers,
                      persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals)


def lr_at(iteration: int, base_lr: float, schedule: str, step: int, gamma: float, warmup: int = 0,
          total: int = 0) -> float:
    """The lr of step `iteration` (0-based): a linear warm-up from 0 over the first `warmup` steps, then the
    schedule; "cosine" goes from base_lr at the warm-up's end to 0 at `total` (the run's iterations)."""
    if iteration < warmup:
        return base_lr * iteration / warmup
    if schedule == "step":
        return base_lr * (gamma if iteration >= step else 1.0)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * (iteration - warmup) / max(1, total - warmup)))
    return base_lr * gamma ** (iteration / step)  # "exp": reaches gamma x at `step`, keeps decaying


@dataclass
class TrainSpec:
    iterations: int
    lr: float
    momentum: float
    batch_size: int                    # the global batch (all ranks together)
    seed: int = 0
    lr_schedule: str = "step"
    lr_step: int = 1
    lr_gamma: float = 0.1
    num_workers: Optional[int] = 0
    progress: bool = True
    desc: str = "train"
    checkpoint_dir: Optional[Path] = None  # None: no checkpoints
    checkpoint_every: int = 0
    history_path: Optional[Path] = None    # streamed history.jsonl (one line per iteration, flushed)
    payload_extra: dict = field(default_factory=dict)  # stored in every checkpoint (identity, attention)
    # called after each step with (iterations done, that step's history record); it may add fields to
    # the record (e.g. a periodic test accuracy for learning curves) before it is written, and must leave
    # the model's train/eval mode as it found it
    on_step: Optional[Callable[[int, dict], None]] = None
    # None: the reference step (eager fp32, hooks, parameter norms in autograd); else the fast step
    # engine of fastdelta/train/steps.py with these options (precision, channels_last, compile, CUDA graphs)
    step: Optional[StepOptions] = None
    # None: the torchvision DataLoader below; else (start_iteration, ctx) -> endless iterable of (x, y)
    # batches, e.g. a DALI pipeline (fastdelta/data/dali.py) with the same batches and crops
    loader: Optional[Callable] = None
    # the iterations (counted as done) after which on_step reads the model (e.g. an evaluation): the loop
    # then does not queue the next step before calling it
    on_step_reads_model: Optional[Callable[[int], bool]] = None
    # read each step's stats one step late and cancel failed updates on the device; None: on CUDA
    deferred_reads: Optional[bool] = None
    nesterov: bool = False
    backbone_lr_mult: float = 1.0          # lr of the non-head parameters = lr * this
    extractor_bn: str = "frozen"           # L2-FE: "frozen" (eval mode) or "train" (BN statistics adapt)
    optimizer: str = "sgd"                 # "sgd" or "adamw" (fastdelta.train.optim.make_optimizer)
    weight_decay: float = 0.0              # AdamW's decoupled weight decay (the method's terms are separate)
    warmup_iterations: int = 0             # linear lr warm-up from 0 (lr_at)
    # fastdelta.train.callbacks.Callback objects, called in this order after on_step (their state is
    # checkpointed under their state_key)
    callbacks: list = field(default_factory=list)


@dataclass
class StartState:
    """Where a resumed run continues: the next iteration, what came before, optimizer and RNG."""
    iteration: int = 0
    history: list = field(default_factory=list)
    optimizer: Optional[dict] = None
    rng: Optional[dict] = None
    step_choice: Optional[str] = None  # the engine `auto` chose on a CPU when the run started
    cpu_threads: Optional[int] = None  # torch's CPU threads when the checkpoint was written (None: not recorded)
    callbacks: Optional[dict] = None  # the callbacks' states, by state_key


def make_train_loader(dataset: Dataset, spec: TrainSpec, start_iteration: int, ctx: DistContext,
                      device: Optional[torch.device] = None) -> DataLoader:
    if spec.loader is not None:
        return spec.loader(start_iteration, ctx)
    sampler = GlobalBatchSampler(len(dataset), spec.batch_size, spec.seed, start_iteration, ctx.rank, ctx.world_size)
    # pinned batches let the copy to a GPU run asynchronously (DevicePrefetcher)
    return DataLoader(SeededSamples(dataset), batch_sampler=sampler, num_workers=resolve_workers(spec.num_workers),
                      pin_memory=device is not None and device.type == "cuda", worker_init_fn=ignore_stop_signals)


def param_groups(reg: Method, params: Sequence[torch.Tensor], backbone_lr_mult: float = 1.0) -> List[dict]:
    """SGD parameter groups: one, or with backbone_lr_mult != 1 the head's and the rest's (its "lr_mult")."""
    params = list(params)
    if backbone_lr_mult == 1.0:
        return [{"params": params, "lr_mult": 1.0}]
    head = {id(p) for p in reg.head_params}
    groups = [{"params": [p for p in params if id(p) in head], "lr_mult": 1.0},
              {"params": [p for p in params if id(p) not in head], "lr_mult": float(backbone_lr_mult)}]
    return [g for g in groups if g["params"]]


def train_loop(target: nn.Module, source: nn.Module, reg: Method, dataset: Dataset, spec: TrainSpec,
               device: torch.device, ctx: DistContext = DistContext(), start: Optional[StartState] = None) -> List[dict]:
    """Train `target` in place from `start` (default: iteration 0); returns the whole history.

    With deferred reads (default on CUDA) nothing in an iteration waits for the device: step t's stats
    are read once step t+1 is queued, a non-finite step is cancelled on the device (and every later one
    until the host sees it), and the loop waits only where the model itself is needed (a checkpoint, an
    evaluation, the end). Otherwise every step is read and checked before its update, as on the CPU."""
    start = start or StartState()
    params = reg.trainable_parameters(target)
    set_training_mode(target, reg, params, spec.extractor_bn)
    check_world_size(reg, ctx)
    deferred = uses_deferred_reads(spec, device)
    stepper = build_step(target, source, reg, param_groups(reg, params, spec.backbone_lr_mult), spec, device, ctx,
                         guarded=deferred)
    if start.optimizer is not None:
        stepper.opt.load_state_dict(start.optimizer)
    run = _Run(target, stepper, dataset, spec, device, ctx, start, deferred)
    try:
        for cb in run.callbacks:
            cb.on_start(run)
        run.steps()
        for cb in run.callbacks:
            cb.on_end(run, run.history)
    finally:
        run.writer.close()
        for cb in run.callbacks:
            cb.teardown(run)
        stepper.close()
        target.requires_grad_(True)
    ctx.barrier()  # rank 0's last checkpoint is on disk before anyone moves on
    return run.history


def set_training_mode(target: nn.Module, reg: Method, params: Sequence[torch.Tensor], extractor_bn: str) -> None:
    """Only `params` train; the rest of the model is in train mode too, except under L2-FE, whose
    extractor is fixed: its weights, and its BN statistics unless extractor_bn is "train"."""
    if reg.freezes_extractor:
        target.requires_grad_(False).train(extractor_bn == "train")
        for p in params:
            p.requires_grad_(True)
    else:
        target.requires_grad_(True).train()


def check_world_size(reg: Method, ctx: DistContext) -> None:
    """The method's terms are scaled for a number of ranks (their gradients are averaged over them)."""
    if ctx.active and reg.sum_scale != ctx.world_size:
        raise ValueError(f"the method was built for world_size={reg.sum_scale:g}, but {ctx.world_size} ranks train")


def uses_deferred_reads(spec: TrainSpec, device: torch.device) -> bool:
    """spec.deferred_reads, by default on CUDA (not with fp16's GradScaler, which reads its own overflow
    flag on the host anyway)."""
    if spec.deferred_reads is not None:
        return spec.deferred_reads
    return device.type == "cuda" and not (spec.step is not None and spec.step.precision == "fp16")


def build_step(target: nn.Module, source: nn.Module, reg: Method, groups: List[dict], spec: TrainSpec,
               device: torch.device, ctx: DistContext, guarded: bool) -> Step:
    """The reference step (spec.step None) or the fast step with spec.step's options."""
    make_step = ReferenceStep if spec.step is None else partial(FastStep, options=spec.step)
    return make_step(target, source, reg, groups, device=device, lr=spec.lr, momentum=spec.momentum, ctx=ctx,
                     nesterov=spec.nesterov, guarded=guarded, optimizer=spec.optimizer, weight_decay=spec.weight_decay)


class _Run:
    """One train_loop call once its step is built: the batches, the history and its file, checkpoints,
    stop signals, and the steps queued but not yet read."""

    def __init__(self, target: nn.Module, stepper: Step, dataset: Dataset, spec: TrainSpec, device: torch.device,
                 ctx: DistContext, start: StartState, deferred: bool):
        self.target, self.stepper, self.spec, self.device, self.ctx = target, stepper, spec, device, ctx
        self.start_iteration, self.deferred = start.iteration, deferred
        self.history = list(start.history)
        self.batches = DevicePrefetcher(iter(make_train_loader(dataset, spec, start.iteration, ctx, device)), device)
        if start.rng is not None:  # after the loader drew its seed, as in the uninterrupted run
            set_rng_state(start.rng)
        self.writer = HistoryWriter(spec.history_path if ctx.is_main else None, self.history, spec.checkpoint_dir)
        # with a run folder, SIGTERM/SIGINT end the step in progress, then a checkpoint and Preempted
        self.stop = StopRequest(ctx, device, enabled=spec.checkpoint_dir is not None)
        self.checkpointed = None  # the iteration of the last checkpoint written
        self.snapshots = BufferSnapshots(target, slots=2 if deferred else 1)
        self.reads = DeferredStats(device, len(STATS) + 1) if deferred else None  # + the BN statistics' norm
        self.timer = StepTimer(device)
        self.t_start = time.perf_counter()
        self.bar = None
        self.healthy = None  # deferred reads: no step has failed (a device flag)
        self.pending = None  # deferred reads: (iteration, lr, data seconds) queued but not yet read
        self.callbacks = list(spec.callbacks)
        self.stop_reason = None  # set by a callback (request_stop): no step after the current one
        for cb in self.callbacks:
            if cb.state_key is not None and start.callbacks and cb.state_key in start.callbacks:
                cb.load_state_dict(start.callbacks[cb.state_key])

    def request_stop(self, reason: str) -> None:
        """A callback ends the training after the current step (e.g. early stopping)."""
        self.stop_reason = reason

    def evaluated(self, iteration: int, metrics: dict) -> None:
        """A callback evaluated the model after `iteration` steps: every callback's on_eval hears it."""
        for cb in self.callbacks:
            cb.on_eval(self, iteration, metrics)

    def steps(self) -> None:
        """Every iteration from the start to spec.iterations, unless a stop signal or a non-finite step ends it."""
        spec, shown = self.spec, self.spec.progress and self.ctx.is_main
        with self.stop.installed(), progress_bar(spec.iterations, spec.desc, "it", shown) as self.bar, \
                flush_denormals(self.device):
            self.bar.update(self.start_iteration)
            self.healthy = torch.ones((), dtype=torch.bool, device=self.device)
            for it in range(self.start_iteration, spec.iterations):
                if self.stop_reason is not None:  # a callback stopped the training: a checkpoint there, no step
                    if self.pending is not None:
                        self.finish(*self.pending, None)
                        self.pending = None
                    self.checkpoint_stopped()
                    break
                if self.stop.poll():  # a stop signal: no further step; the one queued is read first
                    if self.pending is not None:
                        self.finish(*self.pending, None)
                    raise self.preempt(it)
                self.step(it)
            if self.stop.final():  # a signal during the last step: stop before the evaluation as well
                raise self.preempt(spec.iterations if self.stop_reason is None else len(self.history))

    def step(self, it: int) -> None:
        """Iteration `it`: its batch, forward and backward, then the update, checked now or a step later."""
        t0 = time.perf_counter()
        x, y = next(self.batches)
        t_data = time.perf_counter() - t0
        lr = lr_at(it, self.spec.lr, self.spec.lr_schedule, self.spec.lr_step, self.spec.lr_gamma,
                   self.spec.warmup_iterations, self.spec.iterations)
        if not math.isfinite(lr):  # checked before the update it would poison (its loss is still finite)
            if self.pending is not None:
                self.finish(*self.pending, None)
                self.pending = None
            raise NonFiniteLossError(it, "lr", lr, self.history)
        self.snapshots.save(it)
        self.timer.start(it)
        # + the BN statistics' norm; one all-reduce makes every rank read the same stats
        stats = mean_over_ranks(torch.cat([self.stepper.forward_backward(x, y, lr), self.snapshots.norm(like=x)]),
                                self.ctx)
        if self.deferred:
            self.update_deferred(it, lr, t_data, stats)
        else:
            self.update_checked(it, lr, t_data, stats)

    def update_checked(self, it: int, lr: float, t_data: float, stats: torch.Tensor) -> None:
        """The stats read and checked before the update, as on the CPU."""
        out = StepOutput.read(stats)
        self.check(it, out)
        self.stepper.update()
        self.timer.stop(it)
        self.finish(it, lr, t_data, out)

    def update_deferred(self, it: int, lr: float, t_data: float, stats: torch.Tensor) -> None:
        """The update cancelled on the device if this step (or an earlier one) is not finite; the previous
        step read now, this one after the next is queued (or now, before the model itself is read)."""
        self.healthy = self.healthy & self.stepper.finite_on_device(stats)
        self.stepper.update(self.healthy)
        self.timer.stop(it)
        self.reads.push(it, stats)
        if self.pending is not None:
            self.finish(*self.pending, None)
        self.pending = (it, lr, t_data)
        if self.sync_point(it + 1):
            self.finish(*self.pending, None)
            self.pending = None

    def sync_point(self, done: int) -> bool:
        """After these iterations the model itself is read: the next step must not be queued yet."""
        spec = self.spec
        return (done == spec.iterations or (spec.checkpoint_dir is not None and spec.checkpoint_every > 0
                                            and done % spec.checkpoint_every == 0)
                or (spec.on_step_reads_model is not None and spec.on_step_reads_model(done))
                or any(cb.reads_model(done) for cb in self.callbacks))

    def check(self, it: int, out: StepOutput) -> None:
        """A non-finite step stops the run; its update never happened and its BN statistics are restored
        (every rank sees the same averaged values, so all stop together)."""
        bad = self.stepper.first_nonfinite(out)
        if bad is not None:
            self.snapshots.restore(it)
            weights_finite = all(bool(torch.isfinite(p).all()) for p in self.target.parameters())
            raise NonFiniteLossError(it, *bad, self.history, weights_finite=weights_finite)

    def finish(self, it: int, lr: float, t_data: float, out: Optional[StepOutput]) -> None:
        """Step `it` as the host sees it (`out` None: a deferred step, read and checked now), then logged,
        handed to on_step and checkpointed."""
        if out is None:
            out = self.reads.pop(it)
            self.check(it, out)
        t_step = t_data + self.timer.seconds(it)
        self.history.append(self.record(it, lr, t_data, t_step, out))
        done = it + 1
        spec = self.spec
        if spec.on_step is not None:
            spec.on_step(done, self.history[-1])
        for cb in self.callbacks:
            cb.on_step(self, done, self.history[-1])
        self.writer.append(self.history[-1])
        if spec.checkpoint_dir is not None and spec.checkpoint_every > 0 and (
                done % spec.checkpoint_every == 0 or done == spec.iterations):
            self.checkpoint(done)
        self.bar.update(1)
        if it % 5 == 0 or done == spec.iterations:
            self.bar.set_postfix(loss=f"{self.history[-1]['loss']:.4g}",
                                 img_s=f"{spec.batch_size / max(t_step, 1e-9):.0f}")

    def record(self, it: int, lr: float, t_data: float, t_step: float, out: StepOutput) -> dict:
        """Step `it`'s line of the history."""
        return {"iteration": it, **out.values, "loss": out.values["ce"] + out.values["reg"] + out.values["head"],
                "grad_norm": out.grad_norm, "lr": lr, "train_acc": out.train_acc,
                "data_s": round(t_data, 5), "step_s": round(t_step, 5),
                "elapsed_s": round(time.perf_counter() - self.t_start, 3)}

    def checkpoint(self, done: int) -> None:
        path = None
        if self.ctx.is_main:
            states = {cb.state_key: cb.state_dict() for cb in self.callbacks if cb.state_key is not None}
            path = save_checkpoint(self.spec.checkpoint_dir, done, {
                "iteration": done, "model": self.target.state_dict(), "optimizer": self.stepper.opt.state_dict(),
                "rng": rng_state(), "history": self.history, **({"callbacks": states} if states else {}),
                **self.spec.payload_extra})
        self.checkpointed = done
        for cb in self.callbacks:
            cb.on_checkpoint(self, done, path)

    def checkpoint_stopped(self) -> None:
        """A callback stopped the training (nothing queued any more): a checkpoint where it stopped, so that a
        resume knows (the callbacks' states say why), unless written already or no step was taken."""
        done, spec = len(self.history), self.spec
        if (spec.checkpoint_dir is not None and spec.checkpoint_every > 0 and done > self.start_iteration
                and self.checkpointed != done):
            self.checkpoint(done)

    def preempt(self, done: int) -> Preempted:
        """After a stop signal, with `done` steps finished: a checkpoint there (unless just written)."""
        if self.checkpointed != done:
            self.checkpoint(done)
        self.ctx.barrier()  # rank 0's checkpoint is on disk before any rank exits
        return self.stop.preempted(done, self.spec.checkpoint_dir)


class HistoryWriter:
    """history.jsonl written as training goes (a killed run keeps what it did); rewritten from
    the checkpoint's history on resume, so the file always matches the run. A failed write (disk
    full, read-only) is cut back to the last whole line and raised as an OutputError that names the
    checkpoint in `checkpoint_dir` to resume from."""

    def __init__(self, path: Optional[Path], history: list, checkpoint_dir: Optional[Path] = None):
        self.f, self.path, self.checkpoint_dir = None, path, checkpoint_dir
        if path is not None:
            with self._failures():
                # replaced whole: if that fails, the previous file is still there as it was
                atomic_write_text(path, "".join(json.dumps(h) + "\n" for h in history))
                self.f = open(path, "ab", buffering=0)  # unbuffered: a line is in the file once append returns

    def append(self, record: dict) -> None:
        if self.f is not None:
            with self._failures():
                self._write((json.dumps(record) + "\n").encode())

    def _write(self, line: bytes) -> None:
        end = self.f.tell()
        try:
            if self.f.write(line) != len(line):  # a file takes a short write only when the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            try:
                self.f.truncate(end)  # no torn last line (a full disk allows this, a read-only one not)
            except OSError:
                pass
            raise

    @contextmanager
    def _failures(self):
        try:
            yield
        except OSError as e:
            raise write_failed(str(self.path), e, self.checkpoint_dir) from e

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


