"""Command line: `fastdelta fit`, `fastdelta attention`, `fastdelta demo`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from ..attention.measure import compute_attention
from ..fitting import fit
from ..settings import ATTENTION_IMPLS, DEFAULT_RECIPE, METHODS, RECIPES, FitSettings, SettingsError
from .demo import DEMO_METHODS

DEFAULT_MODEL = "resnet101"
# settings the `attention` command has no use for: the main fit's method, schedule, evaluation and run
NOT_FOR_ATTENTION = ("method", "alpha", "beta", "feature_map", "delta_scale", "delta_no_att_scale", "source_bn",
                     "feature_scale", "iterations", "lr_schedule", "lr_step", "lr_gamma", "attention",
                     "eval_every", "eval_images", "checkpoint_every", "overwrite", "allow_low_disk", "extra")


def _csv(value: str):
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str):
    try:
        return [float(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma separated numbers, got {value!r}") from None


def setting_fields(exclude=()) -> list:
    """The FitSettings fields the command line sets with an option of their own."""
    return [f for f in dataclasses.fields(FitSettings) if f.name not in exclude and f.metadata.get("cli") is None]


def _value_parser(f: dataclasses.Field):
    """text -> value for field `f`: its `parse`, else from its type (Optional[...] stripped)."""
    parse = f.metadata.get("parse")
    if parse is not None:
        def checked(text):
            try:
                return parse(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        checked.__name__ = f.name  # argparse names the type in its error message
        return checked
    kind = str(f.type).removeprefix("Optional[").removesuffix("]")
    return {"float": float, "int": int, "str": str, "bool": bool}[kind]


def _default_text(f: dataclasses.Field) -> str:
    if f.default is None or f.default is dataclasses.MISSING or "(default" in f.metadata["help"]:
        return ""
    shown = ("yes" if f.default else "no") if isinstance(f.default, bool) else f.default
    return f" (default: {shown})"


def add_setting_options(p: argparse.ArgumentParser, exclude=()) -> None:
    """One option per FitSettings field (`--name-with-dashes` and the field's extra flags): its type,
    choices and help come from the field, and its default stays the settings' (an option not given is
    not passed, so FitSettings alone says the default)."""
    group = p.add_argument_group("settings", "fit settings (FitSettings); defaults in brackets")
    for f in setting_fields(exclude):
        flags = [f"--{f.name.replace('_', '-')}", *f.metadata["flags"]]
        help_text = f.metadata["help"] + _default_text(f)
        if str(f.type) == "bool":
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
            continue
        choices = f.metadata["choices"]
        choices = choices() if callable(choices) else choices
        group.add_argument(*flags, dest=f.name, type=_value_parser(f), choices=choices, default=argparse.SUPPRESS,
                           help=help_text, metavar=None if choices else f.name.upper())


def given_settings(args) -> dict:
    """The settings written on the command line (options not given are absent: FitSettings' defaults)."""
    names = {f.name for f in setting_fields()}  # not run_dir / resume: --out and --resume RUN_DIR set those
    return {k: v for k, v in vars(args).items() if k in names}


def _add_model_args(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    p.add_argument("--data", required=data_required,
                   help="ImageFolder root with train/<class>/* (and test/<class>/*)"
                        + ("" if data_required else "; with --resume: the run's, unless given"))
    p.add_argument("--test", default=None, help="test ImageFolder root (default: DATA/test if it exists)")
    p.add_argument("--model", default=None, help=f"torchvision or timm model name (default: {DEFAULT_MODEL})")
    p.add_argument("--weights", default=None,
                   help="source weights: a state-dict path, 'imagenet' (efficientnet_lite0 only) or 'random'")
    p.add_argument("--out", default=None, help="output folder (required unless --resume gives it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdelta", description="DELTA transfer learning and its baselines")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_fit_command(sub)
    _add_attention_command(sub)
    _add_compare_command(sub)
    _add_demo_command(sub)
    _add_bench_command(sub)
    return parser


def _add_fit_command(sub) -> None:
    p = sub.add_parser("fit", help="fine-tune a pre-trained CNN with one method", description=(
        "Fine-tune with one of the DELTA paper's methods; writes result.json, history.jsonl, model.pt, "
        "channel_attention.json (attention methods) and history.png to --out."), epilog=(
        "Exit status: 0 done; 2 an error in the settings, the data or the output folder (checked before any "
        "work; a write failing later names the checkpoint to resume from); 3 a loss term diverged; 4 stopped "
        "by SIGTERM or SIGINT (while training: after the step in progress, with a checkpoint written; continue "
        "with --resume OUT, which reads every setting from OUT)."))
    _add_fit_arguments(p)


def _add_fit_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_args(p, data_required=False)
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest valid checkpoint, with the data, model and "
                        "settings it was started with (options given as well must agree with them)")
    add_setting_options(p)


def _add_attention_command(sub) -> None:
    p = sub.add_parser("attention", help="compute and save the channel attention (Algorithm 1) only",
                       description="Train the L2-FE head, measure each channel's loss increase, write "
                                   "channel_attention.json (ours and the public code's layout) to --out.")
    _add_model_args(p)
    add_setting_options(p, exclude=NOT_FOR_ATTENTION)


def _add_compare_command(sub) -> None:
    from .compare.comparison import COMPARE_SETS
    p = sub.add_parser("compare", help="run several methods x seeds under identical settings; write a report",
                       description="The paper's comparison on your data: alpha/beta chosen on a validation split "
                                   "of the training set, every method per seed with the same data order, then "
                                   "report.md, report.json and figures (Table 1, Fig. 3-6 analogs) in --out.")
    _add_model_args(p)
    p.set_defaults(out="fastdelta-compare")
    c = p.add_argument_group("comparison")
    c.add_argument("--methods", type=_csv, default=list(METHODS), help=f"comma separated, from {', '.join(METHODS)}")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    c.add_argument("--search", choices=["alpha", "grid", "none"], default="alpha",
                   help="alpha (the others fixed), grid (every tuned hyperparameter) or none (use the settings)")
    c.add_argument("--alpha-grid", type=_floats, default=None, help="alpha values to search (default: each "
                   "method's grid; the paper's 0.0001, 0.001, 0.01, 0.1, 0.2)")
    c.add_argument("--beta-grid", type=_floats, default=None, help="beta values of --search grid (default: each "
                   "method's grid)")
    c.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out for the search")
    c.add_argument("--folds", type=int, default=1,
                   help="K >= 2: choose alpha (and beta) by K-fold cross-validation, as the paper (5), "
                        "instead of one holdout of --val-fraction")
    c.add_argument("--schedules", type=_csv, default=["step", "exp"],
                   help="Fig. 3: the first seed's l2_sp and delta also run with each of these lr schedules")
    c.add_argument("--curve-points", type=int, default=10, help="test evaluations along training (Fig. 3)")
    c.add_argument("--curve-images", type=int, default=2000, help="test images per curve point")
    c.add_argument("--per-class", type=int, default=None,
                   help="with --data fashion-mnist: training images per class (default 10)")
    c.add_argument("--subset-seed", type=int, default=0, help="with --data fashion-mnist: which images")
    c.add_argument("--reuse-runs", "--reuse-search", dest="reuse_runs", action="store_true",
                   help="take back the runs (search and final) an interrupted compare finished in --out, with "
                        "the same settings, data and source weights, instead of refitting them")
    add_setting_options(p, exclude=COMPARE_SETS)


def _add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="ImageNet EfficientNet-Lite0 -> few-shot Fashion-MNIST, several methods",
                       description="Runs the embedded default on real weights and real data and prints a table "
                                   "of test top-1 per method. Sizes are settings; defaults finish in minutes on a "
                                   "2-core CPU.")
    p.add_argument("--methods", type=_csv, default=list(DEMO_METHODS),
                   help=f"comma separated, from {', '.join(METHODS)}")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--test-images", type=int, default=None, help="default: all 10,000")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--alpha-feature", type=float, default=1e-4, help="alpha of delta / delta_no_att")
    p.add_argument("--alpha-sp", type=float, default=0.01, help="alpha of l2_sp / l2_sp_att")
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--head-epochs", type=int, default=10)
    p.add_argument("--attention-impl", choices=list(ATTENTION_IMPLS), default="prefix")
    p.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fastdelta-demo")
    p.add_argument("--no-progress", action="store_true")


