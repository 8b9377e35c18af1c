#!/usr/bin/env python3
"""Throughput of the RLSD loss, both forms, forward and forward + backward, side by side with the peers.

Forms: from logits (student and teacher ``[B, T+1, V]``) and fused linear (hidden states ``[N, H]``
and the head weight ``[V, H]``), over N tokens (sequences of ``--seqlen``) and vocabularies V.
Providers: naive eager PyTorch, ``torch.compile`` of it, Liger Kernel and Cut Cross-Entropy where
installed (the compositions of ``shared/anchors/peers_bench.py``), and ours.

First the card's copy bandwidth and bf16 matmul rate are measured; before any timing, every provider
is checked against the float64 reference on a slice of the inputs of each vocabulary (ours are timed
only if they pass; a peer that fails is timed and flagged). Then, per shape and mode: median and
20/80 % quantiles, GB/s (logits: 3 N V elements read or written for forward + backward, 2 N V
forward) or TFLOP/s (linear: 8 N H V, forward 4 N H V) and their fraction of the measured ceiling,
and peak extra memory. A provider that runs out of memory is recorded as OOM and not tried at
larger N. CSVs (rows carry the card, versions, commit and date) under ``bench/results/<card>/``
(or ``--out``), rewritten after every shape; a plot; a table last.

    python bench/bench_throughput.py                      # the full grid on this card
    python bench/bench_throughput.py --preset quick       # a few shapes
    python bench/bench_throughput.py --budget-s 170       # stop starting new work after 170 s
    python bench/bench_throughput.py --device cpu         # dry run of every code path, tiny sizes

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

# Vocabularies in order of interest (Qwen's first), so that a time budget cuts the least useful.
PRESETS = {
    "full": {"ns": [1024, 4096, 8192, 16384, 32768], "vocabs": [151936, 32768, 131072, 262144], "hidden": 4096,
             "seqlen": 1024},
    "quick": {"ns": [1024, 8192], "vocabs": [151936, 32768], "hidden": 4096, "seqlen": 1024},
    "tiny": {"ns": [64, 128], "vocabs": [1000, 2048], "hidden": 32, "seqlen": 32},
}
FORMS = ("logits", "linear")
MODES = ("fwd_bwd", "fwd")
# Timing windows: the tiny preset only exercises the code paths, so it times as little as it can.
MEASURE = {"tiny": {"warmup_ms": 0.0, "rep_ms": 1.0, "min_reps": 2}}


def parse(argv):
    """The arguments, every one checked (a usage error, exit status 2, for a bad one); ``args.size``
    holds the sizes (the preset's where a flag is absent) and ``args.preset`` the preset's name."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.sweep_arguments(p, PRESETS, FORMS, P.provider_names(), max_call_s=1.5,
                           providers_help="each must run one of the forms and modes")
    p.add_argument("--ns", type=common.parse_ints, default=None,
                   help="tokens N, e.g. 1k,8k,32k (k = 1024; whole numbers >= 1, repeats dropped)")
    p.add_argument("--vocabs", type=common.parse_ints, default=None,
                   help="vocabularies V, e.g. 151936,32k (repeats dropped)")
    p.add_argument("--hidden", type=common.positive_int, default=None, help="hidden size H of the fused linear form")
    p.add_argument("--seqlen", type=common.positive_int, default=None,
                   help="tokens per sequence (N = sequences x seqlen; an N above it must be a multiple of it)")
    p.add_argument("--dtype", choices=sorted(P.DTYPES), default=None, help="bf16 on cuda, fp32 on cpu")
    p.add_argument("--modes", type=common.names(MODES, "modes"), default=list(MODES), help="fwd_bwd, fwd or both")
    p.add_argument("--rep-ms", type=common.non_negative, default=None,
                   help="time spent on timed calls per measurement (default 100; 1 with the tiny preset)")
    args = p.parse_args(argv)
    args.preset = args.preset or ("full" if args.device == "cuda" else "tiny")
    preset = PRESETS[args.preset]
    args.size = {k: preset[k] if getattr(args, k) is None else getattr(args, k) for k in ("ns", "vocabs", "hidden",
                                                                                            "seqlen")}
    for n in args.size["ns"]:
        if n > args.size["seqlen"] and n % args.size["seqlen"]:
            p.error(f"N = {n} (--ns) is not a multiple of --seqlen {args.size['seqlen']}")
    problem = P.unusable(args.forms, args.modes, args.providers)
    if problem:
        p.error(problem)
    return args


