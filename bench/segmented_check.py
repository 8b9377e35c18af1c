#!/usr/bin/env python3
"""The segmented strategy of the logits form (``kernels/rlsd_seg.py``, opt-in) against the measured
strategies, on one GPU: ``rlsd_loss`` forward + backward, bf16, 10% of rows masked.

For each N: the segmented values against the float64 reference on sampled rows; the time of the
fused and split strategies (the tuner's two) and of the segmented one at each segment size and
launch configuration; the best segmented one again with the default validation and the deferred
one; the three-pass floor (student and teacher read, gradient written, live rows only) at the
copy bandwidth measured in the same run; with ``--ncu`` and Nsight Compute on the path, the DRAM
bytes of one call of each strategy. Writes ``segmented.csv`` to ``--out`` and prints a table.

    python bench/segmented_check.py --out /tmp/gpu_check           # on a GPU, about 2 minutes
    TRITON_INTERPRET=1 python bench/segmented_check.py --dry-run    # the same steps on CPU, tiny
"""

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.launch import common as launch_common
from rlsd_kernels.launch import rlsd_seg, tuning

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = (8192, 16384, 32768)
CONFIGS = ((4096, 8), (2048, 4), (8192, 16))


def inputs(n, vocab, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    student = (torch.randn(n, vocab, device=device, generator=g) * 2).bfloat16()
    teacher = (torch.randn(n, vocab, device=device, generator=g) * 2).bfloat16()
    tokens = torch.randint(0, vocab, (n,), device=device, generator=g)
    tokens[torch.rand(n, device=device, generator=g) < 0.1] = -100
    adv = torch.randn(n, device=device, generator=g)
    return student, teacher, tokens, adv


def timed(fn, device):
    """Median milliseconds of ``fn`` (``common.measure``: CUDA events on a GPU, the clock elsewhere)."""
    return common.measure(fn, torch.device(device))["ms"]


def fwd_bwd(student, teacher, tokens, adv, validate):
    x = student.detach().requires_grad_()

    def run():
        x.grad = None
        rlsd_kernels.rlsd_loss(x, teacher, tokens, adv, validate=validate).backward()

    return run, x


def reference_error(student, teacher, tokens, adv):
    """Largest relative errors of the segmented loss terms and gradient on sampled rows."""
    rows = torch.arange(0, student.shape[0], max(1, student.shape[0] // 16), device=student.device)
    x = student.detach().requires_grad_()
    with tuning.force_choice("segmented"):
        loss = rlsd_kernels.rlsd_loss(x, teacher, tokens, adv, loss_agg="none")
    loss.sum().backward()
    y = student[rows].double().requires_grad_()
    ref = reference.rlsd_loss(y, teacher[rows].double(), tokens[rows], adv[rows].double(), loss_agg="none")
    ref.sum().backward()
    loss_err = ((loss[rows].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    grad_err = ((x.grad[rows].double() - y.grad).abs().max() / y.grad.abs().max().clamp_min(1e-30)).item()
    return loss_err, grad_err


def ncu_bytes(n, vocab, strategy):
    """DRAM bytes read and written by one fwd+bwd call of ``strategy`` (Nsight Compute), or None."""
    if shutil.which("ncu") is None:
        return None
    cmd = ["ncu", "--metrics", "dram__bytes_read.sum,dram__bytes_write.sum", "--csv", "--print-units", "base",
           sys.executable, __file__, "--single", strategy, "--n", str(n), "--vocab", str(vocab)]
    env = dict(os.environ, RLSD_KERNELS_AUTOTUNE="0")  # no tuner trials among the measured kernels
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env).stdout
    lines = out.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if header is None:
        return None
    read = write = 0.0
    for row in csv.DictReader(lines[header:]):
        value = float(row["Metric Value"].replace(",", "") or 0)
        if row["Metric Name"] == "dram__bytes_read.sum":
            read += value
        elif row["Metric Name"] == "dram__bytes_write.sum":
            write += value
    return read, write


def single(args):
    """One warm call of a strategy (under ncu: the second call's kernels are the measured ones)."""
    student, teacher, tokens, adv = inputs(args.n, args.vocab, "cuda")
    run, _ = fwd_bwd(student, teacher, tokens, adv, validate=False)
    with tuning.force_choice(args.single):
        run()
        torch.cuda.synchronize()


DRY_RUN = dict(ns=[32], vocab=700)  # the dry run's sizes: one program under the interpreter


def parse(argv):
    """The arguments, checked up front: a usage error (exit status 2) for a bad one, a clear exit
    without a GPU (unless ``--dry-run``, which needs ``TRITON_INTERPRET=1`` and takes its own sizes)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=common.out_folder, default=Path("/tmp/gpu_check"),
                        help="folder for segmented.csv, created if need be (default /tmp/gpu_check)")
    parser.add_argument("--ns", type=common.parse_ints, default=None,
                        help="token counts, e.g. 8k,1k (k = 1024; default 8192,1024; repeats dropped)")
    parser.add_argument("--n", type=common.positive_int, default=8192, help=argparse.SUPPRESS)  # for --single
    parser.add_argument("--vocab", type=common.positive_int, default=None, help="vocabulary (default 151936)")
    parser.add_argument("--ncu", action="store_true", help="DRAM bytes per strategy with Nsight Compute")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"CPU under the interpreter (TRITON_INTERPRET=1), N = {DRY_RUN['ns'][0]}, "
                             f"V = {DRY_RUN['vocab']}; refuses --ns, --vocab and --ncu")
    parser.add_argument("--single", choices=("fused", "split", "segmented"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        given = [flag for flag, value in (("--ns", args.ns), ("--vocab", args.vocab), ("--ncu", args.ncu)) if value]
        if given:
            parser.error(f"--dry-run runs its own tiny sizes (N = {DRY_RUN['ns'][0]}, V = {DRY_RUN['vocab']}) "
                         f"without ncu: drop {', '.join(given)}")
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--dry-run runs the kernels under Triton's interpreter: "
                         "TRITON_INTERPRET=1 python bench/segmented_check.py --dry-run")
        args.ns, args.vocab = DRY_RUN["ns"], DRY_RUN["vocab"]
    else:
        common.require_cuda("bench/segmented_check.py", "For a dry run of its steps on CPU at tiny sizes: "
                            "TRITON_INTERPRET=1 python bench/segmented_check.py --dry-run")
        args.ns, args.vocab = args.ns or [8192, 1024], args.vocab or 151936
    return args


def main(argv=None):
    args = parse(argv)
    if args.single:
        return single(args)
    cuda = not args.dry_run
    device = "cuda" if cuda else "cpu"
    vocab, ns = args.vocab, args.ns
    columns, configs = (COLUMNS, CONFIGS) if cuda else ((64, 256), ((64, 1),))
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu (interpreter)'}, V = {vocab}, bf16", flush=True)
    bandwidth = common.copy_bandwidth_tbps(device) * 1e9  # bytes per millisecond
    print(f"copy bandwidth {bandwidth / 1e9:.2f} TB/s", flush=True)
    rows = []
    for n in ns:
        student, teacher, tokens, adv = inputs(n, vocab, device)
        live = int((tokens != -100).sum())
        floor_ms = 3 * live * vocab * 2 / bandwidth
        loss_err, grad_err = reference_error(student, teacher, tokens, adv)
        print(f"N={n}: segmented against float64 on sampled rows: loss {loss_err:.1e}, grad {grad_err:.1e}; "
              f"three-pass floor {floor_ms:.3f} ms", flush=True)

        def record(strategy, ms, validate, col=None, config=None, dram=None, n=n, floor_ms=floor_ms,
                   loss_err=loss_err, grad_err=grad_err):
            row = dict(n=n, vocab=vocab, strategy=strategy, validate=validate, segment_columns=col,
                       block_v=config and config[0], num_warps=config and config[1], ms=round(ms, 4),
                       floor_ms=round(floor_ms, 4), loss_rel_err=loss_err, grad_rel_err=grad_err,
                       dram_read_gb=dram and round(dram[0] / 1e9, 3), dram_write_gb=dram and round(dram[1] / 1e9, 3))
            rows.append(row)
            print(f"  {strategy:9s} validate={validate!s:8s} columns={col!s:6s} config={config!s:11s} "
                  f"{ms:7.3f} ms", flush=True)

        run, _ = fwd_bwd(student, teacher, tokens, adv, validate=False)
        for strategy in ("fused", "split"):
            with tuning.force_choice(strategy):
                record(strategy, timed(run, device), False)
        best = None
        for col in columns:
            for config in configs:
                rlsd_seg.SEGMENT_COLUMNS, rlsd_seg.CONFIG = col, tuning.RowConfig(*config)
                with tuning.force_choice("segmented"):
                    ms = timed(run, device)
                record("segmented", ms, False, col, config)
                if best is None or ms < best[0]:
                    best = (ms, col, config)
        rlsd_seg.SEGMENT_COLUMNS, rlsd_seg.CONFIG = best[1], tuning.RowConfig(*best[2])
        for validate in (True, "deferred"):
            run_v, _ = fwd_bwd(student, teacher, tokens, adv, validate=validate)
            with tuning.force_choice("segmented"):
                record("segmented", timed(run_v, device), validate, best[1], best[2])
            with tuning.force_choice("fused"):
                record("fused", timed(run_v, device), validate)
        if args.ncu and cuda:
            for strategy in ("fused", "segmented"):
                dram = ncu_bytes(n, vocab, strategy)
                if dram is not None:
                    record(strategy + " (ncu)", float("nan"), False, dram=dram)
                    print(f"  {strategy}: DRAM read {dram[0] / 1e9:.2f} GB, written {dram[1] / 1e9:.2f} GB "
                          f"(S + T + dS of live rows: {3 * live * vocab * 2 / 1e9:.2f} GB)", flush=True)
        common.write_csv(rows, "segmented", args.out, device)  # what a time box cuts keeps the N before
        del student, teacher, run
        if cuda:
            torch.cuda.empty_cache()
    print(f"programs per multiprocessor by compiled variant: {list(rlsd_seg._per_sm.values())}")
    print(f"wrote {common.write_csv(rows, 'segmented', args.out, device)}")

if __name__ == "__main__":
    with launch_common.backend("triton"):
        main()
