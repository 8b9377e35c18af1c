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
#      after the tests and the memory part (160 s if the tests fill their box), and 35 s more before it is killed
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
#
# Takes no arguments: it is set by environment variables (bash bench/gpu_check.sh --help lists them).
# Without DRY_RUN=1 it needs a CUDA GPU and stops before starting where none is visible. A part that
# fails or times out does not stop the others; the script then lists the failed parts last and exits 1.
set -uo pipefail

usage() {
  cat <<'USAGE'
usage: [VAR=value ...] bash bench/gpu_check.sh [-h | --help]

The prepared check for a lent GPU: set-up, the gpu-marked tests, the throughput and memory sweeps,
a report; each part time-boxed, results in $OUT. It takes no arguments; environment variables:

  OUT=DIR                  results and gpu_check.log (default /tmp/gpu_check)
  PYTHON=PATH              the Python to run (default python3)
  DRY_RUN=1                the same steps on CPU at tiny sizes (no GPU needed; without it, a CUDA GPU
                           is required and the script stops before starting where none is visible)
  QUICK=1                  a few shapes per sweep (about 4 minutes)
  TOTAL_S, TOTAL_S_QUICK   the whole script's target in seconds (450; 300 with QUICK=1)
  TESTS_S                  time box of the gpu tests (140)
  THROUGHPUT_BUDGET_S      the throughput sweep's budget (default: what TOTAL_S leaves, at least 60)
  MEMORY_BUDGET_S, MEMORY_BUDGET_S_QUICK   the memory sweep's budget (65; 40 with QUICK=1)
  THROUGHPUT_ARGS, MEMORY_ARGS   more options for bench_throughput.py / bench_memory.py
  MATRIX=1, MATRIX_S       the option matrix after the gpu tests, and its time box (150)
  MATRIX_ONLY=1, MATRIX_S_ONLY   set-up and the option matrix only, and its time box (420)
  MATRIX_TESTS             the test files of the option matrix (space-separated)
  HOST_OVERHEAD=1          host work per call, after the sweeps
  LINEAR_CHECK=1, LINEAR_SLAB_S, LINEAR_S   the fused linear form's schedule, and its time boxes (280, 150)
  SEGMENTED_CHECK=1, SEGMENTED_S   the segmented strategy (segmented_check.py), and its time box (200)
  OPT_IN_ONLY=1            set-up and the opt-in parts chosen above only (with SEGMENTED_CHECK=1, the
                           segmented gpu tests too, time box SEGMENTED_TESTS_S, 150): what a short
                           loan of a GPU needs for the open measurements, e.g.
                           OPT_IN_ONLY=1 SEGMENTED_CHECK=1 HOST_OVERHEAD=1 (about 9 minutes), then
                           OPT_IN_ONLY=1 LINEAR_CHECK=1 (about 7 minutes)
  PYTORCH_CUDA_ALLOC_CONF  passed on (default expandable_segments:True)

A part that fails or times out does not stop the others: the failed parts are listed last and the
exit status is then 1 (0 when every part passed). See bench/README.md.
USAGE
}
case $# in
  0) ;;
  *) if [ "$#" = 1 ] && { [ "$1" = -h ] || [ "$1" = --help ]; }; then usage; exit 0; fi
     echo "gpu_check.sh: unknown argument(s): $* (it takes none; settings are environment variables)" >&2
     echo "usage: [VAR=value ...] bash bench/gpu_check.sh [-h | --help]" >&2
     exit 2 ;;
esac

if [ "${OPT_IN_ONLY:-0}" != 0 ] && [ "${HOST_OVERHEAD:-0}${LINEAR_CHECK:-0}${SEGMENTED_CHECK:-0}" = 000 ]; then
  echo "gpu_check.sh: OPT_IN_ONLY=1 runs only the opt-in parts, and none is chosen (HOST_OVERHEAD=1," \
    "LINEAR_CHECK=1 or SEGMENTED_CHECK=1)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
if [ "${DRY_RUN:-0}" = 0 ]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)'
  rc=$?
  if [ "$rc" = 3 ]; then
    echo "gpu_check.sh: no CUDA GPU is visible here, so nothing was run. For the same steps on CPU at tiny" \
      "sizes: DRY_RUN=1 bash bench/gpu_check.sh" >&2
    exit 1
  elif [ "$rc" != 0 ]; then
    echo "gpu_check.sh: $PY could not import torch (exit $rc): set PYTHON to a Python with torch" >&2
    exit 1
  fi
