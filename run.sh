#!/usr/bin/env bash
# The main job: set-up, then the default study. A small Qwen2-architecture model, warm-started by
# supervised training, is trained with RLSD, GRPO, OPSD and GRPO+OPSD through the fused losses on
# 3-digit addition (one seed per method, about 7 minutes on a 2-core CPU); prints the table and
# writes results/default/{curves.csv,summary.csv,curves.png}. Arguments go to the study
# (python -m python.rlsd_study --help; docs/study.md has the committed study's commands).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
. .venv/bin/activate
# One torch thread per process, one process per core; the losses take the PyTorch path on CPU
# (the Triton interpreter is for the kernel tests only).
export OMP_NUM_THREADS=1
unset TRITON_INTERPRET
python -m python.rlsd_study "$@"
