"""The fused RLSD policy loss over student and teacher logits.

One program streams a student row and its teacher row together (two online logsumexp states),
runs the shared epilogue on the token, and, when the loss reduces to a scalar, writes the student
logits' gradient right away, walking the row backwards so that the blocks read last, still in
cache, are read first. The backward then only scales that gradient by the incoming scalar: read S,
read T, write dS, three passes over ``[N, V]`` in all.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _cpu, _utils
from ._jit import (
    FLAG_BAD_TOKEN,
    FLAG_NONFINITE_STUDENT,
    FLAG_NONFINITE_TEACHER,
    LN2,
    finish_sum,
    is_finite,
    rlsd_epilogue,
    row_lse_exact,
    row_reference,
    softmax_grad_block,
)
from ._prepare import OUTPUTS, loss_metrics, prepare_loss_inputs
from ._tuning import TRIAL_ROWS, pick_choice, pick_row_config
from ._utils import as_rows, call_op, custom_op, raise_on_error_flags, same_rows, use_triton
from .logprobs import _bwd_inplace_op, _bwd_op, bwd_launcher, trial_destination


@triton.jit
def _rlsd_fwd_kernel(
    S, stride_sb, stride_st,
    T, stride_tb, stride_tt,
    dS, stride_db, stride_dt,
    tokens, adv, lp_t_in, lp_old_in, weight,
    loss_out, lp_s_out, lp_t_out, lse_out, d_lp_out, w_out, ratio_out, flags_out,
    n_rows, seqlen, V, scale2, inv_temp,
    log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip,
    HAS_T_LOGITS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DUAL: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_V)
    n_blocks = tl.cdiv(V, BLOCK_V)
    # int64 rows: offsets into [N, V] pass 2**31 at real sizes.
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        b = row // seqlen
        t = row - b * seqlen
        s_row = S + b * stride_sb + t * stride_st
        t_row = T + b * stride_tb + t * stride_tt
        wt = tl.load(weight + row)
        # A zero weight is a masked token: nothing of its rows is read, its gradient row is zero.
        active = wt != 0.0
        y = tl.load(tokens + row).to(tl.int64)
        y_ok = (y >= 0) & (y < V)
        y_safe = tl.where(y_ok, y, 0)

        read_end = tl.where(active, V, 0)
        # Per-lane sums against each row's first-block max (no reduction inside the loop), with
        # the next block loaded before this one is used, so loads stay in flight. The student row
        # is read again for the gradient: the cache is asked to keep it and drop the teacher's first.
        zs_next = tl.load(s_row + offs, mask=offs < read_end, other=float("-inf"), eviction_policy="evict_last")
        ref_s = row_reference(zs_next.to(tl.float32) * scale2)
        acc_s = tl.zeros([BLOCK_V], dtype=tl.float32)
        zt_next = zs_next
        ref_t = ref_s
        acc_t = acc_s
        if HAS_T_LOGITS:
            zt_next = tl.load(t_row + offs, mask=offs < read_end, other=float("-inf"), eviction_policy="evict_first")
            ref_t = row_reference(zt_next.to(tl.float32) * scale2)
        for i in tl.range(0, tl.where(active, n_blocks, 0)):
            zs = zs_next
            zt = zt_next
            cols = (i + 1) * BLOCK_V + offs
            zs_next = tl.load(s_row + cols, mask=cols < read_end, other=float("-inf"), eviction_policy="evict_last")
            if HAS_T_LOGITS:
                zt_next = tl.load(t_row + cols, mask=cols < read_end, other=float("-inf"),
                                  eviction_policy="evict_first")
            acc_s += tl.exp2(zs.to(tl.float32) * scale2 - ref_s)
            if HAS_T_LOGITS:
                acc_t += tl.exp2(zt.to(tl.float32) * scale2 - ref_t)
        lse2_s, _, ok = finish_sum(ref_s, acc_s)
        if active & ~ok:
            lse2_s, _, _ = row_lse_exact(s_row, V, scale2, BLOCK_V, False)
        zy_s = tl.load(s_row + y_safe, mask=active & y_ok, other=float("-inf")).to(tl.float32) * scale2
        lp_s = tl.minimum((zy_s - lse2_s) * LN2, 0.0)
        flags = tl.where(active & ~y_ok, FLAG_BAD_TOKEN, 0)
        flags |= tl.where(active & ~is_finite(lse2_s), FLAG_NONFINITE_STUDENT, 0)
        if HAS_T_LOGITS:
            lse2_t, _, ok = finish_sum(ref_t, acc_t)
            if active & ~ok:
                lse2_t, _, _ = row_lse_exact(t_row, V, scale2, BLOCK_V, False)
            zy_t = tl.load(t_row + y_safe, mask=active & y_ok, other=float("-inf")).to(tl.float32) * scale2
            lp_t = tl.minimum((zy_t - lse2_t) * LN2, 0.0)
            flags |= tl.where(active & ~is_finite(lse2_t), FLAG_NONFINITE_TEACHER, 0)
        else:
            lp_t = tl.load(lp_t_in + row)
        lp_old = lp_s
        if HAS_OLD:
            lp_old = tl.load(lp_old_in + row)
        a = tl.load(adv + row)

        loss, d_lp, w, ratio, clip_flags = rlsd_epilogue(
            lp_s, lp_t, lp_old, a, log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip, HAS_DUAL
        )
        tl.store(loss_out + row, tl.where(active, loss, 0.0))
        tl.store(lp_s_out + row, tl.where(active, lp_s, 0.0))
        tl.store(lp_t_out + row, tl.where(active, lp_t, 0.0))
        tl.store(lse_out + row, tl.where(active, lse2_s * LN2, 0.0))
        tl.store(d_lp_out + row, tl.where(active, d_lp, 0.0))
        tl.store(w_out + row, tl.where(active, w, 0.0))
        tl.store(ratio_out + row, tl.where(active, ratio, 0.0))
        tl.store(flags_out + row, flags | tl.where(active, clip_flags, 0))

        if WRITE_GRAD:
            d_row = dS + b * stride_db + t * stride_dt
            coef = tl.where(active, wt * d_lp, 0.0)
            lse2_ref = tl.where(active, lse2_s, 0.0)
            # Backwards over the row (its last blocks were read most recently), prefetching as above.
            cols = (n_blocks - 1) * BLOCK_V + offs
            zs_next = tl.load(s_row + cols, mask=cols < read_end, other=float("-inf"), eviction_policy="evict_first")
            for i in tl.range(0, n_blocks):
                cols = (n_blocks - 1 - i) * BLOCK_V + offs
                zs = zs_next
                prev = cols - BLOCK_V
                zs_next = tl.load(s_row + prev, mask=(prev >= 0) & (prev < read_end), other=float("-inf"),
                                  eviction_policy="evict_first")
                g = softmax_grad_block(zs.to(tl.float32) * scale2, lse2_ref, cols, y, coef, 0.0, 0.0, False)
                tl.store(d_row + cols, (g * inv_temp).to(dS.dtype.element_ty), mask=cols < V,
                         eviction_policy="evict_first")


@triton.jit
def _scale_kernel(X, stride_xb, stride_xt, scale, n_rows, seqlen, V, BLOCK_V: tl.constexpr):
    """``X *= scale`` over rows; returns at once when the scale is 1 (the loss is the terminal node)."""
    c = tl.load(scale).to(tl.float32)
    if c != 1.0:
        row = tl.program_id(0).to(tl.int64)
        b = row // seqlen
        x_row = X + b * stride_xb + (row - b * seqlen) * stride_xt
        for start in tl.range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(x_row + cols, mask=cols < V)
            tl.store(x_row + cols, (x.to(tl.float32) * c).to(X.dtype.element_ty), mask=cols < V)


def rlsd_fwd(student, teacher, inputs, params, grad):
    """Launcher. ``inputs`` are the flat per-token tensors and ``params`` the scalars of
    ``_prepare.LossInputs``; ``grad`` is None (no gradient), a tensor shaped like ``student`` (any
    float dtype) to write ``weight * dl/dz`` into, or ``student`` itself (in place).
    Returns ``(outputs, flags)``: a dict of ``OUTPUTS`` ``[N]`` float32 tensors and int32 flags.

    With a gradient to write, two strategies are timed once per problem and the faster is kept:
    ``fused`` writes it from the same program right after the row's statistics (three passes over
    ``[N, V]`` when the re-read student row is still in L2), ``split`` runs the forward without it
    and then the row backward kernel (four passes, every program lighter)."""
    s_rows = as_rows(student, "student_logits")
    t_rows = None if teacher is None else as_rows(teacher, "teacher_logits")
    if not use_triton(student):
        return _cpu.rlsd_fwd(s_rows, t_rows, inputs, params, grad)
    n, device = s_rows.n, student.device
    out = {k: _utils.empty((n,), dtype=torch.float32, device=device) for k in OUTPUTS}
    flags = _utils.empty((n,), dtype=torch.int32, device=device)
    hyper = (
        math.log1p(-params["eps_w"]), math.log1p(params["eps_w"]), params["lam"],
        params["clip_low"], params["clip_high"], params["dual_clip"] or 0.0,
    )
    temperature = params["temperature"]
    lp_t_in, lp_old_in, adv = inputs["lp_t"], inputs["lp_old"], inputs["adv"]

    def run(config, n_rows, dest=None, dest_strides=(0, 0)):
        _rlsd_fwd_kernel[config.grid(n_rows, device)](
            student, s_rows.stride_b, s_rows.stride_t,
            teacher if teacher is not None else student,
            *((t_rows.stride_b, t_rows.stride_t) if t_rows is not None else (0, 0)),
            dest if dest is not None else student, *dest_strides,
            inputs["tokens"], adv,
            lp_t_in if lp_t_in is not None else adv, lp_old_in if lp_old_in is not None else adv, inputs["weight"],
            *(out[k] for k in OUTPUTS), flags,
            n_rows, s_rows.seqlen, s_rows.vocab, 1.4426950408889634 / temperature, 1.0 / temperature,
            *hyper,
            HAS_T_LOGITS=teacher is not None, HAS_OLD=lp_old_in is not None,
            HAS_DUAL=params["dual_clip"] is not None, WRITE_GRAD=dest is not None,
            BLOCK_V=config.block_v, num_warps=config.num_warps,
        )

    trial_rows = min(n, TRIAL_ROWS)
    key = ("rlsd_fwd", student.dtype, None if teacher is None else teacher.dtype, lp_old_in is not None)
    itemsize = student.element_size()
    plain = pick_row_config(key + (False,), s_rows.vocab, device, lambda c: run(c, trial_rows), itemsize)
    if grad is None:
        run(plain, n)
        return out, flags

    trial_dest = trial_destination(grad, s_rows)
    fused = pick_row_config(key + (True,), s_rows.vocab, device, lambda c: run(c, trial_rows, *trial_dest()),
                            itemsize)
    coef = torch.empty_like(inputs["weight"])
    backward = bwd_launcher(s_rows, inputs["tokens"], out["lse"], coef, None, None, temperature)
    bwd_key = ("logprobs_bwd", student.dtype, grad.dtype, False)
    bwd_config = pick_row_config(bwd_key, s_rows.vocab, device, lambda c: backward(c, trial_rows, *trial_dest()),
                                 itemsize)

    def split(n_rows, dest, dest_strides):
        run(plain, n_rows)
        torch.mul(inputs["weight"], out["d_lp"], out=coef)
        backward(bwd_config, n_rows, dest, dest_strides)

    strategies = {"fused": lambda: run(fused, trial_rows, *trial_dest()),
                  "split": lambda: split(trial_rows, *trial_dest())}
    g_rows = as_rows(grad, "grad")
    if pick_choice(key + ("strategy",), device, strategies, default="fused") == "fused":
        run(fused, n, grad, (g_rows.stride_b, g_rows.stride_t))
    else:
        split(n, grad, (g_rows.stride_b, g_rows.stride_t))
    return out, flags


def scale_grad_(grad, scale):
    """``grad *= scale`` in place, skipped on the device when ``scale`` is 1 (no host sync)."""
    if not use_triton(grad):
        if not bool(scale == 1):
            grad.mul_(scale.to(grad.dtype))
        return
    rows = as_rows(grad, "grad")
    block = min(triton.next_power_of_2(rows.vocab), 4096)
    _scale_kernel[(rows.n,)](grad, rows.stride_b, rows.stride_t, scale, rows.n, rows.seqlen, rows.vocab, BLOCK_V=block)
def _forward(student, teacher, tokens, adv, lp_t, lp_old, weight,
             eps_w, lam, clip_low, clip_high, dual_clip, temperature, grad, validate):
    inputs = dict(tokens=tokens, adv=adv, lp_t=lp_t, lp_old=lp_old, weight=weight)
    params = dict(eps_w=eps_w, lam=lam, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                  temperature=temperature)
    out, flags = rlsd_fwd(student, teacher, inputs, params, grad)
    if validate:
        names = {"tokens": "tokens", "student": "student_logits", "teacher": "teacher_logits"}
        raise_on_error_flags(flags, tokens, student.shape[-1], names)
    return tuple(out[k] for k in OUTPUTS) + (flags,)


@custom_op("rlsd_kernels::rlsd_fwd", mutates_args=())
def _fwd_op(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, tokens: torch.Tensor,
    advantages: torch.Tensor, teacher_logprobs: torch.Tensor | None, old_logprobs: torch.Tensor | None,
    weight: torch.Tensor, eps_w: float, lam: float, clip_low: float, clip_high: float,
    dual_clip: float | None, temperature: float, write_grad: bool, validate: bool, pad_before: int, pad_after: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """``pad_before`` / ``pad_after``: the gradient is returned for ``base`` of which the logits are
    ``base[:, pad_before:-pad_after]``, with zero rows there (see ``_slice_of_base``)."""
    grad = dest = None
    if write_grad:
        grad = _utils.empty(_grad_shape(student_logits, pad_before, pad_after), dtype=student_logits.dtype,
                            device=student_logits.device)
        dest = grad if grad.dim() == 2 else grad[:, pad_before:pad_before + student_logits.shape[1]]
        if pad_before or pad_after:
            grad[:, :pad_before].zero_()
            grad[:, pad_before + student_logits.shape[1]:].zero_()
    outs = _forward(student_logits, teacher_logits, tokens, advantages, teacher_logprobs, old_logprobs, weight,
                    eps_w, lam, clip_low, clip_high, dual_clip, temperature, dest, validate)
    return outs + (grad if grad is not None else student_logits.new_empty(0),)


def _grad_shape(student_logits, pad_before, pad_after):
    if not (pad_before or pad_after):
        return student_logits.shape
    b, t, v = student_logits.shape
    return (b, pad_before + t + pad_after, v)


@_fwd_op.register_fake
def _(student_logits, teacher_logits, tokens, advantages, teacher_logprobs, old_logprobs, weight,
      eps_w, lam, clip_low, clip_high, dual_clip, temperature, write_grad, validate, pad_before, pad_after):
    n = tokens.numel()
    per_token = [student_logits.new_empty((n,), dtype=torch.float32) for _ in OUTPUTS]
    flags = student_logits.new_empty((n,), dtype=torch.int32)
    grad = student_logits.new_empty(_grad_shape(student_logits, pad_before, pad_after)) if write_grad else \
        student_logits.new_empty(0)
    return (*per_token, flags, grad)


@custom_op("rlsd_kernels::rlsd_fwd_inplace", mutates_args=("student_logits",))
def _fwd_inplace_op(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, tokens: torch.Tensor,
    advantages: torch.Tensor, teacher_logprobs: torch.Tensor | None, old_logprobs: torch.Tensor | None,
    weight: torch.Tensor, eps_w: float, lam: float, clip_low: float, clip_high: float,
    dual_clip: float | None, temperature: float, validate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    return _forward(student_logits, teacher_logits, tokens, advantages, teacher_logprobs, old_logprobs, weight,
                    eps_w, lam, clip_low, clip_high, dual_clip, temperature, student_logits, validate)


@_fwd_inplace_op.register_fake
def _(student_logits, teacher_logits, tokens, advantages, teacher_logprobs, old_logprobs, weight,
      eps_w, lam, clip_low, clip_high, dual_clip, temperature, validate):
    n = tokens.numel()
    per_token = [student_logits.new_empty((n,), dtype=torch.float32) for _ in OUTPUTS]
    return (*per_token, student_logits.new_empty((n,), dtype=torch.int32))


@custom_op("rlsd_kernels::scale_grad_", mutates_args=("grad",))
def _scale_op(grad: torch.Tensor, scale: torch.Tensor) -> None:
    scale_grad_(grad, scale)


@_scale_op.register_fake
def _(grad, scale):
    return None


class RLSDLossFunction(torch.autograd.Function):
    """Scalar RLSD loss with its student-logit gradient written in the forward pass.

    The differentiable input is the student logits, or the tensor ``base`` they are a
    ``base[:, start:start + length]`` slice of (then the gradient is ``base``-shaped and autograd
    skips the zero-filled copy a slice's backward would make)."""

    @staticmethod
    def forward(ctx, logits_or_base, start, length, teacher, tokens, adv, lp_t_in, lp_old_in, weight, eps_w, lam,
                clip_low, clip_high, dual_clip, temperature, write_grad, inplace, validate):
        student = logits_or_base if start is None else logits_or_base[:, start:start + length]
        pads = (0, 0) if start is None else (start, logits_or_base.shape[1] - start - length)
        args = (student, teacher, tokens, adv, lp_t_in, lp_old_in, weight, eps_w, lam, clip_low, clip_high,
                dual_clip, temperature)
        if write_grad and inplace:
            *outs, flags = call_op(_fwd_inplace_op, *args, validate)
            grad = logits_or_base
        else:
            *outs, flags, grad = call_op(_fwd_op, *args, write_grad, validate, *pads)
        loss = (weight * outs[0]).sum()
        per_token = dict(zip(OUTPUTS, outs, strict=True))
        # In place, ``grad`` is the student logits (or their base) themselves, saved after the kernel
        # wrote them; rows of the base outside the slice are zeroed in the backward.
        ctx.save_for_backward(grad.detach())
        ctx.pads = pads if inplace else (0, 0)
        ctx.used = False
        ctx.mark_non_differentiable(per_token["lp_s"], per_token["lp_t"], per_token["w"], per_token["ratio"], flags)
        return loss, per_token["lp_s"], per_token["lp_t"], per_token["w"], per_token["ratio"], flags

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.used:
            raise RuntimeError("rlsd_loss: the gradient was computed in the forward pass and is already used; "
                               "backward through it twice is not supported")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        before, after = ctx.pads
        if before or after:
            grad[:, :before].zero_()
            grad[:, grad.shape[1] - after:].zero_()
        call_op(_scale_op, grad, grad_loss.float().reshape(1))
        return (grad,) + (None,) * 17


class RLSDTokenLossFunction(torch.autograd.Function):
    """Per-token RLSD losses (``loss_agg="none"``); the backward streams the student rows again."""

    @staticmethod
    def forward(ctx, student, teacher, tokens, adv, lp_t_in, lp_old_in, weight, eps_w, lam, clip_low,
                clip_high, dual_clip, temperature, inplace, validate):
        *outs, flags, _ = call_op(
            _fwd_op, student, teacher, tokens, adv, lp_t_in, lp_old_in, weight, eps_w, lam, clip_low, clip_high,
            dual_clip, temperature, False, validate, 0, 0,
        )
        per_token = dict(zip(OUTPUTS, outs, strict=True))
        ctx.save_for_backward(student, tokens, weight, per_token["lse"], per_token["d_lp"])
        ctx.temperature = temperature
        ctx.inplace = inplace
        ctx.mark_non_differentiable(per_token["lp_s"], per_token["lp_t"], per_token["w"], per_token["ratio"], flags)
        loss = weight * per_token["loss"]
        return loss, per_token["lp_s"], per_token["lp_t"], per_token["w"], per_token["ratio"], flags

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        student, tokens, weight, lse, d_lp = ctx.saved_tensors
        coef = (grad_loss.float().reshape(-1) * weight * d_lp).contiguous()
        if ctx.inplace:
            call_op(_bwd_inplace_op, student, tokens, lse, coef, None, None, ctx.temperature)
            return (student,) + (None,) * 14
        grad = call_op(_bwd_op, student, tokens, lse, coef, None, None, ctx.temperature)
        return (grad,) + (None,) * 14


def _slice_of_base(x):
    """``(base, start)`` when ``x`` is ``base[:, start:start + T]`` of a contiguous ``[B, T', V]``
    tensor, as ``logits[:, :-1]`` is; else None. Eager only: under torch.compile the view is kept."""
    base = x._base
    if base is None or torch.compiler.is_compiling() or x.dim() != 3 or base.dim() != 3 or not base.is_contiguous():
        return None
    if x.stride() != base.stride() or x.shape[0] != base.shape[0] or x.shape[2] != base.shape[2]:
        return None
    offset = x.storage_offset() - base.storage_offset()
    start = offset // base.stride(1)
    if offset % base.stride(1) or start + x.shape[1] > base.shape[1] or not base.requires_grad:
        return None
    return base, start


def rlsd_loss(
    student_logits,
    teacher_logits,
    tokens,
    advantages,
    *,
    teacher_logprobs=None,
    old_logprobs=None,
    mask=None,
    eps_w=0.2,
    lam=1.0,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=3.0,
    temperature=1.0,
    loss_agg="token-mean",
    normalizer=None,
    inplace_backward=False,
    return_metrics=False,
    cu_seqlens=None,
    validate=True,
):
    """The RLSD policy loss, fused over the vocabulary: GRPO's direction, the teacher's magnitude.

    Per token, with ``lp`` the log-prob of the sampled token under ``softmax(z / temperature)``::

        w     = clip(exp(sign(A) * (lp_T - sg(lp_S))), 1 - eps_w, 1 + eps_w)
        A_hat = A * ((1 - lam) + lam * w)                              (detached, sign of A)
        rho   = exp(lp_S - lp_old)                                     (1 when old_logprobs is None)
        l     = -min(rho * A_hat, clip(rho, 1 - clip_low, 1 + clip_high) * A_hat)
        l     = min(l, -dual_clip * A_hat) where A_hat < 0             (dual clip; None disables it)

    then aggregated by ``loss_agg`` (see ``reference.aggregate_loss``). Only the student logits get
    a gradient. ``lam=0`` is plain GRPO/DAPO. Defaults are the official RLSD recipe.

    Args:
        student_logits: ``[B, T, V]`` (views such as ``logits[:, :-1]`` are read in place) or packed
            ``[N, V]``; float32, float16 or bfloat16.
        teacher_logits: same shape (any of those dtypes), the teacher scoring the same tokens; or
            ``None`` with ``teacher_logprobs`` ``[B, T]`` / ``[N]`` precomputed.
        tokens: ``[B, T]`` / ``[N]`` sampled ids; ``-100`` marks a masked token.
        advantages: ``[B]``, ``[B, 1]``, ``[B, T]`` or packed ``[N]``.
        old_logprobs: behaviour-policy log-probs ``[B, T]`` / ``[N]``; ``None`` is on-policy.
        mask: ``[B, T]`` / ``[N]``, bool or float (token weights).
        loss_agg: ``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum``,
            ``seq-mean-token-sum-norm``, ``sum`` or ``none`` (per-token losses).
        normalizer: replaces the mode's denominator (e.g. the global token count under gradient
            accumulation or data parallelism); a number or a one-element tensor.
        inplace_backward: write the student-logit gradient into the logits' storage (saves
            ``N * V`` elements; the logits must not be used after the backward).
        return_metrics: also return a dict of detached metrics (masked means and ``num_tokens``).
        cu_seqlens: ``[S + 1]`` sequence boundaries of packed tokens, for the ``seq-mean`` modes.
        validate: raise ``ValueError`` for token ids outside ``[0, V)`` at unmasked positions and for
            unmasked rows holding NaN or ``+inf`` (one device-to-host sync per call). With
            ``False`` such rows give non-finite values; use it where syncs are not allowed.

    Returns:
        The loss (a scalar, or per-token ``[B, T]`` / ``[N]`` for ``none``), or ``(loss, metrics)``.
    """
    s_rows = as_rows(student_logits, "student_logits")
    if (teacher_logits is None) == (teacher_logprobs is None):
        raise ValueError("give exactly one of teacher_logits and teacher_logprobs")
    if teacher_logits is not None:
        same_rows(s_rows, teacher_logits, "teacher_logits", "student_logits")
    prepared = prepare_loss_inputs(
        student_logits.shape[:-1], student_logits.device, tokens, advantages,
        teacher_logprobs=teacher_logprobs, old_logprobs=old_logprobs, mask=mask, eps_w=eps_w, lam=lam,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, temperature=temperature, loss_agg=loss_agg,
        normalizer=normalizer, cu_seqlens=cu_seqlens, validate=validate,
    )
    inputs, params, m, token_shape = prepared
    if s_rows.n == 0:
        loss = student_logits.float().sum() * 0.0
        loss = loss.expand(token_shape) if loss_agg == "none" else loss
        return (loss, loss_metrics(m, m, m, m, m.int(), m)) if return_metrics else loss
    if inplace_backward and torch.compiler.is_compiling():
        raise ValueError("inplace_backward=True is not supported under torch.compile")

    teacher = None if teacher_logits is None else teacher_logits.detach()
    args = (s_rows.tensor, teacher, inputs["tokens"], inputs["adv"], inputs["lp_t"], inputs["lp_old"],
            inputs["weight"], params["eps_w"], params["lam"], params["clip_low"], params["clip_high"],
            params["dual_clip"], params["temperature"])
    if loss_agg == "none":
        loss, lp_s, lp_t, w, ratio, flags = RLSDTokenLossFunction.apply(*args, inplace_backward, validate)
        loss = loss.view(token_shape)
    else:
        write_grad = student_logits.requires_grad and torch.is_grad_enabled()
        target, start, length = s_rows.tensor, None, None
        sliced = _slice_of_base(s_rows.tensor) if write_grad else None
        if sliced is not None:
            target, start = sliced
            length = s_rows.tensor.shape[1]
        loss, lp_s, lp_t, w, ratio, flags = RLSDLossFunction.apply(
            target, start, length, *args[1:], write_grad, inplace_backward, validate
        )
    if return_metrics:
        return loss, loss_metrics(lp_s, lp_t, w, ratio, flags, m)
    return loss
