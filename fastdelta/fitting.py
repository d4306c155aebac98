"""`fastdelta.fit`, the library entry point: data -> networks -> attention -> training -> result."""
from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.utils.data import Subset

from .data.backend import choose_backend
from .data.inputs import check_output_outside_data
from .data.fingerprint import state_sha256
from .output_files import check_output_dir, require_free_space
from .methods import method_class
from .attention.cache import cache_dir
from .attention.measure import load_attention, measure_attention
from .attention.weights import ChannelAttention
from .networks.models import Networks
from .networks.named_weights import is_weights_name
from .result import FitResult
from .run_folder import RunFolder
from .run_setup import prepare_run, run_context, shard
from .settings import FitSettings, SettingsError, make_settings
from .train.callbacks import (BestWeights, Callback, EarlyStopping, ValidationEvaluator, check_loggers,
                               make_loggers, saved_selection, selection_record, stopped_early)
from .train.checkpoint import (KEEP, CheckpointError, checkpoint_bytes, load_latest, resume_hint, state_bytes,
                               write_failed)
from .train.distributed import DistContext, collective_timeout
from .train.evaluate import evaluate
from .train.identity import check_identity, run_identity
from .train.engine_choice import all_auto, choose_cpu_step
from .train.loop import (NonFiniteLossError, StartState, TrainSpec, build_step, make_loader, param_groups,
                         set_training_mode, train_loop)
from .train.preempt import StopOutsideTraining
from .train.steps import resolve_step_options

# settings that may differ between a run and its resumption: they do not change the result (the
# global batches are the same on any number of ranks, so a DDP run may resume on one process)
RESUMABLE_DIFFERENCES = {"progress", "device", "num_workers", "eval_batch_size", "resume", "run_dir",
                         "checkpoint_every", "attention", "extra", "distributed", "data_prefetch", "overwrite",
                         "allow_overlap", "allow_low_disk", "dist_timeout", "loggers",
                         "val"}  # val: how its path is written; the data record holds its root and fingerprint
# what a run's call record leaves out: where and how this process runs it, not what it computes
NOT_RECORDED = ("run_dir", "resume", "overwrite", "distributed", "attention")


def _writes_files(s: FitSettings) -> bool:
    """Whether this process writes the run's files: under torchrun only rank 0 does (its context is
    not set up yet when the output folder is checked)."""
    return not s.distributed or os.environ.get("RANK", "0") == "0"


def _output_bytes(nets: Networks, s: FitSettings) -> int:
    """Disk space the run needs at most: model.pt, and with checkpoints the KEEP kept ones plus the
    one being written (AdamW's second moment and keep="best"'s copy of the weights: a model's size more each)."""
    extra = state_bytes(nets.target) * ((s.optimizer == "adamw") + (s.keep == "best"))
    return state_bytes(nets.target) + ((KEEP + 1) * (checkpoint_bytes(nets.target) + extra)
                                       if s.checkpoint_every > 0 else 0)


def _model_info(nets: Networks) -> dict:
    """The model record; source_sha256 tells whether two runs started from the same weights."""
    return {"arch": nets.arch, "weights": nets.weights, "head": nets.head_name, "layers": nets.layers,
            "parameters": sum(p.numel() for p in nets.target.parameters()),
            "source_sha256": state_sha256(nets.source)}


# training images (centre crop) a method may measure before training (Method.prepare: e.g. the source
# maps' energy of feature_scale="source_energy")
PREPARE_IMAGES = 256


def _prepare_images(data, s: FitSettings, device):
    """The first PREPARE_IMAGES training images (centre crop) in batches, read only if a method asks;
    the same on every rank."""
    n = min(PREPARE_IMAGES, len(data.train_eval))
    loader = make_loader(Subset(data.train_eval, range(n)), max(1, min(s.eval_batch_size, n)), False, s.seed,
                         s.num_workers)
    for x, _ in loader:
        yield x.to(device)


