"""The OPSD linear losses (``opsd_linear_loss``, ``grpo_opsd_linear_loss``) on the slab schedule
(``forms/slab_opsd.py``, opt-in through ``forms/linear.py: SCHEDULE``): each divergence, the loss,
the metrics and every gradient against the float64 reference and against the chunk schedule; the
slabs really run, as many sweeps per chunk as ``docs/linear-form.md`` counts, at several slab
counts, with vocabularies that the slab size does not divide."""

from __future__ import annotations

import pytest
import test_linear_slab
import test_opsd_linear as opsd_tests
import tolerances
import torch
from test_linear import BLOCK, make_linear_case
from test_linear_skipping import assert_same, grads_of
from test_linear_slab import slab_widths
from test_opsd_linear import DIV_IDS, DIVERGENCES

from rlsd_kernels import reference
from rlsd_kernels.forms import linear, rows

# The slab schedule's fixture: ``slabs(size)`` runs it with ``size`` columns per slab and gives the list
# of its matmuls (rows, columns).
slabs = test_linear_slab.slabs



def check(case, dtype, **kwargs):
    """``test_opsd_linear.check``, the float32 gradients held to ``tolerances.SLAB_GRAD``."""
    if dtype != torch.float32:
        return _check(case, dtype, **kwargs)
    grad = tolerances.GRAD[torch.float32]
    tolerances.GRAD[torch.float32] = tolerances.SLAB_GRAD
    try:
        return _check(case, dtype, **kwargs)
    finally:
        tolerances.GRAD[torch.float32] = grad


_check = opsd_tests.check


@pytest.fixture(autouse=True)
def _checks(monkeypatch):
    """The tests of ``test_opsd_linear`` rerun here check through ``check`` above."""
    monkeypatch.setattr(opsd_tests, "check", check)


def _id(axis):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in axis.items()) or "base"


