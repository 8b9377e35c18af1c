#!/usr/bin/env python3
"""The fused RLSD loss from logits against the naive PyTorch loss and the peers, forward + backward.

First a correctness gate: every provider's loss and student-logit gradient against the float64
reference (on the first rows of the first two sequences at GPU sizes). Then time (median and
quantiles) and peak extra memory of each provider on the same inputs, the bandwidth floors from the
measured copy bandwidth, a table, and a CSV under ``bench/results/<card>/``. The providers are those
of ``bench_throughput.py`` (see ``providers.py``); that script sweeps shapes and the fused linear form.

Defaults: on a GPU (``--device cuda``, the default where one is visible) N = 8 x 1024 = 8192 tokens,
V = 151,936 (Qwen), bf16, as in ``../shared/anchors``; on CPU (``--device cpu``, the default where no
GPU is visible) a small size through the chunked PyTorch path. ``--device cuda`` without a GPU exits
with a message. ``TRITON_INTERPRET=1 ... --check-only`` checks the Triton kernels themselves on CPU.

    python bench/bench_loss.py [--batch 8 --seqlen 1024 --vocab 151936] [--out DIR] [--check-only]
    python bench/bench_loss.py --device cpu               # the CPU path at a small size
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import gate as G  # noqa: E402
import providers as P  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="cuda (the default where a GPU is visible) or cpu (the CPU path, small default sizes)")
    parser.add_argument("--batch", type=common.positive_int, default=None, help="sequences (8 on cuda, 4 on cpu)")
    parser.add_argument("--seqlen", type=common.positive_int, default=None,
                        help="tokens per sequence (1024 on cuda, 256 on cpu)")
    parser.add_argument("--vocab", type=common.positive_int, default=None,
                        help="vocabulary (151936 on cuda, 8192 on cpu)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="bf16 on cuda, fp32 on cpu")
    parser.add_argument("--out", type=common.out_folder, default=None,
                        help="folder for the CSV, created if need be (default bench/results/<card>/)")
    parser.add_argument("--check-only", action="store_true", help="only the correctness gate")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the naive loss")
    args = parser.parse_args(argv)
    device = common.pick_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "bench/bench_loss.py")
    gpu = device.type == "cuda"
    for name, on_gpu, on_cpu in (("batch", 8, 4), ("seqlen", 1024, 256), ("vocab", 151936, 8192),
                                 ("dtype", "bf16", "fp32")):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    dtype = P.DTYPES[args.dtype]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    path = "Triton kernels" + (" (interpreter)" if interpret else "") if gpu or interpret else "CPU path"
    info = common.device_info(device.type)
    n = args.batch * args.seqlen
    print(f"rlsd_loss, logits form: N = {n}, V = {args.vocab}, {args.dtype}, on {info['device']} ({path})")

    inputs = P.make_logits_inputs(args.batch, args.seqlen, args.vocab, dtype, device)
    chosen = P.providers("logits")
    if args.no_compile:
        chosen = [p for p in chosen if p.name != "naive_compile"]
    gate = []
    if interpret and not gpu:
        from rlsd_kernels.launch.common import backend

        # The interpreter runs about 1 ms per program per loop iteration: ours only, on 2 x 16 rows.
        with backend("triton"):
            gate = [{**r, "path": "Triton kernels, interpreter"}
                    for r in G.gate([p for p in chosen if p.ours], inputs.head(2, 16), ["fwd_bwd"], device)]
    if not (gate and args.check_only):
        gate += G.gate(chosen, inputs.head(2, 64), ["fwd_bwd"], device)
    print("correctness gate vs float64 reference (loss error over the mean |advantage|, gradient relative norm):")
    for r in gate:
        errors = f"loss err {r['loss_err']:.2e}, grad err {r['grad_err']:.2e} -> " if "loss_err" in r else ""
        path = f" ({r['path']})" if "path" in r else ""
        print(f"  {r['provider']:22s} {errors}{r['status']}{path}")
    if any(r["status"] != "ok" for r in gate if r["provider"].startswith("rlsd_kernels")):
        raise SystemExit("correctness gate failed: nothing timed")
    if args.check_only:
        return

    status = {r["provider"]: r["status"] for r in gate if "path" not in r}
    rows = []
    bytes_logits = n * args.vocab * dtype.itemsize
    floor = {}
    if gpu:
        bw = common.copy_bandwidth_tbps()
        floor = {f"floor_{k}pass": k * bytes_logits / (bw * 1e12) * 1e3 for k in (3, 4)}
        print(f"copy bandwidth {bw:.2f} TB/s; floors: 3 passes {floor['floor_3pass']:.3f} ms, "
              f"4 passes {floor['floor_4pass']:.3f} ms")
    timing = {"warmup_ms": 100, "rep_ms": 500} if gpu else {"warmup_ms": 0, "rep_ms": 50}
    for p in chosen:
        row = {"provider": p.name, "what": p.what, "n": n, "vocab": args.vocab, "dtype": args.dtype}
        if status[p.name] not in ("ok", "FAILED"):
            rows.append({**row, "status": status[p.name]})
            continue
        result, st = common.guarded(lambda p=p: common.measure(p.make(inputs, True), device, **timing), device)
        row.update(status=st, gate=status[p.name], **(result or {}))
        if floor and result:
            row["x_floor_3pass"] = result["ms"] / floor["floor_3pass"]
        rows.append(row)
    for key, value in floor.items():
        rows.append({"provider": key, "what": "bytes over measured copy bandwidth", "n": n, "vocab": args.vocab,
                     "dtype": args.dtype, "status": "model", "ms": value})
    csv_path = common.write_csv(rows, "loss_logits", args.out, device.type)
    common.print_table(rows, ["provider", "status", "ms", "ms_q20", "ms_q80", "peak_extra_gb", "x_floor_3pass"],
                       title=f"forward + backward, N = {n}, V = {args.vocab}, {args.dtype}, {info['device']}")
    print(f"\nwritten: {csv_path}")


if __name__ == "__main__":
    main()
