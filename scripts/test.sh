#!/usr/bin/env bash
# Builds mta and runs the whole CPU test suite (unit tests, PyTorch oracle tests, CLI refusals).
# GPU tests carry the label "gpu" and run only on a GPU machine: scripts/test-gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ctest --test-dir "${MTA_BUILD_DIR:-build}" --output-on-failure -j "${MTA_JOBS:-$(nproc)}" -LE gpu
