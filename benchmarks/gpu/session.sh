#!/usr/bin/env bash
# The GPU benchmark run: one command, parts in priority order, each under its own time limit inside one
# total (TOTAL, 540 s: the device tool's 10 minutes, less the start and the transfers), every row on
# disk as soon as it is measured. A failing or timed-out part never stops the later ones: its exit
# status goes into the summary. Results are then committed under benchmarks/results/ with the card.
#
#   bash benchmarks/gpu/session.sh prepare ANCHOR.py   here, once: copies the public-recipe anchor script
#                                            (it writes its rows to $OUT/anchor.json) into .carry/
#   bash benchmarks/gpu/session.sh           on the GPU machine (carry .carry, or have shared/anchors/
#                                            public_recipe_gpu.py in the checkout), <= 540 s
#   SMOKE=1 bash benchmarks/gpu/session.sh   the same parts, files and summary on the CPU, tiny shapes (CI)
#
# Parts (PARTS picks and orders them; default "step preflight distance attention"), limit in seconds:
#   step       bench_step.py, then the public anchor script:
#                step/delta     the public re-implementation and fastdelta (eager, then compiled) on
#                               DELTA alone, first: the headline ratio (no new row after 80 s; each
#                               row then profiled over
#                               3 steps: bench_step_gpu/profile_*.txt, see benchmarks/gpu/STEP_MODEL.md)
#                                                                                                     190
#                step/l2,l2_sp  the same for L2, then L2-SP (no new row after 90 s)                  120
#                step/anchor    the public recipe as its anchor script measures it (eager fp32 rows
#                               first; the rest as time allows)                                       35
#   preflight  tests/test_gpu_preflight.py: Triton kernel vs float64, the op under torch.compile
#              (fullgraph), 3 fast steps vs the reference step, the deferred loop on CUDA             80
#   distance   bench_distance.py: fused op vs eager / compiled composite (compiled once per dtype
#              and layout), the four ResNet-101 taps                                                55
#   attention  bench_attention.py: ResNet-101, public one-channel method vs exact and first-order   50
#   data       bench_data.py (DALI GPU vs torchvision CPU vs nvjpeg), a separate call: needs DALI in
#              .dali_site/ (benchmarks/gpu/dali_wheels.sh here, dali_install.sh there)            120
# A part gets min(its limit, the time left before TOTAL less 10 s for the archive); with under 15 s
# left it is skipped (exit "skipped").
#
# What comes back (the device tool returns at most 8 files of $OUT): every part writes into a work
# folder outside $OUT; after each part $OUT is refreshed with
#   all.tar.gz       every part's files and logs (machine.txt, <part>.log, bench_step_gpu/, anchor.json,
#                    distance_gpu.json, attention_gpu.json, *.rows.jsonl, status.tsv, summary.txt)
#   bench_step.json  the step rows (bench_step.md: their table)       anchor.json  the anchor's rows
#   machine.txt      card, driver, versions                           summary.txt  the summary below
# (6 files; a file that a part did not write is a stub that says why). stdout ends with the summary:
# per method and engine img/s, ms/step, the ratio to the public re-implementation, first step, peak
# memory; then every part's exit status.
set -u
cd "$(dirname "$0")/../.."
ANCHOR=.carry/anchors/public_recipe_gpu.py
if [ "${1:-}" = "prepare" ]; then
  if [ ! -f "${2:-}" ]; then echo "usage: session.sh prepare ANCHOR.py (the public-recipe anchor script; '${2:-}' is not a file)"; exit 2; fi
  mkdir -p "$(dirname "$ANCHOR")" && cp "$2" "$ANCHOR" && echo "anchor copied to $ANCHOR"
  exit $?
fi
[ ! -f "$ANCHOR" ] && [ -f shared/anchors/public_recipe_gpu.py ] && ANCHOR=shared/anchors/public_recipe_gpu.py
OUT=${OUT:-/tmp/fastdelta-gpu-out}
SMOKE=${SMOKE:-0}
PARTS=${PARTS:-step preflight distance attention}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -f .dali_site/.installed ] && export PYTHONPATH="$PWD/.dali_site:$PYTHONPATH"
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastdelta-session.XXXXXX")
STATUS="$WORK/status.tsv"
: > "$STATUS"

if [ "$SMOKE" = 1 ]; then  # tiny shapes on the CPU: the same scripts, files and summary
  STEP_DELTA="--smoke --methods delta --also-eager --profile 1"; STEP_MORE="--smoke --methods l2,l2_sp"
  DIST_ARGS="--device cpu --shapes 8x4x4 --cpu-batch 2 --cpu-repeats 1 --layouts nchw"
  ATT_ARGS="--model resnet18 --layers layer4.1.conv2 --images 2 --size 32 --public-channels 2 --skip-bf16"
  DATA_ARGS="--images 8 --batches 2"
  TOTAL=${TOTAL:-900}; L_DELTA=240; L_MORE=240; L_ANCHOR=60; L_PRE=150; L_DIST=120; L_ATT=150; L_DATA=240
else
  STEP_DELTA="--models resnet101 --methods delta --also-eager --profile 3 --time-budget 80"
  STEP_MORE="--models resnet101 --methods l2,l2_sp --profile 3 --time-budget 90"
  DIST_ARGS="--device cuda"
  ATT_ARGS="--model resnet101 --images 32"
  DATA_ARGS="--images 4000 --batches 100"
  TOTAL=${TOTAL:-540}; L_DELTA=190; L_MORE=120; L_ANCHOR=35; L_PRE=80; L_DIST=55; L_ATT=50; L_DATA=120
