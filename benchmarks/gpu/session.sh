#!/usr/bin/env bash
# The GPU benchmark run: one command, parts in priority order, each under its own time limit, every
# row on disk as soon as it is measured (a timeout loses nothing). Results go to $OUT (the device
# tool brings them back) and are then committed under benchmarks/results/ with the card and versions.
#
#   bash benchmarks/gpu/session.sh prepare ANCHOR.py   here, once: copies the public-recipe anchor script
#                                            (it writes its rows to $OUT/anchor.json) into .carry/
#   bash benchmarks/gpu/session.sh           on the GPU machine (carry .carry), <= 480 s by default
#   SMOKE=1 bash benchmarks/gpu/session.sh   the same parts on the CPU with tiny shapes (CI runs it)
#
# Parts (PARTS picks and orders them; default "preflight step distance attention"):
#   preflight  tests/test_gpu_preflight.py: Triton kernel vs float64, the op under torch.compile
#              (fullgraph), 3 fast steps vs the reference step on CUDA; a failure stops the run   <= 60 s
#   step       the public recipe (a copy of the anchor script, eager fp32, hooks) and fastdelta's
#              bench_step.py: DELTA and L2 first (public re-implementation and fastdelta), then L2-SP <= 240 s
#   distance   bench_distance.py: fused op vs eager / compiled composite, the four ResNet-101 taps  <= 90 s
#   attention  bench_attention.py: ResNet-101, public one-channel method vs exact and first-order   <= 90 s
#   data       bench_data.py (DALI GPU vs torchvision CPU vs nvjpeg), a separate call: needs DALI in
#              .dali_site/ (benchmarks/gpu/dali_wheels.sh here, dali_install.sh there)            <= 120 s
set -u
cd "$(dirname "$0")/../.."
ANCHOR=.carry/anchors/public_recipe_gpu.py
if [ "${1:-}" = "prepare" ]; then
  if [ ! -f "${2:-}" ]; then echo "usage: session.sh prepare ANCHOR.py (the public-recipe anchor script; '${2:-}' is not a file)"; exit 2; fi
  mkdir -p "$(dirname "$ANCHOR")" && cp "$2" "$ANCHOR" && echo "anchor copied to $ANCHOR"
  exit $?
fi
OUT=${OUT:-/tmp/fastdelta-gpu-out}
SMOKE=${SMOKE:-0}
PARTS=${PARTS:-preflight step distance attention}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -f .dali_site/.installed ] && export PYTHONPATH="$PWD/.dali_site:$PYTHONPATH"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi (CPU)"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  date -u; echo "SMOKE=$SMOKE PARTS=$PARTS"; } > "$OUT/machine.txt" 2>&1

if [ "$SMOKE" = 1 ]; then  # tiny shapes on the CPU: the same scripts and files, in seconds
  STEP_ARGS="--smoke --methods delta,l2"; STEP_MORE="--smoke --methods l2_sp"
  DIST_ARGS="--device cpu --shapes 8x4x4 --cpu-batch 2 --cpu-repeats 1 --layouts nchw"
  ATT_ARGS="--model resnet18 --layers layer4.1.conv2 --images 2 --size 32 --public-channels 2 --skip-bf16"
  DATA_ARGS="--images 8 --batches 2"
else
  STEP_ARGS="--models resnet101 --methods delta,l2 --time-budget 110"
  STEP_MORE="--models resnet101 --methods l2_sp --time-budget 20"
  DIST_ARGS="--device cuda"
  ATT_ARGS="--model resnet101 --images 32"
  DATA_ARGS="--images 4000 --batches 100"
fi

public_anchor() {  # the public recipe as its anchor script measures it, rows into $OUT/anchor.json
  if [ ! -f "$ANCHOR" ]; then
    echo "no $ANCHOR: run 'bash benchmarks/gpu/session.sh prepare ANCHOR.py' and carry .carry"
    [ "$SMOKE" = 1 ] && { echo "(smoke: the anchor part is skipped)"; return 0; }
    return 1
  fi
  if [ "$SMOKE" = 1 ]; then python3 -m py_compile "$ANCHOR" && echo "anchor compiles (it needs CUDA to run)"; return $?; fi
  OUT="$OUT" timeout 40 python3 "$ANCHOR" resnet101  # the eager fp32 rows come first; the rest as time allows
}

run_part() {
  case $1 in
    preflight) timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_preflight.py ;;
    step)      local rc=0  # every command's failure counts, not only the last one's
               public_anchor || rc=$?
               timeout 150 python3 benchmarks/bench_step.py $STEP_ARGS --out "$OUT/bench_step_gpu" || rc=$?
               timeout 50 python3 benchmarks/bench_step.py $STEP_MORE --append --out "$OUT/bench_step_gpu" || rc=$?
               return $rc ;;
    distance)  timeout 90 python3 benchmarks/bench_distance.py $DIST_ARGS --out "$OUT/distance_gpu.json" ;;
    attention) timeout 90 python3 benchmarks/bench_attention.py $ATT_ARGS --out "$OUT/attention_gpu.json" ;;
    data)      timeout 120 python3 benchmarks/bench_data.py $DATA_ARGS --out "$OUT/bench_data_gpu.json" ;;
    *)         echo "unknown part $1"; return 2 ;;
  esac
}

status=0
for part in $PARTS; do
  start=$(date +%s)
  run_part "$part" > "$OUT/$part.log" 2>&1
  rc=$?
  echo "== $part: exit $rc, $(( $(date +%s) - start )) s"; tail -n 5 "$OUT/$part.log"
  if [ $rc != 0 ]; then status=$rc; fi
  if [ "$part" = preflight ] && [ $rc != 0 ]; then echo "preflight failed: fix it before measuring"; exit $rc; fi
done
exit $status