def _add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: `fastdelta bench step` times the training step of every method",
                       description="Benchmarks (fastdelta/bench.py).")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    from .bench import add_arguments as _bench_arguments
    _bench_arguments(bench_sub.add_parser(
        "step", help="training step of every method vs the public recipe (JSON + Markdown table)"))


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _compare(args) -> None:
    from .compare.comparison import CompareSettings, compare
    train, test = args.data, args.test
    if args.data == "fashion-mnist":  # the embedded real dataset, few-shot
        from ..data.fashion_mnist import few_shot_subset, load_fashion_mnist
        train = few_shot_subset(*load_fashion_mnist("train"), args.per_class or 10, args.subset_seed)
        test = load_fashion_mnist("test")
    elif args.per_class is not None:
        raise ValueError("--per-class only applies to --data fashion-mnist")
    cs = CompareSettings(alpha_grid=args.alpha_grid, beta_grid=args.beta_grid, val_fraction=args.val_fraction,
                         schedules=args.schedules, curve_points=args.curve_points, curve_images=args.curve_images,
                         reuse_runs=args.reuse_runs, folds=args.folds)
    compare(args.model or DEFAULT_MODEL, train, test, methods=args.methods, seeds=args.seeds, search=args.search,
            out=args.out, weights=args.weights, compare_settings=cs, **given_settings(args))
    print((Path(args.out) / "report.md").read_text().split("## The paper")[0])
    print(f"report: {(Path(args.out) / 'report.md').resolve()}")


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command == "fit" and args.resume:
        args.out = args.out or args.resume
        if Path(args.out).resolve() != Path(args.resume).resolve():
            parser.error("--resume RUN_DIR continues in RUN_DIR; --out, if given, must be the same folder")
        if getattr(args, "overwrite", False):
            parser.error("--resume continues the run in RUN_DIR, --overwrite replaces it: choose one")
    elif args.command == "fit" and args.data is None:
        parser.error("the following arguments are required: --data (or --resume RUN_DIR)")
    if args.command in ("fit", "attention") and not args.out:
        parser.error("--out is required")
    warnings.simplefilter("default", UserWarning)
    if args.command == "bench":
        from .bench import run as run_bench
        try:
            run_bench(args)
        except ValueError as e:
            print(f"fastdelta: error: {e}", file=sys.stderr)
            return 2
        return 0
    from ..train.loop import NonFiniteLossError
    from ..train.preempt import Preempted
    try:
        _run(args)
    except NonFiniteLossError as e:
        print(f"fastdelta: error: {e}", file=sys.stderr)
        if e.partial_result is not None and args.command == "fit" and _is_main():
            _save_partial(e.partial_result, args.out)
        return 3
    except Preempted as e:
        if _is_main():
            print(f"fastdelta: {e}", file=sys.stderr)
        return 4
    except (ValueError, OSError) as e:  # OutputError, a DataError, a file missing or a disk full
        print(f"fastdelta: error: {e}", file=sys.stderr)
        return 2
    return 0


