#!/usr/bin/env python3
"""Compile every kernel specialisation (RLSD, log-prob, OPSD) for a GPU target on this machine, no GPU needed.

Builds each kernel to a cubin with Triton's own compiler and ptxas, as the launchers' runtime
specialisation would (16-divisible pointers, strides and vocabulary), and reports registers, spills
(local memory), shared memory and whether the row loads are 16 bytes wide. Prints JSON lines.

    python bench/kernel_resources.py [--capability 90]
"""

import argparse
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources.py compiles real kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rlsd_kernels.kernels.logprobs import _logprobs_bwd_kernel, _logprobs_fwd_kernel  # noqa: E402
from rlsd_kernels.kernels.opsd import _opsd_bwd_kernel, _opsd_fwd_kernel  # noqa: E402
from rlsd_kernels.kernels.opsd_shard import _jsd_sums_kernel, _opsd_stats_kernel  # noqa: E402
from rlsd_kernels.kernels.rlsd import _rlsd_fwd_kernel, _rlsd_token_kernel, _scale_kernel  # noqa: E402
from rlsd_kernels.kernels.rlsd_seg import _rlsd_seg_kernel  # noqa: E402
from rlsd_kernels.launch.tuning import _candidates  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FLOAT_ARGS = {"scale2", "inv_temp", "log_w_lo", "log_w_hi", "lam", "clip_lo", "clip_hi", "dual_clip", "log_tis_cap",
              "sapo_tau_pos", "sapo_tau_neg",
              "kl_coef", "entropy_coef", "alpha", "beta", "token_clip"}
OTHER_POINTERS = {"tokens": "*i64", "flags_out": "*i32", "counts": "*i32"}
LOGIT_POINTERS = {"S", "T", "dS", "X", "dX"}
INT_ARGS = {"V", "n_rows", "seqlen", "n", "vocab_start", "n_seg", "seg_len", "lag"}


def compile_kernel(kernel, constexprs, *, logits="bf16", num_warps=8, capability=90):
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in LOGIT_POINTERS:
            signature[name] = f"*{logits}"
        elif name in OTHER_POINTERS:
            signature[name] = OTHER_POINTERS[name]
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name.startswith("stride") or name in INT_ARGS:
            signature[name] = "i32"
        else:
            signature[name] = "*fp32"
        if signature[name].startswith("*") or name.startswith("stride") or name in ("V", "seg_len"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


def resources(compiled):
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True)
    usage = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", out.stdout)}
    loads = re.findall(r"ld\.global[\w.:]*", compiled.asm["ptx"])
    usage["wide_loads"] = any(".v4." in op for op in loads)
    return usage


RLSD_OFF = dict(HAS_T_LOGITS=True, HAS_OLD=True, HAS_DUAL=True, CISPO=False, SAPO=False, CREDIT_OLD=False,
                HAS_CREDIT=False, SEQ_RATIO=False, IS_MODE=0, KL=0, ENTROPY=False, ENTROPY_GRAD=False, WRITE_GRAD=True)
RLSD_ALL = dict(RLSD_OFF, HAS_CREDIT=True, IS_MODE=1, KL=3, ENTROPY=True, ENTROPY_GRAD=True)
TOKEN_FLAGS = {k: v for k, v in RLSD_ALL.items() if k not in ("HAS_T_LOGITS", "ENTROPY", "WRITE_GRAD")}


def variants():
    """The main flag combinations at the default block, then every tuner candidate."""
    for t, o, g, cispo in itertools.product((True, False), repeat=4):
        flags = dict(RLSD_OFF, HAS_T_LOGITS=t, HAS_OLD=o, WRITE_GRAD=g, CISPO=cispo, BLOCK_V=8192)
        yield _rlsd_fwd_kernel, flags, "bf16", 16
    for t, g in itertools.product((True, False), repeat=2):
        yield _rlsd_fwd_kernel, dict(RLSD_OFF, HAS_T_LOGITS=t, WRITE_GRAD=g, SAPO=True, BLOCK_V=8192), "bf16", 16
    for flags in (RLSD_ALL, dict(RLSD_ALL, SEQ_RATIO=True, IS_MODE=2, KL=1, CREDIT_OLD=True)):
        yield _rlsd_fwd_kernel, dict(flags, BLOCK_V=8192), "bf16", 16
    for logits, itemsize in (("bf16", 2), ("fp32", 4)):
        candidates = sorted({(c.block_v, c.num_warps) for c in _candidates(151936, itemsize) + _candidates(4096)})
        for block, warps in candidates:
            for flags in (RLSD_OFF, dict(RLSD_OFF, HAS_T_LOGITS=False), RLSD_ALL):
                yield _rlsd_fwd_kernel, dict(flags, BLOCK_V=block), logits, warps
            for entropy, partial in ((False, False), (True, False), (True, True)):
                yield _logprobs_fwd_kernel, dict(ENTROPY=entropy, PARTIAL=partial, BLOCK_V=block), logits, warps
            for entropy in (False, True):
                yield _logprobs_bwd_kernel, dict(HAS_ENTROPY=entropy, BLOCK_V=block), logits, warps
    yield _rlsd_token_kernel, dict(TOKEN_FLAGS, BLOCK=1024), "bf16", 4
    # The segmented strategy (opt-in): its default configuration and its neighbours.
    for (block, warps), flags in itertools.product(((4096, 8), (2048, 4), (8192, 16)), (RLSD_OFF, RLSD_ALL)):
        seg_flags = {k: v for k, v in flags.items() if k != "WRITE_GRAD"}
        yield _rlsd_seg_kernel, dict(seg_flags, BLOCK_V=block, BLOCK_SEG=16), "bf16", warps
    yield _rlsd_token_kernel, dict(TOKEN_FLAGS, SAPO=True, BLOCK=1024), "bf16", 4
    yield _scale_kernel, dict(BLOCK_V=4096), "bf16", 4
    yield from opsd_variants()


