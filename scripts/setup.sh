#!/usr/bin/env bash
# Installs moex's Debian packages (when missing) and builds it into build/. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential cmake openmpi-bin libopenmpi-dev libboost-dev libopenblas-dev
          nlohmann-json3-dev libgtest-dev python3-numpy iproute2)
# MOEX_EXTRA_PACKAGES: more Debian packages to install with these (scripts/test.sh adds Slurm's).
read -r -a extra <<< "${MOEX_EXTRA_PACKAGES:-}"
packages+=("${extra[@]}")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "moex setup: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

build_type="${MOEX_BUILD_TYPE:-Release}"
cmake -S . -B build -DCMAKE_BUILD_TYPE="$build_type" ${MOEX_CMAKE_ARGS:-}
cmake --build build -j"$(nproc)"
