#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs besides torch, for an air-gapped GPU machine whose
# Python (3.12 by default) has a CUDA torch and nothing else: omegaconf (recipes; it vendors its
# antlr4 runtime), PyYAML (recipe syntax checks) and xxhash (the data registries the config
# validation reads). ~1.5 MB. Same versions as this checkout's venv, so the check runs with what
# the tests run with.
#
#     bash benchmarks/gpu_wheels.sh [DIR]          # DIR: benchmarks/wheels (ignored by git)
#     PYTHON_VERSION=3.11 bash benchmarks/gpu_wheels.sh /tmp/wheels311
#
# Then on the GPU machine either nothing (gpu_check.py unpacks DIR onto sys.path when a module
# is missing; --wheels DIR if not the default) or
#     python -m pip install --no-index --find-links DIR omegaconf PyYAML xxhash
# and: python benchmarks/gpu_check.py --out gpu_check.json (see its docstring).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-benchmarks/wheels}
PY=${PYTHON:-.venv/bin/python}
PYVER=${PYTHON_VERSION:-3.12}
ABI=cp${PYVER/./}
mkdir -p "$DIR"
# The default wheelhouse is ignored by git (it travels with the device tool's carry=[...]).
if [ "$DIR" = benchmarks/wheels ] && [ ! -e "$DIR/.gitignore" ]; then
    printf '*\n' >"$DIR/.gitignore"
fi
pkgs=()
for dist in omegaconf PyYAML xxhash; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")
    pkgs+=("$dist==$version")
done
"$PY" -m pip download --quiet --only-binary=:all: --no-deps \
    --python-version "$PYVER" --implementation cp --abi "$ABI" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 \
    -d "$DIR" "${pkgs[@]}" 2> >(grep -v "is ignored" >&2)
ls -l "$DIR"/*.whl
du -sh "$DIR"
