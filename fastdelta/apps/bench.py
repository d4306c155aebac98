"""`fastdelta bench step` / benchmarks/bench_step.py: the training step of every method, timed side by side
with the public recipe (eager fp32, forward hooks, full source forward, L2-SP as a Python loop).

Synthetic tensors (this measures the model step, not data loading). For each model, method and engine:
ms/step, img/s, time to first step (building the step and compiling it included; with --warm-first-step also
in a fresh process whose torch.compile caches are warm, as a second run sees it), peak GPU memory.

Both engines run the method's default hyperparameters (`bench_hyperparameters`: alpha 1e-4 for DELTA and
DELTA w/o ATT, 0.01 for the others; beta 0.01, lr 0.01, momentum 0.9, weight decay 1e-4), identical for
the two, on a randomly initialised network whose BatchNorm running statistics are first calibrated on
synthetic batches in train mode (`calibrate_batchnorm`): fresh statistics (mean 0, var 1) leave the
eval-mode source's deep maps of a random ResNet-101 at an rms of ~1e4 (the target's: ~0.5), and DELTA's
distance to them overflows within a few steps; calibrated, the source's maps have the scale a pre-trained
network's have. No step reads the device (the loop's deferred reads on CUDA); a device flag collects
whether every step's loss (and, for fastdelta, gradient norm) was finite, read once after the timed
steps with the parameters' finiteness: a row that went non-finite is an error, not a timing.

Writes `bench_step.json` (updated after every row, so a cut-off run keeps what it measured) and
`bench_step.md` (a table of the ratios: fastdelta / public recipe per method,
each method's step / the L2 step of the same engine).

The public recipe here is a re-implementation of the public DELTA code's training step, kept in this
package so that the benchmark imports nothing from outside it.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods import L2, make_method, method_class
from ..networks.models import DEFAULT_LAYERS, build_architecture, build_networks
from ..settings import METHODS, make_settings
from ..train.evaluate import flush_denormals
from ..train.loop import set_training_mode
from ..train.steps import FastStep, resolve_step_options

GPU_MODELS = ["resnet50", "resnet101", "efficientnet_lite0"]


# ---------------------------------------------------------------------------------------- public recipe
class PublicStep:
    """The public code's step (github.com/lixingjian/DELTA, train.py), transcribed once per method and
    fixed: eager fp32, forward hooks on both networks, the full source forward, L2 as SGD weight decay,
    L2-SP(ATT) as a Python loop over the parameters, DELTA's distance on raw taps. It knows the six
    methods of the paper by name and refuses any other: a new fastdelta method has no public step, and
    timing it with another method's formula would be a wrong ratio."""

    # per method: (trains only the head, SGD weight decay, L2-SP pull, channel-weighted pull,
    #              feature-map term, attention-weighted feature-map term, beta on the head)
    FORMULAS = {
        "l2_fe":        (True,  True,  False, False, False, False, False),
        "l2":           (False, True,  False, False, False, False, False),
        "l2_sp":        (False, False, True,  False, False, False, True),
        "l2_sp_att":    (False, False, True,  True,  False, False, True),
        "delta_no_att": (False, False, False, False, True,  False, True),
        "delta":        (False, False, False, False, True,  True,  True),
    }

    def __init__(self, nets, method: str, attention, lr=0.01, momentum=0.9, alpha=0.01, beta=0.01, wd=1e-4):
        if method not in self.FORMULAS:
            raise ValueError(f"the public recipe has no step for method {method!r}: it transcribes "
                             f"{', '.join(self.FORMULAS)} only")
        (head_only, weight_decay, self.sp, sp_att, self.fm, fm_att, self.head_beta) = self.FORMULAS[method]
        self.alpha, self.beta = alpha, beta
        self.src, self.tgt = nets.source, nets.target
        self.head = nets.head_name
        self.src.eval()
        if head_only:
            self.tgt.eval().requires_grad_(False)
            self.tgt.get_submodule(self.head).requires_grad_(True)
            params = list(self.tgt.get_submodule(self.head).parameters())
        else:
            self.tgt.train().requires_grad_(True)
            params = list(self.tgt.parameters())
        self.opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd if weight_decay else 0)
        self.src_w = {n: p.detach().clone() for n, p in self.src.named_parameters()}
        self.fs, self.ft = [], []
        for model, store in ((self.src, self.fs), (self.tgt, self.ft)):
            for name in nets.layers:
                model.get_submodule(name).register_forward_hook(lambda m, i, o, store=store: store.append(o))
        # DELTA's attention weights; DELTA w/o ATT: the public fea_map, 0.5 sum ||d||^2
        self.cws = attention if fm_att else None
        self.filter_w = {}
        if sp_att:
            for layer, a in zip(nets.layers, attention):
                self.filter_w[layer + ".weight"] = a.numel() * a

    def _att_reg(self):
        reg = 0.
        for i, (a, b) in enumerate(zip(self.fs, self.ft)):
            bb, c, h, w = a.shape
            d = torch.norm(b.reshape(bb, c, -1) - a.reshape(bb, c, -1).detach(), 2, 2)
            reg = reg + (0.5 * torch.sum(d ** 2) if self.cws is None else
                         0.5 * torch.sum(c * self.cws[i] * d ** 2 / (h * w)))
        return reg

    def step(self, x, y) -> torch.Tensor:
        """One step; returns the (detached) loss, on the device: nothing here waits for the GPU."""
        self.fs.clear()
        self.ft.clear()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.tgt(x), y)
        if self.sp:
            sp = 0.
            for n, p in self.tgt.named_parameters():
                if not n.startswith(self.head + "."):
                    d2 = (p - self.src_w[n]).pow(2)
                    if n in self.filter_w:
                        d2 = d2.reshape(d2.shape[0], -1) * self.filter_w[n][:, None]
                    sp = sp + 0.5 * d2.sum()
            loss = loss + self.alpha * sp
        if self.fm:
            with torch.no_grad():
                self.src(x)
            loss = loss + self.alpha * self._att_reg()
        if self.head_beta:
            loss = loss + self.beta * 0.5 * sum(p.pow(2).sum() for p in self.tgt.get_submodule(self.head).parameters())
        loss.backward()
        self.opt.step()
        self.fs.clear()
        self.ft.clear()
        return loss.detach()


