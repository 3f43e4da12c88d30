#!/usr/bin/env bash
# Trains every CONFIG with every seed of SEEDS and prints a table of their final evaluations
# (scripts/results_table.py: error rate for the toy task, perplexity per group for language models).
# On DEVICE=cuda all runs start at once, spread round-robin over GPUS; on DEVICE=cpu they run one
# after another. Each run stops at STEPS (default: the config's) or after TIME_LIMIT minutes, then
# evaluates and checkpoints (`mta train --time-limit`); logs and metrics go to OUT_DIR/<config>-seed<s>.
#
#   MTA=.device/mta SEEDS="1 2" TIME_LIMIT=8 OUT_DIR=runs/lm bash scripts/multi-run.sh configs/lm/{transformer,diff,mta}.json
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: [MTA=..] [SEEDS=..] [TIME_LIMIT=min] [STEPS=n] [DEVICE=cuda|cpu] [GPUS=..] [OUT_DIR=..] $0 CONFIG..." >&2; exit 2; }
MTA=${MTA:-build-gpu/src/mta}
SEEDS=${SEEDS:-"1 2 3"}
TIME_LIMIT=${TIME_LIMIT:-0}
DEVICE=${DEVICE:-cuda}
OUT_DIR=${OUT_DIR:-runs/multi}
if [ "$DEVICE" = cuda ]; then
  GPUS=${GPUS:-$(seq -s " " 0 $(($(nvidia-smi -L | wc -l) - 1)))}
  read -r -a gpus <<<"$GPUS"
fi
mkdir -p "$OUT_DIR"
i=0
pids=()
for config in "$@"; do
  for seed in $SEEDS; do
    run="$OUT_DIR/$(basename "$config" .json)-seed$seed"
    args=(train "$config" --device "$DEVICE" --seed "$seed" --time-limit "$TIME_LIMIT" --out "$run")
    [ -n "${STEPS:-}" ] && args+=(--steps "$STEPS")
    if [ "$DEVICE" = cuda ]; then
      CUDA_VISIBLE_DEVICES=${gpus[$((i % ${#gpus[@]}))]} "$MTA" "${args[@]}" >"$run.log" 2>&1 &
      pids+=($!)
    else
      "$MTA" "${args[@]}" >"$run.log" 2>&1 || { echo "$run failed:" >&2; tail -n 5 "$run.log" >&2; exit 1; }
    fi
    i=$((i + 1))
  done
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ $status -eq 0 ] || { echo "a run failed; see $OUT_DIR/*.log" >&2; tail -n 5 "$OUT_DIR"/*.log >&2; exit 1; }
python3 scripts/results_table.py "$OUT_DIR" "$@"
