"""Command line: `fastdelta fit`, `fastdelta attention`, `fastdelta demo`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from ..attention.measure import compute_attention
from ..fitting import fit
from ..settings import (ATTENTION_SAMPLES, DEFAULT_RECIPE, DELTA_NO_ATT_SCALES, DELTA_SCALES, FEATURE_MAPS,
                        FEATURE_SCALES, HEAD_BN_MODES, METHODS, NORMALISATIONS, RECIPES, SOURCE_BN_MODES, FitSettings,
                        SettingsError)
from .demo import DEMO_METHODS


def _csv(value: str):
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str):
    try:
        return [float(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma separated numbers, got {value!r}") from None


def _images(value: str):
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images or 'all', got {value!r}") from None


def _bool(value: str) -> bool:
    if value.lower() in ("yes", "true", "1"):
        return True
    if value.lower() in ("no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def _add_training_args(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    p.add_argument("--data", required=data_required,
                   help="ImageFolder root with train/<class>/* (and test/<class>/*)"
                        + ("" if data_required else "; with --resume: the run's, unless given"))
    p.add_argument("--test", default=None, help="test ImageFolder root (default: DATA/test if it exists)")
    p.add_argument("--model", default="resnet101", help="torchvision or timm model name (default: resnet101)")
    p.add_argument("--weights", default=None,
                   help="source weights: a state-dict path, 'imagenet' (efficientnet_lite0 only) or 'random'")
    p.add_argument("--layers", type=_csv, default=None, help="regularised layers, comma separated module names")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default 0.01 (0.001 for inception_v3)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--resize", type=int, default=None, help="default 256 (320 for inception_v3)")
    p.add_argument("--crop", type=int, default=None, help="default 224 (299 for inception_v3)")
    p.add_argument("--augmentation", choices=["default", "improved"], default="default")
    p.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                   help="conventions where the paper and its public code differ: public (default) or paper; "
                        "the five options below override single ones")
    p.add_argument("--feature-map", choices=FEATURE_MAPS, default=None,
                   help="conv: raw conv output (public code); activation: ReLU after the conv's BN (paper); "
                        "relu_conv: ReLU of the pre-BN conv output (neither)")
    p.add_argument("--delta-scale", choices=DELTA_SCALES, default=None,
                   help="delta: public (0.5 sum_j c W_j ||d_j||^2 / (h w), summed over the batch) or paper_eq8 "
                        "(sum_j W_j ||d_j||^2 per image, mean over the batch)")
    p.add_argument("--delta-no-att-scale", choices=DELTA_NO_ATT_SCALES, default=None,
                   help="delta_no_att: sum (public fea_map, 0.5 sum ||d||^2), uniform_attention (/ h w) or "
                        "paper_eq5 (sum_j ||d_j||^2 per image, mean over the batch)")
    p.add_argument("--attention-normalisation", choices=NORMALISATIONS, default=None,
                   help="W from the loss increases: zscore_softmax (public, softmax(zscore / T)) or softmax (paper)")
    p.add_argument("--attention-sample", choices=ATTENTION_SAMPLES, default=FitSettings.attention_sample,
                   help="which training images the attention measures when capped: random (seeded) or first")
    p.add_argument("--attention-head-bn", choices=HEAD_BN_MODES, default=None,
                   help="attention head training: train (BN statistics adapt, public) or frozen (eval mode)")
    p.add_argument("--attention-max-images", type=_images, default=None,
                   help="images for the attention: a number or 'all' (public: 128, paper: all)")
    p.add_argument("--attention-augmented", type=_bool, default=None,
                   help="yes: those images with the training augmentation (public); no: centre crop (paper)")
    p.add_argument("--source-bn", choices=SOURCE_BN_MODES, default=FitSettings.source_bn,
                   help="source maps with running BN statistics (public, paper) or the batch's own (not in the paper)")
    p.add_argument("--feature-scale", choices=FEATURE_SCALES, default=FitSettings.feature_scale,
                   help="source_energy: each layer's term divided by the source maps' energy (not in the paper)")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (tllib)")
    p.add_argument("--backbone-lr-mult", type=float, default=FitSettings.backbone_lr_mult,
                   help="lr of the pre-trained layers = lr x this (tllib: 0.1)")
    p.add_argument("--temperature", type=float, default=5.0, help="attention softmax temperature")
    p.add_argument("--attention-impl", choices=["prefix", "masked_forward", "first_order"], default="prefix",
                   help="exact: prefix (default, fast) or masked_forward (literal); first_order: Taylor estimate")
    p.add_argument("--attention-dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--attention-cache", default="auto",
                   help="attention cache folder ('auto': $FASTDELTA_CACHE or ~/.cache/fastdelta, 'off': none)")
    _add_run_args(p)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Where and how the run goes: seed, device, workers, data strictness, output."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--strict-data", action="store_true", help="a bad image file is fatal instead of skipped")
    p.add_argument("--allow-overlap", action="store_true",
                   help="go on when test images are also training images (same file or same bytes; "
                        "counted in result.json) instead of failing")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dist-timeout", type=float, default=FitSettings.dist_timeout, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others in a collective before the run "
                        "fails (a stalled rank would otherwise hang the job)")
    p.add_argument("--out", default=None, help="output folder (required unless --resume gives it)")


def _settings(a) -> dict:
    return dict(weights=a.weights, layers=a.layers, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum,
                resize=a.resize, crop=a.crop, augmentation=a.augmentation, recipe=a.recipe, feature_map=a.feature_map,
                delta_no_att_scale=a.delta_no_att_scale, delta_scale=a.delta_scale,
                attention_normalisation=a.attention_normalisation, attention_sample=a.attention_sample,
                attention_head_bn=a.attention_head_bn,
                attention_augmented=a.attention_augmented, source_bn=a.source_bn, feature_scale=a.feature_scale,
                nesterov=a.nesterov, backbone_lr_mult=a.backbone_lr_mult,
                attention_temperature=a.temperature, attention_max_images=a.attention_max_images,
                attention_impl=a.attention_impl, attention_dtype=a.attention_dtype,
                attention_cache=None if a.attention_cache == "off" else a.attention_cache, seed=a.seed, device=a.device, num_workers=a.workers,
                strict_data=a.strict_data, allow_overlap=a.allow_overlap, progress=not a.no_progress,
                dist_timeout=a.dist_timeout)


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
    _add_training_args(p, data_required=False)
    p.add_argument("--method", choices=list(METHODS), default=FitSettings.method)
    p.add_argument("--alpha", type=float, default=None,
                   help="weight of the regulariser (default: the method's, see the README's method table)")
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="for l2 and l2_fe")
    p.add_argument("--iterations", type=int, default=9000)
    p.add_argument("--lr-schedule", choices=["step", "exp"], default="step")
    p.add_argument("--lr-step", type=int, default=None, help="default: 2/3 of the iterations")
    p.add_argument("--attention", default=None, help="precomputed channel_attention.json to reuse")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="iterations between checkpoints in OUT/checkpoints (0: only at the end)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest valid checkpoint, with the data, model and "
                        "settings it was started with (options given as well must agree with them)")
    p.add_argument("--overwrite", action="store_true",
                   help="OUT holds an earlier run: remove its files and start anew (default: refuse)")
    p.add_argument("--allow-low-disk", action="store_true",
                   help="start even though OUT's disk has less free space than the run needs (default: refuse)")


def _add_attention_command(sub) -> None:
    p = sub.add_parser("attention", help="compute and save the channel attention (Algorithm 1) only",
                       description="Train the L2-FE head, measure each channel's loss increase, write "
                                   "channel_attention.json (ours and the public code's layout) to --out.")
    _add_training_args(p)
    p.add_argument("--head-epochs", type=int, default=10, help="epochs of L2-FE head training")


def _add_compare_command(sub) -> None:
    p = sub.add_parser("compare", help="run several methods x seeds under identical settings; write a report",
                       description="The paper's comparison on your data: alpha/beta chosen on a validation split "
                                   "of the training set, every method per seed with the same data order, then "
                                   "report.md, report.json and figures (Table 1, Fig. 3-6 analogs) in --out.")
    _add_training_args(p)
    p.set_defaults(out="fastdelta-compare")
    p.add_argument("--methods", type=_csv, default=list(METHODS), help=f"comma separated, from {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--search", choices=["alpha", "grid", "none"], default="alpha",
                   help="alpha (beta fixed), grid (alpha x beta) or none (use --alpha/--beta)")
    p.add_argument("--alpha-grid", type=_floats, default=[0.0001, 0.001, 0.01, 0.1, 0.2])
    p.add_argument("--beta-grid", type=_floats, default=[0.0001, 0.001, 0.01, 0.1, 0.2])
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out for the search")
    p.add_argument("--folds", type=int, default=1,
                   help="K >= 2: choose alpha (and beta) by K-fold cross-validation, as the paper (5), "
                        "instead of one holdout of --val-fraction")
    p.add_argument("--alpha", type=float, default=None,
                   help="alpha with --search none (default: each method's own default)")
    p.add_argument("--beta", type=float, default=0.01, help="the fixed beta of --search alpha / none")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="for l2 and l2_fe")
    p.add_argument("--iterations", type=int, default=9000)
    p.add_argument("--schedules", type=_csv, default=["step", "exp"],
                   help="Fig. 3: the first seed's l2_sp and delta also run with each of these lr schedules")
    p.add_argument("--curve-points", type=int, default=10, help="test evaluations along training (Fig. 3)")
    p.add_argument("--curve-images", type=int, default=2000, help="test images per curve point")
    p.add_argument("--per-class", type=int, default=None,
                   help="with --data fashion-mnist: training images per class (default 10)")
    p.add_argument("--subset-seed", type=int, default=0, help="with --data fashion-mnist: which images")
    p.add_argument("--reuse-runs", "--reuse-search", dest="reuse_runs", action="store_true",
                   help="take back the runs (search and final) an interrupted compare finished in --out, with "
                        "the same settings, data and source weights, instead of refitting them")


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
    p.add_argument("--attention-impl", choices=["prefix", "masked_forward", "first_order"], default="prefix")
    p.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fastdelta-demo")
    p.add_argument("--no-progress", action="store_true")


def _add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: `fastdelta bench step` times the training step of every method",
                       description="Benchmarks (fastdelta/apps/bench.py).")
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
    kw = _settings(args)
    kw.pop("seed")
    kw.pop("weights")  # compare takes weights as its own argument
    cs = CompareSettings(alpha_grid=args.alpha_grid, beta_grid=args.beta_grid, val_fraction=args.val_fraction,
                         schedules=args.schedules, curve_points=args.curve_points, curve_images=args.curve_images,
                         reuse_runs=args.reuse_runs, folds=args.folds)
    compare(args.model, train, test, methods=args.methods, seeds=args.seeds, search=args.search,
            out=args.out, weights=args.weights, compare_settings=cs, alpha=args.alpha, beta=args.beta,
            weight_decay=args.weight_decay, iterations=args.iterations, **kw)
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
        if args.overwrite:
            parser.error("--resume continues the run in RUN_DIR, --overwrite replaces it: choose one")
        args.given = _given_options(argv[1:])
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
        call = dict(model=args.model, train=args.data, test=args.test, method=args.method, alpha=args.alpha,
                    beta=args.beta, weight_decay=args.weight_decay, iterations=args.iterations,
                    lr_schedule=args.lr_schedule, lr_step=args.lr_step, attention=args.attention,
                    checkpoint_every=args.checkpoint_every, allow_low_disk=args.allow_low_disk, **_settings(args))
        if args.resume:
            call = _resumed_call(call, args.resume, args.given)
        res = fit(**call, run_dir=args.out, resume=bool(args.resume), distributed=_under_torchrun(),
                  overwrite=args.overwrite)
        if _is_main():  # fit() has written OUT (rank 0 only)
            print(json.dumps({"method": res.method, "test": res.test, "out": str(Path(args.out).resolve())}))
    elif args.command == "attention":
        _attention(args)
    elif args.command == "compare":
        _compare(args)
    else:
        _demo(args)


# fit options whose fastdelta.fit keyword has another name
_OPTION_KEYS = {"data": "train", "temperature": "attention_temperature", "workers": "num_workers",
                "no_progress": "progress"}


def _given_options(tokens) -> set:
    """The fit options written in `tokens` (their dests), told apart from defaults by parsing again with
    every default suppressed: an option given with its default value must still agree with the run."""
    p = argparse.ArgumentParser(prog="fastdelta fit", add_help=False)
    _add_fit_arguments(p)
    for action in p._actions:  # argparse has no public way to suppress the defaults of existing options
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(tokens)))


def _resumed_call(call: dict, run_dir, given: set) -> dict:
    """The fastdelta.fit call the run in `run_dir` was started with (its latest checkpoint keeps it), with
    the options given on this command line put over it; fit then refuses any that changes the result,
    naming it."""
    from ..train.checkpoint import CheckpointError, load_latest
    ckpt = load_latest(Path(run_dir) / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"resume: no checkpoint in {Path(run_dir) / 'checkpoints'}")
    saved, keys = ckpt.get("call"), {_OPTION_KEYS.get(d, d) for d in given} & set(call)
    if saved is None:  # written before checkpoints kept their call: the command line must give it
        if "train" not in keys:
            raise SettingsError(f"--resume {run_dir}: its checkpoint does not record how the run was started "
                                "(an older fastdelta wrote it): give --data, --model, --weights and the other "
                                "options of the original command")
        return call
    objects = [k for k in saved["objects"] if k not in keys]
    if objects:
        flags = ", ".join("--data" if k == "train" else f"--{k}" for k in objects)
        raise SettingsError(f"--resume {run_dir}: the run was started from Python with its {', '.join(objects)} "
                            f"given as objects: resume it with fastdelta.fit(..., resume=True), or give {flags}")
    merged = {k: saved[k] for k in ("model", "train", "test", "weights")}
    merged.update(saved["settings"])
    merged.update({k: call[k] for k in keys})
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
        att = compute_attention(args.model, args.data, attention_head_epochs=args.head_epochs,
                                distributed=_under_torchrun(), **_settings(args))
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