# ---------------------------------------------------------------------------------------- tiny CPU model
class SmokeNet(nn.Module):
    """A small CNN (conv-BN-ReLU stages) for the CPU smoke configuration."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        def stage(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
        self.stem = stage(3, width, 2)
        self.layer1 = stage(width, width, 1)
        self.layer2 = stage(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


SMOKE_LAYERS = ["layer1.0", "layer2.0"]


# ---------------------------------------------------------------------------------------- measurement
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_hyperparameters(method: str) -> dict:
    """The method's default alpha/beta/lr/momentum/weight decay (fastdelta.settings, public recipe): both
    engines of a row run these, so that they do the same work per step at settings that stay finite."""
    s = make_settings(method).resolved()
    return {"alpha": s.alpha, "beta": s.beta, "lr": s.lr, "momentum": s.momentum, "weight_decay": s.weight_decay}


CALIBRATION_BATCHES = 2  # synthetic batches that set the BN running statistics
CALIBRATION_VALUES = 32  # values per channel at the last (stride-32) stage per calibration batch at least


def calibration_batch(batch: int, size: int) -> int:
    """Images per calibration batch: the benchmark's batch, more where the last stage's map is small. A
    running variance estimated from a few values per channel (batch 2 of a 1x1 map) is ~0 for some
    channels, and the eval-mode source then amplifies them by up to 1/sqrt(eps)."""
    last = max(1, -(-size // 32)) ** 2  # the stride-32 map: ceil(size / 32) squared
    return max(batch, -(-CALIBRATION_VALUES // last))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batch: int, size: int, device, batches: int = CALIBRATION_BATCHES,
                        seed: int = 0) -> dict:
    """Set every BatchNorm's running statistics to their average over `batches` synthetic N(0, 1) batches
    (train-mode forwards, cumulative average), then put the model in eval mode.

    A randomly initialised network's fresh statistics (mean 0, var 1) do not normalise in eval mode: the
    frozen source's deep maps grow with depth (rms ~1e4 at ResNet-101's layer3.22.conv3 / layer4.2.conv3
    against ~0.5 for the train-mode target) and DELTA's distance to them overflows in a few steps. After
    calibration the eval-mode maps have the train-mode scale, as a pre-trained network's have."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    info = {"batches": batches if bns else 0, "batch": batch, "size": size, "input": "randn N(0,1)",
            "batchnorm_layers": len(bns)}
    if not bns or batches <= 0:
        return info
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every calibration batch counts the same
    model.train()
    g = torch.Generator(device="cpu").manual_seed(seed + 7919)
    for _ in range(batches):
        model(torch.randn(batch, 3, size, size, generator=g).to(device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()
    return info


_CALIBRATED: dict = {}  # the last calibrated network (on the CPU): the rows of one model share it


def _networks(model: str, num_classes: int, device, seed=0, batch: int = 4, size: int = 32,
              calibration_batches: int = CALIBRATION_BATCHES):
    """Source and target from one randomly initialised network whose BN statistics are calibrated
    (`calibrate_batchnorm`) before the two are built: the source's eval-mode maps then have a
    realistic scale. Returns (networks, calibration record). The calibrated network is kept (one,
    on the CPU) for the next row of the same model and shapes: calibrated once, every engine the same."""
    key = (model, str(device), seed, calibration_batch(batch, size), size, calibration_batches)
    if key not in _CALIBRATED:
        _CALIBRATED.clear()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights: speed does not depend on them
                net = SmokeNet() if model == "smoke" else build_architecture(model)
        net.to(device)
        calibration = calibrate_batchnorm(net, key[3], size, device, calibration_batches, seed)
        _CALIBRATED[key] = (net.cpu(), calibration)
    net, calibration = _CALIBRATED[key]
    layers = SMOKE_LAYERS if model == "smoke" else DEFAULT_LAYERS.get(model)
    nets = build_networks(net, num_classes, None, layers, seed)  # deep copies: the kept one stays as it is
    nets.source.to(device)
    nets.target.to(device)
    return nets, dict(calibration)


def _attention(nets, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in nets.layers:
        with torch.no_grad():
            c = _out_channels(nets.source, layer)
        out.append(torch.softmax(torch.randn(c, generator=g) / 5, 0).to(device))
    return out


def _out_channels(model, layer):
    m = model.get_submodule(layer)
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    return (m if isinstance(m, nn.Conv2d) else convs[-1]).out_channels


def measure(model: str, method: str, engine: str, batch: int, size: int, num_classes: int, device,
            warmup: int, iters: int, options=None, profile_steps: int = 0, profile_dir: Optional[Path] = None,
            calibration_batches: int = CALIBRATION_BATCHES) -> dict:
    """One row: build, first step (timed, compile included), warm-up, timed steps, peak memory.

    Both engines: the method's default hyperparameters (`bench_hyperparameters`), BN statistics
    calibrated before source and target are built. Raises FloatingPointError when a step's loss (or
    fastdelta's gradient norm) or the parameters after the steps are not finite. On the CPU denormal
    floats are flushed to zero, as the training loop does (they make x86 float ops many times slower)."""
    with flush_denormals(device):
        return _measure(model, method, engine, batch, size, num_classes, device, warmup, iters, options,
                        profile_steps, profile_dir, calibration_batches)


def _measure(model, method, engine, batch, size, num_classes, device, warmup, iters, options, profile_steps,
             profile_dir, calibration_batches) -> dict:
    _cleanup(device)
    hp = bench_hyperparameters(method)
    nets, calibration = _networks(model, num_classes, device, batch=batch, size=size,
                                  calibration_batches=calibration_batches)
    attention = _attention(nets, device)
    x, y = _synthetic_batch(batch, size, num_classes, device)
    finite = _FiniteSteps(device)
    _sync(device)
    t0 = time.perf_counter()
    if engine == "public":
        runner, step = _public_steps(nets, method, attention, hp, x, y, finite)
    else:
        runner, step = _fastdelta_steps(nets, method, attention, hp, options, device, x, y, finite)
    cache_before = compile_cache_counters()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    cache = {k: v - cache_before[k] for k, v in compile_cache_counters().items()}
    ms = _timed_ms_per_step(step, device, warmup, iters)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    steps = 1 + warmup + iters
    finite.raise_if_not(nets.target, steps, hp)
    row = {"model": model, "method": method, "engine": engine, "batch": batch, "size": size,
           "ms_per_step": round(ms, 3), "img_per_s": round(batch * 1000 / ms, 1), "first_step_s": round(first, 2),
           "peak_gib": None if peak is None else round(peak, 3), "steps": steps, "finite": True,
           **hp, "bn_calibration": calibration}
    if options is not None:
        row["options"] = options.describe()
        if options.compile is not None:
            row["compile_cache"] = cache  # hits: the first step reused compiled code from an earlier run
    if profile_steps and profile_dir is not None:
        row["profile"] = _profile(step, device, profile_steps,
                                  Path(profile_dir) / f"profile_{model}_{method}_{engine}.txt".replace("[", "_").replace("]", ""))
    del runner, step, nets
    torch._dynamo.reset()
    _cleanup(device)
    return row


def _synthetic_batch(batch: int, size: int, num_classes: int, device) -> tuple:
    """The one (images, labels) batch every step of a row takes, the same for every row of that shape."""
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return x, y


class _FiniteSteps:
    """Whether every step so far was finite, collected on the device (no step waits for the GPU) and read
    once after the timed steps, with the parameters' finiteness."""

    def __init__(self, device):
        self.ok = torch.ones((), dtype=torch.bool, device=device)

    def add(self, finite: torch.Tensor) -> None:
        self.ok = self.ok & finite

    def raise_if_not(self, model: nn.Module, steps: int, hp: dict) -> None:
        """FloatingPointError if a step's checked stats, or `model`'s parameters after the steps, are not finite."""
        with torch.no_grad():
            params_finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(
                [p.detach() for p in model.parameters()]))).all())
        if not bool(self.ok) or not params_finite:
            raise FloatingPointError(f"non-finite {'loss or gradient' if not bool(self.ok) else 'parameters'} "
                                     f"within {steps} steps (alpha {hp['alpha']}, lr {hp['lr']})")


