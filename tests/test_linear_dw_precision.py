"""The precision of dW in the fused linear form against the float64 reference, as a function of the
number of chunks (``docs/linear-form.md``: precision of dW). In the weight's dtype (the default) the
running sum is rounded once per chunk and its error grows about as the square root of the chunk
count; in float32 (``DW_FP32_BYTES``) it is rounded once, whatever the count."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.forms import linear
from rlsd_kernels.launch import common

N, H, V = 1024, 64, 512
CHUNKS = (1, 4, 16, 64)
U = 2.0**-8  # the unit roundoff of bfloat16


def bound(chunks):
    """The documented bound of the relative (Frobenius) error of a bf16 dW summed over ``chunks`` chunks."""
    return U * (1 + math.sqrt(chunks) / 2)


@pytest.fixture
def errors(device, monkeypatch):
    """``errors(budget)``: dW's relative error against float64 at each count of ``CHUNKS``, with
    ``budget`` bytes for a float32 accumulator."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).bfloat16().to(device)
    weight = (torch.randn(V, H, generator=g) * 2 / math.sqrt(H)).bfloat16().to(device)
    tokens = torch.randint(0, V, (N,), generator=g).to(device)
    adv = torch.randn(N, generator=g).to(device)
    lp_t = (-3 * torch.rand(N, generator=g)).to(device)
    w64 = weight.double().requires_grad_()
    reference.rlsd_loss(hidden.double() @ w64.T, None, tokens, adv.double(), teacher_logprobs=lp_t.double()).backward()
    exact = w64.grad
    # The kernels under the interpreter would take minutes at these sizes: the PyTorch path on CPU.
    backend = (lambda: common.backend("torch")) if device.type == "cpu" else contextlib.nullcontext

    def measure(budget):
        monkeypatch.setitem(linear.DW_FP32_BYTES, device.type, budget)
        monkeypatch.setattr(linear, "DW_FP32_BYTES_OTHER", budget)
        out = []
        for chunks in CHUNKS:
            w = weight.clone().requires_grad_()
            with backend():
                rlsd_kernels.rlsd_linear_loss(hidden, w, tokens, adv, teacher_logprobs=lp_t,
                                              chunk_size=N // chunks).backward()
            assert w.grad.dtype == torch.bfloat16
            out.append(float((w.grad.double() - exact).norm() / exact.norm()))
        return out

    return measure


def test_dw_error_in_weight_dtype_grows_with_chunks_within_bound(errors):
    """Measured on CPU: 0.24% (1 chunk; dz in bf16 and the final rounding), 0.31%, 0.51%, 0.86% (64)."""
    errs = errors(0)
    for chunks, err in zip(CHUNKS, errs, strict=True):
        assert err <= bound(chunks), f"{chunks} chunks: relative error of dW {err:.2e} > {bound(chunks):.2e}"
    # One rounding per chunk: the error grows with the count (a float32 sum would not).
    assert errs[-1] > 2 * errs[0], errs


def test_dw_error_in_float32_does_not_grow(errors):
    """A float32 accumulator rounds once: every count errs as one chunk does."""
    errs = errors(4 * V * H)
    assert max(errs) <= bound(1)
    assert max(errs) <= 1.05 * errs[0], errs
    # Outside the budget the weight's dtype is used.
    assert errors(4 * V * H - 1)[-1] > 2 * errs[0]
