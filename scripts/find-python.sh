#!/bin/sh
# The Python that makes .venv: $1 when given (PYTHON=), which must be >= 3.11; else the
# first of python3.13, python3.12, python3.11, python3 on PATH that is >= 3.11 (macOS's
# /usr/bin/python3 is Apple's 3.9). Prints its name; else one line on stderr, exit 2.
# POSIX sh: macOS's /bin/bash is 3.2.
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
if [ -n "$1" ]; then
    ok "$1" && { echo "$1"; exit 0; }
    echo "make: PYTHON=$1 is not a Python >= 3.11; pass another (make setup PYTHON=python3.12)" >&2
    exit 2
fi
for p in python3.13 python3.12 python3.11 python3; do
    command -v "$p" >/dev/null 2>&1 && ok "$p" && { echo "$p"; exit 0; }
done
echo "make: no Python >= 3.11 on PATH (tried python3.13, python3.12, python3.11, python3); install one (macOS: brew install python@3.12) or pass PYTHON=/path/to/python3" >&2
exit 2
