"""The segmented strategy (``kernels/rlsd_seg.py``) compiled, on a CUDA device at real sizes (run
by ``bench/gpu_check.sh`` on a lent GPU; opt-in until such a run shows it faster).

What only a GPU shows: programs that really wait for one another (the interpreter runs one program),
the memory ordering of the published statistics, the cooperative launch and its occupancy, int64
addressing past 2**31 logits. The tests of ``test_gpu.py`` that write a gradient are collected again
here (imported below) and run under the segmented strategy.
"""

import pytest
import torch
from test_gpu import (  # noqa: F401  (collected again under the segmented strategy)
    _inputs,
    _reference_rows,
    test_cuda_graph_capture_and_replay,
    test_more_than_2_pow_31_logits,
    test_qwen_vocabulary,
    test_scalar_loss_in_place_with_view_and_upstream_scale,
    test_torch_compile_on_gpu,
)
from tolerances import FP32, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels.launch import rlsd_seg, tuning

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def segmented():
    with tuning.force_choice("segmented"):
        yield


@pytest.mark.parametrize("columns, grid_cap", [(16384, None), (4096, None), (4096, 3), (65536, 1), (4096, 20)])
def test_segments_and_grids(columns, grid_cap, monkeypatch):
    """Segment sizes, and grids smaller than a row's segments: a lag of 13 steps with 3 programs, 2 with one
    program, 2 with 20."""
    monkeypatch.setattr(rlsd_seg, "SEGMENT_COLUMNS", columns)
    monkeypatch.setattr(rlsd_seg, "GRID_CAP", grid_cap)
    n, vocab = 512, 151936
    student, teacher, tokens, adv, mask = _inputs(n, vocab, torch.bfloat16, seed=11)
    old = rlsd_kernels.token_logprobs(student, tokens)
    rows = torch.arange(0, n, 37, device="cuda")
    normalizer = float(mask.sum())
    ref_loss, ref_grad = _reference_rows(student, teacher, tokens, adv, mask, old, rows, normalizer)
    x = student.clone().requires_grad_()
    loss = rlsd_kernels.rlsd_loss(x, teacher, tokens, adv, old_logprobs=old, mask=mask, loss_agg="none")
    (loss.sum() / normalizer).backward()
    assert_close(loss[rows].sum() / normalizer, ref_loss, what="loss", **FP32)
    assert_grad_close(x.grad[rows], ref_grad, torch.bfloat16)
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))


def test_repeated_calls_are_identical():
    """The merge reads every segment in a fixed order: a read of statistics not yet published (a
    memory-ordering defect) would show as a difference between calls."""
    student, teacher, tokens, adv, mask = _inputs(2048, 151936, torch.bfloat16, seed=12)
    first = None
    for _ in range(20):
        x = student.clone().requires_grad_()
        loss = rlsd_kernels.rlsd_loss(x, teacher, tokens, adv, mask=mask, entropy_coef=0.01, validate=False)
        loss.backward()
        if first is None:
            first = (loss.detach(), x.grad)
            continue
        assert torch.equal(loss.detach(), first[0]) and torch.equal(x.grad, first[1])


def test_agrees_with_the_fused_strategy():
    student, teacher, tokens, adv, mask = _inputs(4096, 151936, torch.bfloat16, seed=13)
    results = []
    for choice in ("fused", "segmented"):
        x = student.clone().requires_grad_()
        with tuning.force_choice(choice):
            loss, metrics = rlsd_kernels.rlsd_loss(x, teacher, tokens, adv, mask=mask, entropy_coef=0.01,
                                                   return_metrics=True)
        loss.backward()
        results.append((loss.detach(), metrics, x.grad))
    assert_close(results[1][0], results[0][0], what="loss", **FP32)
    for key, value in results[0][1].items():
        assert_close(results[1][1][key], value, what=f"metrics[{key}]", **FP32)
    assert_grad_close(results[1][2], results[0][2], torch.bfloat16)
