#!/usr/bin/env bash
# Here (a machine with internet): fetch DALI and the packages the GPU image lacks as Python 3.12 wheels
# and cut them into parts the device tool can carry (64 MiB per call with the working tree; the part
# size is 60 MiB less the tracked files, or PART_MIB):
#   .carry/dali.part00 .. .carry/dali.partNN   (git-ignored)
# On the device machine, one call per part, back to back (a warm machine keeps ignored files; it is
# given back after ~30 s idle, and then the parts stored so far are gone):
#   run(carry=[".carry/dali.part00", ".carry/dali.count"], command="bash benchmarks/gpu/dali_install.sh")
#   run(carry=[".carry/dali.part01"], command="bash benchmarks/gpu/dali_install.sh")   ... and so on;
# the call that brings the last part installs everything into .dali_site/ (PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
wheels=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$wheels" \
  nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==6.0.0.12 \
  astunparse==1.6.3 gast==0.7.0 libcst==1.9.0 makefun==1.16.0 nvtx==0.2.17 optree==0.20.0
# a call carries the working tree too (tracked files): part + tree must stay under 64 MiB
tree_mib=$(git ls-files -z | xargs -0 du -cb | tail -1 | awk '{print int($1 / 1048576) + 1}')
part_mib=${PART_MIB:-$((60 - tree_mib))}
rm -rf .carry && mkdir -p .carry
tar -C "$wheels" -cf - . | split -b "${part_mib}M" -d - .carry/dali.part
n=$(ls .carry | wc -l)
echo "$n" > .carry/dali.count   # the install script waits until it holds this many parts
ls -la .carry
echo "carry each of .carry/dali.part* AND .carry/dali.count in its own call: see the header of this script"
rm -rf "$wheels"
