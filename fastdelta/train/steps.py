"""The fast training step, one engine for all six methods.

`FastStep.forward_backward(x, y, lr)` then `FastStep.update()` does what the reference step of
`ReferenceStep` does (same loss, same history values, same non-finite rules), faster:

- precision: bf16 autocast (default on CUDA), fp16 autocast + GradScaler, or fp32 (the reference);
  loss terms are accumulated in fp32 either way;
- channels_last activations and weights (default on CUDA);
- the target's taps come from a torch.fx extractor sharing the target's modules (no hooks), the source
  is `fastdelta.features.source.SourceFeatures` (frozen, truncated after the last tap, BN folded where exact);
- the loss function (target forward, source forward, CE, feature-map term) is compiled with
  torch.compile(fullgraph=True) -- no graph break (tests/test_step.py checks it on CPU); the backward is
  compiled by AOTAutograd; CUDA graphs through mode "reduce-overhead" (`cuda_graphs=True`);
- parameter-norm terms (L2, L2-SP, L2-SP(ATT), the head's beta/wd term of L2/L2-SP/L2-FE) are not in
  the graph: `optim.PullSGD` adds their gradient after the backward with foreach ops and reports their
  value; the momentum update is torch SGD, fused on CUDA or when guarded, foreach otherwise;
- the step's stats (ce, reg, head, gradient norm, correct count) leave the device in one copy; the loop
  reads them before the update, or a step later with the update guarded (`GuardedUpdate`: a non-finite
  step is cancelled on the device); fp16's GradScaler skips such a step itself.

`resolve_step_options` maps the settings (`precision`, `compile`, `channels_last`, `cuda_graphs`,
`step_engine`) to a `StepOptions`, or to None for the reference step. On CPU "auto" everywhere gives
None: today's eager fp32 step, unchanged.
"""
from __future__ import annotations

import math
import types
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ..features.hooks import FeatureTaps
from ..features.source import source_features
from ..features.target import TargetFeatures
from ..methods import Method
from ..settings import COMPILE_MODES
from .distributed import DistContext
from .optim import grad_norm, make_optimizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the compile mode "auto" takes on CUDA; benchmarks/bench_step.py --compile-modes measures the others
DEFAULT_COMPILE_MODE = "default"


@dataclass
class StepOptions:
    precision: str = "fp32"          # "fp32" | "bf16" | "fp16"
    channels_last: bool = False
    compile: Optional[str] = None    # None: eager; else a torch.compile mode
    cuda_graphs: bool = False        # compile mode "reduce-overhead" (CUDA graph trees)
    fold_source_bn: bool = True      # fold the source's BN into its convs (never a tapped conv)
    fullgraph: bool = True           # compile with fullgraph=True (any graph break is an error)
    backend: str = "inductor"        # torch.compile backend ("eager"/"aot_eager": cheap checks in tests)

    def describe(self) -> dict:
        return {"step_engine": "fast", **asdict(self)}


def compile_mode(value) -> Optional[str]:
    """A settings value of `compile` as a torch.compile mode, or None for eager."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("off", "none", "false", "eager")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("on", "true")):
        return DEFAULT_COMPILE_MODE
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"compile={value!r}: expected 'auto', True/False or one of {COMPILE_MODES}")


def resolve_step_options(device: torch.device, precision: str = "auto", compile="auto", channels_last="auto",
                         cuda_graphs: bool = False, step_engine: str = "auto") -> Optional[StepOptions]:
    """StepOptions for the fast engine, or None for the reference step (eager fp32 with hooks).

    "auto": bf16 (fp16 where the card has no bf16) + channels_last + torch.compile on CUDA; on CPU
    fp32, eager, contiguous -- and then the reference step, today's behaviour and speed."""
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    cl = cuda if channels_last == "auto" else bool(channels_last)
    mode = (DEFAULT_COMPILE_MODE if cuda else None) if compile == "auto" else compile_mode(compile)
    if cuda_graphs:
        if not cuda:
            raise ValueError("cuda_graphs=True needs a CUDA device")
        if compile is False or (compile != "auto" and mode is None):
            raise ValueError("cuda_graphs=True works through torch.compile (mode 'reduce-overhead'): do not set compile=False")
        mode = "reduce-overhead"
    plain = precision == "fp32" and not cl and mode is None
    if step_engine == "reference" or (step_engine == "auto" and plain):
        if not plain:
            raise ValueError("step_engine='reference' is the eager fp32 step: precision, channels_last, compile "
                             "and cuda_graphs must be fp32/False")
        return None
    return StepOptions(precision, cl, mode, bool(cuda_graphs))


