#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install hybridtron into it.
# A second run is a no-op unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HYBRIDTRON_VENV:-.venv}
STAMP="$VENV/.hybridtron-setup"
want=$(cat pyproject.toml launch/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating the environment in $VENV (first run: a few minutes)" >&2
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
pip install -U pip
# torch first and pinned: the CPU wheel; a later resolve must never swap it for a CUDA build.
pip install "torch==2.13.0"
constraints=$(mktemp)
echo "torch==2.13.0" >"$constraints"
DS_BUILD_OPS=0 pip install -c "$constraints" -e ".[dev]"
# mosaicml-streaming without its declared deps (they pull a CUDA torchvision); see stack.md.
pip install --no-deps "mosaicml-streaming==0.13.0"
rm -f "$constraints"
"$VENV/bin/python" -c "import torch, deepspeed, megatron.core, ray, omegaconf, tensorboard; import data_pipeline.streaming_compat" >/dev/null 2>&1 \
  || { echo "[setup] the environment in $VENV does not import; see the messages above" >&2; exit 1; }
echo "$want" >"$STAMP"
echo "[setup] environment ready: $VENV" >&2