def _identity(s: FitSettings, info: dict, data, world_size: int) -> dict:
    """What a checkpoint must agree with to be resumed: every result-changing setting, the model, the
    data, and the fingerprints of the data's and the source weights' contents."""
    settings = {k: v for k, v in s.to_dict().items() if k not in RESUMABLE_DIFFERENCES}
    return run_identity(settings, info, data.description, world_size)


def _resume_state(s: FitSettings, nets: Networks, identity: dict, data):
    ckpt = load_latest(Path(s.run_dir) / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"resume: no checkpoint in {Path(s.run_dir) / 'checkpoints'}")
    check_identity(ckpt["identity"], identity, s.run_dir, ckpt.get("data_files"), data.listings)
    nets.target.load_state_dict(ckpt["model"])
    att = None
    if ckpt.get("attention") is not None:
        att = ChannelAttention.from_dict(ckpt["attention"])
    return StartState(ckpt["iteration"], ckpt["history"], ckpt["optimizer"], ckpt["rng"],
                      ckpt.get("step_choice"), cpu_threads=ckpt.get("cpu_threads"),
                      callbacks=ckpt.get("callbacks")), att


def _curve_evaluator(model: nn.Module, test, s: FitSettings, device, ctx: DistContext):
    """With eval_every > 0: a step callback that adds test_top1 (on the first eval_images test images)
    to the history every eval_every iterations and at the last one, for learning curves."""
    if not s.eval_every or test is None:
        return None
    subset = test if s.eval_images is None else Subset(test, range(min(s.eval_images, len(test))))
    loader = make_loader(shard(subset, ctx), s.eval_batch_size, False, s.seed, s.num_workers)

    def evaluates(done: int) -> bool:
        return done % s.eval_every == 0 or done == s.iterations

    def on_step(done: int, record: dict) -> None:
        if evaluates(done):
            was_training = model.training  # evaluate() leaves eval mode; L2-FE trains in eval mode
            record["test_top1"] = evaluate(model, loader, device, False, "curve", ctx)["top1"]
            model.train(was_training)
            record["test_images"] = len(subset)
    on_step.reads_model = evaluates  # the training loop waits for the step before these iterations
    return on_step


def _dali_kwargs(s: FitSettings, device) -> dict:
    return dict(augmentation=s.augmentation, resize=s.resize, crop=s.crop, prefetch=s.data_prefetch,
                device_id=(device.index or 0) if device.type == "cuda" else None)


def _dali_train_factory(data, s: FitSettings, device, step_options):
    """(start_iteration, ctx) -> DALI training loader: the torchvision path's batches, crops and flips."""
    def make(start_iteration: int, ctx: DistContext):
        from .data.dali import dali_train_loader
        return dali_train_loader(data.train.samples, s.batch_size, s.seed, start_iteration, ctx.rank,
                                 ctx.world_size, channels_last=bool(step_options and step_options.channels_last),
                                 **_dali_kwargs(s, device))
    return make


def _dali_eval_loader(test, s: FitSettings, device, ctx: DistContext):
    from .data.dali import dali_eval_loader
    samples = test.samples[ctx.rank::ctx.world_size] if ctx.active else test.samples
    return dali_eval_loader(samples, s.eval_batch_size, **_dali_kwargs(s, device))


