#!/usr/bin/env bash
# The main job: set-up, then the fused RLSD loss checked against the reference on this machine's
# device and measured against the naive PyTorch loss (and, on a GPU, the peers). Prints a table.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
. .venv/bin/activate
python bench/bench_loss.py "$@"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo
  echo "No GPU here: the Triton kernels themselves, checked under the Triton interpreter:"
  TRITON_INTERPRET=1 python bench/bench_loss.py --check-only --batch 2 --seqlen 16 --vocab 1000
fi