def _public_steps(nets, method: str, attention, hp: dict, x, y, finite: _FiniteSteps):
    """(the public recipe's step, one step on the batch); the step's loss must be finite."""
    runner = PublicStep(nets, method, attention, lr=hp["lr"], momentum=hp["momentum"], alpha=hp["alpha"],
                        beta=hp["beta"], wd=hp["weight_decay"])

    def step():
        finite.add(torch.isfinite(runner.step(x, y)))
    return runner, step


def _fastdelta_steps(nets, method: str, attention, hp: dict, options, device, x, y, finite: _FiniteSteps):
    """(fastdelta's step, one step on the batch) set up as train_loop sets it up; the step's stats must
    pass the loop's non-finite rule."""
    reg = make_method(method, nets.target, nets.source, nets.head_name, nets.layers,
                      attention if method_class(method).uses_attention else None, alpha=hp["alpha"],
                      beta=hp["beta"], weight_decay=hp["weight_decay"], feature_map="conv")
    params = reg.trainable_parameters(nets.target)
    set_training_mode(nets.target, reg, params, extractor_bn="frozen")
    runner = FastStep(nets.target, nets.source, reg, params, options, device, hp["lr"], hp["momentum"])

    def step():  # forward_backward + update without reading the stats (the loop's deferred reads)
        stats = runner.forward_backward(x, y, hp["lr"])
        finite.add(runner.finite_on_device(stats))
        runner.update()
    return runner, step


