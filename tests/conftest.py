"""Test setup: real Triton kernels on CPU tensors through the interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before anything imports triton, so it is decided here, first.
Tests take their device from the ``device`` fixture: CUDA where there is one (the same tests then
run the compiled kernels), else CPU under the interpreter. Every output the ops allocate is filled
with NaN (floats) or -1 (ints) first, so an element a kernel forgets to write fails the comparison.
"""

import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"

import pytest  # noqa: E402
import torch  # noqa: E402

from rlsd_kernels.launch import common as _utils  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Under pytest-xdist (test.sh runs one worker per core) each worker takes its share of the cores:
# more torch threads than cores, on cores that are all busy, run many times slower.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run by bench/gpu_check.sh on a lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    real_empty = _utils.empty

    def poisoned(shape, *, dtype, device):
        out = real_empty(shape, dtype=dtype, device=device)
        return out.fill_(float("nan") if dtype.is_floating_point else -1)

    monkeypatch.setattr(_utils, "empty", poisoned)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    """Runs a test once through the Triton kernels and once through the PyTorch path."""
    with _utils.backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture
def small_blocks():
    """Forces a 16-wide vocabulary block on every row kernel, so tiny vocabularies hit block edges."""
    from rlsd_kernels.launch import tuning

    with tuning.force_row_config(tuning.RowConfig(16, 1)):
        yield 16


@pytest.fixture
def small_chunks(monkeypatch):
    """Shrinks the PyTorch path's token chunks (``CHUNK_ELEMENTS`` float32 values of a ``[rows, V]``
    block) to 64 values: rows of a tiny test span several chunks."""
    from rlsd_kernels.launch import torch_rows

    monkeypatch.setattr(torch_rows, "CHUNK_ELEMENTS", 64)
    return 64
