#!/usr/bin/env bash
# Builds the CUDA-enabled binaries here and packs them, with the shared libraries the GPU machine
# lacks (OpenBLAS and its Fortran runtime, SentencePiece), into .device/ (git-ignored), to be
# carried to the GPU machine (the device tool's `carry: [".device"]`, at most 64 MiB per call).
# The libraries travel xz-compressed (42 MB -> ~6 MB); on the GPU machine `source .device/env.sh`
# unpacks them once and sets LD_LIBRARY_PATH; `bash .device/test-gpu.sh` runs the GPU tests.
#   MTA_PACK_DATA=1  also packs the LM data (data/tok/*.model, data/shards/*.bin, xz-compressed;
#                    env.sh unpacks them into data/ beside .device).
#   MTA_PACK_BASE=REV  also packs `mta` built at git revision REV as .device/mta_base, for an A/B
#                    of a change in one device call (scripts/gpu-ab.sh). REV is checked out in a
#                    worktree, .base/ (git-ignored), and built there in build-gpu/; later packs
#                    rebuild only what differs.
# The binaries travel stripped and xz-compressed (~20 MB -> ~8 MB each); env.sh unpacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
MTA_BUILD_DIR=${MTA_BUILD_DIR:-build-gpu} MTA_CMAKE_ARGS="-DMTA_CUDA=ON" bash scripts/build.sh >/dev/null
B=${MTA_BUILD_DIR:-build-gpu}
rm -rf .device && mkdir -p .device/lib
cp "$B/src/mta" "$B/tests/mta_gpu_tests" .device/
if [ -n "${MTA_PACK_BASE:-}" ]; then
  rev=$(git rev-parse --verify "${MTA_PACK_BASE}^{commit}")
  if [ -d .base ]; then git -C .base checkout -q --detach "$rev"; else git worktree add -q --detach .base "$rev"; fi
  MTA_BUILD_DIR=build-gpu MTA_CMAKE_ARGS="-DMTA_CUDA=ON" MTA_BUILD_TARGET=mta bash .base/scripts/build.sh >/dev/null
  cp .base/build-gpu/src/mta .device/mta_base
  echo "gpu-pack: .device/mta_base is mta at $(git log -1 --format='%h %s' "$rev" | cut -c1-80)"
fi
for lib in $(ldd "$B/src/mta" | awk '/openblas|gfortran|quadmath|sentencepiece/ {print $3}'); do cp -L "$lib" .device/lib/; done
for bin in .device/mta .device/mta_gpu_tests .device/mta_base; do
  [ -f "$bin" ] && strip "$bin" && xz -T0 "$bin"
done
tar -C .device -cJf .device/lib.tar.xz lib && rm -rf .device/lib
if [ "${MTA_PACK_DATA:-0}" = 1 ]; then
  ls data/tok/*.model data/shards/*.bin >/dev/null  # fails with a clear ls error when the data is missing
  tar -cJf .device/data.tar.xz data/tok data/shards
fi
cp -r configs .device/
cp scripts/test-gpu.sh scripts/gpu-check.sh scripts/gpu-ab.sh scripts/gpu-ncu.sh scripts/ncu-kernel-totals.py scripts/ncu-source-lines.py scripts/ncu-sass-lines.py scripts/ncu-pipes.py scripts/gpu-env.sh .device/
mv .device/gpu-env.sh .device/env.sh
du -sh .device
