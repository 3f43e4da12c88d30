#!/usr/bin/env bash
# One device call that checks and times a change on the GPU machine, from a .device/ made by
# scripts/gpu-pack.sh (carry .device): the whole GPU test suite, then (when it passes) the attention
# layer benchmark on the shapes given, the training throughput of the configs given, with the time by
# phase. Logs go to OUT_DIR (default $OUT, the device tool's return folder).
#   bash .device/gpu-check.sh [--seqs 2048,4096] [--dims 64] [--configs kq-only,head-mix] [--reps 10]
#                             [--no-tests | --filter GTEST_PATTERN] [--train CONFIG...]
# --no-tests skips the suite (for a re-timing of binaries that already passed it); --filter runs only
# the tests matching the pattern (e.g. 'FlashMix*:ModelCuda.*'; the whole suite takes ~2.5 minutes).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
# shellcheck source=/dev/null
source "$here/env.sh"
out=${OUT_DIR:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
seqs=2048,4096 dims=64 configs=kq-only,toy,head-mix,paper-lm reps=10 tests=1 filter='*' train=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seqs) seqs=$2; shift 2 ;;
    --dims) dims=$2; shift 2 ;;
    --configs) configs=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --no-tests) tests=0; shift ;;
    --filter) filter=$2; shift 2 ;;
    --train) shift; while [ $# -gt 0 ] && [[ $1 != --* ]]; do train+=("$1"); shift; done ;;
    *) echo "gpu-check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$tests" = 1 ]; then
  timeout 420 "$here/mta_gpu_tests" --gtest_filter="$filter" >"$out/gpu-tests.log" 2>&1
  rc=$?
  grep -E "^\[  FAILED|^\[  PASSED|tests ran" "$out/gpu-tests.log" | head -40
  if [ $rc -ne 0 ]; then
    echo "GPU tests failed (rc=$rc): first failures:"
    grep -B2 -A12 "Failure" "$out/gpu-tests.log" | head -100
    exit 1
  fi
fi
PYTHONUNBUFFERED=1 timeout 300 python3 bench/attn_gpu.py --mta "$here/mta" --seqs "$seqs" --dims "$dims" \
  --configs "$configs" --reps "$reps" --warmup 3 2>&1 | tee "$out/attn.md"
for c in "${train[@]}"; do
  echo "== $c"
  MTA_CUDA_PROFILE=1 timeout 120 "$here/mta" bench train "$c" --device cuda --steps 4 --warmup 1 2>&1 | tail -40
done | tee "$out/train.log"
