#!/usr/bin/env bash
# Builds the CUDA-enabled binaries here and packs them, with the shared libraries the GPU machine
# lacks (OpenBLAS and its Fortran runtime, SentencePiece), into .device/ (git-ignored), to be
# carried to the GPU machine (the device tool's `carry: [".device"]`, at most 64 MiB per call).
# The libraries travel xz-compressed (42 MB -> ~6 MB); on the GPU machine `source .device/env.sh`
# unpacks them once and sets LD_LIBRARY_PATH; `bash .device/test-gpu.sh` runs the GPU tests.
#   MTA_PACK_DATA=1  also packs the LM data (data/tok/*.model, data/shards/*.bin, xz-compressed;
#                    env.sh unpacks them into data/ beside .device).
set -euo pipefail
cd "$(dirname "$0")/.."
MTA_BUILD_DIR=${MTA_BUILD_DIR:-build-gpu} MTA_CMAKE_ARGS="-DMTA_CUDA=ON" bash scripts/build.sh >/dev/null
B=${MTA_BUILD_DIR:-build-gpu}
rm -rf .device && mkdir -p .device/lib
cp "$B/src/mta" "$B/tests/mta_gpu_tests" .device/
for lib in $(ldd "$B/src/mta" | awk '/openblas|gfortran|quadmath|sentencepiece/ {print $3}'); do cp -L "$lib" .device/lib/; done
tar -C .device -cJf .device/lib.tar.xz lib && rm -rf .device/lib
if [ "${MTA_PACK_DATA:-0}" = 1 ]; then
  ls data/tok/*.model data/shards/*.bin >/dev/null  # fails with a clear ls error when the data is missing
  tar -cJf .device/data.tar.xz data/tok data/shards
fi
cp -r configs .device/
cp scripts/test-gpu.sh scripts/gpu-check.sh scripts/gpu-ncu.sh scripts/ncu-kernel-totals.py scripts/ncu-source-lines.py scripts/ncu-sass-lines.py scripts/gpu-env.sh .device/
mv .device/gpu-env.sh .device/env.sh
du -sh .device
