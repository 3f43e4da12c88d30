#!/usr/bin/env bash
# Whether a change leaves the device code of CUDA files unchanged, without a GPU: compiles each FILE (a
# .cu file of the repository) to PTX for sm_90 as the build does (-O3, no -lineinfo) at git revision REV
# (checked out in the .base worktree, as gpu-pack.sh's MTA_PACK_BASE does) and in the working tree,
# drops what differs without meaning (the per-file hashes in internal names, label names), and
# compares. Identical PTX means identical kernels, so a refactor that keeps it keeps the GPU tests'
# verdict (session 16: grad_tiles_at). Exit status 0 when every file is identical, 1 otherwise.
#   bash scripts/ptx-same.sh REV src/attention/flash_kq_layer_bwd.cu [src/attention/flash_mix.cu ...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: ptx-same.sh REV FILE.cu [FILE.cu ...]" >&2; exit 2; }
rev=$(git rev-parse --verify "$1^{commit}")
shift
if [ -d .base ]; then git -C .base checkout -q --detach "$rev"; else git worktree add -q --detach .base "$rev"; fi
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || NVCC=/usr/local/cuda/bin/nvcc
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
ptx() {  # ROOT FILE OUT
  "$NVCC" -DMTA_HAVE_CUDA=1 -I"$1/src" -O3 -DNDEBUG -arch=sm_90 --expt-relaxed-constexpr -std=c++20 -ptx \
    -x cu "$1/$2" -o "$3"
  sed -E -i 's/_GLOBAL__N__[0-9a-f]+_[0-9]+_//g; s/_INTERNAL_[0-9a-f]+_[0-9]+_//g; s/\$L__[A-Za-z0-9_]+/L/g' "$3"
}
status=0
for f in "$@"; do
  name=$(echo "$f" | tr '/' '_')
  ptx .base "$f" "$out/base_$name.ptx" &
  ptx . "$f" "$out/new_$name.ptx" &
  wait
  if cmp -s "$out/base_$name.ptx" "$out/new_$name.ptx"; then
    echo "ptx-same: $f identical to $(git log -1 --format=%h "$rev")"
  else
    lines=$(diff "$out/base_$name.ptx" "$out/new_$name.ptx" | grep -c '^[<>]' || true)  # diff exits 1 here
    echo "ptx-same: $f DIFFERS from $(git log -1 --format=%h "$rev") ($lines lines)"
    status=1
  fi
done
exit $status