def assert_slabs_ran(calls, vocab, size):
    """Every sweep covers the slabs of ``size`` columns in order, the last one narrower."""
    widths = slab_widths(vocab, size)
    assert calls and [w for _, w in calls] == widths * (len(calls) // len(widths))


@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
def test_each_divergence(divergence, beta, device, backend, slabs):
    """``test_opsd_linear.test_each_divergence`` on 4 slabs of the vocabulary of 37 (the last of 7
    columns): alone, with the policy term per token, and with ``token_clip`` binding about half."""
    calls = slabs(10)
    opsd_tests.test_each_divergence(divergence, beta, device=device, backend=backend)
    assert_slabs_ran(calls, 37, 10)


# Slab sizes: 3 slabs (the last of 5 columns), 4 (the last of 7: BLOCK-wide kernels cross a slab
# edge inside a block), one slab, one column per slab; each axis meets two divergences.
AXES = [
    dict(slab=16),
    dict(slab=10, dtype=torch.bfloat16, chunk_size=3),
    dict(slab=37, dtype=torch.float16, chunk_size=4),
    dict(slab=16, layout="view", chunk_size=2, mask="seq", temperature=0.7),
    dict(slab=10, layout="packed", chunk_size=7, mask="float"),
    dict(slab=7, vocab=45, hidden_size=16, mask="none", chunk_size=5),
    dict(slab=1, vocab=BLOCK + 1, bias=False, chunk_size=4),
]


@pytest.mark.parametrize("grpo", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=[_id(a) for a in AXES])
def test_matches_reference(axis, grpo, device, backend, slabs):
    axis = dict(axis)
    size = axis.pop("slab")
    i = AXES.index(dict(axis, slab=size))
    case = make_linear_case(device, **axis)
    calls = slabs(size)
    for divergence, beta in (DIVERGENCES[i % 5], DIVERGENCES[(2 * i + 1 + grpo) % 5]):
        extra = dict(alpha=0.7, lam=0.5) if grpo else {}
        check(case, axis.get("dtype", torch.float32), grpo=grpo, divergence=divergence, beta=beta, **extra)
    assert_slabs_ran(calls, case.weight.shape[0], size)


@pytest.mark.parametrize("grpo", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ignored_ids(dtype, grpo, device, backend, slabs):
    """Ids of -100 without a mask: those rows are neither scored nor differentiated."""
    case = make_linear_case(device, dtype=dtype, mask="none", chunk_size=3)
    case.tokens.view(-1)[::3] = -100
    calls = slabs(16)
    for divergence, beta in (("reverse_kl", 0.5), ("jsd", 0.3), ("sampled_token", 0.5)):
        check(case, dtype, grpo=grpo, divergence=divergence, beta=beta, loss_agg="none")
    assert_slabs_ran(calls, 37, 16)


@pytest.mark.parametrize("grpo", [False, True])
def test_sampled_token_with_teacher_logprobs(grpo, device, backend, slabs):
    """The student's rows alone in each slab's matmul; the teacher's token log-probs given."""
    calls = slabs(16)
    opsd_tests.test_sampled_token_with_teacher_logprobs(grpo, device=device, backend=backend)
    assert_slabs_ran(calls, 37, 16)
    assert {r for r, _ in calls} <= {4, 3, 2, 1}  # chunks of 4 student rows, never stacked


@pytest.mark.parametrize("loss_agg", ["token-mean", "none"])
@pytest.mark.parametrize("grpo", [False, True])
def test_sampled_token_with_teacher_logprobs_fp32(grpo, loss_agg, device, backend, slabs):
    """Float32, ``token_clip`` binding at some tokens, 3 slabs. (With ``mask="partial"`` the mean of
    D = lp_S - lp_T over the tokens nearly cancels, to -0.0019, below the float32 rounding of the
    log-probs relative to it, on the chunk schedule's Triton path too.)"""
    case = make_linear_case(device, teacher="logprobs", mask="seq", chunk_size=3)
    slabs(16)
    _, metrics = check(case, torch.float32, grpo=grpo, divergence="sampled_token", token_clip=0.2, loss_agg=loss_agg)
    assert 0 < float(metrics["token_clip_frac"]) < 1


@pytest.mark.parametrize("option", opsd_tests.OPTIONS, ids=[_id(o) for o in opsd_tests.OPTIONS])
def test_grpo_policy_options(option, device, backend, slabs):
    """Sequence-level terms (a pass of the student's slab statistics first) and the entropy term (its
    gradient slab by slab, the sampled token's included)."""
    calls = slabs(10)
    opsd_tests.test_grpo_policy_options(option, device=device, backend=backend)
    assert_slabs_ran(calls, 37, 10)


def test_sampled_token_entropy_term(device, backend, slabs):
    """The sampled token with ``entropy_coef``: its gradient needs more than ``p``, a sweep of its own."""
    case = make_linear_case(device, chunk_size=4, mask="seq", entropy_coef=0.05)
    slabs(16)
    check(case, torch.float32, grpo=True, divergence="sampled_token", alpha=0.7)


def test_aggregations(device, backend, slabs):
    """Every ``loss_agg`` (``test_opsd_linear.test_aggregations``: the divergences take turns)."""
    calls = slabs(16)
    for loss_agg in reference.LOSS_AGG_MODES:
        opsd_tests.test_aggregations(loss_agg, device=device, backend=backend)
    assert_slabs_ran(calls, 37, 16)


# Sweeps over the slabs per chunk (one matmul of the weight's slabs each): the statistics, the JSD's
# second sweep, the gradient (after the whole rows' statistics), as docs/linear-form.md counts them.
SWEEPS = {  # (scalar loss with its gradient, per-token forward, per-token backward)
    ("forward_kl", False): (2, 1, 1), ("reverse_kl", False): (2, 1, 1), ("jsd", False): (3, 2, 1),
    ("sampled_token", False): (1, 1, 1), ("sampled_token", True): (2, 1, 1),
}


@pytest.mark.parametrize("divergence, entropy", list(SWEEPS), ids=[f"{d}-entropy={e}" for d, e in SWEEPS])
def test_sweeps_per_chunk(divergence, entropy, device, slabs, monkeypatch):
    """One chunk of 10 rows, 3 slabs: the number of matmuls of each pass, and their rows (the teacher's
    stacked under the student's for the full-vocabulary divergences)."""
    monkeypatch.setattr(rows, "SKIP", False)
    case = make_linear_case(device, mask="none", ratio=None, chunk_size=10,
                            **(dict(entropy_coef=0.05) if entropy else {}))
    calls = slabs(16)
    # The gradient's sweep stacks the teacher's rows for the full-vocabulary divergences only.
    grad_rows = 10 if divergence == "sampled_token" else 20
    scalar, forward, backward = SWEEPS[divergence, entropy]
    hidden = case.hidden.detach().requires_grad_()
    opsd_tests.call(case, entropy, hidden, divergence=divergence).backward()
    sweeps = [20] * (scalar - (scalar > 1)) + [grad_rows] * (scalar > 1)
    assert [r for r, _ in calls] == [r for r in sweeps for _ in range(3)]
    calls.clear()
    loss = opsd_tests.call(case, entropy, hidden, divergence=divergence, loss_agg="none")
    assert [r for r, _ in calls] == [20] * (3 * forward)
    calls.clear()
    loss.sum().backward()
    assert [r for r, _ in calls] == [grad_rows] * (3 * backward)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("grpo", [False, True])
@pytest.mark.parametrize("loss_agg", ["token-mean", "none"])
@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
def test_same_values_as_chunk_schedule(divergence, beta, loss_agg, grpo, skip, device, backend, slabs, monkeypatch):
    """The two schedules give the same loss, metrics and gradients (to the float32 rounding of their
    sums), with and without work skipping; bf16 for the policy term."""
    dtype = torch.bfloat16 if grpo else torch.float32
    case = make_linear_case(device, dtype=dtype, layout="packed", chunk_size=4, temperature=0.8)
    monkeypatch.setattr(rows, "SKIP", skip)
    upstream = torch.randn(case.tokens.shape, device=device) if loss_agg == "none" else None
    tensors = (case.hidden, case.weight, case.bias)

    def fn(h, w, b):
        return opsd_tests.call(case, grpo, h, w, b, divergence=divergence, beta=beta, loss_agg=loss_agg,
                               return_metrics=True)

    calls = slabs(10)
    on_slabs = grads_of(fn, tensors, upstream)
    assert calls
    monkeypatch.setattr(linear, "SCHEDULE", "chunk")
    assert_same(on_slabs, grads_of(fn, tensors, upstream), dtype)


EDGE_CASES = ["test_fully_masked_and_empty_batches", "test_non_finite_hidden_states_are_reported",
              "test_student_and_teacher_layouts_differ", "test_tied_weights"]


@pytest.mark.parametrize("name", EDGE_CASES)
def test_opsd_linear_edge_cases_on_slabs(name, device, backend, slabs):
    calls = slabs(16)
    param = {"test_non_finite_hidden_states_are_reported": "which", "test_student_and_teacher_layouts_differ":
             "student_view"}.get(name, "grpo")
    values = ("student_hidden", "teacher_hidden") if param == "which" else (False, True)
    for value in values:
        getattr(opsd_tests, name)(device=device, backend=backend, **{param: value})
    assert calls or name == "test_fully_masked_and_empty_batches"


def test_no_grad_frozen_weight_and_backward_twice(device, backend, slabs):
    calls = slabs(16)
    opsd_tests.test_no_grad_frozen_weight_and_backward_twice(device=device, backend=backend)
    assert calls
