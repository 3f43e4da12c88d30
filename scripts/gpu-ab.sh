#!/usr/bin/env bash
# A/B of one attention layer's time, the packed `mta` against `mta_base` (MTA_PACK_BASE=REV bash
# scripts/gpu-pack.sh), side by side in one run on the GPU machine: each case runs with the two
# binaries alternately, ROUNDS times, so that clock and thermal drift hit both alike. Prints, per case
# and binary, the median over rounds of the forward, backward and forward+backward times, and new/base.
#   bash .device/gpu-ab.sh [--rounds 3] [--reps 10] [--forward-only] SPEC:BATCH:SEQ [SPEC:BATCH:SEQ ...]
#   e.g. bash .device/gpu-ab.sh .device/configs/attn/kq-layer-35m.json:32:1024 \
#                               .device/configs/attn/paper-lm-h16.json:2:4096
# Speed only: correctness is the GPU suite's (test-gpu.sh, or gpu-check.sh --filter). DEVICE=cpu runs
# the same comparison on the CPU (a smoke test of this script); MTA_NEW / MTA_BASE name other binaries.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
# shellcheck source=/dev/null
[ -f "$here/env.sh" ] && source "$here/env.sh"
new=${MTA_NEW:-$here/mta} base=${MTA_BASE:-$here/mta_base} device=${DEVICE:-cuda}
rounds=3 reps=10 fwd_only=() cases=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --forward-only) fwd_only=(--forward-only); shift ;;
    -*) echo "gpu-ab: unknown option $1" >&2; exit 2 ;;
    *) cases+=("$1"); shift ;;
  esac
done
[ ${#cases[@]} -gt 0 ] || { echo "gpu-ab: give at least one SPEC:BATCH:SEQ" >&2; exit 2; }
for b in "$new" "$base"; do [ -x "$b" ] || { echo "gpu-ab: no binary $b (MTA_PACK_BASE=REV for mta_base)" >&2; exit 2; }; done
log=$(mktemp)
for c in "${cases[@]}"; do
  IFS=: read -r spec batch seq <<<"$c"
  [ -f "$spec" ] && [ -n "$batch" ] && [ -n "$seq" ] || { echo "gpu-ab: bad case '$c' (SPEC:BATCH:SEQ)" >&2; exit 2; }
  for ((r = 0; r < rounds; ++r)); do
    for which in base new; do
      bin=$base; [ $which = new ] && bin=$new
      line=$("$bin" bench attn --device "$device" --impl fused --spec "$spec" --batch "$batch" --seq "$seq" \
        --reps "$reps" --warmup 2 "${fwd_only[@]}" 2>&1 | tail -1)
      case "$line" in
        '{'*) echo "$c $which $line" >>"$log" ;;
        *) echo "gpu-ab: $which failed on $c: $line" >&2; exit 1 ;;
      esac
    done
  done
done
python3 - "$log" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    case, which, js = line.split(" ", 2)
    runs.setdefault(case, {}).setdefault(which, []).append(json.loads(js))
def med(rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else None
def fmt(x):
    return f"{'-':>9s}" if x is None else f"{x:9.3f}"
print(f"{'case':60s} {'binary':6s} {'fwd ms':>9s} {'bwd ms':>9s} {'f+b ms':>9s}")
for case, by in runs.items():
    m = {w: {k: med(by[w], k) for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms")} for w in ("base", "new")}
    for w in ("base", "new"):
        print(f"{case[-60:]:60s} {w:6s} {fmt(m[w]['fwd_ms'])} {fmt(m[w]['bwd_ms'])} {fmt(m[w]['fwd_bwd_ms'])}"
              f"   ({len(by[w])} rounds)")
    ratio = [m["new"][k] / m["base"][k] if m["new"][k] and m["base"][k] else None for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms")]
    print(f"{'':60s} {'new/base':6s} " + " ".join(fmt(x) for x in ratio))
PY
rm -f "$log"
