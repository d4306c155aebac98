"""The three feature-map forms of DELTA side by side, and why one of them collapses DELTA.

ImageNet EfficientNet-Lite0 -> Fashion-MNIST (a fixed few-shot subset), DELTA and DELTA w/o ATT with
each `feature_map` ("conv", "relu_conv", "activation") at one alpha, every other convention from one
recipe, seeds 0..N-1, plus L2 as the plain fine-tune. Each run's test top-1 on the full test set
goes to OUT/runs.jsonl as soon as it is measured (an interrupted run continues where it stopped).

For the attention methods it also measures, from checkpoints along training, on a fixed batch of 32
training images (target in train mode as in training, source in eval mode), per regularised layer:
the largest channel weight c * W_j, the term of each channel, and the share of the whole
feature-map term taken by the single largest channel -- the measurement that explains why ReLU of
the pre-BN conv output collapses DELTA but hardly DELTA w/o ATT.

    python3 benchmarks/tap_forms.py --out benchmarks/results/tap_forms_cpu --seeds 3
    python3 benchmarks/tap_forms.py --out OUT --summary-only     # tap_forms.json / .md / .png
"""
import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fastdelta
from fastdelta.train.checkpoint import read_checkpoint
from fastdelta.data.fashion_mnist import few_shot_subset, load_fashion_mnist
from fastdelta.environment import environment
from fastdelta.output_files import atomic_write_text
from fastdelta.networks.models import build_networks
from fastdelta.methods import make_method
from fastdelta.settings import DEFAULT_RECIPE, FEATURE_MAPS, RECIPES
from fastdelta.features.hooks import FeatureTaps
sys.path.insert(0, str(Path(__file__).resolve().parent))  # rowlog beside this script, when loaded as a module
from rowlog import RowLog, measured_environment  # noqa: E402

FORM_METHODS = ("delta", "delta_no_att")


def run_key(r: dict) -> tuple:
    return r["method"], r["feature_map"], r["seed"]


@torch.no_grad()
def channel_terms(reg, target, source, x) -> list:
    """Per layer, (C,) fp64: each channel's share of the regulariser's distance on batch x (unscaled by alpha)."""
    target = copy.deepcopy(target).train()  # batch statistics, as in training; the copy keeps running stats
    rectify = reg.rectify_at_tap
    with FeatureTaps(target, reg.taps, rectify=rectify) as tt, FeatureTaps(source, reg.taps, rectify=rectify) as st:
        _, t_feats = tt(x)
        _, s_feats = st(x)
    out = []
    for t, s, scale in zip(t_feats, s_feats, reg.scales(t_feats)):
        t, s = t.double(), s.double()
        if reg.relu:
            t, s = t.relu(), s.relu()
        out.append(0.5 * (t - s).pow(2).sum(dim=(0, 2, 3)) * scale.double())
    return out


