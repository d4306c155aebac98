"""What `precision/channels_last/compile="auto"` become on a CPU: the fastest step engine for this
machine, network, image size, batch and method, measured rather than assumed.

On CUDA `auto` is bf16 + channels_last + torch.compile (`steps.resolve_step_options`). On a CPU the
fastest engine depends on the workload: bf16 autocast doubled the ResNet-50 step on an AVX512-BF16
CPU and did nothing for EfficientNet-Lite0 at 64 px on the same CPU. So `auto` times the candidates
on copies of the run's own networks and one batch of its own shape, their steps interleaved (A B C
A B C ...) so that a load change on a shared machine hits every candidate alike, and keeps the
fastest. The choice is cached per machine and workload (a JSON file beside the attention cache), so
the probe's few seconds are paid once.

Candidates: the reference step (eager fp32, hooks); the fast step in fp32 channels_last; and, only
where the CPU has bf16 units (AVX512-BF16 or AMX), the fast step in bf16 autocast channels_last.
bf16 needs the units to be fast. torch.compile is never chosen by `auto` on a CPU: its first step's
compilation pays off only in runs of many hundred steps; `compile=yes` asks for it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .steps import StepOptions

REFERENCE = "reference"
CACHE_VERSION = 1


def cpu_flags() -> set:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def cpu_has_bf16_units(flags: Optional[set] = None) -> bool:
    """Native bf16 arithmetic (AVX512-BF16 dot products or AMX tiles): without it bf16 is emulated and slower."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_candidates(bf16_units: bool) -> Dict[str, Optional[StepOptions]]:
    """name -> StepOptions (None: the reference step) of the engines `auto` may pick on this CPU."""
    out: Dict[str, Optional[StepOptions]] = {REFERENCE: None, "fp32_channels_last": StepOptions("fp32", True, None)}
    if bf16_units:
        out["bf16_channels_last"] = StepOptions("bf16", True, None)
    return out


def describe_options(options: Optional[StepOptions]) -> dict:
    return {"step_engine": "reference"} if options is None else options.describe()


def interleaved_ms(steps: Dict[str, Callable[[], None]], rounds: int, warmup: int = 1,
                   budget_s: Optional[float] = None) -> Dict[str, List[float]]:
    """Each callable's step times in ms, the callables taking turns (A B C A B C ...) after `warmup`
    untimed rounds; stops early (after at least two rounds) once `budget_s` is spent."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    t_start = time.perf_counter()
    for r in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1000)
        if budget_s is not None and r >= 1 and time.perf_counter() - t_start > budget_s:
            break
    return times


def ratio_spread(times: Dict[str, List[float]], baseline: str) -> Dict[str, dict]:
    """Per candidate: median ms, and its speed-up over `baseline` round by round (median, min, max), so
    one run's ratio comes with its own spread."""
    out = {}
    for name, ms in times.items():
        ratios = [b / m for b, m in zip(times[baseline], ms)]
        out[name] = {"ms_median": round(statistics.median(ms), 3), "speedup_median": round(statistics.median(ratios), 3),
                     "speedup_min": round(min(ratios), 3), "speedup_max": round(max(ratios), 3), "rounds": len(ms)}
    return out


def workload_key(arch: str, method: str, batch: int, size: int, layers: Sequence[str], threads: int) -> str:
    """What the choice depends on: the machine (CPU model and flags, torch), the network, the method, the
    shape and the thread count."""
    cpu = (platform.processor() or "") + "|" + " ".join(sorted(cpu_flags()))
    text = json.dumps([CACHE_VERSION, cpu, torch.__version__, arch, method, batch, size, list(layers), threads])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_file(cache_root: Optional[Path], key: str) -> Optional[Path]:
    return None if cache_root is None else cache_root / "engine" / f"{key}.json"


def read_choice(path: Optional[Path]) -> Optional[dict]:
    """A cached choice (JSON), or None when missing or unreadable (then measured again)."""
    if path is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) and "choice" in record else None
    except (OSError, ValueError):
        return None


