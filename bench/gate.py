"""The correctness gate: every provider against the float64 reference before anything is timed.

Run on a slice of a benchmark's own inputs (``inputs.head(...)``): the loss and every gradient of a
provider against ``rlsd_kernels.reference`` in float64 on the same values. Liger's GRPO rows are
held to the reference with lam = 0 and no dual clip, which is what they compute.
"""

from __future__ import annotations

import torch
from common import guarded
from providers import DTYPE_NAMES, Provider

from rlsd_kernels import reference

# The gate's limits: loss error relative to the token-mean |advantage| (the loss's own scale, which
# a near-zero loss would not be), gradient error as a relative norm.
LOSS_LIMIT = {True: 1e-4, False: 1e-2}
GRAD_LIMIT = {
    True: {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2},
    # Logits rounded to the input dtype (about 4e-3 relative in bf16) or CCE's backward, which skips
    # softmax entries below eps/32 of the dtype: both stay well inside these.
    False: {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2},
}
# rlsd_linear_loss computes float32 logits, but its gradients go through matmuls in the input dtype.
LINEAR_OURS_LOSS_LIMIT = 1e-3
LINEAR_OURS_GRAD_LIMIT = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def limits(p: Provider, dtype) -> tuple[float, float]:
    if p.form == "linear" and p.ours:
        return LINEAR_OURS_LOSS_LIMIT, LINEAR_OURS_GRAD_LIMIT[dtype]
    return LOSS_LIMIT[p.exact], GRAD_LIMIT[p.exact][dtype]


def reference_result(inp, target, backward):
    """The float64 reference loss and gradients (``grpo``: lam = 0 and no dual clip)."""
    kw = {"lam": 0.0, "dual_clip": None} if target == "grpo" else {}
    if inp.form == "logits":
        s = inp.student.detach().double().requires_grad_()
        loss = reference.rlsd_loss(s[:, :-1], inp.teacher[:, :-1].double(), inp.tokens, inp.adv.double(),
                                   old_logprobs=inp.old.double(), mask=inp.mask, **kw)
        wrt = [s]
    else:
        h = inp.hidden_states.detach().double().requires_grad_()
        w = inp.weight.detach().double().requires_grad_()
        teacher = inp.teacher_hidden.double() @ w.detach().T
        loss = reference.rlsd_loss(h @ w.T, teacher, inp.tokens, inp.adv_tok.double(),
                                   old_logprobs=inp.old.double(), mask=inp.mask, **kw)
        wrt = [h, w]
    grads = torch.autograd.grad(loss, wrt) if backward else ()
    return loss.detach(), [g.detach() for g in grads]


def _grad_error(got, want):
    if got.shape != want.shape and got.shape == want[:, :-1].shape:
        want = want[:, :-1]  # a provider that returns the gradient of the [B, T, V] rows only
    if got.shape != want.shape:
        return float("inf")
    return float((got.double() - want).norm() / want.norm().clamp(min=1e-30))


def gate(chosen: list[Provider], inp, modes, device) -> list[dict]:
    """Loss and every gradient of each provider against the float64 reference, on ``inp`` (a small slice).

    Returns one row per provider and mode with ``status``: ``ok``, ``FAILED``, ``unavailable: ...``,
    ``OOM`` or ``error: ...``.
    """
    rows, refs = [], {}
    scale = float((inp.adv_tok.abs() * inp.mask).sum() / inp.mask.sum())
    for p in chosen:
        for mode in [m for m in modes if m in p.modes]:
            backward = mode == "fwd_bwd"
            row = {"form": p.form, "mode": mode, "provider": p.name, "target": p.target, "n": inp.n,
                   "vocab": inp.vocab, "hidden": inp.hidden, "dtype": DTYPE_NAMES[inp.student.dtype]}
            if (p.target, backward) not in refs:
                refs[p.target, backward] = reference_result(inp, p.target, backward)
            ref_loss, ref_grads = refs[p.target, backward]
            run_inp = inp.clone() if p.clobbers else inp
            result, status = guarded(lambda p=p, x=run_inp, b=backward: p.make(x, b)(), device)
            if status == "ok":
                loss, grads = result
                loss_limit, grad_limit = limits(p, inp.student.dtype)
                loss_err = abs(float(loss.detach()) - float(ref_loss)) / max(scale, 1e-12)
                grad_err = max((_grad_error(g, r) for g, r in zip(grads, ref_grads, strict=True)), default=0.0)
                ok = loss_err <= loss_limit and grad_err <= grad_limit
                status = "ok" if ok else "FAILED"
                row.update(loss_err=loss_err, grad_err=grad_err if backward else None, loss_limit=loss_limit,
                           grad_limit=grad_limit if backward else None)
            row["status"] = status
            rows.append(row)
            del result
    return rows
