"""The slab schedule of the fused linear form (``forms/slab.py``, opt-in through
``forms/linear.py: SCHEDULE``): the loss, the metrics and every gradient against the float64
reference, and against the chunk schedule; the slabs really run (one matmul per slab for both
models' rows), at several slab counts, with vocabularies that the slab size does not divide."""

from __future__ import annotations

import math

import pytest
import test_linear
import torch
from test_linear import BLOCK, check_against_reference, logits64, make_linear_case
from test_linear_skipping import assert_same, grads_of, zero_advantages
from tolerances import FP32, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.forms import linear, rows, slab
from rlsd_kernels.launch.tuning import RowConfig, force_row_config


@pytest.fixture
def slabs(monkeypatch):
    """Runs the slab schedule with ``size`` columns per slab; counts its matmuls (rows, columns)."""
    monkeypatch.setattr(linear, "SCHEDULE", "slab")
    calls = []
    real = slab.logits_into

    def counted(out, h, weight, bias):
        calls.append((h.shape[0], weight.shape[0]))
        return real(out, h, weight, bias)

    monkeypatch.setattr(slab, "logits_into", counted)

    def use(size):
        monkeypatch.setattr(slab, "SLAB_SIZE", size)
        calls.clear()
        return calls

    return use


def slab_widths(vocab, size):
    """The slabs' widths; ``size`` None: the budget's, one slab at the tests' vocabularies on the CPU."""
    size = vocab if size is None else size
    return [min(size, vocab - a) for a in range(0, vocab, size)]


# Slab sizes against the test vocabulary of 37: three slabs (the last of 5 columns), four (the last
# of 7: BLOCK-wide kernels then cross a slab edge inside a block), one, and one column per slab.
AXES = [
    dict(slab=16),
    dict(slab=10, dtype=torch.bfloat16),
    dict(slab=37, dtype=torch.float16),
    dict(slab=16, dtype=torch.bfloat16, layout="view", chunk_size=4, teacher="logprobs", mask="seq"),
    dict(slab=10, layout="packed", chunk_size=5, mask="float", temperature=0.7, lam=0.5),
    dict(slab=7, vocab=45, hidden_size=16, ratio=None, dual_clip=None, mask="none"),
    dict(slab=1, vocab=BLOCK + 1, bias=False, chunk_size=3),
    dict(slab=None, chunk_size=None),
]


def _id(axis):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in axis.items())


