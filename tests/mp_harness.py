"""The harness of the multi-process tests: spawned gloo ranks on CPU, each set up as conftest.py sets
up a test (the Triton interpreter, NaN-filled allocations)."""

import datetime
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 240


def spawn(worker, world, tmp_path):
    """Runs ``worker(rank, world, init)`` on ``world`` ranks; a rank's exception fails the test with
    its traceback, and a run past ``TIMEOUT_S`` fails it too."""
    init = f"file://{tmp_path / 'rendezvous'}"
    ctx = mp.start_processes(worker, args=(world, init), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-rank run did not finish in {TIMEOUT_S} s")


def start_rank(rank, world, init):
    """Joins the gloo group; Triton runs under the interpreter and outputs start as NaN (or -1)."""
    # Before anything imports triton (the test modules import neither triton nor rlsd_kernels at the top).
    os.environ["TRITON_INTERPRET"] = "1"
    assert "triton" not in sys.modules
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    from rlsd_kernels.launch import common as _utils

    real_empty = _utils.empty

    def poisoned(shape, *, dtype, device):
        # As the conftest does: an output a kernel forgets to write fails the comparison.
        return real_empty(shape, dtype=dtype, device=device).fill_(float("nan") if dtype.is_floating_point else -1)

    _utils.empty = poisoned


def finish_rank():
    # No rank tears its connections down while another still uses them. (After a failure the parent
    # ends the other ranks.)
    dist.barrier()
    dist.destroy_process_group()
