"""Host work per call of ``rlsd_loss`` (forward and backward) with the kernels stubbed out.

Every Triton kernel object the launchers hold is replaced by a stub whose launch does nothing, and
the backend switch sends the tensors to the Triton launchers whatever their device, so what is
left is the host's work: argument checks and preparation, allocations, small ATen ops, option
packing, the autograd Function and the launch path. Per variant it reports the ATen ops per call
(counted by a ``TorchDispatchMode``) and the microseconds per call (median over many calls), with
``validate=True``, ``"deferred"`` (on CPU the same check as ``True``: nothing runs ahead of the
host to defer it) and ``False``, and writes a CSV under ``bench/results/cpu/`` (or
``bench/results/<device>/`` with ``--device cuda``).

On CPU the tensors need no kernel at all; with ``--device cuda`` the same stubs run on CUDA
tensors, where the validation's device-to-host read is real (but waits on nothing, the kernels
being stubbed). The stub writes zeros into the int32 arguments (the kernels' flags) outside the
count and the timing's ATen ops, so that validation finds no error bits. On CPU the timing serves
blocks of 1 MiB or more from a cache, as the CUDA caching allocator does on a GPU
(``CachedLargeBlocks``; ``--plain-alloc`` times glibc's own allocation instead); the op counts
include every allocation either way.

    python bench/host_overhead.py                      # N = 1024, V = 151,936, bf16, CPU
    python bench/host_overhead.py --vocab 4096 --calls 500

The ``floor`` variant is the least the default call does, written out by hand with the same stubs
and autograd (``_Floor``): what a call could cost with no checks and no layers.
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common as bench_common  # noqa: E402

import rlsd_kernels  # noqa: E402
from rlsd_kernels.launch import common  # noqa: E402
from rlsd_kernels.launch import rlsd as rlsd_launch  # noqa: E402

LAUNCH_MODULES = ("logprobs", "rlsd", "opsd")
VARIANTS = ("default", "trainer", "floor")
DTYPES = ("bfloat16", "float16", "float32")


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while it is active (and not ``paused``)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


_counter: OpCounter | None = None


class _StubLaunch:
    """``kernel[grid](*args, **meta)`` that zeroes the int32 tensor arguments (the flags) and does
    nothing else; the zeroing is not counted."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **meta):
        if _counter is None:
            # Timing: zero the flags and nothing else, so that the stub itself costs little.
            for a in args:
                if isinstance(a, torch.Tensor) and a.dtype == torch.int32:
                    a.zero_()
            return
        paused = not _counter.paused
        if paused:
            _counter.paused = True
        try:
            with torch.utils._python_dispatch._disable_current_modes():
                for a in args:
                    if isinstance(a, torch.Tensor) and a.dtype == torch.int32:
                        a.zero_()
        finally:
            if paused:
                _counter.paused = False


def stub_kernels():
    """Replaces the kernels and the backend switch in every launcher module; returns an undo."""
    undo = []
    stub = _StubLaunch()
    for name in LAUNCH_MODULES:
        module = importlib.import_module(f"rlsd_kernels.launch.{name}")
        for attr, value in list(vars(module).items()):
            if attr.endswith("_kernel") and hasattr(value, "run"):
                undo.append((module, attr, value))
                setattr(module, attr, stub)
        if hasattr(module, "use_triton"):
            undo.append((module, "use_triton", module.use_triton))
            module.use_triton = lambda x: True
    undo.append((common, "use_triton", common.use_triton))
    common.use_triton = lambda x: True

    def restore():
        for module, attr, value in reversed(undo):
            setattr(module, attr, value)

    return restore


class _Floor(torch.autograd.Function):
    """The least the default call does, written out with no checks and no layers: flat ids,
    broadcast advantages, mask and token-mean weights, the packed outputs, the flags and the
    gradient allocated, one launch, the loss as a dot product; the backward's scale launch."""

    @staticmethod
    def forward(ctx, student, teacher, tokens, advantages):
        ctx.set_materialize_grads(False)
        b, t, v = student.shape
        n = b * t
        flat = tokens.view(-1)
        adv = advantages.reshape(b, 1).expand(b, t).reshape(-1)
        mask = (flat != -100).float()
        weight = mask / mask.sum().clamp_min(1.0)
        packed = common.empty((10, n), dtype=torch.float32, device=student.device)
        flags = common.empty((n,), dtype=torch.int32, device=student.device)
        grad = common.empty(student.shape, dtype=student.dtype, device=student.device)
        rlsd_launch._rlsd_fwd_kernel[(n,)](
            student, t * v, v, teacher, t * v, v, grad, t * v, v, flat, adv, adv, adv, weight, *([adv] * 5),
            packed, n, flags, n, t, v, 1.0, 1.0, *([0.0] * 11), WRITE_GRAD=True, BLOCK_V=8192)
        ctx.grad = grad.detach()
        ctx.mark_non_differentiable(packed, flags)
        return torch.dot(weight, packed[0]), packed, flags

    @staticmethod
    def backward(ctx, grad_value, *unused):
        grad, ctx.grad = ctx.grad, None
        b, t, v = grad.shape
        rlsd_launch._scale_kernel[(b * t,)](grad, t * v, v, grad_value, b * t, t, v, BLOCK_V=4096)
        return grad, None, None, None


