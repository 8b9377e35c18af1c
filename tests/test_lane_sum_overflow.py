"""Logits just below the overflow of the kernels' per-lane sums, against the float64 reference.

The row kernels sum ``exp2(d)`` with ``d`` the logits' distance above the row's first-block max in
base 2, and redo a row whose sum overflows. Products of those exponentials overflow first: the
entropy's ``exp2(d) * d`` some 7 bits of ``d`` earlier, the KLs' ``exp2(d) * (d - d')`` wherever the
difference is large; and the segmented strategy adds several segments' sums, each finite. A gap of
84 to 88.6 nats leaves ``exp2(d)`` finite: each such product, and such a merge, must redo the row
(or merge in logs) rather than give an infinite loss or a false non-finite error. (They once gave
``loss = +inf`` with ``entropy_coef``, and the segmented strategy a false error or a wrong loss.)
"""

import pytest
import torch
from cases import make_case
from test_opsd import check as check_opsd
from test_opsd import opsd_case
from test_rlsd import BLOCK, check_against_reference
from tolerances import FP32, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.launch import rlsd_seg
from rlsd_kernels.launch.tuning import RowConfig, force_choice, force_row_config

# Nats above the first block's max: exp2 of the largest stays finite (88.72 is the float32 limit).
GAPS = [84.0, 86.0, 88.0, 88.6]


# The tokens whose rows get a peak (the others keep entropies of order 1, the metrics' scale).
ROWS = ((0, 1), (2, 3))


def _peaks(buf, gap, columns, first=slice(0, BLOCK)):
    """Sets ``columns`` of the ``ROWS`` of ``buf`` (a ``[B, T, V]`` logits buffer) to ``gap`` above
    each row's ``first`` block max (columns after that block)."""
    for b, t in ROWS:
        x = buf.view.data[b, t]
        x[columns] = x[first].amax() + gap


@pytest.mark.parametrize("strategy", ["fused", "split"])
@pytest.mark.parametrize("gap", GAPS)
def test_policy_loss_with_entropy(gap, strategy, device, backend):
    case = make_case(device, vocab=3 * BLOCK + 5, mask="none", ratio=None, entropy_coef=0.05)
    for buf in (case.student, case.teacher):
        _peaks(buf, gap, [BLOCK + 1])
    with force_row_config(RowConfig(BLOCK, 1)), force_choice(strategy):
        check_against_reference(case, torch.float32)


@pytest.mark.parametrize("gap", GAPS)
def test_token_logprobs_with_entropy(gap, device, backend):
    vocab = 3 * BLOCK + 5
    logits = torch.randn(3, 4, vocab, device=device)
    for b, t in ROWS:
        logits[b, t, 2 * BLOCK + 3] = logits[b, t, :BLOCK].amax() + gap
    tokens = torch.randint(0, vocab, (3, 4), device=device)
    upstream = torch.randn(2, 3, 4, device=device)
    ref_logits = logits.double().requires_grad_()
    ref_lp, ref_h = reference.token_logprobs(ref_logits, tokens, return_entropy=True)
    ((ref_lp * upstream[0]).sum() + (ref_h * upstream[1]).sum()).backward()
    x = logits.clone().requires_grad_()
    with force_row_config(RowConfig(BLOCK, 1)):
        lp, h = rlsd_kernels.token_logprobs(x, tokens, return_entropy=True)
    ((lp * upstream[0]).sum() + (h * upstream[1]).sum()).backward()
    assert_close(lp, ref_lp, what="lp", **FP32)
    assert_close(h, ref_h, what="entropy", **FP32)
    assert_grad_close(x.grad, ref_logits.grad, torch.float32)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("gap", GAPS)
def test_divergences_and_entropy(gap, divergence, device, backend):
    """The peak in one model only: the KL's cross term multiplies an exponential by a gap of ~120 bits."""
    case = opsd_case(device, vocab=3 * BLOCK + 5, mask="none")
    for buf in (case.student, case.teacher):
        _peaks(buf, gap if buf is case.student else 0.0, [BLOCK + 1])
    _peaks(case.teacher, gap, [2 * BLOCK + 2])
    with force_row_config(RowConfig(BLOCK, 1)):
        check_opsd(case, torch.float32, divergence=divergence)
        check_opsd(case, torch.float32, grpo=True, divergence=divergence, entropy_coef=0.1)


@pytest.mark.parametrize("gap", GAPS)
def test_segments_each_near_the_float32_maximum(gap, device, backend, monkeypatch):
    """Two-block segments, each with a peak in its second block: every segment's sum is finite, and
    at the largest gaps two of them add up past the float32 maximum."""
    from rlsd_kernels.launch import rlsd as rlsd_launch

    monkeypatch.setattr(rlsd_launch, "SEGMENTED", True)
    monkeypatch.setattr(rlsd_seg, "SEGMENT_COLUMNS", 2 * BLOCK)
    case = make_case(device, vocab=5 * BLOCK, mask="none", ratio=None, entropy_coef=0.05)
    for buf in (case.student, case.teacher):
        _peaks(buf, gap, [BLOCK + 4])
        _peaks(buf, gap, [3 * BLOCK + 4], first=slice(2 * BLOCK, 3 * BLOCK))
    with force_row_config(RowConfig(BLOCK, 1)):
        check_against_reference(case, torch.float32)
