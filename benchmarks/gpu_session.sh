#!/usr/bin/env bash
# Every GPU benchmark of the open issues in one device call (run from the repository root on the
# device machine: `bash benchmarks/gpu_session.sh`). Each part has its own time limit so one slow
# part cannot eat the others' time; results go to $OUT (the device tool brings them back) and are
# then committed under benchmarks/results/ with the card, versions and date they record.
#   issue 4: bench_attention.py (ResNet-101, public vs exact vs first-order), ~2 min
#   issue 3: bench_distance.py (fused op vs eager / compiled composite, 4 ResNet-101 taps), ~2.5 min
#   issue 5: bench_step.py (ResNet-101 first; every method vs the public recipe), ~4 min
set -u
OUT=${OUT:-/tmp/fastdelta-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; date -u; } > "$OUT/machine.txt" 2>&1
timeout 140 python3 benchmarks/bench_attention.py --model resnet101 --images 32 --out "$OUT/attention_gpu.json" > "$OUT/attention.log" 2>&1
timeout 160 python3 benchmarks/bench_distance.py --device cuda --out "$OUT/distance_gpu.json" > "$OUT/distance.log" 2>&1
timeout 260 python3 benchmarks/bench_step.py --models resnet101 --time-budget 240 --profile 3 --out "$OUT/bench_step_gpu" > "$OUT/step.log" 2>&1
tail -n 5 "$OUT"/*.log
