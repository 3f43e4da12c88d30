#!/usr/bin/env bash
# The paper's toy task at full size on GPUs (issue 4, item 6): configs/toy/paper-{transformer,mta}.json
# (N=5, L=2, "all", 4 layers, dim 256, batch 64), SEEDS seeds per model, STEPS steps each (the paper:
# 100k) or as many as TIME_LIMIT minutes allow, all runs at once, spread round-robin over the visible
# GPUs. Sharing a GPU costs: on an H200 three runs on one GPU made ~13 steps/s each, one alone ~60-70.
# Prints a markdown table of held-out error rates; per-run logs and metrics under OUT_DIR.
#
#   MTA=.device/mta TIME_LIMIT=6 SEEDS="1 2 3" OUT_DIR=runs/toy-gpu bash scripts/toy-gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MTA=${MTA:-build-gpu/src/mta}
STEPS=${STEPS:-100000}
TIME_LIMIT=${TIME_LIMIT:-0}
SEEDS=${SEEDS:-"1 2 3"}
OUT_DIR=${OUT_DIR:-runs/toy-gpu}
MODELS=${MODELS:-"transformer mta"}
CONFIGS=${CONFIGS:-paper}  # configs/toy/$CONFIGS-<model>.json: "paper" (exact) or "fast" (lr 1e-3, warmup 500)
GPUS=${GPUS:-$(seq -s " " 0 $(($(nvidia-smi -L | wc -l) - 1)))}
read -r -a gpus <<<"$GPUS"
mkdir -p "$OUT_DIR"
i=0
pids=()
for model in $MODELS; do
  for seed in $SEEDS; do
    run="$OUT_DIR/$model-seed$seed"
    CUDA_VISIBLE_DEVICES=${gpus[$((i % ${#gpus[@]}))]} "$MTA" train "configs/toy/$CONFIGS-$model.json" --device cuda \
      --seed "$seed" --steps "$STEPS" --time-limit "$TIME_LIMIT" --out "$run" >"$run.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
  done
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ $status -eq 0 ] || { echo "a run failed; see $OUT_DIR/*.log" >&2; tail -n 5 "$OUT_DIR"/*.log >&2; exit 1; }

# The last evaluation of each run (metrics.jsonl lines of kind "eval"), then mean +- std over seeds.
/usr/bin/env python3 - "$OUT_DIR" $MODELS <<'EOF'
import json, pathlib, statistics, sys
out, models = pathlib.Path(sys.argv[1]), sys.argv[2:]
print(f"| error % on 1000 held-out examples | N=5 all | per seed | steps per seed |")
print("|---|---|---|---|")
for model in models:
    errs, steps = [], []
    for run in sorted(out.glob(f"{model}-seed*/metrics.jsonl")):
        evals = [d for d in map(json.loads, run.read_text().splitlines()) if d.get("kind") == "eval"]
        last = evals[-1]
        errs.append(100 * last["error_rate"])
        steps.append(last["step"])
    sd = statistics.stdev(errs) if len(errs) > 1 else 0.0
    print(f"| {model} | {statistics.mean(errs):.1f} +- {sd:.1f} | {' / '.join(f'{e:.1f}' for e in errs)} | {' / '.join(map(str, steps))} |")
EOF