def probe_batch(train, settings: dict, n: int = 32) -> torch.Tensor:
    """n training images spread over the set (centre crop, as fit prepares them)."""
    from fastdelta.data import resolve_data
    images = resolve_data(train, None, resize=settings["resize"], crop=settings["crop"]).train_eval
    step = max(1, len(images) // n)
    return torch.stack([images[i][0] for i in range(0, len(images), step)][:n])


def diagnose(run_dir: Path, result, settings: dict, x) -> dict:
    """Largest c * W_j per layer and the top channel's share of the term at every checkpoint."""
    nets = build_networks("efficientnet_lite0", 10, "imagenet", None, settings["seed"])
    att = None if result.attention is None else result.attention.weights
    reg = make_method(result.method, nets.target, nets.source, nets.head_name, nets.layers,
                      att if result.method == "delta" else None, alpha=1.0, beta=0.0, weight_decay=0.0,
                      feature_map=settings["feature_map"], delta_no_att_scale=settings["delta_no_att_scale"])
    states = [(0, None)] + [(int(p.stem.split("-")[1]), p) for p in sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))]
    along = []
    for it, path in states:
        if path is not None:
            nets.target.load_state_dict(read_checkpoint(path)["model"])
        terms = channel_terms(reg, nets.target, nets.source, x)
        total = float(sum(t.sum() for t in terms))
        per_layer = {}
        for layer, t in zip(nets.layers, terms):
            j = int(t.argmax())
            per_layer[layer] = {"term": float(t.sum()), "top_channel": j, "top_share_of_all": float(t[j]) / total,
                                "top5_share_of_layer": float(t.topk(min(5, len(t))).values.sum() / t.sum())}
        along.append({"iteration": it, "term": total, "layers": per_layer})
    cw = {}
    if att is not None and result.method == "delta":
        for layer, w in zip(nets.layers, att):
            j = int(w.argmax())
            cw[layer] = {"channels": w.numel(), "max_cW": float(w[j] * w.numel()), "channel": j}
    return {"max_cW": cw, "along_training": along}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--forms", default=",".join(FEATURE_MAPS))
    p.add_argument("--methods", default="l2," + ",".join(FORM_METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--alpha", type=float, default=1e-4)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES), help="fit recipe")
    p.add_argument("--test-images", type=int, default=None, help="default: all 10,000")
    p.add_argument("--diagnose-every", type=int, default=25, help="checkpoint spacing of the share measurement")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--command", help="with --summary-only: the command that made the runs, for the summary")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    if not a.summary_only:
        train = few_shot_subset(*load_fashion_mnist("train"), a.per_class, 0)
        x_test, y_test = load_fashion_mnist("test")
        if a.test_images:
            x_test, y_test = x_test[:a.test_images], y_test[:a.test_images]
        base = dict(iterations=a.iterations, batch_size=32, lr=0.01, beta=0.01, recipe=a.recipe,
                    resize=round(a.image_size * 256 / 224), crop=a.image_size, progress=False)
        done = {run_key(r) for r in RowLog.rows(runs_path)}
        emit = RowLog(runs_path, resume=True)
        for seed in range(a.seeds):
            for method in a.methods.split(","):
                for form in (a.forms.split(",") if method in FORM_METHODS else [None]):
                    if (method, form, seed) in done:
                        continue
                    run_dir = Path(tempfile.mkdtemp(prefix="tapform-"))
                    t0 = time.perf_counter()
                    kw = dict(base, seed=seed, run_dir=str(run_dir), checkpoint_every=a.diagnose_every)
                    if form is not None:
                        kw.update(feature_map=form, alpha=a.alpha)
                    row = {"method": method, "feature_map": form, "seed": seed}
                    try:
                        res = fastdelta.fit("efficientnet_lite0", train, (x_test, y_test), method=method,
                                            weights="imagenet", **kw)
                        row.update(test_top1=res.test_top1, status="ok")
                        if form is not None:
                            row["diagnosis"] = diagnose(run_dir, res, res.settings, probe_batch(train, kw))
                        row["settings"] = {k: res.settings[k] for k in ("recipe", "feature_map", "delta_no_att_scale",
                                                                       "attention_head_bn", "attention_max_images",
                                                                       "attention_augmented", "alpha", "iterations")}
                    except fastdelta.NonFiniteLossError as e:
                        row.update(test_top1=None, status=f"diverged: {e}")
                    finally:
                        shutil.rmtree(run_dir, ignore_errors=True)
                    row["seconds"] = round(time.perf_counter() - t0, 1)
                    emit(row)
    summarise(out, a, a.command or " ".join(sys.argv))


def summarise(out: Path, a, command: str) -> None:
    runs = RowLog.rows(out / "runs.jsonl")
    if not runs:
        return
    table = {}
    for r in runs:
        table.setdefault((r["method"], r["feature_map"]), []).append(r["test_top1"])
    rows = []
    for (method, form), vals in sorted(table.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        ok = [v for v in vals if v is not None]
        rows.append({"method": method, "feature_map": form, "values": vals,
                     "mean": float(np.mean(ok)) if ok else None, "std": float(np.std(ok)) if ok else None})
    env = measured_environment(out / "tap_forms.json", a.summary_only, environment)
    report = {"schema": "fastdelta.tap_forms/1", "command": command, "environment": env,
              "setting": {"model": "efficientnet_lite0 (imagenet)", "data": f"fashion-mnist, {a.per_class}/class",
                          "image_size": a.image_size, "iterations": a.iterations, "alpha": a.alpha,
                          "recipe": a.recipe, "test_images": a.test_images or 10000},
              "table": rows, "runs": runs}
    atomic_write_text(out / "tap_forms.json", json.dumps(report, indent=1))
    lines = [f"# Feature-map forms: Lite0 -> Fashion-MNIST {a.per_class}/class, {a.image_size} px, "
             f"{a.iterations} iterations, alpha {a.alpha:g}, recipe {a.recipe}", "", f"Command: `{command}`", "",
             "| method | feature_map | test top-1 (mean ± std) | seeds |", "|---|---|---|---|"]
    for r in rows:
        cell = "diverged" if r["mean"] is None else f"{r['mean']:.2f} ± {r['std']:.2f}"
        lines.append(f"| {r['method']} | {r['feature_map'] or '-'} | {cell} | "
                     + ", ".join("div" if v is None else f"{v:.2f}" for v in r["values"]) + " |")
    lines += ["", "## Largest channel weight and the top channel's share of the term (seed 0)", "",
              "| method | feature_map | layer | max c·W_j | top channel share at it 0 / middle / end |",
              "|---|---|---|---|---|"]
    for r in runs:
        if r["seed"] != 0 or "diagnosis" not in r:
            continue
        d = r["diagnosis"]
        along = d["along_training"]
        picks = [along[0], along[len(along) // 2], along[-1]]
        for layer in along[0]["layers"]:
            cw = d["max_cW"].get(layer, {}).get("max_cW")
            shares = " / ".join(f"{p['layers'][layer]['top_share_of_all']:.2f}" for p in picks)
            lines.append(f"| {r['method']} | {r['feature_map']} | {layer} | {'-' if cw is None else f'{cw:.1f}'} | {shares} |")
    atomic_write_text(out / "tap_forms.md", "\n".join(lines) + "\n")
    plot(out, rows)


def plot(out: Path, rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['method']}\n{r['feature_map'] or ''}" for r in rows]
    means = [r["mean"] or 0.0 for r in rows]
    ax.bar(range(len(rows)), means, yerr=[r["std"] or 0.0 for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("DELTA by feature-map form")
    fig.tight_layout()
    fig.savefig(out / "tap_forms.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