def write_choice(path: Optional[Path], record: dict) -> None:
    """Best effort: a cache that cannot be written only means the next run measures again."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def options_named(name: str, bf16_units: bool) -> Optional[StepOptions]:
    return cpu_candidates(bf16_units or name.startswith("bf16")).get(name)


def probe(build: Callable[[Optional[StepOptions]], Tuple[Callable[[], None], Callable[[], None]]],
          candidates: Dict[str, Optional[StepOptions]], rounds: int = 4, budget_s: float = 20.0) -> dict:
    """Time every candidate's step (interleaved) and pick the fastest by median. `build(options)` returns
    (one training step on a copy of the run's networks, a close function)."""
    built = {name: build(opts) for name, opts in candidates.items()}
    try:
        times = interleaved_ms({name: step for name, (step, _) in built.items()}, rounds, budget_s=budget_s)
    finally:
        for _, close in built.values():
            close()
    spread = ratio_spread(times, REFERENCE)
    choice = min(spread, key=lambda name: spread[name]["ms_median"])
    return {"choice": choice, "measured": spread}


def networks_copy(*objects):
    """Deep copies of the networks and the method together, so the copy's method refers to the copy's
    parameters (one memo for all)."""
    return copy.deepcopy(objects)


# a run this short spends more on the probe (about 6 steps per candidate) than any engine could save
MIN_PROBE_ITERATIONS = 50


def probe_batch(dataset, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`batch` of the run's own training items (repeated when the set is smaller): realistic values for
    the feature-map term, the run's exact input shape."""
    items = [dataset[i % len(dataset)] for i in range(batch)]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def cpu_auto_choice(target, source, reg, dataset, batch: int, lr: float, momentum: float, key: str,
                    cache_root: Optional[Path], make_step: Callable) -> dict:
    """The record of `auto`'s choice on a CPU: {"choice", "why", "measured"?, "cached"?}. Read from the
    cache when this workload was measured before; else measured (`probe`) on copies of the networks
    and written there. `make_step(target, source, reg, options)` builds a step as the loop would."""
    path = cache_file(cache_root, key)
    cached = read_choice(path)
    if cached is not None:
        return {**cached, "cached": str(path)}
    x, y = probe_batch(dataset, batch)
    bf16 = cpu_has_bf16_units()

    def build(options):
        t, s, r = networks_copy(target, source, reg)
        step = make_step(t, s, r, options)

        def one():
            step.forward_backward(x, y, lr)
            step.update()
        return one, step.close
    from .evaluate import flush_denormals  # as in training: denormals would slow every candidate alike
    with flush_denormals(torch.device("cpu")), torch.random.fork_rng(devices=[]):
        record = probe(build, cpu_candidates(bf16))
    record["why"] = (f"fastest by median over {record['measured'][record['choice']]['rounds']} interleaved steps of "
                     f"this network, batch and image size on this CPU (bf16 units: {'yes' if bf16 else 'no'})")
    write_choice(path, record)
    return record


def all_auto(s) -> bool:
    """Every engine setting left to `auto` (any explicit one is the user's choice, taken as given)."""
    return (s.precision == "auto" and s.compile == "auto" and s.channels_last == "auto" and s.step_engine == "auto"
            and not s.cuda_graphs)


def engine_cache_root() -> Optional[Path]:
    """The folder the attention cache sits in ($FASTDELTA_CACHE or ~/.cache/fastdelta); "off": no cache."""
    if os.environ.get("FASTDELTA_CACHE") in ("", "off"):
        return None
    from ..attention.cache import cache_dir
    return cache_dir("auto").parent


def choose_cpu_step(s, arch: str, layers: Sequence[str], target, source, reg, dataset, resumed: Optional[str],
                    make_step: Callable) -> Tuple[Optional[StepOptions], Optional[dict]]:
    """(the step options for a CPU run whose engine settings are all `auto`, the record of why). A resumed
    run keeps the engine it started with (the same arithmetic); a run shorter than MIN_PROBE_ITERATIONS
    takes the reference step unmeasured."""
    bf16 = cpu_has_bf16_units()
    if resumed is not None:
        return options_named(resumed, bf16), {"choice": resumed, "why": "the engine the resumed run started with"}
    if s.iterations < MIN_PROBE_ITERATIONS:
        return None, {"choice": REFERENCE, "why": f"fewer than {MIN_PROBE_ITERATIONS} iterations: not worth measuring"}
    key = workload_key(arch, s.method, s.batch_size, int(dataset[0][0].shape[-1]), layers, torch.get_num_threads())
    record = cpu_auto_choice(target, source, reg, dataset, s.batch_size, s.lr, s.momentum, key,
                             engine_cache_root(), make_step)
    return options_named(record["choice"], bf16), record