def _run(args) -> None:
    if args.command == "fit":
        given = {k: v for k, v in (("model", args.model), ("train", args.data), ("test", args.test),
                                   ("weights", args.weights)) if v is not None}
        given.update(given_settings(args))
        call = _resumed_call(given, args.resume) if args.resume else {"model": DEFAULT_MODEL, "test": None, **given}
        res = fit(**call, run_dir=args.out, resume=bool(args.resume), distributed=_under_torchrun())
        if _is_main():  # fit() has written OUT (rank 0 only)
            print(json.dumps({"method": res.method, "test": res.test, "out": str(Path(args.out).resolve())}))
    elif args.command == "attention":
        _attention(args)
    elif args.command == "compare":
        _compare(args)
    else:
        _demo(args)


def _resumed_call(given: dict, run_dir) -> dict:
    """The fastdelta.fit call the run in `run_dir` was started with (its latest checkpoint keeps it), with
    what this command line gives (`given`: model, train, test, weights, settings) put over it; fit then
    refuses any that changes the result, naming it."""
    from ..train.checkpoint import CheckpointError, load_latest
    ckpt = load_latest(Path(run_dir) / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"resume: no checkpoint in {Path(run_dir) / 'checkpoints'}")
    saved = ckpt.get("call")
    if saved is None:  # written before checkpoints kept their call: the command line must give it
        if "train" not in given:
            raise SettingsError(f"--resume {run_dir}: its checkpoint does not record how the run was started "
                                "(an older fastdelta wrote it): give --data, --model, --weights and the other "
                                "options of the original command")
        return {"model": DEFAULT_MODEL, "test": None, **given}
    objects = [k for k in saved["objects"] if k not in given]
    if objects:
        flags = ", ".join("--data" if k == "train" else f"--{k}" for k in objects)
        raise SettingsError(f"--resume {run_dir}: the run was started from Python with its {', '.join(objects)} "
                            f"given as objects: resume it with fastdelta.fit(..., resume=True), or give {flags}")
    merged = {k: saved[k] for k in ("model", "train", "test", "weights")}
    merged.update(saved["settings"])
    merged.update(given)
    return merged