fi
RESERVE=10    # seconds kept for the summary and the archive
MIN_PART=15   # a part with less than this left is skipped
DEADLINE=$(( $(date +%s) + TOTAL ))

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi (CPU)"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  date -u; echo "SMOKE=$SMOKE PARTS=$PARTS TOTAL=$TOTAL"; } > "$WORK/machine.txt" 2>&1

stub() {  # FILE REASON: a JSON file that says why the real one is missing
  [ -f "$1" ] || printf '{"rows": [], "missing": "%s"}\n' "$2" > "$1"
}

collect() {  # $OUT: the archive of the work folder so far and the headline files, at most 8 files
  cp "$WORK/machine.txt" "$OUT/machine.txt"
  for f in bench_step_gpu/bench_step.json bench_step_gpu/bench_step.md anchor.json summary.txt; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$(basename "$f")"
  done
  tar -czf "$OUT/all.tar.gz.part" -C "$WORK" . && mv -f "$OUT/all.tar.gz.part" "$OUT/all.tar.gz"
}

run_timed() {  # NAME LIMIT LOG CMD...: CMD under min(LIMIT, time left), output into LOG, status into status.tsv
  local name=$1 limit=$2 log=$3 left start rc=0
  shift 3
  left=$(( DEADLINE - $(date +%s) - RESERVE ))
  if [ "$left" -lt "$MIN_PART" ]; then
    echo "$name: skipped, ${left} s left of TOTAL=$TOTAL" >> "$log"
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$STATUS"
    return 125
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit $limit s): $*" >> "$log"
  start=$(date +%s)
  timeout -k 5 "$limit" "$@" >> "$log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" >> "$STATUS"
  echo "== $name: exit $rc, $(( $(date +%s) - start )) s (limit $limit s)"
  tail -n 4 "$log" | cut -c1-300
  return $rc
}

anchor_part() {  # the public recipe as its anchor script measures it, rows into $WORK/anchor.json
  local log="$WORK/step.log"
  if [ ! -f "$ANCHOR" ]; then
    echo "no $ANCHOR: run 'bash benchmarks/gpu/session.sh prepare ANCHOR.py' and carry .carry" >> "$log"
    stub "$WORK/anchor.json" "no anchor script ($ANCHOR): session.sh prepare ANCHOR.py"
    if [ "$SMOKE" = 1 ]; then
      printf 'step/anchor\t0\t0\t%s\n' "$L_ANCHOR" >> "$STATUS"; echo "== step/anchor: exit 0 (smoke: no anchor script, skipped)"; return 0
    fi
    printf 'step/anchor\t1\t0\t%s\n' "$L_ANCHOR" >> "$STATUS"; echo "== step/anchor: exit 1 (no anchor script)"; return 1
  fi
  if [ "$SMOKE" = 1 ]; then  # it needs CUDA: the smoke run only checks that it compiles
    run_timed step/anchor "$L_ANCHOR" "$log" python3 -m py_compile "$ANCHOR"
    local rc=$?
    stub "$WORK/anchor.json" "smoke: the anchor script needs CUDA (it compiles)"
    return $rc
  fi
  local rc=0
  run_timed step/anchor "$L_ANCHOR" "$log" env OUT="$WORK" python3 "$ANCHOR" resnet101 || rc=$?
  stub "$WORK/anchor.json" "the anchor script wrote no rows (exit $rc)"
  return $rc
}

run_part() {
  local log="$WORK/$1.log"
  case $1 in
    step)      local rc=0  # each command's failure counts; none stops the next
               run_timed step/delta "$L_DELTA" "$log" \
                 python3 benchmarks/bench_step.py $STEP_DELTA --out "$WORK/bench_step_gpu" || rc=$?
               run_timed step/l2,l2_sp "$L_MORE" "$log" \
                 python3 benchmarks/bench_step.py $STEP_MORE --append --out "$WORK/bench_step_gpu" || rc=$?
               anchor_part || rc=$?
               return $rc ;;
    preflight) run_timed preflight "$L_PRE" "$log" python3 -m pytest -q -p no:cacheprovider tests/test_gpu_preflight.py ;;
    distance)  run_timed distance "$L_DIST" "$log" python3 benchmarks/bench_distance.py $DIST_ARGS --out "$WORK/distance_gpu.json" ;;
    attention) run_timed attention "$L_ATT" "$log" python3 benchmarks/bench_attention.py $ATT_ARGS --out "$WORK/attention_gpu.json" ;;
    data)      run_timed data "$L_DATA" "$log" python3 benchmarks/bench_data.py $DATA_ARGS --out "$WORK/bench_data_gpu.json" ;;
    *)         echo "unknown part $1" | tee -a "$log"; printf '%s\t2\t0\t0\n' "$1" >> "$STATUS"; return 2 ;;
  esac
}

status=0
for part in $PARTS; do
  run_part "$part" || status=$?
  collect
done

# the summary: the last thing on stdout (and summary.txt, in the archive too)
mkdir -p "$WORK/bench_step_gpu"
stub "$WORK/bench_step_gpu/bench_step.json" "no step rows (PARTS=$PARTS)"
[ -f "$WORK/bench_step_gpu/bench_step.md" ] || echo "no step rows (PARTS=$PARTS)" > "$WORK/bench_step_gpu/bench_step.md"
stub "$WORK/anchor.json" "the step part did not run (PARTS=$PARTS)"
if ! python3 benchmarks/bench_step.py summary "$WORK" --out "$WORK/summary.txt" > /dev/null 2> "$WORK/summary.err"; then
  { echo "== summary (bench_step.py summary failed: $(tail -n 1 "$WORK/summary.err"))"; echo
    echo "| part | exit | s | limit s |"; echo "|---|---|---|---|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$STATUS"; } > "$WORK/summary.txt"
fi
collect
rm -rf "$WORK"
cat "$OUT/summary.txt"
exit $status