def fit(model: Union[str, nn.Module], train, test=None, method: str = FitSettings.method, weights=None,
        callbacks=None, **settings) -> FitResult:
    """Fine-tune `model` on `train` with one of the paper's methods and evaluate on `test`.

    model: torchvision/timm name or nn.Module; weights: state-dict path, "imagenet" (EfficientNet-Lite0,
    shipped), a name of pre-trained weights (torchvision's DEFAULT, IMAGENET1K_V1, ...; "pretrained" for timm)
    read from torch hub's or Hugging Face's cache (never downloaded), or None/"random" (warned). train/test: ImageFolder root, torch Dataset or (images, labels).
    Settings: see FitSettings. Raises NonFiniteLossError (with .partial_result) if a loss term diverges,
    OutputError if run_dir cannot take the run's files (checked first: another run holding it, an
    earlier run's files without resume/overwrite, too little free space) or a write fails,
    Preempted on SIGTERM/SIGINT with a run_dir (while training after a checkpoint; before or after it at
    once, saying what was kept), and CollectiveTimeout (an OSError) when a rank stalls past dist_timeout.
    Resuming a run that finished returns its saved result and leaves its files as they are (a warning).
    Under torchrun with distributed=True every rank returns the result; only rank 0 writes files.
    """
    requested = make_settings(method, **settings)
    callbacks = _user_callbacks(callbacks)
    check_loggers(requested.loggers)  # a logger's missing package: an error before any work
    if requested.resume and requested.overwrite:
        raise SettingsError("resume=True continues the run in run_dir, overwrite=True replaces it: choose one")
    call = call_record(model, train, test, weights, requested)
    check_output_outside_data(requested.run_dir, train, test)  # before the run folder is marked
    with _run_folder(requested), _stop_outside_training(requested) as stop:
        try:
            return _fit(model, train, test, weights, requested, stop, call, callbacks)
        except RuntimeError as e:
            checkpoints = None if requested.run_dir is None else Path(requested.run_dir) / "checkpoints"
            timeout = collective_timeout(e, requested.dist_timeout, resume_hint(checkpoints)) \
                if requested.distributed else None
            if timeout is None:
                raise
            raise timeout from e


def call_record(model, train, test, weights, s: FitSettings) -> dict:
    """How a run was started, kept in its checkpoints so that `fastdelta fit --resume RUN` alone can start
    it again: names, absolute paths (a resume may start in another folder) and the settings as given
    (resolved again the same way). `objects` names what was a Python object (a Dataset, arrays, an
    nn.Module), which only Python can pass again."""
    def path(v):
        return os.path.abspath(v) if isinstance(v, (str, os.PathLike)) else None
    given = {"model": model if isinstance(model, str) else None, "train": path(train), "test": path(test),
             "weights": weights if weights is None or str(weights) in ("imagenet", "random") or is_weights_name(weights)
             else path(weights)}
    objects = [k for k, v in (("model", model), ("train", train), ("test", test), ("weights", weights),
                              ("val", s.val))
               if v is not None and (given[k] if k in given else path(v)) is None]
    settings = {k: v for k, v in s.to_dict().items() if k not in NOT_RECORDED}
    settings["val"] = path(s.val)  # absolute, as train and test; an object is named in `objects`
    return {**given, "objects": objects, "settings": json.loads(json.dumps(settings, default=str))}


@contextmanager
def _run_folder(s: FitSettings):
    """run_dir checked and locked for the life of the run, before any work (a bad or busy folder fails
    now, not after the training); nothing to hold without one, or on a torchrun rank that writes nothing."""
    if s.run_dir is None or not _writes_files(s):
        yield None
        return
    check_output_dir(s.run_dir, create=not s.resume)
    keep = [s.attention] if isinstance(s.attention, (str, os.PathLike)) else []  # an input, not the old run's
    with RunFolder.claim(s.run_dir, resume=s.resume, overwrite=s.overwrite, keep=keep) as folder:
        yield folder


@contextmanager
def _stop_outside_training(s: FitSettings):
    """With a run_dir (as the training loop's own handler), SIGTERM/SIGINT stop the run at once with a
    Preempted outside the loop too; without one they keep their usual effect."""
    stop = StopOutsideTraining(s.run_dir)
    if s.run_dir is None:
        yield stop
        return
    with stop.installed():
        yield stop


def _user_callbacks(callbacks) -> list:
    """fit's `callbacks`: fastdelta.train.callbacks.Callback objects (run after fastdelta's own, before the
    loggers)."""
    callbacks = list(callbacks or [])
    bad = [c for c in callbacks if not isinstance(c, Callback)]
    if bad:
        raise SettingsError(f"callbacks: {bad[0]!r} is not a fastdelta.train.callbacks.Callback (subclass it and "
                            "override the hooks you need)")
    return callbacks


