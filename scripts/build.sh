#!/usr/bin/env bash
# Configures and builds mta into build/ (Release). Re-running only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${MTA_BUILD_DIR:-build}
JOBS=${MTA_JOBS:-$(nproc)}
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release ${MTA_CMAKE_ARGS:-} >/dev/null
# MTA_BUILD_TARGET=mta builds the command alone (the quick start), skipping the tests.
cmake --build "$BUILD_DIR" -j "$JOBS" ${MTA_BUILD_TARGET:+--target "$MTA_BUILD_TARGET"}