@dataclass
class StepOutput:
    values: Dict[str, float]   # ce, reg, head; in the loop, every stat is averaged over ranks
    grad_norm: float
    train_acc: float
    bn_norm: float = 0.0       # the norm of the BN statistics after the step (the loop appends it)

    @classmethod
    def read(cls, stats: torch.Tensor) -> "StepOutput":
        """The host view of a step's stats tensor (reading it waits for the step on a GPU)."""
        ce, reg, head, gnorm, acc, *bn = stats.tolist()
        return cls({"ce": ce, "reg": reg, "head": head}, gnorm, acc, bn[0] if bn else 0.0)

    def row(self) -> List[float]:
        """The stats in STATS order, the BN statistics' norm appended (what `read` took apart)."""
        return [self.values["ce"], self.values["reg"], self.values["head"], self.grad_norm, self.train_acc,
                self.bn_norm]


# a step's stats: one float64 device tensor, so that reading them is one copy, made when the loop chooses
STATS = ("ce", "reg", "head", "grad_norm", "train_acc")


def mean_over_ranks(stats: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """A step's stats (this rank's, the loop's BN norm appended) averaged over ranks in one all-reduce, so
    that every rank reads the same values and all stop together on a non-finite one."""
    if not ctx.active:
        return stats
    return ctx.all_reduce_sum(stats) / ctx.world_size


# The non-finite rule, declared once for the host and the device (Step.first_nonfinite, Step.finite_on_device):
# the loss terms, then the gradient norm (a finite loss can still give an infinite one; under fp16's
# GradScaler that is its signal to skip the step instead), then the norm of the BN statistics that the loop
# appends after STATS (a finite loss whose forward overflowed the running statistics). The first failing
# stat names the failure.
FAILURE_NAMES = ("ce", "reg", "head", "gradient", "train_acc", "bn_statistics")


def checked_stats(skips_nonfinite_grads: bool = False) -> Tuple[slice, slice]:
    """The parts of a step's stats (tensor or host row, STATS order) that must be finite, in checking order."""
    return slice(0, 3 if skips_nonfinite_grads else 4), slice(len(STATS), None)


class GuardedUpdate:
    """An optimizer step that a 0-d device flag can cancel without a host read: torch's fused SGD skips
    parameters and momentum buffers entirely when its `found_inf` is set (the mechanism GradScaler uses).
    Momentum buffers start at zero instead of being created by the first step (the same update: buf =
    0.9 * 0 + g = g), so that a cancelled first step leaves nothing behind either."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        self.buffers_ready = False  # at the first step, after any resumed optimizer state was loaded

    def step(self, ok: torch.Tensor) -> None:
        if not self.buffers_ready:
            for group in self.opt.param_groups:
                for p in group["params"]:
                    state = self.opt.state[p]
                    if group.get("momentum") and state.get("momentum_buffer") is None:  # SGD's (AdamW: none)
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.buffers_ready = True
        self.opt.grad_scale, self.opt.found_inf = None, (~ok).to(torch.float32)
        try:
            self.opt.step()
        finally:
            self.opt.found_inf = None


def as_groups(params: Sequence) -> List[dict]:
    """Trainable parameters, or SGD parameter groups (dicts with "params" and "lr_mult"), as groups."""
    groups = list(params)
    return groups if groups and isinstance(groups[0], dict) else [{"params": groups, "lr_mult": 1.0}]


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


class Step(ABC):
    """A training step engine as the loop drives it: `forward_backward(x, y, lr)` (loss, gradients and the
    stats tensor, STATS in float64 on the step's device; nothing updated yet), `update(ok=None)` (the
    optimizer step; `ok`, a device flag, cancels it without a host read and needs guarded=True), `close()`,
    the optimizer `opt` (its state is checkpointed), and the non-finite rule on either side of the device:
    `finite_on_device(stats)` and `first_nonfinite(out)`."""
    opt: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler] = None
    guard: Optional[GuardedUpdate] = None
    # fp16: an infinite gradient is the GradScaler's signal to lower the scale and skip the step
    skips_nonfinite_grads = False

    @abstractmethod
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """Loss and gradients; returns the stats (STATS, float64, on the step's device)."""

    @abstractmethod
    def close(self) -> None:
        """Undo what the step did to the networks it was given (hooks, memory layout)."""

    def finite_on_device(self, stats: torch.Tensor) -> torch.Tensor:
        """A 0-d bool tensor: every checked stat finite (`checked_stats`); no host synchronisation."""
        return torch.isfinite(torch.cat([stats[part] for part in checked_stats(self.skips_nonfinite_grads)])).all()

    def first_nonfinite(self, out: StepOutput) -> Optional[Tuple[str, float]]:
        """(name, value) of the first checked stat that is NaN/inf (`checked_stats`); None if all are finite."""
        row = out.row()
        for part in checked_stats(self.skips_nonfinite_grads):
            for name, v in zip(FAILURE_NAMES[part], row[part]):
                if not math.isfinite(v):
                    return name, v
        return None

    def update(self, ok: Optional[torch.Tensor] = None) -> None:
        """The optimizer step; `ok` (a device flag, guarded steps only) cancels it without a host read."""
        if self.scaler is not None:
            self.scaler.step(self.opt)  # skipped when unscale_ found an inf/NaN gradient
            self.scaler.update()
        elif ok is None:
            self.opt.step()
        else:
            self.guard.step(ok)


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """The model wrapped for DDP (gradients averaged over ranks)."""
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


class ReferenceStep(Step):
    """The reference step: eager fp32, forward hooks on the full networks, every term in autograd
    (guarded=True builds a fused SGD, whose update a device flag can cancel)."""

    def __init__(self, target: nn.Module, source: nn.Module, reg: Method, params: Sequence,
                 device: torch.device, lr: float, momentum: float, ctx: DistContext = DistContext(),
                 nesterov: bool = False, guarded: bool = False, optimizer: str = "sgd", weight_decay: float = 0.0):
        self.reg, self.ctx = reg, ctx
        groups = as_groups(params)
        self.params = [p for g in groups for p in g["params"]]
        # every term is in autograd here: torch's SGD or AdamW as they are (weight_decay: AdamW's decoupled one)
        self.opt = make_optimizer(optimizer, groups, lr, momentum, nesterov, weight_decay, fused=guarded or None)
        self.guard = GuardedUpdate(self.opt) if guarded else None
        self.forward = _ddp(target, device) if ctx.active else target
        self.target_taps = self.source_taps = None
        if reg.uses_source_features:
            self.target_taps = FeatureTaps(target, reg.taps, self.forward, reg.rectify_at_tap, reg.tap_follows)
            self.source_taps = FeatureTaps(source, reg.taps, None, reg.rectify_at_tap)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """Loss and gradients; returns the stats (STATS, float64, on the step's device)."""
        set_lr(self.opt, lr)
        if self.target_taps is not None:
            logits, t_feats = self.target_taps(x)
            with torch.no_grad():
                _, s_feats = self.source_taps(x)
            terms = self.reg.terms(t_feats, s_feats)
        else:
            logits = self.forward(x)
            terms = self.reg.terms()
        ce = F.cross_entropy(logits.float(), y)
        values = torch.stack([ce, terms.reg, terms.head]).detach().double()
        self.opt.zero_grad(set_to_none=True)
        (ce + terms.reg + terms.head).backward()
        gnorm = grad_norm(self.params).to(values.device)
        acc = (logits.argmax(1) == y).float().mean()
        return torch.cat([values, gnorm.double().reshape(1), acc.double().reshape(1)])

    def close(self) -> None:
        for taps in (self.target_taps, self.source_taps):
            if taps is not None:
                taps.close()


class FastStep(Step):
    """The compiled step for one (target, source, method); owns the optimizer (`opt`)."""

    def __init__(self, target: nn.Module, source: nn.Module, reg: Method, params: Sequence,
                 options: StepOptions, device: torch.device, lr: float, momentum: float,
                 ctx: DistContext = DistContext(), nesterov: bool = False, guarded: bool = False,
                 optimizer: str = "sgd", weight_decay: float = 0.0):
        """`params`: the trainable parameters, or SGD parameter groups (dicts with "params" and "lr_mult");
        guarded: a fused SGD whose update a device flag can cancel (update(ok)); optimizer "adamw": torch's
        AdamW (weight_decay its decoupled decay), the pulls added to the gradients before its step as well."""
        self.target, self.reg, self.options, self.device, self.ctx = target, reg, options, torch.device(device), ctx
        groups = as_groups(params)
        self.params = [p for g in groups for p in g["params"]]
        self.dtype = DTYPES[options.precision]
        self.memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        if options.channels_last:
            target.to(memory_format=torch.channels_last)  # in place: the Parameter objects stay the same
        self.features = reg.uses_source_features
        if self.features:
            self.model = TargetFeatures(target, reg.taps)
            self.source = source_features(source, reg.taps, options.fold_source_bn,
                                          reg.rectify_at_tap).to(self.device)
            if options.channels_last:
                self.source.to(memory_format=torch.channels_last)
        else:
            self.model, self.source = target, None
        if ctx.active:
            self.model = _ddp(self.model, self.device)
        pulls = reg.pulls(self.params)
        self.graph_terms = pulls is None  # a method without a pull form: its terms in the graph
        self.pulls = pulls or []
        cuda = self.device.type == "cuda"
        fused = cuda or guarded
        self.opt = make_optimizer(optimizer, groups, lr, momentum, nesterov, weight_decay, self.pulls,
                                  foreach=None if fused else True, fused=True if fused else None)
        self.guard = GuardedUpdate(self.opt) if guarded else None
        if options.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
            self.opt.scaler = self.scaler
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        self.loss_fn = self._loss
        if options.compile is not None:
            mode = options.compile if options.backend == "inductor" else None  # modes are inductor's
            # dynamo caches compiled code per code object: a private copy of `_loss` per FastStep, so several
            # steps in one process (methods run one after another) never share, or exhaust, one cache
            fn = FastStep._loss
            own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                     fn.__closure__)
            self.loss_fn = torch.compile(types.MethodType(own, self), mode=mode, backend=options.backend,
                                         fullgraph=options.fullgraph and not ctx.active)  # DDP splits graphs

    @property
    def skips_nonfinite_grads(self) -> bool:
        return self.scaler is not None

    def _loss(self, x: torch.Tensor, y: torch.Tensor):
        zero = torch.zeros((), device=x.device)
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            if self.features:
                logits, t_feats = self.model(x)
                with torch.no_grad():
                    s_feats = self.source(x)
                terms = self.reg.terms(t_feats, s_feats)
                reg, head = terms.reg.float(), terms.head.float()
            else:
                logits = self.model(x)
                reg, head = zero, zero  # parameter-norm terms: applied by the optimizer (PullSGD)
                if self.graph_terms:
                    terms = self.reg.terms()
                    reg, head = terms.reg.float(), terms.head.float()
        ce = F.cross_entropy(logits.float(), y)
        correct = (logits.detach().argmax(1) == y).sum()
        return ce + reg + head, torch.stack([ce.detach(), reg.detach(), head.detach()]), correct

    def sync_mode(self) -> None:
        """The fx extractor follows the target's train/eval mode (a callback may have evaluated it)."""
        if self.features:
            net = self.model.module.net if isinstance(self.model, DDP) else self.model.net
            if net.training != self.target.training:
                net.train(self.target.training)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """Loss, gradients (pulls included) and the stats tensor (STATS, float64); nothing is updated yet."""
        set_lr(self.opt, lr)
        self.sync_mode()
        x = x.contiguous(memory_format=self.memory_format)
        self.opt.zero_grad(set_to_none=True)
        loss, terms, correct = self.loss_fn(x, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        pulled = self.opt.pull_()
        extra = torch.stack([pulled.get("reg", terms.new_zeros(())), pulled.get("head", terms.new_zeros(()))])
        terms = terms + torch.cat([terms.new_zeros(1), extra.to(terms.device)])
        gn = grad_norm(self.params).to(terms.device)
        return torch.cat([terms.double(), gn.double().reshape(1), correct.double().reshape(1) / len(y)])

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> StepOutput:
        """forward_backward + update, raising FloatingPointError on a non-finite term (benchmarks)."""
        out = StepOutput.read(mean_over_ranks(self.forward_backward(x, y, lr), self.ctx))
        bad = self.first_nonfinite(out)
        if bad is not None:
            raise FloatingPointError(f"non-finite {bad[0]}: {bad[1]}")
        self.update()
        return out

    def close(self) -> None:
        """The target's parameters back to the contiguous layout the caller gave."""
        if self.options.channels_last:
            self.target.to(memory_format=torch.contiguous_format)
