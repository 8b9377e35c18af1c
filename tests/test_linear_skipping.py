"""Work skipping in the fused linear form (``forms/rows.py``): masked rows are neither scored nor
differentiated, rows without a logit gradient take no part in dH and dW. Every result equals the
form's without skipping (``rows.SKIP = False``) and the float64 reference, and the skipped rows
really run no matmul."""

from __future__ import annotations

import pytest
import torch
from test_linear import check_against_reference, make_linear_case
from tolerances import FP32, GRAD, PAIR_GRAD, assert_close

import rlsd_kernels
from rlsd_kernels.forms import linear, rows
from rlsd_kernels.launch.tuning import RowConfig, force_row_config


def zero_advantages(case, share=0.4, seed=7):
    """About ``share`` of the tokens (whole sequences where advantages are per sequence) get A = 0."""
    g = torch.Generator(device=case.advantages.device).manual_seed(seed)
    keep = torch.rand(case.advantages.shape, generator=g, device=case.advantages.device) > share
    case.advantages = case.advantages * keep
    return case


@pytest.fixture
def count_rows(monkeypatch):
    """Counts the rows of every logits matmul and of every dH/dW product of the form."""
    counts = {"logits": 0, "grad": 0}
    real_logits, real_add = linear.logits_into, linear._Grads.add

    def logits_into(out, h, weight, bias):
        counts["logits"] += h.shape[0]
        return real_logits(out, h, weight, bias)

    def add(self, sl, dz, h, live, grads):
        counts["grad"] += grads
        return real_add(self, sl, dz, h, live, grads)

    monkeypatch.setattr(linear, "logits_into", logits_into)
    monkeypatch.setattr(linear._Grads, "add", add)
    return counts


def run(fn, skip, monkeypatch):
    monkeypatch.setattr(rows, "SKIP", skip)
    with force_row_config(RowConfig(16, 1)):
        return fn()


def grads_of(fn, tensors, upstream=None):
    """``(outputs, gradients)`` of ``fn(*leaves)`` under ``upstream`` (1 for a scalar)."""
    leaves = [None if x is None else x.detach().requires_grad_() for x in tensors]
    out = fn(*leaves)
    parts = [x for x in (out if isinstance(out, tuple) else (out,)) if isinstance(x, torch.Tensor)]
    sum((x if upstream is None else x * upstream).sum() for x in parts).backward()
    return out, [None if x is None else x.grad for x in leaves]