def _timed_ms_per_step(step, device, warmup: int, iters: int) -> float:
    """Milliseconds per step over `iters` steps after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - t1) * 1000 / iters


def compile_cache_counters() -> dict:
    """torch.compile's on-disk cache lookups so far in this process (inductor FX graphs, AOTAutograd)."""
    from torch._dynamo.utils import counters
    return {"fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
            "autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "autograd_miss": counters["aot_autograd"]["autograd_cache_miss"]}


def warm_first_steps(args, rows: list) -> None:
    """Time to first step again in a fresh process, now that this one filled torch.compile's caches.

    A user's second run (or second job on the machine) sees this time, not the cold one; one subprocess
    measures every compiled fastdelta row (1 timed step each) and the result goes to `first_step_warm_s`."""
    todo = [r for r in rows if "error" not in r and r["engine"] != "public" and r.get("options", {}).get("compile")]
    if not todo:
        return
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fastdelta", "bench", "step", "--engines", "fastdelta", "--warmup", "0",
               "--iters", "1", "--out", tmp,
               "--models", ",".join(dict.fromkeys(r["model"] for r in todo)),
               "--methods", ",".join(dict.fromkeys(r["method"] for r in todo)),
               "--batch", str(todo[0]["batch"]), "--size", str(todo[0]["size"]),
               "--num-classes", str(args.num_classes), "--device", args.device, "--precision", args.precision,
               "--channels-last", args.channels_last]
        cmd += ["--compile-modes", args.compile_modes] if args.compile_modes else ["--compile", args.compile]
        cmd += ["--calibration-batches", str(getattr(args, "calibration_batches", CALIBRATION_BATCHES))]
        cmd += ["--cuda-graphs"] if args.cuda_graphs else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"warm first step: the subprocess failed ({done.returncode}): {done.stderr[-2000:]}", flush=True)
            return
        warm = {(r["model"], r["method"], r["engine"]): r for r in json.loads((Path(tmp) / "bench_step.json").read_text())["rows"]}
    for r in todo:
        w = warm.get((r["model"], r["method"], r["engine"]))
        if w is not None and "error" not in w:
            r["first_step_warm_s"], r["compile_cache_warm"] = w["first_step_s"], w.get("compile_cache")