def make_call(n, vocab, dtype, device, variant):
    """``(fn, student)``: ``fn()`` runs one forward and backward of the variant's call (``floor``:
    the hand-written least of the default call, ``_Floor``; it ignores ``validate``)."""
    seq = 128 if n % 128 == 0 else n
    b = n // seq
    g = torch.Generator().manual_seed(0)
    student = torch.empty((b, seq, vocab), dtype=dtype, device=device).requires_grad_()
    teacher = torch.empty((b, seq, vocab), dtype=dtype, device=device)
    tokens = torch.randint(0, vocab, (b, seq), generator=g).to(device)  # int64: the stub leaves them
    advantages = torch.randn((b,), generator=g).to(device)
    extra = {}
    if variant == "trainer":
        # What a GRPO trainer passes: a mask, the behaviour policy's log-probs, [B, 1] advantages.
        extra = dict(mask=torch.ones((b, seq), dtype=torch.bool, device=device),
                     old_logprobs=-torch.rand((b, seq), generator=g).to(device))
        advantages = advantages[:, None]

    def fn(validate):
        student.grad = None
        if variant == "floor":
            loss = _Floor.apply(student, teacher, tokens, advantages)[0]
        else:
            loss = rlsd_kernels.rlsd_loss(student, teacher, tokens, advantages, validate=validate, **extra)
        loss.backward()

    return fn


def count_ops(fn, *args) -> Counter:
    """The ATen ops of one ``fn(*args)`` by name (the stubs' own zeroing left out)."""
    global _counter
    _counter = OpCounter()
    try:
        with _counter:
            fn(*args)
        return _counter.ops
    finally:
        _counter = None


class CachedLargeBlocks:
    """``common.empty`` for the timing on CPU: a block of 1 MiB or more comes back from a cache of
    freed blocks of its shape, as the CUDA caching allocator hands blocks out on a GPU. On CPU glibc
    maps and unmaps every such block (the gradient of N = 1024 rows at V = 151,936 is 311 MB),
    which a GPU never pays: about 30 us per call here, and the caches it flushes."""

    def __init__(self, real):
        self.real, self.blocks = real, {}

    def __call__(self, shape, *, dtype, device):
        shape = tuple(shape)
        if device.type != "cpu" or math.prod(shape) * dtype.itemsize < (1 << 20):
            return self.real(shape, dtype=dtype, device=device)
        block = self.blocks.get((shape, dtype))
        # Free when nothing but the cache holds its storage (2: the cache's tensor and the query's).
        if block is None or torch._C._storage_Use_Count(block.untyped_storage()._cdata) != 2:
            block = self.blocks[(shape, dtype)] = self.real(shape, dtype=dtype, device=device)
        return block


def measure(fn, validate, calls, device, cached=True):
    for _ in range(5):
        fn(validate)
    ops = count_ops(fn, validate)
    times = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    real = common.empty
    if cached and device.type == "cpu":
        common.empty = CachedLargeBlocks(real)
    try:
        for _ in range(calls):
            sync()
            t0 = time.perf_counter()
            fn(validate)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        common.empty = real
    return sum(ops.values()), statistics.median(times) * 1e6, ops


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=bench_common.positive_int, default=1024, help="tokens N (k = 1024)")
    p.add_argument("--vocab", type=bench_common.positive_int, default=151936, help="vocabulary V (k = 1024)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--calls", type=bench_common.positive_int, default=300, help="timed calls per variant")
    p.add_argument("--variants", type=bench_common.names(VARIANTS, "variants"), default=list(VARIANTS),
                   help=f"a subset of {','.join(VARIANTS)}")
    p.add_argument("--ops", action="store_true", help="print the ATen ops of each call by name")
    p.add_argument("--plain-alloc", action="store_true",
                   help="on CPU, time with glibc's allocation of large blocks (default: cached, as on a GPU)")
    p.add_argument("--out", default=None, help="CSV path ending in .csv, its folder created if need be "
                   "(default bench/results/<card>/host_overhead.csv)")
    args = p.parse_args(argv)
    if args.out is not None:
        out = Path(args.out)
        if out.suffix != ".csv" or not out.stem:
            p.error(f"argument --out: {args.out!r} is not a .csv file name")
        try:
            bench_common.out_folder(str(out.parent))
        except argparse.ArgumentTypeError as e:
            p.error(f"argument --out: {e}")
    if args.device == "cuda":
        bench_common.require_cuda("bench/host_overhead.py --device cuda", "Its default, --device cpu, runs on CPU.")
    device = torch.device(args.device)
    torch.set_num_threads(1)
    restore = stub_kernels()
    rows = []
    try:
        for variant in args.variants:
            fn = make_call(args.n, args.vocab, getattr(torch, args.dtype), device, variant)
            for validate in (True, "deferred", False) if variant != "floor" else (False,):
                count, us, ops = measure(fn, validate, args.calls, device, cached=not args.plain_alloc)
                rows.append(dict(variant=variant, validate=validate, n=args.n, vocab=args.vocab, dtype=args.dtype,
                                 aten_ops=count, us_per_call=round(us, 1)))
                if args.ops:
                    print(f"{variant} validate={validate}: {dict(ops.most_common())}")
    finally:
        restore()
    print(f"host work per rlsd_loss fwd+bwd, kernels stubbed (N = {args.n}, V = {args.vocab}, {args.dtype}, "
          f"{device.type}, median of {args.calls})")
    print(f"{'variant':<10} {'validate':>9} {'ATen ops':>9} {'us/call':>9}")
    for r in rows:
        print(f"{r['variant']:<10} {r['validate']!s:>9} {r['aten_ops']:>9} {r['us_per_call']:>9.1f}")
    out = Path(args.out) if args.out else None
    path = bench_common.write_csv(rows, out.stem if out else "host_overhead", out and out.parent, device.type)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