fi
mkdir -p "$OUT" || exit 1
LOG="$OUT/gpu_check.log"
: > "$LOG" || exit 1
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
REP_MS=(--rep-ms 60)
if [ "${DRY_RUN:-0}" != 0 ]; then
  SIZES=(--device cpu)
  REP_MS=()  # the tiny preset's own timing window: the dry run only exercises the code paths
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
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    FAILED+=("$name (timed out)")
  elif [ "$rc" != 0 ]; then
    FAILED+=("$name (exit $rc)")
  fi
  return 0
}
TIMES=()
FAILED=()
# finish: the parts' times, the failed parts; exit status 1 if any failed.
finish() {
  say "== parts: ${TIMES[*]}; total ${SECONDS} s"
  if [ "${#FAILED[@]}" != 0 ]; then
    say "== FAILED: ${FAILED[*]} (see $LOG)"
    exit 1
  fi
  say "== every part passed"
  exit 0
}

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
  finish
fi

# With OPT_IN_ONLY=1 the standard parts (2-5) are skipped: set-up, then the opt-in parts chosen.
if [ "${OPT_IN_ONLY:-0}" = 0 ]; then
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
    --budget-s "$THROUGHPUT_BUDGET_S" ${REP_MS[@]+"${REP_MS[@]}"} --no-progress ${THROUGHPUT_EXTRA[@]+"${THROUGHPUT_EXTRA[@]}"}
  part "memory" $((MEMORY_BUDGET_S + 30)) "$PY" bench/bench_memory.py ${SIZES[@]+"${SIZES[@]}"} --out "$OUT" \
    --budget-s "$MEMORY_BUDGET_S" --no-progress ${MEMORY_EXTRA[@]+"${MEMORY_EXTRA[@]}"}

  say "== parts so far: ${TIMES[*]}; total ${SECONDS} s"
  # --plots redraws both PNGs from the CSVs, so a sweep cut short by its time box still has its plot.
  "$PY" bench/report.py "$OUT" --plots --tests "$(cat "$TESTS_OUT")" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || FAILED+=("report (exit $rc)")
  rm -f "$TESTS_OUT"
fi

# ---------------------------------------------------------------------------------------------------
# Host overhead (issue 14). NOT YET RUN on a GPU: written and checked on CPU only. Opt-in, after the
# check above: HOST_OVERHEAD=1 QUICK=1 bash bench/gpu_check.sh (about 2 minutes more).
#   a. bench/host_overhead.py on CUDA tensors: ATen ops and us per rlsd_loss fwd+bwd with the kernels
#      stubbed out (the validation's device-to-host read is real there), N = 1024, V = 151,936, bf16
#   b. bench/host_timing.py: rlsd_loss fwd+bwd (and the no-grad forward) with the kernels running, at
#      N = 1024 and 8192, V = 151,936, bf16, 10% of rows masked: validate=True (default),
#      validate="deferred" (error bits read at the next call, no blocking sync) and validate=False;
#      then eager against CUDA-graph replay of the same fwd+bwd at N = 1024, validate=False (the graph
#      is captured after three warm-up calls; tests/test_gpu.py checks that its values are right)
# Writes $OUT/host_overhead.csv and $OUT/host_timing.csv. With DRY_RUN=1 both run on CPU at tiny sizes.
if [ "${HOST_OVERHEAD:-0}" != 0 ]; then
  HOST_ARGS=(--device cuda --calls 300)
  TIMING_ARGS=()
  if [ "${DRY_RUN:-0}" != 0 ]; then
    HOST_ARGS=(--device cpu --calls 20 --vocab 4096)
    TIMING_ARGS=(--dry-run)
  fi
  part "host overhead, kernels stubbed" 90 "$PY" bench/host_overhead.py "${HOST_ARGS[@]}" \
    --out "$OUT/host_overhead.csv"
  part "host overhead, kernels running" 120 "$PY" bench/host_timing.py ${TIMING_ARGS[@]+"${TIMING_ARGS[@]}"} \
    --out "$OUT"
  say "== host overhead: ${SECONDS} s in all"
