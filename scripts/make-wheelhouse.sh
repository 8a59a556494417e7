#!/usr/bin/env bash
# Download every wheel the container needs, for its Python (3.11) and platform
# (manylinux x86_64), so that `docker build` installs them with --no-index: pip inside
# a container often cannot reach or verify a package index.
# Usage: scripts/make-wheelhouse.sh [DIR]   (default .cache/wheelhouse)
set -euo pipefail
DIR=${1:-.cache/wheelhouse}
PIP=${PIP:-.venv/bin/pip}
PY=${PY:-.venv/bin/python}
mkdir -p "$DIR"
# The dependency list lives in pyproject.toml alone; versions in constraints.txt.
# The extras the image installs too (docker/Dockerfile): tensorboard.
# One requirement a line, read without mapfile (bash 4): macOS's /bin/bash is 3.2.
deps=$("$PY" scripts/dependencies.py pyproject.toml tensorboard)
DEPS=()
while IFS= read -r dep; do
    [ -n "$dep" ] && DEPS+=("$dep")
done <<EOF
$deps
EOF
[ ${#DEPS[@]} -gt 0 ] || { echo "make-wheelhouse: no dependencies in pyproject.toml" >&2; exit 2; }
"$PIP" download --quiet --dest "$DIR" --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 --platform any \
    -c constraints.txt \
    "${DEPS[@]}"
echo "wheelhouse $DIR: $(ls "$DIR" | wc -l) wheels, $(du -sh "$DIR" | cut -f1)"
