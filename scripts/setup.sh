#!/usr/bin/env bash
# Creates .venv with everything the project needs, from the project's own files. Idempotent.
# torch 2.13.0 is the CPU build that lies on this machine kind's disk; on a machine with a GPU,
# create .venv with --system-site-packages over an existing CUDA torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,lint,bench]"
