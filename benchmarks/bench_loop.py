"""Training-loop step time through `fastdelta.fit` (the whole loop: data, step, checks, history).

Prints one JSON line per engine with the median and minimum `step_s` of the steps after warm-up, for
the reference step and the fast step (eager fp32 on the CPU). Only `fastdelta.fit`'s public API is
used, so the same script times two checkouts side by side, e.g. with farm-bench:

    farm-bench "PYTHONPATH=OLD python3 benchmarks/bench_loop.py" "PYTHONPATH=NEW python3 benchmarks/bench_loop.py"
"""
import argparse
import json
import statistics
import warnings

import numpy as np

import fastdelta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="delta")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--engines", default="reference,fast")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, a.size, a.size, 3), dtype=np.uint8)
    y = np.repeat(np.arange(4), 16)
    warnings.simplefilter("ignore")
    for engine in a.engines.split(","):
        kw = dict(step_engine=engine, compile=False) if engine == "fast" else dict(step_engine=engine)
        res = fastdelta.fit("efficientnet_lite0", (x, y), None, method=a.method, weights="imagenet",
                            iterations=a.iterations, batch_size=16, resize=a.size, crop=a.size, alpha=1e-4,
                            attention_max_images=16, attention_head_epochs=1, progress=False, **kw)
        steps = [h["step_s"] for h in res.history[a.warmup:]]
        print(json.dumps({"engine": engine, "method": a.method, "median_step_ms": round(1e3 * statistics.median(steps), 2),
                          "min_step_ms": round(1e3 * min(steps), 2), "steps": len(steps)}), flush=True)


if __name__ == "__main__":
    main()
