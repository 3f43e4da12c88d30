#!/usr/bin/env bash
# The GPU test suite (label "gpu"): on a machine with an NVIDIA GPU. Two ways:
#  - from a checkout with the build dependencies: builds with CUDA and runs `ctest -L gpu`;
#  - from .device/ made by scripts/gpu-pack.sh (the GPU machine has no Debian packages): runs the
#    packed test binary with the packed libraries.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -f "$here/mta_gpu_tests.xz" ] || [ -x "$here/mta_gpu_tests" ]; then
  # shellcheck source=/dev/null
  source "$here/env.sh"  # unpacks the test binary
  if [ $# -gt 0 ]; then exec "$here/mta_gpu_tests" "$@"; fi
  rc=0
  "$here/mta_gpu_tests" || rc=$?
  python3 "$here/../tests/oracle/check_attn.py" --mta "$here/mta" --device cuda --cases 160 || rc=$?
  exit $rc
fi
cd "$here/.."
MTA_BUILD_DIR=${MTA_BUILD_DIR:-build-gpu} MTA_CMAKE_ARGS="-DMTA_CUDA=ON" bash scripts/build.sh
ctest --test-dir "${MTA_BUILD_DIR:-build-gpu}" -L gpu --output-on-failure
