"""The one reference comparison: an op against ``rlsd_kernels.reference`` in float64 on the same
inputs, with a random upstream gradient: the loss (per token, or a scalar whose tolerance follows
the size of the terms it sums), every metric, and the gradient of every differentiable input."""

from __future__ import annotations

import torch
from tolerances import FP32, assert_close, assert_grad_close

from rlsd_kernels import reference


def random_upstream(ref_loss):
    """A random upstream gradient for per-token losses, 1.7 for a scalar (never just ``.sum()``)."""
    upstream = torch.randn(ref_loss.shape, dtype=torch.float64) if ref_loss.dim() else torch.tensor(1.7)
    return upstream.to(ref_loss.device)


def assert_sum_close(loss, expected, terms, loss_agg, *, normalizer=None, cu_seqlens=None):
    """A scalar loss aggregates per-token ``terms`` of both signs, which may cancel far below their
    size (seen: a token-mean of 0.0025 from terms of about 0.5, off by 2.3e-7). Where the logits come
    from a float32 matmul the error is relative to the terms: the absolute part of the tolerance
    scales with the same aggregation of ``|terms|``."""
    size = reference.aggregate_loss(terms.abs(), terms != 0, loss_agg, normalizer=normalizer, cu_seqlens=cu_seqlens)
    scale = max(float(size), float(expected.detach().abs()))
    torch.testing.assert_close(loss.detach().double().cpu(), expected.detach().double().cpu(), rtol=FP32["rtol"],
                               atol=FP32["atol"] * scale, msg=lambda m: f"loss: {m}")


def compare(run, run_reference, leaves, reference_leaves, dtype, *, upstream=None, terms=None, loss_agg=None,
            aggregation=None):
    """Runs ``run_reference()`` and ``run()`` (each ``(loss, metrics)``), backpropagates the same
    upstream through both, and compares the loss, the metrics (the same keys) and the gradient of
    each of ``leaves`` (name -> tensor or None) with ``reference_leaves``' (float64). With ``terms``
    (a function giving the reference's per-token losses) a scalar loss is held to ``assert_sum_close``
    under ``loss_agg`` and ``aggregation`` (its normalizer and cu_seqlens). Returns ``(loss, metrics)``."""
    ref_loss, ref_metrics = run_reference()
    upstream = random_upstream(ref_loss) if upstream is None else upstream.to(ref_loss.device)
    (ref_loss * upstream).sum().backward()
    loss, metrics = run()
    assert loss.dtype == torch.float32
    if loss.dim() or terms is None:
        assert_close(loss, ref_loss, what="loss", **FP32)
    else:
        assert_sum_close(loss, ref_loss, terms(), loss_agg, **(aggregation or {}))
    assert set(metrics) == set(ref_metrics)
    for key, value in ref_metrics.items():
        assert_close(metrics[key], value, what=f"metrics[{key}]", **FP32)
    (loss * upstream.to(loss.dtype)).sum().backward()
    for name, x in leaves.items():
        if x is not None:
            assert x.grad.dtype == dtype and x.grad.shape == x.shape, name
            assert_grad_close(x.grad, reference_leaves[name].grad, dtype, what=f"d{name}")
    return loss, metrics


def check_logits_canaries(case, inplace):
    """Nothing read or written outside the logits views (the in-place gradient stays inside)."""
    if not inplace:
        case.student.check_canaries("student logits")
    else:
        outside = case.student.buffer.detach()[~case.student.inside]
        assert torch.isnan(outside.float()).all(), "in-place gradient wrote outside the logits view"
    if case.teacher is not None:
        case.teacher.check_canaries("teacher logits")