def _fit(model, train, test, weights, requested: FitSettings, stop: StopOutsideTraining, call: dict,
         callbacks: list = ()) -> FitResult:
    s, data, nets = prepare_run(model, train, test, weights, requested, stop)
    if s.run_dir is not None and _writes_files(s):  # a disk known to be too small fails before the training
        require_free_space(s.run_dir, _output_bytes(nets, s), "this run's checkpoints and model.pt",
                           s.allow_low_disk)
    ctx, device = run_context(s)
    info = _model_info(nets)  # hashes the source weights while they are on the CPU
    nets.source.to(device)
    nets.target.to(device)
    timings = {}
    t_all = time.perf_counter()
    identity = _identity(s, info, data, ctx.world_size)
    start, attention = (_resume_state(s, nets, identity, data) if s.resume else (StartState(), None))
    if s.resume and (start.iteration >= s.iterations or stopped_early(start.callbacks)):
        finished = _finished_run(s, nets, attention, start, ctx)
        if finished is not None:
            return finished
    if attention is None and method_class(s.method).uses_attention:
        stop.phase = "computing the channel attention, before training"
        attention = (load_attention(s.attention, nets, s) if s.attention is not None
                     else measure_attention(nets, data, s, device, ctx))
        if s.attention is None and not ctx.active and not getattr(attention, "cache_failed", False):  # stored there
            stop.cached_attention = cache_dir(s.attention_cache)
        timings["attention"] = attention.timings.get("total", 0.0)
    stop.phase = "preparing the training, before training"
    reg, feature_source, prepared = _regulariser(s, nets, data, attention, device, ctx)
    step_options, choice = _step_options(s, device, ctx, nets, feature_source, reg, data, start, info)
    backend = choose_backend(s.data_backend, device, data.train, data.test)
    spec = _train_spec(s, data, device, ctx, nets, step_options, backend,
                       {"identity": identity, "data_files": data.listings, "call": call,
                        "attention": None if attention is None else attention.to_dict(),
                        "cpu_threads": torch.get_num_threads(),
                        "step_choice": None if choice is None else choice["choice"]}, callbacks)
    settings_record = {**s.to_dict(), "device_used": str(device), "world_size": ctx.world_size,
                       "step_used": step_options.describe() if step_options is not None else {"step_engine": "reference"},
                       "step_choice": choice,
                       "resumed_from_iteration": start.iteration if s.resume else None,
                       **_thread_change(s, start, device),
                       **prepared}
    data_record = {**data.description, "skipped_files": [list(x) for x in data.skipped],
                   "backend": backend.to_dict()}
    result = FitResult(nets.target, s.method, settings_record, info, data_record, [], {}, attention, timings)
    return _train_and_test(result, s, feature_source, reg, data, spec, device, ctx, start, backend, stop, t_all)


def _train_and_test(result: FitResult, s: FitSettings, feature_source, reg, data, spec: TrainSpec, device,
                    ctx: DistContext, start: StartState, backend, stop: StopOutsideTraining, t_all: float) -> FitResult:
    """`result` (the run's records, without history and test) trained, tested and saved."""
    timings = result.timings
    stop.phase = "training"
    t0 = time.perf_counter()
    try:
        result.history = train_loop(result.model, feature_source, reg, data.train, spec, device, ctx, start)
    except NonFiniteLossError as e:
        timings["train"] = round(time.perf_counter() - t0, 3)
        _explain_divergence(e, reg)
        result.history, result.status = e.history, f"diverged: {e}"
        e.partial_result = result
        raise
    timings["train"] = round(time.perf_counter() - t0, 3)
    result.selection = selection_record(spec.callbacks)
    ran = len(result.history) - start.iteration
    if ran:
        timings["first_step"] = result.history[start.iteration]["step_s"]
        timings["img_per_s"] = round(s.batch_size * ran / max(timings["train"], 1e-9), 2)
    stop.phase = "testing, after training"
    result.test = _test(result.model, data.test, s, device, ctx, backend, timings)
    timings["total"] = round(time.perf_counter() - t_all, 3)
    if s.run_dir is not None and ctx.is_main:
        stop.phase = "saving the results, after training"
        _save(result, Path(s.run_dir), spec.checkpoint_dir)
    return result


