#!/usr/bin/env bash
# The prepared check for a lent GPU (H100 or H200): under 8 minutes, nothing from the network.
#
#   1. set-up: the peers' wheels carried in .whl/ (liger-kernel, cut-cross-entropy) into /tmp/site;
#      this package from the work tree (pure Python: PYTHONPATH)                          ~5 s
#   2. the gpu-marked tests                                                    time box 140 s
#   2b. with MATRIX=1 only (it does not fit the 8 minutes beside the sweeps): the option matrix with
#      CUDA tensors, i.e. the formula, regime, surface and loss-family tests (every option, both
#      backends, compiled kernels), one pytest per file so a cut keeps what ran  time box MATRIX_S
#   3. throughput, both forms, fwd and fwd+bwd, with the peers: whatever the 450 s total leaves
#      after the tests and the memory part (at least 155 s), and 35 s more before it is killed
#   4. peak memory on long traces (N up to 128k), both forms            budget 65 s, box 95 s
#   5. a short table, printed last                                                      ~5 s
#
# Each part is time-boxed and the next one runs whatever the last one did. The sweeps start nothing
# new past their budget, measure in order of interest and rewrite their CSVs after every shape, so
# a part cut short keeps what it measured. Writes to $OUT (default /tmp/gpu_check): gpu_check.log,
# throughput.csv, throughput_gate.csv, throughput.png, memory.csv, memory_gate.csv, memory.png.
#
#   bash bench/gpu_check.sh               # the full check
#   QUICK=1 bash bench/gpu_check.sh       # a few shapes per sweep (about 4 minutes)
#   DRY_RUN=1 bash bench/gpu_check.sh     # the same steps on CPU at tiny sizes (no GPU needed)
#   MATRIX_ONLY=1 bash bench/gpu_check.sh # set-up and the option matrix only, time box 420 s: run
#                                         # once on a lent GPU after a change to the kernels' options
#   MATRIX_TESTS="tests/test_formulas.py" MATRIX_ONLY=1 bash bench/gpu_check.sh   # a part of it
#   THROUGHPUT_ARGS="--vocabs 32k,128k,256k" MEMORY_ARGS="--forms linear" bash bench/gpu_check.sh
#                                         # a second run for what a first one's budget cut
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
# The whole script's target, under the 8-minute limit; the throughput sweep gets what is left.
TOTAL_S=${TOTAL_S:-450}
TESTS_S=${TESTS_S:-140}
MATRIX_S=${MATRIX_S:-150}
# The option matrix in order of value: closed forms, every regime, the public surface, then the
# matrix files of the loss family.
MATRIX_TESTS=${MATRIX_TESTS:-"tests/test_formulas.py tests/test_formulas_opsd.py tests/test_regimes.py \
tests/test_surface.py tests/test_loss_family.py tests/test_bad_input.py tests/test_rlsd.py tests/test_opsd.py \
tests/test_linear.py tests/test_opsd_linear.py tests/test_logprobs.py"}
MEMORY_BUDGET_S=${MEMORY_BUDGET_S:-65}
REPORT_S=15
SIZES=()
if [ "${DRY_RUN:-0}" != 0 ]; then
  SIZES=(--device cpu)
  # Liger's Triton kernels then run on CPU under the interpreter; ours take their CPU path.
  export TRITON_INTERPRET=1
elif [ "${QUICK:-0}" != 0 ]; then
  SIZES=(--preset quick)
  TOTAL_S=${TOTAL_S_QUICK:-300}
  MEMORY_BUDGET_S=${MEMORY_BUDGET_S_QUICK:-40}
fi
read -r -a THROUGHPUT_EXTRA <<< "${THROUGHPUT_ARGS:-}"
read -r -a MEMORY_EXTRA <<< "${MEMORY_ARGS:-}"

say() { echo "$(date +%H:%M:%S) $*" | tee -a "$LOG"; }
# part NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, output to the terminal and the log.
part() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  say "== $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    say "== $name: TIMED OUT after $((SECONDS - t0)) s"
  else
    say "== $name: exit $rc after $((SECONDS - t0)) s"
  fi
  TIMES+=("$name $((SECONDS - t0))s (rc $rc)")
  return 0
}
TIMES=()

say "== set-up"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$LOG" && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  say "no wheels in .whl/: the peers will be reported as unavailable"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Fewer OOMs from fragmentation after a provider has run out; peak figures are unaffected.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, torch, triton
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
for name in ("liger_kernel", "cut_cross_entropy", "rlsd_kernels"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'importable')} from {module.__path__[0]}")
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__}: {e})")
EOF
git rev-parse HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$LOG"

# The option matrix: one pytest per file (failures listed by -rfE, progress dots dropped), so a
# file cut by the time box leaves the summaries of those before it.
MATRIX_CMD='for f in $MATRIX_TESTS; do echo "-- $f"; "$PY" -m pytest -q -rfE -p no:cacheprovider "$f" 2>&1 |
  grep -vE "^[.sxFE]+ *(\[ *[0-9]+%\])?\$"; done'
