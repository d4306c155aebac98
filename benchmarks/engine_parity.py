"""Accuracy parity of the CPU step engines `auto` can pick, against the fp32 reference step, on real data.

    OMP_NUM_THREADS=1 python3 benchmarks/engine_parity.py --out OUT [--seeds 3] [--iterations 300]
    python3 benchmarks/engine_parity.py --out OUT --summary-only

ImageNet EfficientNet-Lite0 -> Fashion-MNIST, 30 training images per class (subset seed 0), 64 px crops
(resize 73), batch 32, public recipe, L2 (weight decay 1e-4) and DELTA (alpha 1e-4, beta 0.01), tested on
all 10,000 test images. Per seed and method every engine trains from the same start; a row is appended
to OUT/runs.jsonl as soon as it is measured (an interrupted run continues where it stopped). The summary
(OUT/parity.json, OUT/parity.md) pairs each engine with the reference seed by seed: mean difference,
sample std, and the paired 95% interval (t distribution); an engine keeps accuracy when that interval
contains 0 or the mean difference is inside the reference's own seed spread.
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ENGINES = {"reference": dict(step_engine="reference"),
           "fp32_channels_last": dict(precision="fp32", channels_last=True, compile=False),
           "bf16_channels_last": dict(precision="bf16", channels_last=True, compile=False)}
METHODS = {"l2": {}, "delta": dict(alpha=1e-4)}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def fit_row(method: str, engine: str, seed: int, iterations: int, data) -> dict:
    import fastdelta
    (x, y), (xt, yt) = data
    t0 = time.perf_counter()
    res = fastdelta.fit("efficientnet_lite0", (x, y), (xt, yt), weights="imagenet", method=method, seed=seed,
                        iterations=iterations, batch_size=32, resize=73, crop=64, beta=0.01, progress=False,
                        attention_head_epochs=10, **METHODS[method], **ENGINES[engine])
    return {"method": method, "engine": engine, "seed": seed, "iterations": iterations, "test_top1": res.test_top1,
            "final_ce": res.history[-1]["ce"], "train_s": res.timings.get("train"), "wall_s": round(time.perf_counter() - t0, 1),
            "step_used": res.settings["step_used"],
            "cpu": {k: res.settings.get(k) for k in ("cpu_threads", "cpu_model", "cpu_capability")}}


def load_data():
    from fastdelta.data.fashion_mnist import few_shot_subset, load_fashion_mnist
    x, y = load_fashion_mnist("train")
    return few_shot_subset(x, y, 30, 0), load_fashion_mnist("test")


def paired(rows, method: str, engine: str) -> dict:
    ref = {r["seed"]: r["test_top1"] for r in rows if r["method"] == method and r["engine"] == "reference"}
    run = {r["seed"]: r["test_top1"] for r in rows if r["method"] == method and r["engine"] == engine}
    seeds = sorted(set(ref) & set(run))
    diffs = [run[s] - ref[s] for s in seeds]
    if len(diffs) < 2:
        return {"seeds": seeds, "diffs": diffs}
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = T95.get(len(diffs) - 1, 2.0) * sd / math.sqrt(len(diffs))
    ref_sd = statistics.stdev([ref[s] for s in seeds])
    return {"seeds": seeds, "diffs": [round(d, 2) for d in diffs], "mean": round(mean, 3), "std": round(sd, 3),
            "ci95": [round(mean - half, 3), round(mean + half, 3)], "reference_seed_std": round(ref_sd, 3),
            # fewer than three seeds decide nothing (a 95% interval on two is t = 12.7 wide)
            "keeps_accuracy": None if len(diffs) < 3 else bool(mean - half <= 0 <= mean + half or abs(mean) <= ref_sd)}


def summary(out: Path) -> dict:
    rows = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines() if l.strip()]
    result = {m: {e: paired(rows, m, e) for e in ENGINES if e != "reference"} for m in METHODS}
    from fastdelta.apps.bench.interleaved import cpu_record
    import torch
    machine = {**cpu_record(), "device": "cpu", "torch": torch.__version__, "python": sys.version.split()[0]}
    (out / "parity.json").write_text(json.dumps({"machine": machine, "pairs": result, "rows": rows}, indent=1))
    lines = ["# Engine parity: test top-1 of each CPU engine minus the fp32 reference step, paired by seed", "",
             "| method | engine | per seed (points) | mean ± std | paired 95% interval | reference seed std | keeps accuracy |",
             "|---|---|---|---|---|---|---|"]
    for m, per in result.items():
        for e, p in per.items():
            if "mean" in p:
                lines.append(f"| {m} | {e} | {', '.join(f'{d:+.2f}' for d in p['diffs'])} | {p['mean']:+.2f} ± {p['std']:.2f} "
                             f"| [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] | {p['reference_seed_std']:.2f} | "
                             f"{ {True: 'yes', False: 'no', None: 'not decided (under 3 seeds)'}[p['keeps_accuracy']]} |")
    lines += ["", "| method | engine | seed | test top-1 | train s |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['engine']} | {r['seed']} | {r['test_top1']:.2f} | {r['train_s']} |" for r in rows]
    (out / "parity.md").write_text("\n".join(lines) + "\n")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--summary-only", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.summary_only:
        log = out / "runs.jsonl"
        done = {(r["method"], r["engine"], r["seed"]) for r in
                (json.loads(l) for l in (log.read_text().splitlines() if log.exists() else []) if l.strip())}
        data = load_data()
        for seed in range(a.seeds):
            for method in METHODS:
                for engine in a.engines.split(","):
                    if (method, engine, seed) in done:
                        continue
                    row = fit_row(method, engine, seed, a.iterations, data)
                    with open(log, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    print(json.dumps(summary(out), indent=1))


if __name__ == "__main__":
    sys.exit(main())