fi

# ---------------------------------------------------------------------------------------------------
# 6. The schedule of the fused linear form (issue 15), with LINEAR_CHECK=1 only, after the parts above
#    (time boxes LINEAR_SLAB_S for f, default 280 s, then LINEAR_S for a-e, default 150 s). NOT YET
#    RUN ON A GPU: written and run on CPU at tiny sizes (DRY_RUN=1) only. At N = 8192, H = 4096, V = 151,936, bf16, teacher included, 10% masked rows:
#    a. the profiler's breakdown of one rlsd_linear_loss fwd+bwd by GEMM role (teacher logits,
#       student logits, dH, dW; roles told apart by the matmuls' shapes) with each role's TFLOP/s;
#    b. chunk_size 256 / 512 / 1024 (the fitted model says 92 / 71 / 67 ms), time and peak extra;
#    c. work skipping on and off (forms/rows.py: SKIP) on a batch with 40% zero-advantage sequences,
#       and on one without (skipping must then cost nothing);
#    d. TFLOP/s of torch.mm at the planned shapes (M = 256, 512 logits; dH; dW);
#    e. dW accumulated in float32 (forms/linear.py: DW_FP32_BYTES) at a size where it fits: it runs
#       (torch.addmm with out_dtype on CUDA) and its error against float64 beside the bf16 default;
#    f. the slab schedule (forms/slab.py, opt-in: forms/linear.py: SCHEDULE) against the chunk schedule:
#       its values beside the chunk schedule's (loss, dH, dW), the profiler breakdown of (a) on slabs,
#       time and peak extra at N = 8192 (chunk_size 256 and the slab default 384) and at one sequence
#       of N = 32,768, with torch.compile of the naive loss beside them (the issue's peer to beat); then
#       the OPSD linear losses (each divergence, and GRPO+sampled token) at N = 8192 on both schedules:
#       the slab schedule's values beside the chunk schedule's, time and peak extra.
#    QUICK=1 LINEAR_CHECK=1 bash bench/gpu_check.sh: about 300 s + these two parts.
if [ "${LINEAR_CHECK:-0}" != 0 ]; then
LINEAR_SETUP=$(cat <<'EOF'
import math, sys, time
import torch
import rlsd_kernels
sys.path.insert(0, "bench")
import providers
from rlsd_kernels import reference
from rlsd_kernels.forms import linear, rows, slab

cuda = torch.cuda.is_available()
dev = "cuda" if cuda else "cpu"
N, H, V, SEQ = (8192, 4096, 151936, 512) if cuda else (256, 32, 512, 32)
CHUNKS = (256, 512, 1024) if cuda else (32, 64, 128)
SLAB_CHUNK = slab.default_chunk_size(V, torch.device(dev), torch.bfloat16) if cuda else 48
if not cuda:
    slab.SLAB_SIZE = 96  # several slabs, the last narrower, at the dry run's vocabulary
g = torch.Generator(device=dev).manual_seed(0)
hidden = torch.randn(N, H, device=dev, generator=g).bfloat16().requires_grad_()
teacher = (hidden.detach().float() + 0.5 * torch.randn(N, H, device=dev, generator=g)).bfloat16()
weight = (torch.randn(V, H, device=dev, generator=g) * 2 / math.sqrt(H)).bfloat16().requires_grad_()
tokens = torch.randint(0, V, (N,), device=dev, generator=g)
mask = torch.rand(N, device=dev, generator=g) > 0.1
adv = torch.randn(N, device=dev, generator=g)
seq = torch.arange(N, device=dev) // SEQ
adv_skip = adv * (torch.rand(N // SEQ, device=dev, generator=g) > 0.4)[seq]
print(f"N={N} H={H} V={V} bf16 on {dev}; zero-advantage rows in the skip batch: "
      f"{float((adv_skip == 0).float().mean()):.0%}")

def step(a=adv, **kw):
    loss = rlsd_kernels.rlsd_linear_loss(hidden, weight, tokens, a, teacher_hidden=teacher, mask=mask, **kw)
    return torch.autograd.grad(loss, (hidden, weight))

def sync():
    if cuda:
        torch.cuda.synchronize()

def timed(fn, reps=5):
    fn(); fn(); sync()
    if cuda:
        base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); sync(); times.append(1e3 * (time.perf_counter() - t))
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if cuda else float("nan")
    return sorted(times)[reps // 2], peak

# a. the profiler breakdown of one call by GEMM role
def breakdown(tag, **kw):
    step(**kw); sync()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        step(**kw); sync()
    roles = {}
    for e in prof.key_averages(group_by_input_shape=True):
        us = e.device_time_total if cuda else e.cpu_time_total
        if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"):
            shapes = [s for s in e.input_shapes if len(s) == 2]
            a, b = shapes[1:3] if "addmm" in e.key else shapes[:2]
            if b == [H, V] or (a[1] == H and b[0] == H):
                role = f"logits M={a[0]}"
            elif a[1] == V:
                role = "dH"
            else:
                role = "dW"
            flops = 2 * a[0] * a[1] * b[1] * e.count
            r = roles.setdefault(role, [0, 0.0, 0.0]); r[0] += e.count; r[1] += us; r[2] += flops
    for role, (n, us, flops) in sorted(roles.items()):
        print(f"{tag} {role:16s} {n:4d} calls {us / 1e3:9.2f} ms  {flops / us / 1e6 if us else 0:8.1f} TFLOP/s")
    print(prof.key_averages().table(sort_by="device_time_total" if cuda else "cpu_time_total", row_limit=12))
EOF
)
LINEAR_CHUNK_PY=$(cat <<'EOF'
breakdown("a.")

# b. chunk sizes; c. skipping on and off
for c in CHUNKS:
    ms, gb = timed(lambda c=c: step(chunk_size=c))
    print(f"b. chunk_size={c:5d}: {ms:8.2f} ms  peak extra {gb:.3f} GB")
for label, a in (("40% zero adv", adv_skip), ("no zero adv", adv)):
    for skip in (True, False):
        rows.SKIP = skip
        ms, gb = timed(lambda a=a: step(a=a, chunk_size=CHUNKS[0]))
        print(f"c. {label:12s} skip={skip!s:5s}: {ms:8.2f} ms  peak extra {gb:.3f} GB")
rows.SKIP = True

# d. torch.mm at the planned shapes
def mm_rate(m, k, n, out_dtype=None):
    a = torch.randn(m, k, device=dev).bfloat16(); b = torch.randn(k, n, device=dev).bfloat16()
    kw = {"out_dtype": torch.float32} if out_dtype and cuda else {}
    ms, _ = timed(lambda: torch.mm(a, b, **kw), reps=10)
    return 2 * m * k * n / ms / 1e9
for m in CHUNKS[:2]:
    print(f"d. logits [{m},{H}]x[{H},{V}] fp32 out: {mm_rate(m, H, V, True):7.1f} TFLOP/s; "
          f"dH [{m},{V}]x[{V},{H}]: {mm_rate(m, V, H):7.1f}; dW [{V},{m}]x[{m},{H}]: {mm_rate(V, m, H):7.1f}")

# e. dW in float32 where it fits, against float64 (a smaller vocabulary and hidden size)
n2, h2, v2 = (2048, 1024, 8192) if cuda else (128, 16, 64)
x = torch.randn(n2, h2, device=dev, generator=g).bfloat16()
w0 = (torch.randn(v2, h2, device=dev, generator=g) * 2 / math.sqrt(h2)).bfloat16()
y = torch.randint(0, v2, (n2,), device=dev, generator=g)
a2 = torch.randn(n2, device=dev, generator=g)
lp_t = -3 * torch.rand(n2, device=dev, generator=g)
w64 = w0.double().requires_grad_()
reference.rlsd_loss(x.double() @ w64.T, None, y, a2.double(), teacher_logprobs=lp_t.double()).backward()
for budget in (0, 1 << 40):
    linear.DW_FP32_BYTES[dev] = budget
    w = w0.clone().requires_grad_()
    rlsd_kernels.rlsd_linear_loss(x, w, y, a2, teacher_logprobs=lp_t, chunk_size=n2 // 32).backward()
    err = float((w.grad.double() - w64.grad).norm() / w64.grad.norm())
    print(f"e. dW {'float32' if budget else 'bf16   '} accumulator, 32 chunks: relative error {err:.3%}")
linear.DW_FP32_BYTES[dev] = 0
EOF
)
LINEAR_SLAB_PY=$(cat <<'EOF'
# f. the slab schedule against the chunk schedule
rows.SKIP = None
def values(schedule, chunk):
    linear.SCHEDULE = schedule
    loss = rlsd_kernels.rlsd_linear_loss(hidden, weight, tokens, adv, teacher_hidden=teacher, mask=mask,
                                         chunk_size=chunk)
    return [loss.detach().float()] + [x.float() for x in torch.autograd.grad(loss, (hidden, weight))]
ref_vals = values("chunk", CHUNKS[0])
for chunk in (CHUNKS[0], SLAB_CHUNK):
    diffs = [float((a - b).norm() / b.norm()) for a, b in zip(values("slab", chunk), ref_vals)]
    print(f"f. slab chunk_size={chunk}: relative difference to the chunk schedule: loss {diffs[0]:.2e} "
          f"dH {diffs[1]:.2e} dW {diffs[2]:.2e}")
del ref_vals
linear.SCHEDULE = "slab"
breakdown("f. slab", chunk_size=SLAB_CHUNK)
for schedule, chunk in (("chunk", CHUNKS[0]), ("slab", CHUNKS[0]), ("slab", SLAB_CHUNK)):
    linear.SCHEDULE = schedule
    ms, gb = timed(lambda c=chunk: step(chunk_size=c))
    print(f"f. N={N} {schedule:5s} chunk_size={chunk:4d}: {ms:8.2f} ms  peak extra {gb:.3f} GB")
linear.SCHEDULE = None
naive = torch.compile(providers.naive_linear_rlsd) if cuda else providers.naive_linear_rlsd
NAIVE = "torch.compile of the naive loss" if cuda else "the naive loss (eager)"

def naive_step():
    loss = naive(hidden, teacher, weight, tokens, torch.zeros(N, device=dev), adv, mask.float())
    return torch.autograd.grad(loss, (hidden, weight))

ms, gb = timed(naive_step)
print(f"f. N={N} {NAIVE}: {ms:8.2f} ms  peak extra {gb:.3f} GB")
del hidden, teacher, tokens, mask, adv, adv_skip, seq
if cuda:
    torch.cuda.empty_cache()
N = 4 * N  # one sequence of 32,768 tokens on a GPU
hidden = torch.randn(N, H, device=dev, generator=g).bfloat16().requires_grad_()
teacher = (hidden.detach().float() + 0.5 * torch.randn(N, H, device=dev, generator=g)).bfloat16()
tokens = torch.randint(0, V, (N,), device=dev, generator=g)
mask = torch.rand(N, device=dev, generator=g) > 0.1
adv = torch.full((N,), 0.5, device=dev)
for schedule, chunk in (("chunk", CHUNKS[0]), ("chunk", CHUNKS[0] // 2), ("slab", SLAB_CHUNK), ("slab", CHUNKS[0])):
    linear.SCHEDULE = schedule
    ms, gb = timed(lambda c=chunk: step(a=adv, chunk_size=c), reps=3)
    print(f"f. N={N} one sequence {schedule:5s} chunk_size={chunk:4d}: {ms:8.2f} ms  peak extra {gb:.3f} GB")
linear.SCHEDULE = None
ms, gb = timed(naive_step, reps=3)
print(f"f. N={N} {NAIVE}: {ms:8.2f} ms  peak extra {gb:.3f} GB")

# f. the OPSD linear losses beside the policy rows, at N = 8192: slab against chunk schedule, values
#    (loss, dH, dW), time and peak extra (docs/linear-form.md counts 7 weight streams a chunk on
#    chunks against 5 (the KLs), 6 (the JSD), 4 (the sampled token) on slabs, for more FLOPs).
del hidden, teacher, tokens, mask, adv
if cuda:
    torch.cuda.empty_cache()
N = N // 4
hidden = torch.randn(N, H, device=dev, generator=g).bfloat16().requires_grad_()
teacher = (hidden.detach().float() + 0.5 * torch.randn(N, H, device=dev, generator=g)).bfloat16()
tokens = torch.randint(0, V, (N,), device=dev, generator=g)
mask = torch.rand(N, device=dev, generator=g) > 0.1
adv = torch.randn(N, device=dev, generator=g)

def opsd_step(divergence, grpo, **kw):
    kw = dict(kw, teacher_hidden=teacher, mask=mask, divergence=divergence)
    if grpo:
        loss = rlsd_kernels.grpo_opsd_linear_loss(hidden, weight, tokens, adv, **kw)
    else:
        loss = rlsd_kernels.opsd_linear_loss(hidden, weight, tokens, **kw)
    return [loss.detach().float()] + [x.float() for x in torch.autograd.grad(loss, (hidden, weight))]

for divergence, grpo in (("forward_kl", False), ("reverse_kl", False), ("jsd", False), ("sampled_token", False),
                         ("sampled_token", True)):
    tag = ("grpo+" if grpo else "") + divergence
    got = {}
    for schedule in ("chunk", "slab"):
        linear.SCHEDULE = schedule
        got[schedule] = opsd_step(divergence, grpo, chunk_size=CHUNKS[0])
    diffs = [float((a - b).norm() / b.norm()) for a, b in zip(got["slab"], got["chunk"])]
    del got
    print(f"f. OPSD {tag}: slab against chunk schedule, relative difference: loss {diffs[0]:.2e} "
          f"dH {diffs[1]:.2e} dW {diffs[2]:.2e}")
    for schedule, chunk in (("chunk", CHUNKS[0]), ("slab", CHUNKS[0]), ("slab", SLAB_CHUNK)):
        linear.SCHEDULE = schedule
        ms, gb = timed(lambda c=chunk: opsd_step(divergence, grpo, chunk_size=c), reps=3)
        print(f"f. N={N} OPSD {tag:19s} {schedule:5s} chunk_size={chunk:4d}: {ms:8.2f} ms  peak extra {gb:.3f} GB")
linear.SCHEDULE = None
EOF
)
  # The slab schedule first: it is what the next GPU run has to decide (each part is cut alone).
  part "linear slab schedule" "${LINEAR_SLAB_S:-280}" "$PY" -c "$LINEAR_SETUP
$LINEAR_SLAB_PY"
  part "linear schedule" "${LINEAR_S:-150}" "$PY" -c "$LINEAR_SETUP
$LINEAR_CHUNK_PY"
fi

# ---------------------------------------------------------------------------------------------------
# 7. The segmented strategy of the logits form (issue 14), with SEGMENTED_CHECK=1 only, after the parts
#    above (time box SEGMENTED_S, default 200 s). NOT YET RUN ON A GPU: written and run on CPU under the
#    interpreter (one program, DRY_RUN=1) only. bench/segmented_check.py at N = 8192 and 1024,
#    V = 151,936, bf16, 10% masked rows: its values against float64 on sampled rows; fwd+bwd time of the
#    fused and split strategies and of the segmented one at 8k / 16k / 32k columns per segment and
#    three launch configurations; the best one with validate=True and "deferred"; the three-pass floor
#    at the copy bandwidth of the same run; DRAM bytes per strategy when ncu is on the image. The gpu
#    tests of part 2 include tests/test_gpu_segmented.py (waits between programs, memory ordering,
#    grids smaller than a row's segments, CUDA graphs). Writes $OUT/segmented.csv.
#    SEGMENTED_CHECK=1 QUICK=1 TESTS_S=240 bash bench/gpu_check.sh: about 400 s + 200 s (the gpu tests
#    with the segmented ones need about 100 s more than part 2's default box).
if [ "${SEGMENTED_CHECK:-0}" != 0 ]; then
  SEGMENTED_ARGS=(--out "$OUT" --ncu)
  [ "${DRY_RUN:-0}" != 0 ] && SEGMENTED_ARGS=(--out "$OUT" --dry-run)
  # Part 2, which runs the segmented gpu tests (waits between programs, memory ordering), is skipped
  # with OPT_IN_ONLY=1: they run here then.
  if [ "${OPT_IN_ONLY:-0}" != 0 ] && [ "${DRY_RUN:-0}" = 0 ]; then
    part "segmented gpu tests" "${SEGMENTED_TESTS_S:-150}" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_gpu_segmented.py
  fi
  part "segmented strategy" "${SEGMENTED_S:-200}" "$PY" bench/segmented_check.py "${SEGMENTED_ARGS[@]}"
fi

finish
