#!/usr/bin/env bash
# A CPU twin of the GPU machine's software: Python 3.12, torch 2.11.0 (PyPI's build, CUDA 13.0 libraries,
# as torch 2.11.0+cu130 there), triton 3.6.0, torchvision 0.26.0, timm, numpy 2.x, and this package with
# its test extras, in a venv beside the tree (.venv-twin/, which holds its own .gitignore: never
# committed, never carried). It then runs what the GPU run runs, on the CPU:
#   1. the GPU session's smoke (SMOKE=1 bash benchmarks/gpu/session.sh: every part, tiny shapes)
#   2. the Triton kernel tests under the interpreter (TRITON_INTERPRET=1 pytest tests/test_kernels.py -k triton)
#   3. the fast-step tests (tests/test_step.py)
#   4. the rest of tests/test_kernels.py: the native kernel compiled against that torch, opcheck of the
#      custom op, torch.compile(fullgraph=True) of a training step with it (inductor on the CPU)
# so that an API that differs between torch 2.11 (the GPU machine) and this machine's torch shows here
# first. Nothing built for this machine's torch is reused: the native CPU kernel is found or compiled
# for the twin's torch as on a fresh GPU machine (fastdelta/kernels/native.py keys it by torch version).
#
#   bash scripts/gpu_twin.sh             build the venv if needed (first time: ~5 GB from PyPI, minutes), run 1-4
#   bash scripts/gpu_twin.sh build       only build it
#   bash scripts/gpu_twin.sh run         only run 1-4 (TWIN_PARTS="session triton step kernels" picks; ~8 min)
# Logs: .venv-twin/logs/<part>.log; the last lines say what passed and failed.
set -u
cd "$(dirname "$0")/.."
VENV=${TWIN_VENV:-$PWD/.venv-twin}
PY312=${TWIN_PYTHON:-}
PINS="torch==2.11.0 torchvision==0.26.0 triton==3.6.0 timm numpy>=2,<3"
MODE=${1:-all}

find_python() {
  [ -n "$PY312" ] && { echo "$PY312"; return; }
  for p in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    # a pyenv shim exists for every version but runs only the selected one: ask the interpreter itself
    "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { command -v "$p"; return; }
  done
  return 1
}

build() {
  if [ -f "$VENV/.built" ] && "$VENV/bin/python" -c "import torch, triton, torchvision, timm, numpy, fastdelta" 2>/dev/null; then
    echo "twin venv ready: $VENV"; return 0
  fi
  local py
  py=$(find_python) || { echo "no Python 3.12 found (pyenv install 3.12, or TWIN_PYTHON=/path/to/python3.12)"; return 2; }
  echo "building $VENV with $py ($PINS)"
  "$py" -m venv "$VENV" || return 2
  echo '*' > "$VENV/.gitignore"   # the venv ignores itself (Python 3.13's venv does this on its own)
  mkdir -p "$VENV/logs"
  # the local wheel folders hold Python 3.11 builds only: these come from PyPI
  "$VENV/bin/python" -m pip install -q $PINS || return 3
  FASTDELTA_SKIP_NATIVE=1 "$VENV/bin/python" -m pip install -q -e ".[test]" || return 3
  # pip must not have moved the pins (fastdelta asks torch>=2.11, torchvision>=0.26)
  "$VENV/bin/python" - <<'EOF' || return 3
import numpy, timm, torch, torchvision, triton, sys
got = dict(python=sys.version.split()[0], torch=torch.__version__, torchvision=torchvision.__version__,
           triton=triton.__version__, timm=timm.__version__, numpy=numpy.__version__)
print("twin:", " ".join(f"{k} {v}" for k, v in got.items()))
assert sys.version_info[:2] == (3, 12) and torch.__version__.startswith("2.11.0") and \
    torchvision.__version__.startswith("0.26.0") and triton.__version__ == "3.6.0" and numpy.__version__[0] == "2", got
EOF
  touch "$VENV/.built"
}

run_parts() {
  export PATH="$VENV/bin:$PATH"   # session.sh and the tests call python3: the twin's
  mkdir -p "$VENV/logs"
  local parts=${TWIN_PARTS:-session triton step kernels} rc=0 results=""
  python3 -c "import sys, torch, triton; print('twin python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  for part in $parts; do
    local log="$VENV/logs/$part.log" r=0 start
    start=$(date +%s)
    case $part in
      session) SMOKE=1 OUT="$VENV/logs/session-out" bash benchmarks/gpu/session.sh > "$log" 2>&1 || r=$? ;;
      triton)  TRITON_INTERPRET=1 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
                 -k "triton and not interpreter_suite" > "$log" 2>&1 || r=$? ;;
      step)    python3 -m pytest -q -p no:cacheprovider tests/test_step.py > "$log" 2>&1 || r=$? ;;
      kernels) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not triton" > "$log" 2>&1 || r=$? ;;
      *)       echo "unknown part $part" > "$log"; r=2 ;;
    esac
    echo "== twin/$part: exit $r, $(( $(date +%s) - start )) s ($log)"
    tail -n 3 "$log" | cut -c1-300
    results="$results$part=$r "
    [ "$r" = 0 ] || rc=1
  done
  echo "twin: $results"
  return $rc
}

case $MODE in
  build) build ;;
  run)   run_parts ;;
  all)   build && run_parts ;;
  *)     echo "usage: bash scripts/gpu_twin.sh [build|run]"; exit 2 ;;
esac
