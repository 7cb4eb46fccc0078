#!/usr/bin/env bash
# Sets up a fresh Debian or Ubuntu machine: the system libraries the C++ loader links
# (liblmdb, libjpeg-turbo, zlib) and a compiler, then a virtual environment in .venv with
# PyTorch and t2i-fast (built from this checkout) and its test tools.
#
#   bash scripts/setup.sh            # T2I_TORCH=torch==2.13.0 by default
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential cmake liblmdb-dev libjpeg-dev zlib1g-dev python3-dev python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pinned: a bare "torch" would fetch the newest CUDA build; 2.13.0 lies in the range we support.
.venv/bin/python -m pip install -q "${T2I_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q ".[test]"
echo "ready: $(.venv/bin/t2i-fast --version)"
