#!/usr/bin/env bash
# On the device machine: store the DALI wheel parts carried by this call (see dali_wheels.sh); once every
# part is here, join them and install into .dali_site/. Prints what to export. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .dali_parts
if ls .carry/dali.part* >/dev/null 2>&1; then cp .carry/dali.part* .dali_parts/; fi
if [ -f .carry/dali.count ]; then cp .carry/dali.count .dali_parts/; fi
want=$(cat .dali_parts/dali.count 2>/dev/null || echo "?")
have=$(ls .dali_parts/dali.part* 2>/dev/null | wc -l)
echo "DALI parts stored: $have of $want"
if [ "$want" != "?" ] && [ "$have" -ge "$want" ] && [ ! -f .dali_site/.installed ]; then
  rm -rf .dali_wheels && mkdir -p .dali_wheels
  cat .dali_parts/dali.part* | tar -C .dali_wheels -xf -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .dali_site .dali_wheels/*.whl
  touch .dali_site/.installed
  rm -rf .dali_wheels
fi
if [ -f .dali_site/.installed ]; then
  PYTHONPATH="$PWD/.dali_site${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import nvidia.dali as d; print('DALI', d.__version__)"
  echo "export PYTHONPATH=$PWD/.dali_site:\$PYTHONPATH"
fi