export PY MATRIX_TESTS

if [ "${MATRIX_ONLY:-0}" != 0 ]; then
  part "option matrix" "${MATRIX_S_ONLY:-420}" bash -c "$MATRIX_CMD"
  say "== parts: ${TIMES[*]}; total ${SECONDS} s"
  exit 0
fi

TESTS_OUT=$(mktemp)
part "gpu tests" "$TESTS_S" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
if [ "${MATRIX:-0}" != 0 ]; then
  part "option matrix" "$MATRIX_S" bash -c "$MATRIX_CMD"
fi
grep -E "(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s" "$LOG" | tail -n 1 | tr -d '=' \
  | sed 's/^ *//;s/ *$//' > "$TESTS_OUT"
[ -s "$TESTS_OUT" ] || echo "no pytest summary line (timed out?): see gpu_check.log" > "$TESTS_OUT"

THROUGHPUT_BUDGET_S=${THROUGHPUT_BUDGET_S:-$((TOTAL_S - SECONDS - 35 - (MEMORY_BUDGET_S + 30) - REPORT_S))}
[ "$THROUGHPUT_BUDGET_S" -ge 60 ] || THROUGHPUT_BUDGET_S=60
part "throughput" $((THROUGHPUT_BUDGET_S + 35)) "$PY" bench/bench_throughput.py ${SIZES[@]+"${SIZES[@]}"} --out "$OUT" \
  --budget-s "$THROUGHPUT_BUDGET_S" --rep-ms 60 --no-progress ${THROUGHPUT_EXTRA[@]+"${THROUGHPUT_EXTRA[@]}"}
part "memory" $((MEMORY_BUDGET_S + 30)) "$PY" bench/bench_memory.py ${SIZES[@]+"${SIZES[@]}"} --out "$OUT" \
  --budget-s "$MEMORY_BUDGET_S" --no-progress ${MEMORY_EXTRA[@]+"${MEMORY_EXTRA[@]}"}

say "== parts: ${TIMES[*]}; total ${SECONDS} s"
# --plots redraws both PNGs from the CSVs, so a sweep cut short by its time box still has its plot.
"$PY" bench/report.py "$OUT" --plots --tests "$(cat "$TESTS_OUT")" 2>&1 | tee -a "$LOG"
rm -f "$TESTS_OUT"

# ---------------------------------------------------------------------------------------------------
# Host overhead (issue 14). NOT YET RUN on a GPU: written and checked on CPU only. Opt-in, after the
# check above: HOST_OVERHEAD=1 QUICK=1 bash bench/gpu_check.sh (about 2 minutes more).
#   a. bench/host_overhead.py on CUDA tensors: ATen ops and us per rlsd_loss fwd+bwd with the kernels
#      stubbed out (the validation's device-to-host read is real there), N = 1024, V = 151,936, bf16
#   b. triton's do_bench of rlsd_loss fwd+bwd (and the no-grad forward) at N = 1024 and 8192,
#      V = 151,936, bf16, 10% of rows masked: validate=True (default), validate="deferred" (error
#      bits read at the next call, no blocking sync) and validate=False
# Writes $OUT/host_overhead.csv and $OUT/host_do_bench.csv.
if [ "${HOST_OVERHEAD:-0}" != 0 ]; then
  part "host overhead, kernels stubbed" 90 "$PY" bench/host_overhead.py --device cuda --calls 300 \
    --out "$OUT/host_overhead.csv"
  part "host overhead, do_bench" 120 "$PY" - "$OUT/host_do_bench.csv" <<'PYEOF'
import csv, sys
import torch
from triton.testing import do_bench
import rlsd_kernels

V, rows = 151936, []
for n in (1024, 8192):
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(n, V, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    t = torch.randn(n, V, device="cuda", dtype=torch.bfloat16, generator=g)
    tok = torch.randint(0, V, (n,), device="cuda", generator=g)
    tok[torch.rand(n, device="cuda", generator=g) < 0.1] = -100
    adv = torch.randn(n, device="cuda", generator=g)
    for validate in (True, "deferred", False):
        def fwd_bwd():
            s.grad = None
            rlsd_kernels.rlsd_loss(s, t, tok, adv, validate=validate).backward()

        def fwd():
            with torch.no_grad():
                rlsd_kernels.rlsd_loss(s, t, tok, adv, validate=validate)

        for name, fn in (("fwd+bwd", fwd_bwd), ("fwd", fwd)):
            fn()
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            rows.append({"n": n, "vocab": V, "dtype": "bfloat16", "pass": name, "validate": validate, "ms": round(ms, 4)})
            print(f"N={n:5d} {name:8s} validate={validate!s:8s} {ms:.3f} ms", flush=True)
    del s, t
    torch.cuda.empty_cache()
with open(sys.argv[1], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
PYEOF
  say "== host overhead: ${SECONDS} s in all"
fi
