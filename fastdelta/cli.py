"""Command line: `fastdelta fit`, `fastdelta attention`, `fastdelta demo`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .demo import DEMO_METHODS
from .settings import (ATTENTION_SAMPLES, DEFAULT_RECIPE, DELTA_NO_ATT_SCALES, DELTA_SCALES, FEATURE_MAPS,
                       FEATURE_SCALES, HEAD_BN_MODES, METHODS, NORMALISATIONS, RECIPES, SOURCE_BN_MODES, FitSettings)


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


def _add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="ImageFolder root with train/<class>/* (and test/<class>/*)")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--strict-data", action="store_true", help="a bad image file is fatal instead of skipped")
    p.add_argument("--no-progress", action="store_true")
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
                strict_data=a.strict_data, progress=not a.no_progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdelta", description="DELTA transfer learning and its baselines")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fine-tune a pre-trained CNN with one method", description=(
        "Fine-tune with one of the DELTA paper's methods; writes result.json, history.jsonl, model.pt, "
        "channel_attention.json (attention methods) and history.png to --out."), epilog=(
        "Exit status: 0 done; 2 an error in the settings, the data or the output folder (checked before any "
        "work; a write failing later names the checkpoint to resume from); 3 a loss term diverged; 4 stopped "
        "by SIGTERM or SIGINT after the step in progress, with a checkpoint written: continue with --resume OUT."))
    _add_training_args(p)
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
                   help="continue the run in RUN_DIR from its latest valid checkpoint (same settings required)")

    p = sub.add_parser("attention", help="compute and save the channel attention (Algorithm 1) only",
                       description="Train the L2-FE head, measure each channel's loss increase, write "
                                   "channel_attention.json (ours and the public code's layout) to --out.")
    _add_training_args(p)
    p.add_argument("--head-epochs", type=int, default=10, help="epochs of L2-FE head training")

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
    p.add_argument("--reuse-search", action="store_true",
                   help="take the search runs an interrupted compare finished in --out (same settings) "
                        "instead of refitting them")

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

    p = sub.add_parser("bench", help="benchmarks: `fastdelta bench step` times the training step of every method",
                       description="Benchmarks (fastdelta/bench.py).")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    from .bench import add_arguments as _bench_arguments
    _bench_arguments(bench_sub.add_parser(
        "step", help="training step of every method vs the public recipe (JSON + Markdown table)"))
    return parser


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _compare(args) -> None:
    from .compare.comparison import CompareSettings, compare
    train, test = args.data, args.test
    if args.data == "fashion-mnist":  # the embedded real dataset, few-shot
        from .data.fashion_mnist import few_shot_subset, load_fashion_mnist
        train = few_shot_subset(*load_fashion_mnist("train"), args.per_class or 10, args.subset_seed)
        test = load_fashion_mnist("test")
    elif args.per_class is not None:
        raise ValueError("--per-class only applies to --data fashion-mnist")
    kw = _settings(args)
    kw.pop("seed")
    kw.pop("weights")  # compare takes weights as its own argument
    cs = CompareSettings(alpha_grid=args.alpha_grid, beta_grid=args.beta_grid, val_fraction=args.val_fraction,
                         schedules=args.schedules, curve_points=args.curve_points, curve_images=args.curve_images,
                         reuse_search=args.reuse_search, folds=args.folds)
    compare(args.model, train, test, methods=args.methods, seeds=args.seeds, search=args.search,
            out=args.out, weights=args.weights, compare_settings=cs, alpha=args.alpha, beta=args.beta,
            weight_decay=args.weight_decay, iterations=args.iterations, **kw)
    print((Path(args.out) / "report.md").read_text().split("## The paper")[0])
    print(f"report: {(Path(args.out) / 'report.md').resolve()}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "fit" and args.resume:
        args.out = args.out or args.resume
        if Path(args.out).resolve() != Path(args.resume).resolve():
            parser.error("--resume RUN_DIR continues in RUN_DIR; --out, if given, must be the same folder")
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
    import fastdelta
    from .ioutil import OutputError, check_output_dir
    from .train.loop import NonFiniteLossError
    from .train.preempt import Preempted
    try:
        if args.command == "fit":
            kw = _settings(args)
            res = fastdelta.fit(args.model, args.data, args.test, method=args.method, alpha=args.alpha,
                                beta=args.beta, weight_decay=args.weight_decay, iterations=args.iterations,
                                lr_schedule=args.lr_schedule, lr_step=args.lr_step, attention=args.attention,
                                run_dir=args.out, checkpoint_every=args.checkpoint_every,
                                resume=bool(args.resume), distributed=_under_torchrun(), **kw)
            if _is_main():  # fit() has written OUT (rank 0 only)
                print(json.dumps({"method": res.method, "test": res.test, "out": str(Path(args.out).resolve())}))
        elif args.command == "attention":
            if _is_main():
                check_output_dir(args.out)  # before the work, not at its end
            kw = _settings(args)
            att = fastdelta.attention(args.model, args.data, attention_head_epochs=args.head_epochs,
                                      distributed=_under_torchrun(), **kw)
            if not _is_main():
                return 0
            att.save(Path(args.out) / "channel_attention.json")
            print(json.dumps({"layers": att.layers, "images": att.images, "impl": att.impl,
                              "out": str((Path(args.out) / "channel_attention.json").resolve())}))
        elif args.command == "compare":
            _compare(args)
        else:
            from .demo import DemoConfig, run_demo
            unknown = [m for m in args.methods if m not in METHODS]
            if unknown:
                raise fastdelta.SettingsError(f"--methods: unknown {unknown}; valid: {', '.join(METHODS)}")
            run_demo(DemoConfig(args.methods, args.per_class, args.test_images, args.image_size, args.iterations,
                                args.batch_size, args.lr, args.alpha_feature, args.alpha_sp, args.beta,
                                args.head_epochs, args.seed, args.out, not args.no_progress,
                                args.attention_impl, args.recipe))
    except NonFiniteLossError as e:
        if e.partial_result is not None and args.command == "fit" and _is_main():
            e.partial_result.save(args.out)
        print(f"fastdelta: error: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        if _is_main():
            print(f"fastdelta: {e}", file=sys.stderr)
        return 4
    except (ValueError, FileNotFoundError, OutputError) as e:
        print(f"fastdelta: error: {e}", file=sys.stderr)
        return 2
    return 0