def _thread_change(s: FitSettings, start: StartState, device) -> dict:
    """A resume's CPU thread counts, before (the checkpoint's) and now, for the settings record; another
    count than the checkpoint's is warned on a CPU: the order of torch's sums changes, so the trajectory is
    not the one an uninterrupted run would have taken."""
    if not s.resume or start.cpu_threads is None:
        return {}
    now = torch.get_num_threads()
    if now != start.cpu_threads and device.type == "cpu":
        warnings.warn(f"fastdelta: resuming {s.run_dir} with {now} CPU threads, but it ran with {start.cpu_threads} "
                      "up to its checkpoint: the order of the sums changes, so the rest of the trajectory will "
                      f"differ from an uninterrupted run's (torch.set_num_threads({start.cpu_threads}) or "
                      f"OMP_NUM_THREADS={start.cpu_threads} keeps it); result.json records both counts",
                      UserWarning, stacklevel=4)
    return {"resumed_cpu_threads": {"checkpoint": start.cpu_threads, "now": now}}


def _finished_run(s: FitSettings, nets: Networks, attention, start: StartState, ctx: DistContext):
    """The saved result of a run that finished (last checkpoint at the last iteration, result.json
    written), its files left as they are: resuming would only test it again and overwrite its timings.
    None when it still has to test or save (stopped after its last checkpoint). Rank 0 decides for all."""
    saved = _saved_result(Path(s.run_dir), start.iteration) if ctx.is_main else None
    if ctx.all_reduce_sum(torch.tensor([float(saved is not None)])).item() == 0:
        return None
    saved = saved or {}
    best = (start.callbacks or {}).get("best_weights") or {}
    if s.keep == "best" and best.get("state") is not None:
        nets.target.load_state_dict(best["state"])  # the weights its model.pt holds
    if ctx.is_main:
        top1 = (saved.get("test") or {}).get("top1")
        early = ", stopped early" if stopped_early(start.callbacks) else ""
        warnings.warn(f"fastdelta: the run in {s.run_dir} finished ({start.iteration} of {s.iterations} "
                      f"iterations{early}); "
                      "nothing to resume: its files are left as they are"
                      + (f" (test top-1 {top1:.2f}%)" if top1 is not None else ""), UserWarning, stacklevel=4)
    return FitResult(nets.target, s.method, saved.get("settings", {}), saved.get("model", {}), saved.get("data", {}),
                     start.history, saved.get("test", {}), attention, saved.get("timings_s", {}),
                     saved.get("status", "ok"), saved_selection(start.callbacks))


def _saved_result(run_dir: Path, iterations: int) -> Optional[dict]:
    """result.json of a run that finished all `iterations`, else None."""
    try:
        saved = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("status") == "ok" and saved.get("iterations_run") == iterations else None


def _regulariser(s: FitSettings, nets: Networks, data, attention, device, ctx: DistContext):
    """(the method built with its hyperparameters, the network its source maps come from, what the
    method's preparation recorded)."""
    method = method_class(s.method)
    hyper = {name: getattr(s, name) for name in method.declared()}
    reg = method(nets.target, nets.source, nets.head_name, nets.layers,
                 None if attention is None else attention.weights, distance_impl=s.distance_impl,
                 world_size=ctx.world_size, **hyper)
    feature_source = reg.source_network(nets.source)
    with torch.no_grad():
        record = reg.prepare(feature_source, _prepare_images(data, s, device))
    return reg, feature_source, record


def _step_options(s: FitSettings, device, ctx: DistContext, nets: Networks, feature_source, reg, data,
                  start: StartState, info: dict):
    """(the step options, None for the reference step; on a CPU with every engine setting `auto`, the record
    of the measured choice, else None)."""
    if device.type == "cpu" and all_auto(s) and not ctx.active:
        def make_step(target, source, method, options):
            params = method.trainable_parameters(target)
            set_training_mode(target, method, params, "frozen")
            return build_step(target, source, method, param_groups(method, params, s.backbone_lr_mult),
                              TrainSpec(1, s.lr, s.momentum, s.batch_size, s.seed, step=options, nesterov=s.nesterov,
                                        optimizer=s.optimizer, weight_decay=s.adamw_weight_decay),
                              device, ctx,
                              guarded=False)
        return choose_cpu_step(s, info.get("arch", ""), nets.layers, nets.target, feature_source, reg, data.train,
                               start.step_choice, make_step)
    try:
        return resolve_step_options(device, s.precision, s.compile, s.channels_last, s.cuda_graphs, s.step_engine), None
    except ValueError as e:
        raise SettingsError(str(e)) from e


