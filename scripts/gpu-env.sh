# Sourced on the GPU machine from a .device/ made by scripts/gpu-pack.sh (as .device/env.sh): unpacks
# the packed libraries (and LM data, when packed) once, and puts the libraries on LD_LIBRARY_PATH.
_mta_dev="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ -d "$_mta_dev/lib" ] || tar -C "$_mta_dev" -xJf "$_mta_dev/lib.tar.xz"
if [ -f "$_mta_dev/data.tar.xz" ] && [ ! -d "$_mta_dev/../data/shards" ]; then
  tar -C "$_mta_dev/.." -xJf "$_mta_dev/data.tar.xz"
fi
export LD_LIBRARY_PATH="$_mta_dev/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
unset _mta_dev