def timing(args) -> dict:
    """The timing window of :func:`common.measure`: the preset's, ``--rep-ms`` where given."""
    return {**MEASURE.get(args.preset, {"rep_ms": 100.0}), **({} if args.rep_ms is None else {"rep_ms": args.rep_ms})}


def passes(modes, vocabs):
    """(mode, vocabulary) sweeps over N in order of interest, so that a time budget cuts the least useful:
    every mode at the first vocabulary, then the first mode (forward + backward) at the others, then the rest."""
    first, rest = vocabs[:1], vocabs[1:]
    return ([(m, v) for m in modes for v in first] + [(m, v) for m in modes[:1] for v in rest]
            + [(m, v) for m in modes[1:] for v in rest])


def layout(n, seqlen):
    """``(sequences, tokens per sequence)`` for N tokens."""
    if n <= seqlen:
        return 1, n
    assert n % seqlen == 0, (n, seqlen)  # parse() refuses such sizes
    return n // seqlen, seqlen


def main(argv=None) -> int:
    args = parse(argv)
    start = time.monotonic()
    device = common.pick_device(args.device, "bench/bench_throughput.py")
    preset, size = args.preset, args.size
    measure_kw = timing(args)
    dtype = P.DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    forms, modes, names = args.forms, args.modes, args.providers
    info = common.device_info(device.type)
    out = args.out or common.RESULTS / common.card_slug(info["device"])
    print(f"throughput on {info['device']} (torch {info['torch']}, triton {info['triton']}, commit {info['commit']}): "
          f"N {size['ns']}, V {size['vocabs']}, H {size['hidden']}, {P.DTYPE_NAMES[dtype]}, forms {forms}, "
          f"modes {modes}, budget {args.budget_s or 'none'} s", flush=True)
    ceil = common.ceilings(device, rep_ms=300.0 if preset != "tiny" else 10.0)
    print(f"ceilings: copy {ceil['copy_tbps']:.3f} TB/s, matmul {ceil['matmul_tflops']:.1f} TFLOP/s", flush=True)

    chosen = {form: P.providers(form, names) for form in forms}
    total = sum(len(size["ns"]) * len(size["vocabs"]) * len(Sweep.tasks(chosen[f], modes)) for f in forms)
    progress = common.Progress(total, "throughput", enabled=not args.no_progress)
    sweep = Sweep(device, dtype, ceil, timing=True, max_call_s=args.max_call_s or None, progress=progress,
                  measure_kw=measure_kw, extra={"bench": "throughput"})
    written = []
    for i, form in enumerate(forms):
        deadline = None
        if args.budget_s:
            share = args.logits_share if form == "logits" and i < len(forms) - 1 else 1.0
            deadline = start + share * args.budget_s
        for mode, vocab in passes(modes, size["vocabs"]):
            for n in size["ns"]:
                batch, seqlen = layout(n, size["seqlen"])
                sweep.shape(form, chosen[form], [mode], batch=batch, seqlen=seqlen, vocab=vocab,
                            hidden=size["hidden"], deadline=deadline, gate_modes=modes)
                written.append(common.write_csv(sweep.rows, "throughput", out, device.type))
                if sweep.gate_rows:
                    written.append(common.write_csv(sweep.gate_rows, "throughput_gate", out, device.type))
    progress.close()
    from rlsd_kernels.launch.tuning import tuned_configs

    # What the autotuner picked for each kernel and shape (configurations, fused or split strategy).
    for key, choice in tuned_configs().items():
        print(f"tuned {key[1:]}: {choice}")
    if not args.no_plot:
        data = report.load(out)
        plot = report.plot_throughput(data["throughput"], out / "throughput.png")
        if plot:
            print(f"written: {plot}")
    print(f"written: {', '.join(map(str, dict.fromkeys(written)))} ({time.monotonic() - start:.0f} s)")
    data = report.load(out)
    for line in report.gate_summary(data["throughput_gate"]):
        print(line)
    for form in forms:
        shape = report.focus_shape(data["throughput"], form)
        for mode in modes:
            if shape:
                report.throughput_table(data["throughput"], form, mode, shape)
    if sweep.ours_failed:
        print("\nrlsd_kernels FAILED its correctness gate: it was not timed (see throughput_gate.csv)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