def _output_folder(out):
    """OUT checked, marked as fastdelta's and locked for the command (rank 0 only under torchrun)."""
    from contextlib import nullcontext

    from ..output_files import check_output_dir
    from ..run_folder import RunFolder
    if not _is_main():
        return nullcontext()
    check_output_dir(out)  # before the work, not at its end
    return RunFolder.claim(out, check_earlier=False)


def _attention(args) -> None:
    from ..output_files import OutputError, reason
    from ..train.preempt import StopOutsideTraining
    # SIGTERM/SIGINT: a Preempted (exit 4) saying that nothing was kept, not a silent death
    with _output_folder(args.out), StopOutsideTraining(phase="computing the channel attention").installed():
        att = compute_attention(args.model or DEFAULT_MODEL, args.data, args.weights,
                                  distributed=_under_torchrun(), **given_settings(args))
        if not _is_main():
            return
        path = Path(args.out) / "channel_attention.json"
        try:
            att.save(path)
        except OSError as e:
            raise OutputError(f"could not write {path}: {reason(e)}", e.errno) from e
    print(json.dumps({"layers": att.layers, "images": att.images, "impl": att.impl, "out": str(path.resolve())}))


def _demo(args) -> None:
    from .demo import DemoConfig, run_demo
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SettingsError(f"--methods: unknown {unknown}; valid: {', '.join(METHODS)}")
    with _output_folder(args.out):
        run_demo(DemoConfig(args.methods, args.per_class, args.test_images, args.image_size, args.iterations,
                            args.batch_size, args.lr, args.alpha_feature, args.alpha_sp, args.beta,
                            args.head_epochs, args.seed, args.out, not args.no_progress,
                            args.attention_impl, args.recipe))


def _save_partial(partial, out) -> None:
    """The diverged run's partial result in OUT; a failed write is said, and the exit status stays 3."""
    from ..output_files import reason
    try:
        partial.save(out)
    except (OSError, RuntimeError) as e:
        why = reason(e) if isinstance(e, OSError) else str(e)
        print(f"fastdelta: note: the partial result could not be saved in {out}: {why}", file=sys.stderr)
