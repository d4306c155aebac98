"""Command line: `fastdelta fit`, `attention`, `compare`, `demo`, `bench`, `predict`, `evaluate`, `export`.
Building the parser imports the settings only; each command imports what it runs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from .._version import __version__
from ..methods import L2FE
from ..methods.base import all_hyperparameters
from ..settings import METHODS, FitSettings, SettingsError, _yes_no
from .demo import DemoConfig

DEFAULT_MODEL = "resnet101"
# settings the `attention` command has no use for: the main fit's method, schedule, evaluation and run
FIT_ONLY = ("method", "iterations", "lr_schedule", "lr_step", "lr_gamma", "attention", "eval_every", "eval_images",
            "checkpoint_every", "overwrite", "allow_low_disk", "extra", "warmup_iterations", "optimizer",
            "adamw_weight_decay", "val", "keep", "early_stopping_patience", "loggers")
# the method whose head Algorithm 1 trains (fastdelta.attention.measure): its hyperparameters are attention's
ATTENTION_HEAD = L2FE


def not_for_attention() -> tuple:
    """FIT_ONLY, and every registered method's hyperparameters but the attention head's."""
    return FIT_ONLY + tuple(n for n in all_hyperparameters() if n not in ATTENTION_HEAD.declared())


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


def yes_no(text: str) -> bool:
    try:
        return _yes_no(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class YesNo(argparse.Action):
    """A bool setting in every spelling the command line uses for one: `--name`, `--name yes|no` (as the
    auto/yes/no settings take it) and `--no-name`."""

    def __init__(self, option_strings, dest, **kwargs):
        negated = [f"--no-{o[2:]}" for o in option_strings if o.startswith("--") and not o.startswith("--no-")]
        super().__init__([*option_strings, *negated], dest, nargs="?", type=yes_no, metavar="yes|no", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string.startswith("--no-"):
            if value is not None:
                parser.error(f"{option_string} takes no value: give --{option_string[5:]} yes|no")
            value = False
        setattr(namespace, self.dest, True if value is None else value)


class Merge(argparse.Action):
    """A dict setting given once per entry (`--grid alpha=0.01,0.1 --grid beta=0.01`): the entries merged."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), **value})


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, with a YesNo option shown as `--name [yes|no], --no-name`."""

    def _format_action_invocation(self, action):
        if isinstance(action, YesNo):
            return ", ".join(o if o.startswith("--no-") else f"{o} [yes|no]" for o in action.option_strings)
        return super()._format_action_invocation(action)


def add_options(group, cls: type, exclude=()) -> None:
    """One option per field of dataclass `cls` (`--name-with-dashes` and the field's extra flags): its
    type, choices and help come from the field (fastdelta.settings.setting), and its default stays the
    dataclass's (an option not given is not passed, so the dataclass alone says the default). A field
    marked deprecated keeps its option, out of the help; one marked merge is repeated, its dicts merged."""
    for f in option_fields(cls, exclude):
        flags = [f"--{f.name.replace('_', '-')}", *f.metadata["flags"]]
        help_text = argparse.SUPPRESS if f.metadata.get("deprecated") else f.metadata["help"] + _default_text(f)
        if str(f.type) == "bool":
            group.add_argument(*flags, dest=f.name, action=YesNo, default=argparse.SUPPRESS, help=help_text)
            continue
        choices = f.metadata["choices"]
        choices = choices() if callable(choices) else choices
        extra = dict(action=Merge) if f.metadata.get("merge") else {}
        group.add_argument(*flags, dest=f.name, type=_value_parser(f), choices=choices, default=argparse.SUPPRESS,
                           help=help_text, metavar=f.metadata.get("metavar") or (None if choices else f.name.upper()),
                           **extra)


def add_setting_options(p: argparse.ArgumentParser, exclude=()) -> None:
    """An option per FitSettings field (those in `exclude` left out)."""
    add_options(p.add_argument_group("settings", "fit settings (FitSettings)"), FitSettings, exclude)


def given_fields(args, cls: type) -> dict:
    """The fields of `cls` written on the command line (options not given are absent: the defaults)."""
    names = {f.name for f in option_fields(cls)}  # not run_dir / resume: --out and --resume RUN_DIR set those
    return {k: v for k, v in vars(args).items() if k in names}


def given_settings(args) -> dict:
    return given_fields(args, FitSettings)


def _add_model_args(p: argparse.ArgumentParser, data_required: bool = True,
                    out_help: str = "output folder (required unless --resume gives it)") -> None:
    p.add_argument("--data", required=data_required,
                   help="ImageFolder root with train/<class>/* (and test/<class>/*)"
                        + ("" if data_required else "; with --resume: the run's, unless given"))
    p.add_argument("--test", default=None, help="test ImageFolder root (default: DATA/test if it exists)")
    p.add_argument("--model", default=None, help=f"torchvision or timm model name (default: {DEFAULT_MODEL})")
    p.add_argument("--weights", default=None,
                   help="source weights: a state-dict path, 'imagenet' (efficientnet_lite0 only), a torchvision "
                        "weights name (DEFAULT, IMAGENET1K_V1, ...) or 'pretrained' (timm), read from torch hub's / "
                        "Hugging Face's cache (never downloaded), or 'random'")
    p.add_argument("--out", default=None, help=out_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdelta", description="DELTA transfer learning and its baselines",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastdelta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_fit_command(sub)
    _add_attention_command(sub)
    _add_compare_command(sub)
    _add_demo_command(sub)
    _add_bench_command(sub)
    _add_predict_command(sub)
    _add_evaluate_command(sub)
    _add_export_command(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
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
    _add_model_args(p, out_help="output folder")
    add_setting_options(p, exclude=not_for_attention())


def _add_compare_command(sub) -> None:
    from .compare.compare_settings import COMPARE_SETS, CompareSettings
    p = sub.add_parser("compare", help="run several methods x seeds under identical settings; write a report",
                       description="The paper's comparison on your data: each method's tuned hyperparameters "
                                   "(alpha/beta for the paper's) chosen on a validation split of the training "
                                   "set, every method per seed with the same data order, then report.md, report.json and figures (Table 1, Fig. 3-6 analogs) in --out.")
    _add_model_args(p, out_help="output folder (default: fastdelta-compare)")
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


def _add_run_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a fit's output folder (--out): result.json and model.pt")


def _add_predict_command(sub) -> None:
    p = sub.add_parser("predict", help="classify images with a fine-tuned run",
                       description="The top-k classes of each image, preprocessed as the run's test images were.")
    _add_run_argument(p)
    p.add_argument("images", metavar="IMAGES_OR_FOLDER", nargs="+",
                   help="image files, or folders (their images, in subfolders too)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--out", default=None, help="preds.csv or preds.json, one row per image (default: a table)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward (default: the run's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def _add_evaluate_command(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy of a fine-tuned run on a labelled test folder",
                       description="Top-1 (fit's rule), top-5, per-class accuracy and the confusion matrix; "
                                   "writes evaluation.json and confusion_matrix.png to --out.")
    _add_run_argument(p)
    p.add_argument("--test", required=True, help="test ImageFolder root: DIR/<class>/<image>")
    p.add_argument("--out", default=None, help="output folder (default: RUN/evaluation)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward (default: the run's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def _add_export_command(sub) -> None:
    from ..inference.export import FORMATS
    p = sub.add_parser("export", help="write a fine-tuned run's network as TorchScript, ONNX or torch.export",
                       description="Checks the export against the eager network on the same images before "
                                   "writing FILE, then writes FILE.json (transform and class names) beside it.")
    _add_run_argument(p)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    p.add_argument("--images", nargs="+", default=None,
                   help="images or folders to check the export on (default: seeded random images)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="allowed max abs logit difference, times max(1, largest |logit|) (default: 1e-4)")


def _predict(args) -> None:
    from ..inference import load
    from ..inference.outputs import predictions_table, write_predictions
    if args.out is not None and Path(args.out).suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out {args.out}: give a .csv or a .json file")
    predictions = load(args.run, args.device).predict(args.images, args.top_k, args.batch_size)
    if args.out is None:
        print(predictions_table(predictions))
        return
    write_predictions(predictions, args.out)
    print(json.dumps({"images": len(predictions), "out": str(Path(args.out).resolve())}))


def _evaluate(args) -> None:
    from ..inference import load
    from ..inference.outputs import write_evaluation
    from ..output_files import check_output_dir
    model = load(args.run, args.device)
    out = Path(args.out) if args.out else Path(args.run) / "evaluation"
    check_output_dir(out)  # before the work, not at its end
    evaluation = model.evaluate(args.test, args.batch_size)
    files = write_evaluation(evaluation, out, f"{model.record.method} ({model.record.arch})")
    print(json.dumps({"top1": evaluation.top1, "top5": evaluation.top5, "top1_10crop": evaluation.top1_10crop,
                      "images": evaluation.images, **files}))


def _export(args) -> None:
    from ..inference import load
    sidecar = load(args.run).export(args.format, args.out, images=args.images, tolerance=args.tolerance)
    print(json.dumps({"format": args.format, "out": str(Path(args.out).resolve()),
                      "sidecar": str(Path(f"{args.out}.json").resolve()), "check": sidecar["check"]}))


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
    from .compare.compare_settings import COMPARE_SETS  # compare's own option of a fit setting's name (val_fraction)
    fit_settings = {k: v for k, v in given_settings(args).items() if k not in COMPARE_SETS}
    compare(args.model or DEFAULT_MODEL, train, test, methods=cs.methods, seeds=cs.seeds, search=cs.search,
            out=args.out, weights=args.weights, compare_settings=cs, **fit_settings)
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
        if args.command == "compare":  # as a shell reports a death by that signal (SIGTERM: 143)
            import signal
            return 128 + getattr(signal.Signals, e.signal_name, signal.SIGTERM).value
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
        from ..fitting import fit
        res = fit(**call, run_dir=args.out, resume=bool(args.resume), distributed=_under_torchrun())
        if _is_main():  # fit() has written OUT (rank 0 only)
            print(json.dumps({"method": res.method, "test": res.test, "out": str(Path(args.out).resolve())}))
    elif args.command == "attention":
        _attention(args)
    elif args.command == "compare":
        _compare(args)
    elif args.command == "predict":
        _predict(args)
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "export":
        _export(args)
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
    from ..attention.measure import compute_attention
    from ..output_files import OutputError, reason
    from ..train.preempt import StopOutsideTraining
    from ..data.inputs import check_output_outside_data
    check_output_outside_data(args.out, args.data)  # before the folder is marked as output
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
    cfg.validate()
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
