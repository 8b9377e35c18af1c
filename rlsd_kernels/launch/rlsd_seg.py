"""Launcher of the segmented policy-loss kernel (``kernels/rlsd_seg.py``): the segments, the scratch,
and a cooperative grid sized from the compiled kernel's resources.

Opt-in (``launch/rlsd.py: SEGMENTED``, or ``RLSD_KERNELS_SEGMENTED=1``) until a GPU run shows it
faster than the measured strategies: ``SEGMENTED_CHECK=1 bash bench/gpu_check.sh``.
"""

from __future__ import annotations

import torch
import triton

from ..kernels.rlsd_seg import _rlsd_seg_kernel
from .common import num_sms
from .tuning import RowConfig

# Columns per segment (rounded down to a multiple of the block, at least one block): 16,384 columns
# of bf16 are 32 KB per model per item. On CUDA the block is ``CONFIG``'s unless a test forces one.
SEGMENT_COLUMNS = 16384
CONFIG = RowConfig(4096, 8)
# Statistics per segment: the student's reference, sum and entropy sum, the teacher's reference and sum.
_STATS = 5
MAX_PROGRAMS_PER_SM = 4
# At most this many programs when set (tests: a grid smaller than a row's segments, LAG > 1; under the
# interpreter, a grid of several programs over rows of one segment each).
GRID_CAP = None
_per_sm: dict = {}


def segments(vocab: int, block_v: int, columns: int | None = None) -> tuple[int, int]:
    """``(seg_len, n_seg)``: the columns of one segment and how many cover the vocabulary."""
    columns = SEGMENT_COLUMNS if columns is None else columns
    seg_len = max(block_v, columns // block_v * block_v)
    return seg_len, triton.cdiv(vocab, seg_len)


def interpreter_grid(n_items: int, n_seg: int) -> int:
    """Programs of a launch under the Triton interpreter, which runs them one after another: one
    (every wait is then met when reached), or ``GRID_CAP`` where each row is one segment (no program
    then waits for another)."""
    return max(1, min(n_items, GRID_CAP)) if GRID_CAP and n_seg == 1 else 1


def lag(n_seg: int, programs: int) -> int:
    """Steps between publishing an item and finishing it: enough that every segment of the finished
    item's row was published at this step or before, by this program or by another of the grid
    (``LAG * G >= n_seg - 1``), and at least one, so that a wait never precedes its own row's
    publication in program order. ``tests/test_segmented.py`` checks a model of the schedule."""
    return max(1, triton.cdiv(n_seg - 1, programs))


def programs_per_sm(compiled, num_warps: int, device: torch.device) -> int:
    """How many programs of ``compiled`` one multiprocessor of ``device`` holds at once."""
    compiled._init_handles()  # the register count is known once the binary is loaded
    props = torch.cuda.get_device_properties(device)
    return occupancy(compiled.n_regs, compiled.metadata.shared, num_warps,
                     regs=getattr(props, "regs_per_multiprocessor", 65536),
                     threads=getattr(props, "max_threads_per_multi_processor", 2048),
                     shared=getattr(props, "shared_memory_per_multiprocessor", 228 << 10))


def occupancy(n_regs: int, shared_bytes: int, num_warps: int, *, regs: int, threads: int, shared: int) -> int:
    """Programs per multiprocessor from a kernel's registers per thread and shared memory, and the
    multiprocessor's registers, threads and shared memory: at most ``MAX_PROGRAMS_PER_SM`` and at
    least 1. Registers are allocated per warp in units of 256, and each program reserves 1 KB of
    shared memory besides its own. A cooperative launch larger than what fits fails with an error
    instead of waiting forever, so an estimate too high is reported, never a hang."""
    warp_regs = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = regs // (warp_regs * num_warps)
    by_threads = threads // (32 * num_warps)
    by_shared = shared // (shared_bytes + 1024)
    return max(1, min(by_regs, by_threads, by_shared, MAX_PROGRAMS_PER_SM))


def launch(config: RowConfig, n_rows: int, head, dest, dest_strides, per_token, tail, meta):
    """Runs the fused forward with the gradient over ``n_rows`` rows, segmented. The arguments are
    those of ``rlsd._launch``; ``dest`` is the gradient (never None here)."""
    student = head[0]
    device = student.device
    vocab = tail[1]
    seg_len, n_seg = segments(vocab, config.block_v)
    n_items = n_rows * n_seg
    if _STATS * n_items >= 2**31:
        raise ValueError(f"the segmented strategy indexes its statistics with int32: {n_rows} rows x {n_seg} "
                         f"segments is too many; raise SEGMENT_COLUMNS or use the fused strategy")
    scratch = torch.empty(_STATS * n_items + 2 * n_rows, dtype=torch.float32, device=device)
    counts = torch.zeros(n_rows, dtype=torch.int32, device=device)
    args = (*head, dest, *dest_strides, *per_token, n_rows, *tail,
            scratch[:_STATS * n_items], scratch[_STATS * n_items:], counts, n_seg, seg_len)
    const = dict(BLOCK_V=config.block_v, BLOCK_SEG=triton.next_power_of_2(n_seg), num_warps=config.num_warps,
                 **meta)
    if device.type != "cuda":
        programs = interpreter_grid(n_items, n_seg)
        _rlsd_seg_kernel[(programs,)](*args, lag(n_seg, programs), **const)
        return
    key = (device.index, student.dtype, dest.dtype, head[3].dtype, tuple(sorted(const.items())))
    per_sm = _per_sm.get(key)
    if per_sm is None:
        compiled = _rlsd_seg_kernel.warmup(*args, 1, grid=(1,), launch_cooperative_grid=True, **const)
        per_sm = _per_sm[key] = programs_per_sm(compiled, config.num_warps, device)
    programs = max(1, min(n_items, per_sm * num_sms(device), GRID_CAP or n_items))
    _rlsd_seg_kernel[(programs,)](*args, lag(n_seg, programs), launch_cooperative_grid=True, **const)
