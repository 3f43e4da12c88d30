#!/usr/bin/env bash
# Nsight Compute on the GPU machine, from a .device/ made by scripts/gpu-pack.sh (carry .device): the
# two profiles bench/RESULTS.md quotes. Reports go to OUT_DIR (default $OUT, the device tool's folder).
#   bash .device/gpu-ncu.sh kernels [SPEC.json]   sections (speed of light, memory, warp states,
#        occupancy) of the fused kernels on one attention layer, B=2, T=4096 (default: head-mix,
#        g=16 pre and post, H=16, D=64)
#   bash .device/gpu-ncu.sh step CONFIG           the duration of every kernel of one training step, and
#        each kernel's total over its launches (ncu-kernel-totals.py)
#   bash .device/gpu-ncu.sh source REGEX SPEC.json B T   the source view of the first kernel matching
#        REGEX on one attention layer (the build has -lineinfo): the hottest source lines by
#        instructions, by stall samples and by ncu's per-line excess (bank conflicts, uncoalesced
#        sectors: ncu-source-lines.py); with SASS_LINES=FILE:L1,L2 also those lines' loads and stores
#        against their ideal sectors and wavefronts (ncu-sass-lines.py); the CSV stays in OUT_DIR
#   bash .device/gpu-ncu.sh pipes REGEX SPEC.json B T [SKIP]   `--set full` of the kernel matching REGEX
#        (its SKIP+1-th launch): issue slots, L1 / L2, each pipe's utilization, bank conflicts and the
#        stall reasons per issued instruction (ncu-pipes.py)
# MTA_BIN=PATH profiles another mta binary (e.g. .device/mta_base from MTA_PACK_BASE, for a before/after).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
# shellcheck source=/dev/null
source "$here/env.sh"
out=${OUT_DIR:-${OUT:-/tmp/gpu-ncu}}
mta=${MTA_BIN:-$here/mta}
mkdir -p "$out"
case "${1:-}" in
  kernels)
    spec=${2:-}
    if [ -z "$spec" ]; then
      spec=$out/head-mix.json
      echo '{"head_pre":{"group":16},"head_post":{"group":16},"heads":16,"head_dim":64}' >"$spec"
    fi
    ncu --clock-control none -k regex:"flash_m" --launch-count 4 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section ComputeWorkloadAnalysis --section LaunchStats "$mta" bench attn --device cuda \
      --impl fused --spec "$spec" --batch 2 --seq 4096 --reps 1 --warmup 0 >"$out/ncu-kernels.txt" 2>&1
    grep -E "^  [a-z_ ]+.*\(|Duration|Warp Cycles Per Issued|Issue Slots Busy|Achieved Occupancy|Registers Per" \
      "$out/ncu-kernels.txt" | cut -c1-120 ;;
  step)
    ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel "$mta" bench train \
      "${2:?a config}" --device cuda --steps 1 --warmup 0 >"$out/ncu-step.txt" 2>&1
    python3 "$here/ncu-kernel-totals.py" "$out/ncu-step.txt" 30 ;;
  source)
    name=$(echo "${2:?a kernel regex}" | tr -c 'A-Za-z0-9_\n' _)
    ncu --clock-control none -k regex:"$2" --launch-count 1 --import-source yes --section SourceCounters \
      --section WarpStateStats -f -o "$out/src-$name" "$mta" bench attn --device cuda --impl fused \
      --spec "${3:?a spec}" --batch "${4:-2}" --seq "${5:-4096}" --reps 1 --warmup 0 >"$out/ncu-src-$name.log" 2>&1
    ncu --import "$out/src-$name.ncu-rep" --page source --print-source cuda,sass --csv >"$out/src-$name.csv"
    python3 "$here/ncu-source-lines.py" "$out/src-$name.csv" 40
    # Then, for the lines named in SASS_LINES (FILE_SUFFIX:LINE,LINE...), their loads and stores.
    if [ -n "${SASS_LINES:-}" ]; then
      python3 "$here/ncu-sass-lines.py" "$out/src-$name.csv" "${SASS_LINES%%:*}" "${SASS_LINES#*:}"
    fi ;;
  pipes)
    name=$(echo "${2:?a kernel regex}" | tr -c 'A-Za-z0-9_\n' _)
    ncu --clock-control none -k regex:"$2" --launch-skip "${6:-0}" --launch-count 1 --set full -f \
      -o "$out/pipes-$name" "$mta" bench attn --device cuda --impl fused --spec "${3:?a spec}" \
      --batch "${4:-2}" --seq "${5:-4096}" --reps 1 --warmup 0 >"$out/ncu-pipes-$name.log" 2>&1
    ncu --import "$out/pipes-$name.ncu-rep" --page raw --csv >"$out/pipes-$name.csv"
    python3 "$here/ncu-pipes.py" "$out/pipes-$name.csv" ;;
  *) echo "usage: gpu-ncu.sh kernels [SPEC.json] | step CONFIG | [SASS_LINES=FILE:L1,L2] source REGEX SPEC [B T]" \
       "| pipes REGEX SPEC [B T SKIP]" >&2
     exit 2 ;;
esac