def assert_same(a, b, dtype):
    """Skipping changes nothing but the matmuls' shapes (the chunks hold other rows), and with them the
    float32 rounding of the logits and of the gradients' sums (on CPU a one-row matmul rounds unlike a
    wider one): dH (over the vocabulary) and dW and db (over the tokens) add terms of both signs, so
    two float32 results are within ``PAIR_GRAD`` of the largest value."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    outs_a = out_a if isinstance(out_a, tuple) else (out_a,)
    outs_b = out_b if isinstance(out_b, tuple) else (out_b,)
    for x, y in zip(outs_a, outs_b, strict=True):
        if isinstance(x, dict):
            for k in x:
                assert_close(x[k], y[k], what=f"metrics[{k}]", **FP32)
        else:
            assert_close(x, y, what="output", **FP32)
    for name, x, y in zip(("hidden", "weight", "bias"), grads_a, grads_b, strict=False):
        if y is not None:
            tol = PAIR_GRAD if dtype == torch.float32 else GRAD[dtype]
            assert_close(x, y, what=f"d{name}", **tol)


POLICY = [
    dict(layout="packed", chunk_size=4),
    dict(layout="view", chunk_size=3, teacher="logprobs"),
    dict(layout="contiguous", chunk_size=5, dtype=torch.bfloat16),
    dict(layout="packed", chunk_size=4, ratio_level="sequence", rollout=True, tis_level="sequence"),
    dict(layout="packed", chunk_size=4, ref=True, kl_coef=0.1),
    dict(layout="packed", chunk_size=4, entropy_coef=0.01),
    dict(layout="packed", chunk_size=4, surrogate="cispo", credit_mask=True, lam=0.5, temperature=0.7),
]


@pytest.mark.parametrize("axis", POLICY, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
@pytest.mark.parametrize("loss_agg", ["token-mean", "none"])
def test_policy_loss_with_skipping_matches(axis, loss_agg, device, backend, monkeypatch):
    """Against the reference with skipping (a scalar loss: the tolerance table's per-token upstream
    case is ``assert_same``'s), and against the form without it; for per-sequence options the packed
    layout's sequences come from ``cu_seqlens``."""
    case = zero_advantages(make_linear_case(device, mask="partial", **axis))
    extra = {"loss_agg": loss_agg}
    if case.tokens.dim() == 1 and axis.get("ratio_level") == "sequence":
        extra["cu_seqlens"] = torch.tensor([0, 4, 10], device=device)
    dtype = axis.get("dtype", torch.float32)
    monkeypatch.setattr(rows, "SKIP", True)
    if loss_agg != "none":
        check_against_reference(case, dtype, **extra)
    upstream = torch.randn(case.tokens.shape, device=device) if loss_agg == "none" else None

    def fn(h, w, b):
        return case.call(h, w, b, return_metrics=True, **extra)

    tensors = (case.hidden, case.weight, case.bias)
    assert_same(run(lambda: grads_of(fn, tensors, upstream), True, monkeypatch),
                run(lambda: grads_of(fn, tensors, upstream), False, monkeypatch), dtype)


def test_skipped_rows_run_no_matmul(device, count_rows, monkeypatch):
    """The forward scores only unmasked rows and differentiates only those with A != 0 (no KL, no
    entropy term); the per-token backward differentiates only rows with a gradient."""
    case = zero_advantages(make_linear_case(device, layout="packed", mask="partial", teacher="logprobs",
                                            chunk_size=3, batch=4, seqlen=6))
    live = case.kwargs["mask"] & (case.tokens != -100)
    with_grad = live & (case.advantages != 0)
    assert 0 < int(with_grad.sum()) < int(live.sum()) < case.tokens.numel()
    _, grads = run(lambda: grads_of(lambda h, w, b: case.call(h, w, b), (case.hidden, case.weight, case.bias)),
                   True, monkeypatch)
    assert count_rows == {"logits": int(live.sum()), "grad": int(with_grad.sum())}
    assert (grads[0][~with_grad] == 0).all() and (grads[0][with_grad] != 0).any(dim=-1).all()
    count_rows.update(logits=0, grad=0)
    run(lambda: grads_of(lambda h, w, b: case.call(h, w, b, loss_agg="none"), (case.hidden, case.weight, case.bias),
                         torch.randn(case.tokens.shape, device=device)), True, monkeypatch)
    # Forward over the live rows, backward recomputes the rows with a gradient.
    assert count_rows == {"logits": int(live.sum()) + int(with_grad.sum()), "grad": int(with_grad.sum())}
    count_rows.update(logits=0, grad=0)
    run(lambda: grads_of(lambda h, w, b: case.call(h, w, b), (case.hidden, case.weight, case.bias)), False, monkeypatch)
    assert count_rows == {"logits": case.tokens.numel(), "grad": case.tokens.numel()}


def test_all_advantages_zero(device, backend, monkeypatch):
    """No row has a gradient: every gradient is zero, and the loss and metrics are as without skipping."""
    case = make_linear_case(device, layout="packed", mask="partial", chunk_size=4)
    case.advantages = torch.zeros_like(case.advantages)
    tensors = (case.hidden, case.weight, case.bias)

    def fn(h, w, b):
        return case.call(h, w, b, return_metrics=True)

    skipped = run(lambda: grads_of(fn, tensors), True, monkeypatch)
    for g in skipped[1]:
        assert torch.equal(g, torch.zeros_like(g))
    assert_same(skipped, run(lambda: grads_of(fn, tensors), False, monkeypatch), torch.float32)


@pytest.mark.parametrize("divergence", ["jsd", "sampled_token"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "none"])
def test_opsd_linear_with_skipping_matches(divergence, loss_agg, device, backend, monkeypatch):
    """The OPSD losses have a gradient at any advantage: only masked rows are skipped."""
    case = zero_advantages(make_linear_case(device, layout="view", mask="partial", chunk_size=3))
    upstream = torch.randn(case.tokens.shape, device=device) if loss_agg == "none" else None
    extra = dict(mask=case.kwargs["mask"], loss_agg=loss_agg, chunk_size=3, return_metrics=True,
                 divergence=divergence)

    def opsd(h, w, b):
        return rlsd_kernels.opsd_linear_loss(h, w, case.tokens, teacher_hidden=case.teacher, bias=b, **extra)

    def grpo(h, w, b):
        return rlsd_kernels.grpo_opsd_linear_loss(h, w, case.tokens, case.advantages, teacher_hidden=case.teacher,
                                                  bias=b, old_logprobs=case.kwargs["old_logprobs"], alpha=0.5,
                                                  **extra)

    tensors = (case.hidden, case.weight, case.bias)
    for fn in (opsd, grpo):
        assert_same(run(lambda fn=fn: grads_of(fn, tensors, upstream), True, monkeypatch),
                    run(lambda fn=fn: grads_of(fn, tensors, upstream), False, monkeypatch), torch.float32)


@pytest.mark.parametrize("entropy", [False, True])
def test_token_logprobs_linear_with_skipping_matches(entropy, device, backend, monkeypatch):
    case = make_linear_case(device, layout="view", mask="none")
    tokens = case.tokens.clone()
    tokens[0, 1:3] = -100
    tokens[1, 0] = -100

    def fn(h, w, b):
        return rlsd_kernels.token_logprobs_linear(h, w, tokens, bias=b, temperature=0.7, return_entropy=entropy,
                                                  chunk_size=3)

    upstream = torch.randn(tokens.shape, device=device)
    tensors = (case.hidden, case.weight, case.bias)
    skipped = run(lambda: grads_of(fn, tensors, upstream), True, monkeypatch)
    assert_same(skipped, run(lambda: grads_of(fn, tensors, upstream), False, monkeypatch), torch.float32)
    assert (skipped[1][0][tokens == -100] == 0).all()
