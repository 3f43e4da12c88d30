#!/usr/bin/env bash
# README command 1: install dependencies, build, and run the main job (the toy task on the CPU,
# standard attention against MTA, printing the comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
MTA_BUILD_TARGET=mta bash scripts/build.sh
exec build/src/mta compare configs/toy/cpu-transformer.json configs/toy/cpu-mta.json