def _callbacks(s: FitSettings, data, ctx: DistContext, run_dir: Optional[Path], user: list) -> list:
    """The training loop's callbacks: with a validation set its evaluation, the best weights and early
    stopping; the user's; then the loggers (rank 0), which so log every field the others added."""
    callbacks = []
    if data.val is not None:
        loader = make_loader(shard(data.val, ctx), s.eval_batch_size, False, s.seed, s.num_workers)
        callbacks += [ValidationEvaluator(loader, s.eval_every, s.iterations), BestWeights(s.keep == "best")]
        if s.early_stopping_patience:
            callbacks.append(EarlyStopping(s.early_stopping_patience))
    callbacks += list(user)
    if run_dir is not None and ctx.is_main:
        callbacks += make_loggers(s.loggers, run_dir)
    return callbacks


def _train_spec(s: FitSettings, data, device, ctx: DistContext, nets: Networks, step_options, backend,
                payload_extra: dict, callbacks: list = ()) -> TrainSpec:
    """The training loop's settings: checkpoints and history.jsonl in run_dir, curve points, the loader, the
    callbacks (`callbacks`: the user's)."""
    run_dir = Path(s.run_dir) if s.run_dir is not None else None
    # with a validation set, eval_every scores it (callbacks) and the test set only at the end
    curve = _curve_evaluator(nets.target, data.test if data.val is None else None, s, device, ctx)
    return TrainSpec(s.iterations, s.lr, s.momentum, s.batch_size, s.seed, s.lr_schedule, s.lr_step, s.lr_gamma,
                     s.num_workers, s.progress, f"train {s.method}", nesterov=s.nesterov,
                     optimizer=s.optimizer, weight_decay=s.adamw_weight_decay, warmup_iterations=s.warmup_iterations,
                     callbacks=_callbacks(s, data, ctx, run_dir, callbacks),
                     backbone_lr_mult=s.backbone_lr_mult,
                     checkpoint_dir=None if run_dir is None else run_dir / "checkpoints",
                     checkpoint_every=s.checkpoint_every,
                     history_path=None if run_dir is None else run_dir / "history.jsonl",
                     payload_extra=payload_extra,
                     on_step=curve, on_step_reads_model=getattr(curve, "reads_model", None), step=step_options,
                     loader=_dali_train_factory(data, s, device, step_options) if backend.name == "dali" else None)


def _explain_divergence(e: NonFiniteLossError, reg) -> None:
    hint = reg.explain_divergence()
    if hint:
        e.args = (f"{e.args[0]}; {hint}",)


def _test(model: nn.Module, test, s: FitSettings, device, ctx: DistContext, backend, timings: dict) -> dict:
    if test is None:
        return {}
    t0 = time.perf_counter()
    loader = (_dali_eval_loader(test, s, device, ctx) if backend.name == "dali" else
              make_loader(shard(test, ctx), s.eval_batch_size, False, s.seed, s.num_workers))
    metrics = evaluate(model, loader, device, s.progress, f"test {s.method}", ctx)
    timings["test"] = round(time.perf_counter() - t0, 3)
    return metrics


def _save(result: FitResult, run_dir: Path, checkpoint_dir) -> None:
    """result.save; a failed write (atomic_write turns torch.save's RuntimeError into the OSError it stands
    for) is an OutputError naming the checkpoint to resume from."""
    try:
        result.save(run_dir)
    except OSError as e:
        raise write_failed(f"the results in {run_dir}", e, checkpoint_dir) from e
