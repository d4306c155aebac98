"""Why one feature-map form collapses DELTA: the regulariser's pull measured step by step.

Trains DELTA (and DELTA w/o ATT) as `fastdelta.fit` does -- the same batches, attention, reference
step -- for each `feature_map` form, and every `--every` iterations records, on that step's batch:

- ce and the feature-map term, and the norms of their gradients on the backbone (not the head),
  measured separately, with their cosine: how hard the term pulls against the task;
- per regularised layer, the share of the term, the largest c * W_j and its channel's share of the term;
- for the rectified forms, the share of the term that no gradient can reduce: positions where the
  target's map is <= 0 (ReLU passes no gradient there) while the source's is > 0.

Writes OUT/diagnosis.json (rows appended as measured), OUT/diagnosis.png and OUT/diagnosis.md (one
row per run: the figures the tap-form READMEs quote; `--table-only` rewrites it from the JSON).

    python3 benchmarks/diagnose_tap_forms.py --out benchmarks/results/tap_forms_cpu_2026-11-27/diagnosis
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fastdelta
from fastdelta.data import resolve_data
from fastdelta.data.fashion_mnist import few_shot_subset, load_fashion_mnist
from fastdelta.environment import environment
from fastdelta.output_files import atomic_write_text
from fastdelta.methods import make_method
from fastdelta.features.hooks import FeatureTaps
from fastdelta.networks.models import build_networks
from fastdelta.train.bn_buffers import BufferSnapshots
from fastdelta.train.distributed import DistContext
from fastdelta.train.evaluate import evaluate
from fastdelta.train.loop import TrainSpec, lr_at, make_loader, make_train_loader
from fastdelta.train.steps import ReferenceStep


def backbone_grad(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def measure(reg, target, source, x, y):
    """The probe of one batch (the model in train mode, as in the step; BN statistics restored after)."""
    bn = BufferSnapshots(target)
    bn.save(0)
    rectify = reg.rectify_at_tap
    with FeatureTaps(target, reg.taps, rectify=rectify) as tt, FeatureTaps(source, reg.taps, rectify=rectify) as st:
        logits, t_feats = tt(x)
        with torch.no_grad():
            _, s_feats = st(x)
    ce = F.cross_entropy(logits, y)
    term = reg.terms(t_feats, s_feats).reg  # alpha included
    head = set(id(p) for p in reg.head_params)
    backbone = [p for p in target.parameters() if id(p) not in head]
    g_ce, g_reg = backbone_grad(ce, backbone), backbone_grad(term, backbone)
    bn.restore(0)  # the probe's forward leaves the BN statistics as they were
    layers = {}
    with torch.no_grad():
        per_layer = []
        for layer, t, s, scale in zip(reg.layers, t_feats, s_feats, reg.scales(t_feats)):
            t, s = t.double(), s.double()
            a, b = (t.relu(), s.relu()) if reg.relu else (t, s)
            d2 = (a - b).pow(2) * scale.double().view(1, -1, 1, 1) * 0.5
            stuck = float(d2[(t <= 0) & (s > 0)].sum()) if reg.relu else 0.0
            per_layer.append((layer, d2.sum(dim=(0, 2, 3)), stuck))
        total = sum(float(c.sum()) for _, c, _ in per_layer)
        for layer, per_channel, stuck in per_layer:
            j = int(per_channel.argmax())
            layers[layer] = {"share": float(per_channel.sum()) / total, "top_channel": j,
                             "top_channel_share": float(per_channel[j]) / total,
                             "unreducible_share": stuck / max(float(per_channel.sum()), 1e-300)}
    return {"ce": ce.item(), "term": term.item(), "grad_ce": float(g_ce.norm()), "grad_term": float(g_reg.norm()),
            "cosine": float(F.cosine_similarity(g_ce, g_reg, dim=0)), "layers": layers}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--forms", default="conv,relu_conv,activation")
    p.add_argument("--methods", default="delta,delta_no_att")
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--alpha", type=float, default=1e-4)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-only", action="store_true", help="only rewrite OUT/diagnosis.md from OUT/diagnosis.json")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.table_only:
        write_table(out)
        return
    out.mkdir(parents=True, exist_ok=True)
    train = few_shot_subset(*load_fashion_mnist("train"), a.per_class, 0)
    x_te, y_te = load_fashion_mnist("test")
    test = (x_te[:a.test_images], y_te[:a.test_images])
    resize, crop = round(a.image_size * 256 / 224), a.image_size
    common = dict(batch_size=32, lr=0.01, resize=resize, crop=crop, seed=a.seed, progress=False)
    att = fastdelta.compute_attention("efficientnet_lite0", train, weights="imagenet", **common)
    data = resolve_data(train, test, resize=resize, crop=crop)
    device = torch.device("cpu")
    rows = []
    for method in a.methods.split(","):
        for form in a.forms.split(","):
            torch.manual_seed(a.seed)
            nets = build_networks("efficientnet_lite0", 10, "imagenet", None, a.seed)
            reg = make_method(method, nets.target, nets.source, nets.head_name, nets.layers,
                              att.weights if method == "delta" else None, alpha=a.alpha, beta=0.01, weight_decay=1e-4,
                              feature_map=form, delta_no_att_scale="sum")
            nets.target.train()
            step = ReferenceStep(nets.target, nets.source, reg, list(nets.target.parameters()), device, 0.01, 0.9)
            spec = TrainSpec(a.iterations, 0.01, 0.9, 32, a.seed, lr_step=round(a.iterations * 2 / 3))
            batches = iter(make_train_loader(data.train, spec, 0, DistContext()))
            trace = []
            for it in range(a.iterations):
                x, y = next(batches)
                if it % a.every == 0 or it == a.iterations - 1:
                    trace.append({"iteration": it, **measure(reg, nets.target, nets.source, x, y)})
                step.forward_backward(x, y, lr_at(it, 0.01, "step", spec.lr_step, 0.1))
                step.update()
            step.close()
            top1 = evaluate(nets.target, make_loader(data.test, 256, False, 0, 0), device, False)["top1"]
            rows.append({"method": method, "feature_map": form, "test_top1_first_images": top1, "trace": trace})
            print(method, form, f"{top1:.2f}", flush=True)
            atomic_write_text(out / "diagnosis.json", json.dumps(
                {"command": " ".join(sys.argv), "environment": environment(), "alpha": a.alpha,
                 "iterations": a.iterations, "test_images": a.test_images, "rows": rows}, indent=1))
    plot(out, rows)
    write_table(out)


TABLE_HEAD = ("| method | form | top-1 | term, start -> end | cos(grad CE, grad term) at step 0 | grad term / grad CE: "
              "start / middle / end | training CE at the end | unreducible share of the last layer's term: start / "
              "end | the last layer's share of the term: start / end | largest single channel's share of the term: "
              "start / end |\n" + "|---" * 10 + "|")


def table_row(row: dict) -> str:
    """One run's line: the trace's first, middle and last probes; the last regularised layer (conv_head on
    EfficientNet-Lite0) for the shares, the largest single channel over every layer."""
    tr = row["trace"]
    first, mid, last = tr[0], tr[len(tr) // 2], tr[-1]
    head = list(first["layers"])[-1]
    top = lambda t: max(v["top_channel_share"] for v in t["layers"].values())
    return (f"| {row['method']} | {row['feature_map']} | {row['test_top1_first_images']:.2f} | "
            f"{first['term']:.1f} -> {last['term']:.1f} | {first['cosine']:+.2f} | "
            f"{grad_ratio(first):.2f} / {grad_ratio(mid):.2f} / {grad_ratio(last):.2f} | {last['ce']:.2f} | "
            f"{first['layers'][head]['unreducible_share']:.2f} / {last['layers'][head]['unreducible_share']:.2f} | "
            f"{first['layers'][head]['share']:.2f} / {last['layers'][head]['share']:.2f} | "
            f"{top(first):.3f} / {top(last):.3f} |")


def write_table(out: Path) -> None:
    rows = json.loads((out / "diagnosis.json").read_text())["rows"]
    atomic_write_text(out / "diagnosis.md", "\n".join([TABLE_HEAD] + [table_row(r) for r in rows]) + "\n")


def grad_ratio(probe: dict) -> float:
    """|grad of alpha*term| / |grad of CE| on the backbone at one probe."""
    return probe["grad_term"] / max(probe["grad_ce"], 1e-12)


def plot(out: Path, rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for r in rows:
        it = [t["iteration"] for t in r["trace"]]
        name = f"{r['method']} {r['feature_map']} ({r['test_top1_first_images']:.1f}%)"
        ls = "-" if r["method"] == "delta" else "--"
        axes[0].plot(it, [grad_ratio(t) for t in r["trace"]], ls, label=name)
        axes[1].plot(it, [t["cosine"] for t in r["trace"]], ls, label=name)
        axes[2].plot(it, [t["ce"] for t in r["trace"]], ls, label=name)
    axes[0].set_yscale("log")
    axes[0].set_title("|grad of alpha*term| / |grad of CE| (backbone)", fontsize=9)
    axes[1].set_title("cosine(grad CE, grad term)", fontsize=9)
    axes[2].set_title("training CE on the step's batch", fontsize=9)
    for ax in axes:
        ax.set_xlabel("iteration", fontsize=8)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "diagnosis.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