@pytest.mark.parametrize("axis", AXES, ids=[_id(a) for a in AXES])
def test_matches_reference(axis, device, backend, slabs):
    axis = dict(axis)
    size = axis.pop("slab")
    case = make_linear_case(device, **axis)
    calls = slabs(size)
    check_against_reference(case, axis.get("dtype", torch.float32))
    # One matmul per slab and chunk, of the student's and the teacher's rows stacked.
    vocab, mask = case.weight.shape[0], case.kwargs.get("mask")
    live = int((mask != 0).sum()) if mask is not None else case.tokens.numel()
    widths = slab_widths(vocab, size)
    assert [w for _, w in calls] == widths * (len(calls) // len(widths)) and calls
    # The masked rows are skipped on the CPU (rows.SKIP); the teacher's rows ride with the student's.
    stacked = 2 if case.teacher is not None else 1
    assert sum(r for r, _ in calls) == stacked * live * len(widths)


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
def test_aggregations(loss_agg, device, backend, slabs):
    """Every ``loss_agg``, with sequences of whole masked tokens and advantages of exactly 0."""
    case = zero_advantages(make_linear_case(device, layout="packed", mask="seq", chunk_size=7))
    slabs(16)
    check_against_reference(case, torch.float32, loss_agg=loss_agg,
                            cu_seqlens=torch.tensor([0, 5, 7, 10], device=device))


OPTIONS = [
    dict(ratio_level="sequence"),
    dict(rollout=True, tis_level="sequence", ratio=None),
    dict(entropy_coef=0.05),
    dict(ref=True, kl_coef=0.1, credit_mask=True),
    dict(surrogate="cispo", ratio_level="sequence", rollout=True, tis_level="sequence", ref=True, kl_coef=0.05,
         entropy_coef=0.02, credit_mask=True, credit_base="old", dtype=torch.bfloat16),
    dict(surrogate="sapo", temperature=0.7, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("option", OPTIONS, ids=[_id(o) for o in OPTIONS])
@pytest.mark.parametrize("loss_agg", ["token-mean", "none"])
def test_options_match_reference(option, loss_agg, device, backend, slabs):
    """Chunks of 3 rows across sequences of 5 tokens; the sequence-level terms take a pass of the
    student's log-probs first, the entropy term its gradient slab by slab."""
    case = zero_advantages(make_linear_case(device, chunk_size=3, **option))
    slabs(10)
    check_against_reference(case, option.get("dtype", torch.float32), loss_agg=loss_agg)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("case_axis", [dict(layout="packed", chunk_size=4),
                                       dict(layout="view", chunk_size=3, dtype=torch.bfloat16),
                                       dict(layout="packed", chunk_size=4, entropy_coef=0.01, ref=True, kl_coef=0.1)],
                         ids=["packed", "view-bf16", "entropy-kl"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "none"])
def test_same_values_as_chunk_schedule(case_axis, skip, loss_agg, device, backend, slabs, monkeypatch):
    """The two schedules give the same loss, metrics and gradients (to the float32 rounding of their
    sums, and the logit gradient's rounding to the weight's dtype), with and without work skipping."""
    case = zero_advantages(make_linear_case(device, mask="partial", **case_axis))
    monkeypatch.setattr(rows, "SKIP", skip)
    upstream = torch.randn(case.tokens.shape, device=device) if loss_agg == "none" else None
    tensors = (case.hidden, case.weight, case.bias)

    def fn(h, w, b):
        return case.call(h, w, b, loss_agg=loss_agg, return_metrics=True)

    slabs(16)
    on_slabs = grads_of(fn, tensors, upstream)
    monkeypatch.setattr(linear, "SCHEDULE", "chunk")
    assert_same(on_slabs, grads_of(fn, tensors, upstream), case_axis.get("dtype", torch.float32))


@pytest.mark.parametrize("teacher", ["hidden", "logprobs"])
def test_tied_weights(teacher, device, backend, slabs):
    """The weight is also the input embedding: autograd adds both gradients into ``weight.grad``."""
    slabs(16)
    test_linear.check_tied_weights(teacher, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
def test_token_logprobs_linear_backward(dtype, entropy, device, backend, slabs):
    """The log-probs' forward keeps the chunk schedule; their backward runs slab by slab."""
    case = make_linear_case(device, dtype=dtype, layout="view", vocab=BLOCK + 5)
    tokens = case.tokens.clone()
    tokens.view(-1)[::4] = -100
    h64, w64, b64 = case.leaves64()
    ref = reference.token_logprobs(logits64(h64, w64, b64), tokens, temperature=0.7, return_entropy=entropy)
    ref = ref if entropy else (ref,)
    upstream = [torch.randn_like(r) for r in ref]
    sum((r * u).sum() for r, u in zip(ref, upstream, strict=True)).backward()
    leaves = [x.detach().requires_grad_() for x in (case.hidden, case.weight, case.bias)]
    calls = slabs(8)
    with force_row_config(RowConfig(BLOCK, 1)):
        out = rlsd_kernels.token_logprobs_linear(*leaves[:2], tokens, bias=leaves[2], temperature=0.7,
                                                 return_entropy=entropy, chunk_size=4)
    out = out if entropy else (out,)
    sum((o * u.float()).sum() for o, u in zip(out, upstream, strict=True)).backward()
    assert [w for _, w in calls] == slab_widths(BLOCK + 5, 8) * (len(calls) // 3) and calls
    for name, o, r in zip(("lp", "entropy"), out, ref, strict=False):
        assert_close(o, r, what=name, **FP32)
    for name, x, r in zip(("hidden", "weight", "bias"), leaves, (h64, w64, b64), strict=True):
        assert_grad_close(x.grad, r.grad, dtype, what=f"d{name}")
    assert (leaves[0].grad[tokens == -100] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_logits(dtype, device, backend, slabs):
    """Logits spread over about ±60: a slab's values are its own softmax (in [0, 1]), never
    exponentials against a reference they may exceed by far more than float16's range."""
    case = make_linear_case(device, dtype=dtype, mask="none")
    case.weight = (case.weight.float() * 25).to(dtype)
    slabs(16)
    check_against_reference(case, dtype)


# The fused-linear tests of errors and edge cases, rerun on slabs (they take the schedule from the module).
EDGE_CASES = [
    ("test_fully_masked_batch", {}),
    ("test_empty_batch", {}),
    ("test_no_grad_frozen_weight_and_detached_inputs", {}),
    ("test_backward_twice_is_refused", {}),
    ("test_token_ids_out_of_range", {"bad_id": 37}),
    ("test_token_ids_out_of_range", {"bad_id": -1}),
    ("test_non_finite_hidden_states_are_reported", {"which": "student_hidden"}),
    ("test_non_finite_hidden_states_are_reported", {"which": "teacher_hidden"}),
    ("test_equals_rlsd_loss_on_materialised_logits", {}),
    ("test_sequence_options_on_packed_tokens", {}),
    ("test_normalizer", {}),
]


@pytest.mark.parametrize("name, kwargs", EDGE_CASES, ids=[n[5:] + "".join(f"-{v}" for v in k.values())
                                                          for n, k in EDGE_CASES])
def test_linear_edge_cases_on_slabs(name, kwargs, device, backend, slabs):
    calls = slabs(16)
    getattr(test_linear, name)(device=device, backend=backend, **kwargs)
    assert calls or name == "test_empty_batch"


def test_opsd_runs_on_slabs(device, slabs):
    """The OPSD losses run on slabs too (``forms/slab_opsd.py``; tested in ``test_linear_slab_opsd.py``):
    the statistics and the gradient sweep, each one matmul per slab of both models' rows."""
    case = make_linear_case(device, mask="partial")
    calls = slabs(16)
    h = case.hidden.detach().requires_grad_()
    rlsd_kernels.opsd_linear_loss(h, case.weight, case.tokens, teacher_hidden=case.teacher, chunk_size=3).backward()
    assert [w for _, w in calls] == slab_widths(37, 16) * (len(calls) // 3) and calls
    assert torch.isfinite(h.grad).all()


def test_schedule_argument(device):
    with pytest.raises(ValueError, match="schedule"):
        linear.LinearForm(4, schedule="slabs")
    device = torch.device(device)
    assert linear.schedule_for(torch.device("cuda")) == "chunk" and linear.schedule_for(torch.device("cpu")) == "chunk"
    assert linear.schedule_for(device, "slab") == "slab"


def test_sizes_from_the_budget():
    """384 rows and 14 slabs of 10,880 columns at the Qwen vocabulary in bf16 on a GPU, with the
    teacher's rows stacked; the slab buffer within 32 MiB; never more columns than the vocabulary."""
    cuda = torch.device("cuda")
    vocab = 151936
    rows_ = slab.default_chunk_size(vocab, cuda, torch.bfloat16)
    assert rows_ == 384
    cols = slab.slab_size(vocab, 2 * rows_, cuda)
    assert cols == 10880 and math.ceil(vocab / cols) == 14 and 4 * 2 * rows_ * cols <= 32 << 20
    assert slab.slab_size(100, 8, cuda) == 100 and slab.slab_size(100, 8, cuda, size=30) == 30


def test_policy_loss_takes_the_slab_chunk_size(monkeypatch):
    """Where the slab schedule is chosen, the linear losses without ``chunk_size`` take the slab
    schedule's default chunk (its buffers' budget less the slab buffer), the log-probs (whose forward
    keeps the chunk schedule) the chunk schedule's; a given ``chunk_size`` wins everywhere."""
    from rlsd_kernels.api import compose

    monkeypatch.setattr(slab, "CHUNK_BYTES_OTHER", 64 << 20)
    monkeypatch.setattr(slab, "SLAB_BYTES_OTHER", 8 << 20)
    weight, hidden = torch.randn(4096, 16, dtype=torch.bfloat16), torch.randn(2, 8, 16, dtype=torch.bfloat16)
    kw = dict(chunk_size=None, process_group=None, paired=False)
    chunk_default = linear.default_chunk_size(4096, hidden.device, weight.dtype)
    slab_default = slab.default_chunk_size(4096, hidden.device, weight.dtype)
    assert slab_default != chunk_default
    assert compose.linear_form(hidden, weight, None, None, loss=True, **kw)[0].chunk == chunk_default
    monkeypatch.setattr(linear, "SCHEDULE", "slab")
    assert compose.linear_form(hidden, weight, None, None, loss=True, **kw)[0].chunk == slab_default
    assert compose.linear_form(hidden, weight, None, None, **kw)[0].chunk == chunk_default
    kw["chunk_size"] = 128
    assert compose.linear_form(hidden, weight, None, None, loss=True, **kw)[0].chunk == 128


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_combined_entropy_of_an_invalid_row_stays_non_finite(bad):
    """``collectives.combine`` (slabs and vocabulary shards alike): a shard whose statistics are NaN
    (a NaN or +inf logit in it) makes the row's entropy NaN, never a finite mixture of the others."""
    from rlsd_kernels.forms.collectives import combine

    stats = torch.randn(3, 4, 5)  # [shards, (reference, log-sum, token log-prob, entropy), tokens]
    stats[:, 2] = float("-inf")
    stats[1, 2] = -1.0
    stats[2, 1, 3] = bad
    stats[2, 3, 3] = float("nan")
    _, _, lse_all, entropy, _ = combine(stats, torch.ones(5, dtype=torch.bool), 1.0)
    assert torch.isfinite(entropy[[0, 1, 2, 4]]).all()
    assert not torch.isfinite(entropy[3]) and not torch.isfinite(lse_all[3])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("schedule", ["chunk", "slab"])
def test_invalid_hidden_row_gives_non_finite_entropy(bad, schedule, device, backend, slabs, monkeypatch):
    """A NaN or +inf in one hidden row with ``validate=False``: the loss, and every metric that
    averages the row in, are non-finite on both schedules (the slab schedule's entropy was finite)."""
    if schedule == "slab":
        slabs(16)
    else:
        monkeypatch.setattr(linear, "SCHEDULE", "chunk")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 12, generator=g).to(device)
    w = (torch.randn(37, 12, generator=g) * 0.5).to(device)
    tokens = torch.randint(0, 37, (2, 5), generator=g).to(device)
    h[1, 2, 3] = bad
    with force_row_config(RowConfig(BLOCK, 1)):
        loss, m = rlsd_kernels.rlsd_linear_loss(h, w, tokens, torch.randn(2).to(device),
                                                teacher_hidden=torch.randn(2, 5, 12).to(device), validate=False,
                                                return_metrics=True, chunk_size=4, entropy_coef=0.1)
        _, entropy = rlsd_kernels.token_logprobs_linear(h, w, tokens, return_entropy=True, validate=False)
    assert not torch.isfinite(loss) and not torch.isfinite(m["entropy_mean"])
    assert not torch.isfinite(entropy[1, 2]) and torch.isfinite(entropy[0]).all()
