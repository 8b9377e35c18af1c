#!/usr/bin/env python3
"""What the host's work costs a real call on one GPU: ``rlsd_loss`` forward + backward (and the
no-grad forward) with the kernels running, bf16, 10% of rows masked, at N = 1024 and 8192,
V = 151,936, for ``validate=True`` (the default), ``"deferred"`` and ``False``; then, at N = 1024 and
``validate=False``, eager calls against the replay of a captured CUDA graph of the same call (what
a graph saves is the host's share). ``bench/host_overhead.py`` counts the host's work alone, with
the kernels stubbed out. Writes ``host_timing.csv`` to ``--out`` and prints a line per measurement.

    python bench/host_timing.py --out /tmp/gpu_check        # on a GPU, about a minute
    python bench/host_timing.py --dry-run --out /tmp/dry    # the same steps on CPU, tiny (no graph)
"""

import argparse
import sys
from pathlib import Path

import torch

import rlsd_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VALIDATE = (True, "deferred", False)


def inputs(n, vocab, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    student = torch.randn(n, vocab, device=device, generator=g).bfloat16().requires_grad_()
    teacher = torch.randn(n, vocab, device=device, generator=g).bfloat16()
    tokens = torch.randint(0, vocab, (n,), device=device, generator=g)
    tokens[torch.rand(n, device=device, generator=g) < 0.1] = -100
    return student, teacher, tokens, torch.randn(n, device=device, generator=g)


def calls(student, teacher, tokens, adv, validate):
    """``{pass name: fn}`` of one call each."""

    def fwd_bwd():
        student.grad = None
        rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, validate=validate).backward()

    def fwd():
        with torch.no_grad():
            rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, validate=validate)

    return {"fwd+bwd": fwd_bwd, "fwd": fwd}


def graph_replay(student, teacher, tokens, adv):
    """A captured CUDA graph of one fwd+bwd with ``validate=False`` (three warm-up calls on a side
    stream first, as capture needs); its replay writes ``student.grad`` again."""

    def step():
        rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, validate=False).backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            student.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    student.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def run(device, ns, vocab, out):
    rows = []

    def record(n, name, validate, fn):
        ms = common.measure(fn, device)["ms"]
        rows.append({"n": n, "vocab": vocab, "dtype": "bfloat16", "pass": name, "validate": validate,
                     "ms": round(ms, 4)})
        print(f"N={n:5d} {name:20s} validate={validate!s:8s} {ms:.3f} ms", flush=True)
        common.write_csv(rows, "host_timing", out, device.type)

    for n in ns:
        x = inputs(n, vocab, device)
        for validate in VALIDATE:
            for name, fn in calls(*x, validate).items():
                record(n, name, validate, fn)
        del x
        common.free_memory(device)
    x = inputs(ns[0], vocab, device, seed=1)
    record(ns[0], "fwd+bwd eager", False, calls(*x, False)["fwd+bwd"])
    if device.type == "cuda":
        record(ns[0], "fwd+bwd graph replay", False, graph_replay(*x))
    else:
        print("graph replay: skipped (CUDA graphs need a GPU)")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=common.out_folder, default=None,
                   help="folder for host_timing.csv (default bench/results/<card>/)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on CPU at tiny sizes, no graph")
    args = p.parse_args(argv)
    if args.dry_run:
        return run(torch.device("cpu"), (32, 64), 700, args.out)
    common.require_cuda("bench/host_timing.py", "Its --dry-run runs the same steps on CPU at tiny sizes.")
    return run(torch.device("cuda"), (1024, 8192), 151936, args.out)


if __name__ == "__main__":
    main()
