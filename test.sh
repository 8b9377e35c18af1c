#!/usr/bin/env bash
# Set-up, then the linter and the test suite. Without a GPU the Triton kernels run on CPU under the
# Triton interpreter; tests marked `gpu` run on a lent GPU through bench/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
# One worker process per core (pytest-xdist; PYTEST_WORKERS=0 runs in this process): the suite is
# mostly the single-threaded Triton interpreter.
python -m pytest -q -n "${PYTEST_WORKERS:-auto}" "$@"
