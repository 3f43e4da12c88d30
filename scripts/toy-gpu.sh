#!/usr/bin/env bash
# The paper's toy task at full size on GPUs (issue 4, item 6): configs/toy/paper-{transformer,mta}.json
# (N=5, L=2, "all", 4 layers, dim 256, batch 64), SEEDS seeds per model (default 3), STEPS steps each
# (the paper: 100k) or as many as TIME_LIMIT minutes allow, all at once over the visible GPUs
# (scripts/multi-run.sh). On an H200 with the fused kernels (session 6) three runs sharing a GPU make
# ~60 steps/s each (before them: ~13 each, ~60-70 alone), so 100k steps take ~28 minutes; a run stopped
# by TIME_LIMIT continues with the same `mta train ... --out RUN_DIR --resume`. CONFIGS=fast takes
# configs/toy/fast-*.json (lr 1e-3, warmup 500).
#
#   MTA=.device/mta TIME_LIMIT=6 SEEDS="1 2 3" OUT_DIR=runs/toy-gpu bash scripts/toy-gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIGS=${CONFIGS:-paper}
OUT_DIR=${OUT_DIR:-runs/toy-gpu} DEVICE=cuda exec bash scripts/multi-run.sh \
  "configs/toy/$CONFIGS-transformer.json" "configs/toy/$CONFIGS-mta.json"
