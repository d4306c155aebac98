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
from ..settings import METHODS, FitSettings, SettingsError
from .demo import DemoConfig

DEFAULT_MODEL = "resnet101"
# settings the `attention` command has no use for: the main fit's method, schedule, evaluation and run
NOT_FOR_ATTENTION = ("method", "alpha", "beta", "feature_map", "delta_scale", "delta_no_att_scale", "source_bn",
                     "feature_scale", "iterations", "lr_schedule", "lr_step", "lr_gamma", "attention",
                     "eval_every", "eval_images", "checkpoint_every", "overwrite", "allow_low_disk", "extra")


def option_fields(cls: type, exclude=()) -> list:
    """The fields of dataclass `cls` the command line sets with an option of their own."""
    return [f for f in dataclasses.fields(cls) if f.name not in exclude and f.metadata.get("cli") is None]


def setting_fields(exclude=()) -> list:
    return option_fields(FitSettings, exclude)


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
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default is None or "(default" in f.metadata["help"]:
        return ""
    if isinstance(default, bool):
        shown = "yes" if default else "no"
    elif isinstance(default, (list, tuple)):
        shown = ",".join(map(str, default))
    else:
        shown = default
    return f" (default: {shown})"


def add_options(group, cls: type, exclude=()) -> None:
    """One option per field of dataclass `cls` (`--name-with-dashes` and the field's extra flags): its
    type, choices and help come from the field (fastdelta.settings.setting), and its default stays the
    dataclass's (an option not given is not passed, so the dataclass alone says the default)."""
    for f in option_fields(cls, exclude):
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


def add_setting_options(p: argparse.ArgumentParser, exclude=()) -> None:
    """An option per FitSettings field (those in `exclude` left out)."""
    add_options(p.add_argument_group("settings", "fit settings (FitSettings)"), FitSettings, exclude)


def given_fields(args, cls: type) -> dict:
    """The fields of `cls` written on the command line (options not given are absent: the defaults)."""
    names = {f.name for f in option_fields(cls)}  # not run_dir / resume: --out and --resume RUN_DIR set those
    return {k: v for k, v in vars(args).items() if k in names}


def given_settings(args) -> dict:
    return given_fields(args, FitSettings)


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
    from .compare.compare_settings import COMPARE_SETS, CompareSettings
    p = sub.add_parser("compare", help="run several methods x seeds under identical settings; write a report",
                       description="The paper's comparison on your data: alpha/beta chosen on a validation split "
                                   "of the training set, every method per seed with the same data order, then "
                                   "report.md, report.json and figures (Table 1, Fig. 3-6 analogs) in --out.")
    _add_model_args(p)
    p.set_defaults(out="fastdelta-compare")
    c = p.add_argument_group("comparison", "how the comparison runs (CompareSettings)")
    add_options(c, CompareSettings)
    c.add_argument("--per-class", type=int, default=None,
                   help="with --data fashion-mnist: training images per class (default 10)")
    c.add_argument("--subset-seed", type=int, default=0, help="with --data fashion-mnist: which images")
    add_setting_options(p, exclude=COMPARE_SETS)


def _add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="ImageNet EfficientNet-Lite0 -> few-shot Fashion-MNIST, several methods",
                       description="Runs the embedded default on real weights and real data and prints a table "
                                   "of test top-1 per method. Sizes are settings; defaults finish in minutes on a "
                                   "2-core CPU.")
    add_options(p, DemoConfig)


def _add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: `fastdelta bench step` times the training step of every method",
                       description="Benchmarks (fastdelta/apps/bench/).")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    from .bench import add_arguments as _bench_arguments
    _bench_arguments(bench_sub.add_parser(
        "step", help="training step of every method vs the public recipe (JSON + Markdown table)"))


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _compare(args) -> None:
    from .compare import CompareSettings, compare
    train, test = args.data, args.test
    if args.data == "fashion-mnist":  # the embedded real dataset, few-shot
        from ..data.fashion_mnist import few_shot_subset, load_fashion_mnist
        train = few_shot_subset(*load_fashion_mnist("train"), args.per_class or 10, args.subset_seed)
        test = load_fashion_mnist("test")
    elif args.per_class is not None:
        raise ValueError("--per-class only applies to --data fashion-mnist")
    cs = CompareSettings(**given_fields(args, CompareSettings))
    compare(args.model or DEFAULT_MODEL, train, test, methods=cs.methods, seeds=cs.seeds, search=cs.search,
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
    from .demo import run_demo
    cfg = DemoConfig(**given_fields(args, DemoConfig))
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise SettingsError(f"--methods: unknown {unknown}; valid: {', '.join(METHODS)}")
    with _output_folder(cfg.out):
        run_demo(cfg)


def _save_partial(partial, out) -> None:
    """The diverged run's partial result in OUT; a failed write is said, and the exit status stays 3."""
    from ..output_files import reason
    try:
        partial.save(out)
    except (OSError, RuntimeError) as e:
        why = reason(e) if isinstance(e, OSError) else str(e)
        print(f"fastdelta: note: the partial result could not be saved in {out}: {why}", file=sys.stderr)
