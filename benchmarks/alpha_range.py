"""Which alphas work, per variant of the feature-map term: accuracy over the paper's alpha grid.

ImageNet EfficientNet-Lite0 -> Fashion-MNIST (a fixed few-shot subset), one method (default DELTA),
every alpha of the grid under each variant (a named set of fit settings, e.g. the options that are
not in the paper: source_bn="batch", feature_scale="source_energy", another tap set), one seed. A
run that diverges is recorded as such. Rows go to OUT/runs.jsonl as measured (an interrupted run
continues); OUT/alpha_range.json, .md and .png summarise.

    python3 benchmarks/alpha_range.py --out OUT \\
        --variant public='{}' --variant batch_bn='{"source_bn": "batch"}' \\
        --variant energy='{"feature_scale": "source_energy"}'
"""
import argparse
import json
import sys
import time
from pathlib import Path

import fastdelta
from fastdelta.methods.hyperparameters import PAPER_GRID
from fastdelta.data.fashion_mnist import few_shot_subset, load_fashion_mnist
from fastdelta.environment import environment
from fastdelta.output_files import atomic_write_text
from fastdelta.settings import DEFAULT_RECIPE, RECIPES
sys.path.insert(0, str(Path(__file__).resolve().parent))  # rowlog beside this script, when loaded as a module
from rowlog import RowLog, measured_environment  # noqa: E402



def variant(text: str):
    name, sep, settings = text.partition("=")
    if not sep:
        raise SystemExit(f"--variant {text!r}: expected NAME=JSON")
    return name, json.loads(settings)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--variant", action="append", type=variant, required=True, metavar="NAME=JSON")
    p.add_argument("--method", default="delta")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in PAPER_GRID))
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES), help="fit recipe")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--command", help="with --summary-only: the command that made the runs, for the summary")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    alphas = [float(v) for v in a.alphas.split(",")]
    if not a.summary_only:
        train = few_shot_subset(*load_fashion_mnist("train"), a.per_class, 0)
        x, y = load_fashion_mnist("test")
        test = (x[:a.test_images], y[:a.test_images])
        done = {(r["variant"], r["alpha"]) for r in RowLog.rows(runs_path)}
        emit = RowLog(runs_path, resume=True)
        for name, settings in a.variant:
            for alpha in alphas:
                if (name, alpha) in done:
                    continue
                t0 = time.perf_counter()
                row = {"variant": name, "settings": settings, "alpha": alpha}
                try:
                    res = fastdelta.fit("efficientnet_lite0", train, test, method=a.method, weights="imagenet",
                                        alpha=alpha, iterations=a.iterations, batch_size=32, lr=0.01, beta=0.01,
                                        resize=round(a.image_size * 256 / 224), crop=a.image_size, seed=a.seed,
                                        recipe=a.recipe, progress=False, **settings)
                    row.update(test_top1=res.test_top1, status="ok", reg_first=res.history[0]["reg"],
                               reg_last=res.history[-1]["reg"], ce_last=res.history[-1]["ce"],
                               source_energy=res.settings.get("source_energy"))
                except fastdelta.NonFiniteLossError as e:
                    row.update(test_top1=None, status=f"diverged at iteration {e.iteration} ({e.term})")
                row["seconds"] = round(time.perf_counter() - t0, 1)
                emit(row)
    summarise(out, a, alphas, a.command or " ".join(sys.argv))


def summarise(out: Path, a, alphas, command: str) -> None:
    runs = RowLog.rows(out / "runs.jsonl")
    names = list(dict.fromkeys(r["variant"] for r in runs))
    cell = {(r["variant"], r["alpha"]): r for r in runs}
    env = measured_environment(out / "alpha_range.json", a.summary_only, environment)
    atomic_write_text(out / "alpha_range.json", json.dumps(
        {"schema": "fastdelta.alpha_range/1", "command": command, "environment": env,
         "setting": {"method": a.method, "per_class": a.per_class, "image_size": a.image_size,
                     "iterations": a.iterations, "seed": a.seed, "recipe": a.recipe, "test_images": a.test_images},
         "runs": runs}, indent=1))
    lines = [f"# {a.method} over alpha: Lite0 -> Fashion-MNIST {a.per_class}/class, {a.image_size} px, "
             f"{a.iterations} iterations, seed {a.seed}, recipe {a.recipe}, first {a.test_images} test images", "",
             f"Command: `{command}`", "", "| variant | settings | " + " | ".join(f"α {v:g}" for v in alphas) + " |",
             "|---|---|" + "---|" * len(alphas)]
    for name in names:
        row = [cell.get((name, v)) for v in alphas]
        settings = next(r["settings"] for r in runs if r["variant"] == name)
        lines.append(f"| {name} | `{json.dumps(settings)}` | " + " | ".join(
            "-" if r is None else ("diverged" if r["test_top1"] is None else f"{r['test_top1']:.2f}") for r in row) + " |")
    atomic_write_text(out / "alpha_range.md", "\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in names:
        pts = [(v, cell[(name, v)]["test_top1"]) for v in alphas if (name, v) in cell and cell[(name, v)]["test_top1"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("alpha")
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=7)
    ax.set_title(f"{a.method}: accuracy over alpha (missing point = diverged)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "alpha_range.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
