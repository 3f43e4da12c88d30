# Sourced on the GPU machine from a .device/ made by scripts/gpu-pack.sh (as .device/env.sh): unpacks
# the binaries, the packed libraries (and LM data, when packed) once, and puts the libraries on
# LD_LIBRARY_PATH.
_mta_dev="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ -d "$_mta_dev/lib" ] || tar -C "$_mta_dev" -xJf "$_mta_dev/lib.tar.xz"
for _mta_bin in "$_mta_dev"/*.xz; do  # the binaries (mta, mta_gpu_tests, mta_base), once
  case "$_mta_bin" in *.tar.xz | "$_mta_dev/*.xz") continue ;; esac
  [ -f "${_mta_bin%.xz}" ] || { xz -dk "$_mta_bin" && chmod +x "${_mta_bin%.xz}"; }
done
unset _mta_bin
if [ -f "$_mta_dev/data.tar.xz" ] && [ ! -d "$_mta_dev/../data/shards" ]; then
  tar -C "$_mta_dev/.." -xJf "$_mta_dev/data.tar.xz"
fi
export LD_LIBRARY_PATH="$_mta_dev/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
unset _mta_dev
