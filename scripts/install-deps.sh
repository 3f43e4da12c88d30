#!/usr/bin/env bash
# Installs the Debian packages mta needs. Idempotent: installs only what is missing.
# Used by README's quick start and by .ci/run.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  nlohmann-json3-dev      # JSON configs, specs, safetensors headers
  libcli11-dev            # command-line parsing
  libopenblas-openmp-dev  # CPU matrix products (OpenMP-threaded OpenBLAS)
  libgtest-dev googletest # unit tests
  libsentencepiece-dev sentencepiece  # tokenizer (language-modelling issue)
  python3-torch python3-numpy         # test oracles, for /usr/bin/python3
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