def _profile(step, device, steps: int, path: Path) -> str:
    """torch.profiler over a few steps: the top kernels / ops by self time, written to `path`."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=25))
    return path.name


def environment(device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cpu_count": os.cpu_count()}
    try:
        import torchvision
        env["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        import timm
        env["timm"] = timm.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   driver_capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    try:
        from ..kernels.dispatch import describe
        env["distance_kernels"] = describe()
    except Exception:  # noqa: BLE001 - the kernels module is optional here
        pass
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


def markdown(result: dict) -> str:
    """The results table: per model and method, public vs fastdelta img/s and ratios."""
    rows = result["rows"]
    env = result["environment"]
    lines = [f"# bench_step: {env.get('gpu', env['device'])}, torch {env['torch']}, {env['date']}", "",
             f"batch {result['config']['batch']}, {result['config']['size']}x{result['config']['size']}, "
             f"synthetic tensors, {result['config']['iters']} timed steps after {result['config']['warmup']} "
             "warm-up steps. ratio = fastdelta img/s / public img/s; vs L2 = the method's ms/step / the same "
             "engine's L2 ms/step.", ""]
    fast_engines = sorted({r["engine"] for r in rows if r["engine"] != "public"})
    head = ["model", "method", "public img/s", "public ms", "public first s", "public peak GiB"]
    for e in fast_engines:
        head += [f"{e} img/s", f"{e} ms", "ratio", "vs L2", "first s", "warm first s", "peak GiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    key = {(r["model"], r["method"], r["engine"]): r for r in rows if "error" not in r}
    errors = [r for r in rows if "error" in r]
    fmt = lambda v, f="{:,.1f}": "-" if v is None else f.format(v)
    for model in dict.fromkeys(r["model"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model):
            pub = key.get((model, method, "public"))
            cells = [model, method, fmt(pub and pub["img_per_s"]), fmt(pub and pub["ms_per_step"], "{:.2f}"),
                     fmt(pub and pub["first_step_s"]), fmt(pub and pub["peak_gib"], "{:.2f}")]
            for e in fast_engines:
                r = key.get((model, method, e))
                l2 = key.get((model, L2.name, e))
                ratio = r["img_per_s"] / pub["img_per_s"] if r and pub else None
                vs_l2 = r["ms_per_step"] / l2["ms_per_step"] if r and l2 else None
                cells += [fmt(r and r["img_per_s"]), fmt(r and r["ms_per_step"], "{:.2f}"), fmt(ratio, "{:.2f}x"),
                          fmt(vs_l2, "{:.2f}x"), fmt(r and r["first_step_s"]), fmt(r and r.get("first_step_warm_s")),
                          fmt(r and r["peak_gib"], "{:.2f}")]
            lines.append("| " + " | ".join(cells) + " |")
    if errors:
        lines += ["", "Failed rows:", ""] + [f"- {r['model']} {r['method']} {r['engine']}: {r['error']}" for r in errors]
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items())]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU configuration (a small CNN, batch 4, 32x32, few steps): a CI smoke test")
    p.add_argument("--models", default=None,
                   help=f"comma separated (default {','.join(GPU_MODELS)}; 'smoke' = the tiny CNN)")
    p.add_argument("--methods", default="all", help=f"comma separated from {', '.join(METHODS)}, or all")
    p.add_argument("--engines", default="public,fastdelta", help="public and/or fastdelta")
    p.add_argument("--batch", type=int, default=None, help="default 64 (smoke: 4)")
    p.add_argument("--size", type=int, default=None, help="default 224 (smoke: 32)")
    p.add_argument("--num-classes", type=int, default=120)
    p.add_argument("--warmup", type=int, default=None, help="default 5 (smoke: 1)")
    p.add_argument("--iters", type=int, default=None, help="default 20 (smoke: 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", default="auto", help="auto, off, or a torch.compile mode (fastdelta engine)")
    p.add_argument("--compile-modes", default=None,
                   help="measure the fastdelta engine once per mode, e.g. default,max-autotune-no-cudagraphs,"
                        "reduce-overhead (overrides --compile)")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--cuda-graphs", action="store_true", help="fastdelta: CUDA graphs (compile 'reduce-overhead')")
    p.add_argument("--also-eager", action="store_true",
                   help="also measure the fastdelta engine without torch.compile (engine 'fastdelta[eager]', same "
                        "precision and layout), before the compiled one: a fastdelta figure even when the "
                        "compile does not finish in time, and what the compile adds")
    p.add_argument("--calibration-batches", type=int, default=CALIBRATION_BATCHES,
                   help="synthetic batches that set the random network's BN running statistics before source "
                        "and target are built (0: fresh statistics, whose eval-mode source maps overflow DELTA)")
    p.add_argument("--out", default="bench-step", help="folder for bench_step.json and bench_step.md")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of an existing OUT/bench_step.json (same model/method/engine: replaced), "
                        "so a configuration can be measured in several runs")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many steps per row: top kernels to OUT/profile_*.txt")
    p.add_argument("--warm-first-step", action="store_true",
                   help="after the run, time each compiled fastdelta row's first step again in a fresh process "
                        "(torch.compile's on-disk caches now warm): first_step_warm_s")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: start no new row after this (rows measured so far are written)")


def run(args) -> dict:
    from ..train.distributed import DistContext, device_for
    device = device_for(DistContext(), args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    plan = _Plan.of(args)
    fast = _fastdelta_engines(args, device, plan.engines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = None
    if args.append and (out / "bench_step.json").is_file():
        previous = json.loads((out / "bench_step.json").read_text())
    t_start = time.perf_counter()
    result = _new_result(args, plan, fast, device, previous)
    for model in plan.models:
        for method in plan.methods:
            runs = ([("public", None)] if "public" in plan.engines else []) + fast
            for label, opts in runs:
                if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                    print(f"time budget of {args.time_budget:.0f} s spent: {model} {method} {label} not measured",
                          flush=True)
                    continue
                row = _measure_row(args, plan, model, method, label, opts, device, out)
                result["rows"] = [r for r in result["rows"] if (r["model"], r["method"], r["engine"]) !=
                                  (row["model"], row["method"], row["engine"])] + [row]
                print(json.dumps(row), flush=True)
                _save(out, result)
    if args.warm_first_step:
        warm_first_steps(args, result["rows"])
    _save(out, result)
    print(markdown(result), flush=True)
    return result


@dataclass
class _Plan:
    """What a bench run measures: models x methods x engines, and the shape and number of the steps."""
    models: List[str]
    methods: List[str]
    engines: List[str]
    batch: int
    size: int
    warmup: int
    iters: int

    @classmethod
    def of(cls, args) -> "_Plan":
        """From the command line; --smoke changes the defaults to the tiny CPU configuration."""
        smoke = args.smoke
        models = args.models.split(",") if args.models else (["smoke"] if smoke else GPU_MODELS)
        methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ValueError(f"--methods: unknown {bad}; valid: {', '.join(METHODS)}")
        return cls(models, methods, engines=[e.strip() for e in args.engines.split(",") if e.strip()],
                   batch=args.batch or (4 if smoke else 64), size=args.size or (32 if smoke else 224),
                   warmup=args.warmup if args.warmup is not None else (1 if smoke else 5),
                   iters=args.iters or (2 if smoke else 20))


def _fastdelta_engines(args, device, engines: List[str]) -> list:
    """(engine label, StepOptions) per fastdelta engine measured: one per compile mode, with --also-eager
    the same step uncompiled first."""
    cl = {"auto": "auto", "on": True, "off": False}[args.channels_last]
    fast = []
    if "fastdelta" in engines:
        modes = args.compile_modes.split(",") if args.compile_modes else [args.compile]
        for mode in modes:
            opts = resolve_step_options(device, args.precision, mode, cl, args.cuda_graphs, "fast")
            label = "fastdelta" if len(modes) == 1 else f"fastdelta[{mode}]"
            if args.also_eager and len(modes) == 1 and opts is not None and opts.compile is not None:
                eager = resolve_step_options(device, opts.precision, "off", opts.channels_last, False, "fast")
                fast.append(("fastdelta[eager]", eager))
            fast.append((label, opts))
    return fast


def _new_result(args, plan: _Plan, fast: list, device, previous: Optional[dict]) -> dict:
    """bench_step.json before any row is measured; with --append it keeps `previous`'s rows."""
    result = {"config": {"models": plan.models, "methods": plan.methods, "batch": plan.batch, "size": plan.size,
                         "warmup": plan.warmup, "iters": plan.iters, "num_classes": args.num_classes,
                         "smoke": args.smoke,
                         "fastdelta_options": {label: o.describe() for label, o in fast},
                         "hyperparameters": {m: bench_hyperparameters(m) for m in plan.methods},
                         "bn_calibration_batches": args.calibration_batches,
                         "host_reads_per_step": 0},
              "environment": environment(device), "rows": []}
    if previous is not None:
        result["previous_environments"] = previous.get("previous_environments", []) + [previous["environment"]]
        result["config"]["hyperparameters"] = {**previous.get("config", {}).get("hyperparameters", {}),
                                               **result["config"]["hyperparameters"]}
        result["rows"] = previous["rows"]
    return result


def _measure_row(args, plan: _Plan, model: str, method: str, label: str, opts, device, out: Path) -> dict:
    """One row, or the row's error: one failed row must not lose the others."""
    try:
        return measure(model, method, "public" if label == "public" else label, plan.batch, plan.size,
                       args.num_classes, device, plan.warmup, plan.iters, opts, args.profile, out,
                       args.calibration_batches)
    except Exception as e:  # noqa: BLE001
        row = {"model": model, "method": method, "engine": label, "error": f"{type(e).__name__}: {e}"[:500]}
        torch._dynamo.reset()
        _cleanup(device)
        return row


def _save(out: Path, result: dict) -> None:
    """Written after every row, so that a cut-off run keeps what it measured."""
    (out / "bench_step.json").write_text(json.dumps(result, indent=1))
    (out / "bench_step.md").write_text(markdown(result))


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="bench_step", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
