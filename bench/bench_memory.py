#!/usr/bin/env python3
"""Peak extra memory of the RLSD loss on long traces, against sequence length, for every provider.

One sequence of N tokens (up to 128k where the card holds the inputs), forward + backward, both
forms: from logits (student and teacher ``[1, N+1, V]``) and fused linear (hidden states ``[N, H]``,
head weight ``[V, H]``). Peak extra memory counts everything a call allocates beyond its inputs,
the returned gradients included (``torch.cuda.max_memory_allocated``, after a warm-up call). Every
provider is checked against the float64 reference first. A provider that runs out of memory is
recorded as OOM and not tried at longer N; inputs that do not fit on the card are recorded as such.
Writes ``memory.csv``, ``memory_gate.csv`` and ``memory.png`` under ``bench/results/<card>/`` (or
``--out``) and prints a table of peak GB by N.

    python bench/bench_memory.py                          # N = 4k ... 128k, V = 151,936, H = 4096
    python bench/bench_memory.py --seqlens 8k,32k --forms logits
    python bench/bench_memory.py --device cpu             # dry run of every code path, tiny sizes

Needs a CUDA GPU, except for the CPU dry run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import providers as P  # noqa: E402
import report  # noqa: E402
from sweep import Sweep  # noqa: E402

PRESETS = {
    "full": {"seqlens": [4096, 8192, 16384, 32768, 65536, 131072], "vocab": 151936, "hidden": 4096},
    "quick": {"seqlens": [8192, 32768], "vocab": 151936, "hidden": 4096},
    "tiny": {"seqlens": [32, 64, 128], "vocab": 1000, "hidden": 32},
}
FORMS = ("logits", "linear")
MODES = ["fwd_bwd"]


def parse(argv):
    """The arguments, every one checked (a usage error, exit status 2, for a bad one); ``args.preset``
    is the preset's name and ``args.seqlens``, ``args.vocab``, ``args.hidden`` the sizes (the preset's
    where a flag is absent)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.sweep_arguments(p, PRESETS, FORMS, P.provider_names(), max_call_s=5.0,
                           providers_help="each must run one of the forms")
    p.add_argument("--seqlens", type=common.parse_ints, default=None,
                   help="sequence lengths, e.g. 4k,32k,128k (k = 1024; whole numbers >= 1, repeats dropped)")
    p.add_argument("--vocab", type=common.positive_int, default=None, help="vocabulary V")
    p.add_argument("--hidden", type=common.positive_int, default=None, help="hidden size H of the fused linear form")
    p.add_argument("--dtype", choices=sorted(P.DTYPES), default=None, help="bf16 on cuda, fp32 on cpu")
    args = p.parse_args(argv)
    args.preset = args.preset or ("full" if args.device == "cuda" else "tiny")
    for k in ("seqlens", "vocab", "hidden"):
        if getattr(args, k) is None:
            setattr(args, k, PRESETS[args.preset][k])
    problem = P.unusable(args.forms, MODES, args.providers)
    if problem:
        p.error(problem)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    start = time.monotonic()
    device = common.pick_device(args.device, "bench/bench_memory.py")
    seqlens, vocab, hidden = args.seqlens, args.vocab, args.hidden
    dtype = P.DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    forms, names = args.forms, args.providers
    info = common.device_info(device.type)
    out = args.out or common.RESULTS / common.card_slug(info["device"])
    print(f"memory on long traces, {info['device']} (torch {info['torch']}, triton {info['triton']}, commit "
          f"{info['commit']}): N {seqlens}, V {vocab}, H {hidden}, {P.DTYPE_NAMES[dtype]}, forms {forms}, "
          f"budget {args.budget_s or 'none'} s", flush=True)

    chosen = {form: P.providers(form, names) for form in forms}
    modes = MODES
    total = sum(len(seqlens) * len(Sweep.tasks(chosen[f], modes)) for f in forms)
    progress = common.Progress(total, "memory", enabled=not args.no_progress)
    sweep = Sweep(device, dtype, {}, timing=False, max_call_s=args.max_call_s or None, gate_batch=1,
                  progress=progress, extra={"bench": "memory"})
    written = []
    for i, form in enumerate(forms):
        deadline = None
        if args.budget_s:
            share = args.logits_share if form == "logits" and i < len(forms) - 1 else 1.0
            deadline = start + share * args.budget_s
        for n in seqlens:
            sweep.shape(form, chosen[form], modes, batch=1, seqlen=n, vocab=vocab, hidden=hidden, deadline=deadline)
            written.append(common.write_csv(sweep.rows, "memory", out, device.type))
            if sweep.gate_rows:
                written.append(common.write_csv(sweep.gate_rows, "memory_gate", out, device.type))
    progress.close()
    data = report.load(out)
    if not args.no_plot:
        plot = report.plot_memory(data["memory"], out / "memory.png")
        if plot:
            print(f"written: {plot}")
    print(f"written: {', '.join(map(str, dict.fromkeys(written)))} ({time.monotonic() - start:.0f} s)")
    for line in report.gate_summary(data["memory_gate"]):
        print(line)
    for form in forms:
        report.memory_table(data["memory"], form)
    if sweep.ours_failed:
        print("\nrlsd_kernels FAILED its correctness gate: it was not measured (see memory_gate.csv)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
