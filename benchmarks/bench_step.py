"""Training-step benchmark: every method, fastdelta's step engine next to the public recipe.

Same code as `fastdelta bench step ...` (fastdelta/bench.py). Writes bench_step.json (rewritten after
every row) and bench_step.md (method x engine: img/s, ms/step, ratio to the public recipe, ratio to the
same engine's L2 step, time to first step, peak GPU memory) to --out.

GPU, the benchmark configuration (ResNet-50, ResNet-101, EfficientNet-Lite0; batch 64, 224x224; all six
methods; public recipe + fastdelta "auto" = bf16 + channels_last + torch.compile "default"):
    python3 benchmarks/bench_step.py --out benchmarks/results/bench_step_gpu
Split over several calls (rows of an existing folder are kept with --append), with a safety budget:
    python3 benchmarks/bench_step.py --models resnet101 --time-budget 500 --out DIR
    python3 benchmarks/bench_step.py --models resnet50,efficientnet_lite0 --append --time-budget 500 --out DIR
Choosing the compile mode by measurement (DEFAULT_COMPILE_MODE in fastdelta/train/steps.py):
    python3 benchmarks/bench_step.py --models resnet101 --methods l2,delta --engines fastdelta \\
        --compile-modes off,default,max-autotune-no-cudagraphs,reduce-overhead --out DIR-modes
CPU smoke test (CI, tests/test_step.py):
    python3 benchmarks/bench_step.py --smoke --out /tmp/bench-smoke
"""
import sys

from fastdelta.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
