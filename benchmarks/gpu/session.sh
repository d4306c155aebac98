#!/usr/bin/env bash
# Every GPU benchmark of the open issues in one device call (run from the repository root on the
# device machine: `bash benchmarks/gpu/session.sh`). Each part has its own time limit so one slow part
# cannot eat the others' time; results go to $OUT (the device tool brings them back) and are then
# committed under benchmarks/results/ with the card, versions and date they record.
#   attention  issue 4: bench_attention.py (ResNet-101, public vs exact vs first-order)      <= 140 s
#   distance   issue 3: bench_distance.py (fused op vs eager / compiled composite, 4 taps)    <= 160 s
#   step       issue 5: bench_step.py (ResNet-101 first; every method vs the public recipe;
#              then each compiled row's first step again in a fresh process, caches warm)        <= 300 s
#   data       issue 6: bench_data.py (DALI GPU vs torchvision CPU vs nvjpeg); needs DALI in
#              .dali_site/ (benchmarks/gpu/dali_wheels.sh here, dali_install.sh there)          <= 120 s
# PARTS picks and orders them (default: all four; about 12 minutes at most, so a session with 15
# minutes of device time and a cold start should pick: PARTS="attention distance step").
set -u
OUT=${OUT:-/tmp/fastdelta-gpu-out}
PARTS=${PARTS:-attention distance step data}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -f .dali_site/.installed ] && export PYTHONPATH="$PWD/.dali_site:$PYTHONPATH"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; date -u; } > "$OUT/machine.txt" 2>&1
for part in $PARTS; do
  case $part in
    attention) timeout 140 python3 benchmarks/bench_attention.py --model resnet101 --images 32 --out "$OUT/attention_gpu.json" ;;
    distance)  timeout 160 python3 benchmarks/bench_distance.py --device cuda --out "$OUT/distance_gpu.json" ;;
    step)      timeout 300 python3 benchmarks/bench_step.py --models resnet101 --time-budget 200 --warm-first-step --profile 3 --out "$OUT/bench_step_gpu" ;;
    data)      timeout 120 python3 benchmarks/bench_data.py --images 4000 --batches 100 --out "$OUT/bench_data_gpu.json" ;;
    *) echo "unknown part $part"; continue ;;
  esac > "$OUT/$part.log" 2>&1
  echo "== $part: exit $?"; tail -n 5 "$OUT/$part.log"
done
