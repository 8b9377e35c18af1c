"""Every kernel specialisation compiles for Hopper (sm_90) with the real Triton compiler, on CPU.

The interpreter accepts code that the compiler rejects and says nothing of registers, so
``bench/kernel_resources.py`` builds each kernel to a cubin (in a process without the interpreter)
and this checks that all of them compiled, none spills more than a few bytes, and the row loads
are 16 bytes wide.
"""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlsd_kernels.launch.rlsd_seg import CONFIG
from rlsd_kernels.launch.tuning import _candidates

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    # Under pytest-xdist (test.sh) the workers' temporary folders lie in the run's: the first worker
    # to take the lock builds the report there, and any other reads it.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    path = shared / "sm90_report.jsonl"
    with open(shared / "sm90_report.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            out = subprocess.run([sys.executable, str(SCRIPT), "--capability", "90"], capture_output=True,
                                 text=True, env=env, timeout=2400)
            assert out.returncode == 0, out.stderr[-3000:]
            path.write_text(out.stdout)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_variant_compiled(report):
    kernels = {row["kernel"] for row in report}
    assert kernels == {"_rlsd_fwd_kernel", "_rlsd_token_kernel", "_logprobs_fwd_kernel", "_logprobs_bwd_kernel",
                       "_scale_kernel", "_opsd_fwd_kernel", "_opsd_bwd_kernel", "_opsd_stats_kernel",
                       "_jsd_sums_kernel", "_rlsd_seg_kernel"}
    assert sum(row["kernel"].startswith(("_opsd", "_jsd")) for row in report) > 140
    for logits, itemsize in (("bf16", 2), ("fp32", 4)):
        configs = {(c.block_v, c.num_warps) for c in _candidates(151936, itemsize) + _candidates(4096)}
        tested = {(row["BLOCK_V"], row["num_warps"]) for row in report
                  if row["kernel"] == "_rlsd_fwd_kernel" and row["logits"] == logits}
        assert configs <= tested, logits
    # The segmented strategy's default configuration (opt-in, launch/rlsd_seg.py: CONFIG), with every
    # option off and on.
    segmented = {(row["BLOCK_V"], row["num_warps"], row["ENTROPY"]) for row in report
                 if row["kernel"] == "_rlsd_seg_kernel"}
    assert {(CONFIG.block_v, CONFIG.num_warps, False), (CONFIG.block_v, CONFIG.num_warps, True)} <= segmented


def test_nothing_spills(report):
    # ptxas keeps a few variants at 64-72 registers and spills 8-24 bytes there, and with every
    # loss option on (entropy, KL, importance weights) the 128-register cap of 16 warps costs
    # 24-40 bytes; anything more is a regression.
    # The OPSD kernels carry two rows' sums and blocks: up to 48 bytes for every one of their variants.
    plain = [row for row in report if not row.get("ENTROPY") and not row.get("HAS_ENTROPY")
             and not row["kernel"].startswith(("_opsd", "_jsd"))]
    assert not [row for row in report if row["local"] or row["stack"] > 48]
    assert not [row for row in plain if row["stack"] > 24]


def test_row_loads_are_16_bytes_wide(report):
    narrow = [row for row in report if row["kernel"] not in ("_scale_kernel", "_rlsd_token_kernel")
              and not row["wide_loads"]]
    assert not narrow, narrow