OPSD_OFF = {k: v for k, v in RLSD_OFF.items() if k not in ("HAS_T_LOGITS", "ENTROPY", "WRITE_GRAD")}
OPSD_OFF.update(HAS_OLD=False, HAS_DUAL=False)
OPSD_MODES = {
    "opsd": OPSD_OFF,
    "grpo": dict(OPSD_OFF, HAS_OLD=True, HAS_DUAL=True),
    "all": dict(OPSD_OFF, HAS_OLD=True, HAS_DUAL=True, HAS_CREDIT=True, IS_MODE=1, KL=3, ENTROPY_GRAD=True),
    "other": dict(OPSD_OFF, HAS_OLD=True, CISPO=True, CREDIT_OLD=True, SEQ_RATIO=True, IS_MODE=2, KL=1),
    "sapo": dict(OPSD_OFF, HAS_OLD=True, SAPO=True),
}


def _opsd_fwd_flags(div, mode, write_grad, teacher=True):
    grpo = mode != "opsd"
    # Rows read again (the gradient, or the JSD's second sweep) are asked to stay in cache.
    reread = write_grad or div == 2
    return dict(OPSD_MODES[mode], DIV=div, HAS_T_LOGITS=teacher, NEED_LP=grpo or div == 3, GRPO=grpo,
                ENTROPY=mode == "all", WRITE_GRAD=write_grad, KEEP_S=reread, KEEP_T=reread and div != 3)


def opsd_variants():
    """Every configuration the OPSD tuner can return at V = 151,936 (``_opsd_launch.pick_config``):
    the whole flag matrix with bfloat16 logits at the two 4096-wide ones, the common and the heaviest
    flags with float32 logits (the widest loads), and the vocabulary-parallel statistics kernels."""
    for logits, configs in (("bf16", ((4096, 16), (4096, 8))), ("fp32", ((4096, 16), (4096, 8), (2048, 8), (2048, 4)))):
        full = logits == "bf16"
        for block, warps in configs:
            for div in range(4):
                for mode in (OPSD_MODES if full else ("opsd", "all")):
                    for write_grad in ((True, False) if full else (True,)):
                        flags = dict(_opsd_fwd_flags(div, mode, write_grad), BLOCK_V=block)
                        yield _opsd_fwd_kernel, flags, logits, warps
            if full:
                for mode in ("opsd", "all"):
                    for write_grad in (True, False):
                        flags = dict(_opsd_fwd_flags(3, mode, write_grad, teacher=False), BLOCK_V=block)
                        yield _opsd_fwd_kernel, flags, logits, warps
            for div in range(3):
                for need_lp, entropy in (((False, False), (True, False), (True, True)) if full else ((True, True),)):
                    flags = dict(DIV=div, NEED_LP=need_lp, ENTROPY_GRAD=entropy, BLOCK_V=block)
                    yield _opsd_bwd_kernel, flags, logits, warps
            for div in range(3):
                for lp in ((False, True) if full else (True,)):
                    yield _opsd_stats_kernel, dict(DIV=div, NEED_LP=lp, ENTROPY=lp, BLOCK_V=block), logits, warps
            yield _jsd_sums_kernel, dict(BLOCK_V=block), logits, warps


def _build(index):
    # Kernels do not pickle: a compiling process gets an index into the variants it already holds.
    kernel, flags, logits, warps = _CHOSEN[index]
    compiled = compile_kernel(kernel, flags, logits=logits, num_warps=warps, capability=_CAPABILITY)
    return dict(kernel=kernel.__name__, logits=logits, num_warps=warps, **flags, **resources(compiled))


# The targets checked with this script (the sm_XX Triton's CUDA backend and ptxas build for it); others
# are refused up front rather than failing deep inside LLVM.
CAPABILITIES = (80, 86, 89, 90)
_CAPABILITY = 90
_CHOSEN = []


def main(argv=None):
    global _CAPABILITY
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capability", type=int, choices=CAPABILITIES, default=90,
                        help="compute capability of the target: 80, 86 (Ampere), 89 (Ada), 90 (Hopper, the default)")
    parser.add_argument("--quick", action="store_true", help="only the default block sizes")
    parser.add_argument("--jobs", type=common.positive_int, default=os.cpu_count() or 1, help="compiling processes")
    args = parser.parse_args(argv)
    _CAPABILITY = args.capability
    _CHOSEN.extend(v for v in variants() if not args.quick or v[1].get("BLOCK_V", 8192) in (8192, 4096))
    # Forked workers inherit the variants and the target.
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        for row in pool.map(_build, range(len(_CHOSEN))):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
