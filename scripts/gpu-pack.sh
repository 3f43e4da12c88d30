#!/usr/bin/env bash
# Builds the CUDA-enabled binaries here and packs them, with the shared libraries the GPU machine
# lacks (OpenBLAS and its Fortran runtime, SentencePiece), into .device/ (git-ignored), to be
# carried to the GPU machine: the device tool's `carry: [".device"]`, then `bash .device/test-gpu.sh`
# there.
set -euo pipefail
cd "$(dirname "$0")/.."
MTA_BUILD_DIR=${MTA_BUILD_DIR:-build-gpu} MTA_CMAKE_ARGS="-DMTA_CUDA=ON" bash scripts/build.sh >/dev/null
B=${MTA_BUILD_DIR:-build-gpu}
rm -rf .device && mkdir -p .device/lib
cp "$B/src/mta" "$B/tests/mta_gpu_tests" .device/
for lib in $(ldd "$B/src/mta" | awk '/openblas|gfortran|quadmath|sentencepiece/ {print $3}'); do cp -L "$lib" .device/lib/; done
cp -r configs .device/
cp scripts/test-gpu.sh .device/
du -sh .device
