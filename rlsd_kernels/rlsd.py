"""The fused RLSD loss over student and teacher logits: launcher, custom ops, autograd, API.

The kernels are in ``_rlsd_kernels.py``. For a scalar loss the student logits' gradient is written
in the forward pass, so the backward only scales it by the incoming scalar (on the device, skipped
when it is 1). Per-token upstream gradients (``loss_agg="none"``) take a backward that streams the
student rows again.
"""

from __future__ import annotations

import torch
import triton

from . import _cpu, _utils
from ._prepare import (
    OUTPUTS,
    kernel_flags,
    kernel_scalars,
    needs_sequence_pass,
    output_metrics,
    pack,
    prepare_loss_inputs,
    sequence_terms,
    unpack,
)
from ._rlsd_kernels import _rlsd_fwd_kernel, _rlsd_token_kernel, _scale_kernel
from ._tuning import TRIAL_ROWS, pick_choice, pick_row_config
from ._utils import as_rows, call_op, custom_op, raise_on_error_flags, same_rows, use_triton
from .logprobs import _bwd_inplace_op, _bwd_op, bwd_launcher, logprobs_bwd, trial_destination

TOKEN_BLOCK = 1024


def _optional(inputs, key, fallback):
    return inputs[key] if inputs[key] is not None else fallback


def rlsd_fwd(student, teacher, inputs, params, grad):
    """Launcher. ``inputs`` are the flat per-token tensors and ``params`` the scalars of
    ``_prepare.LossInputs``; ``grad`` is None (no gradient), a tensor shaped like ``student`` (any
    float dtype) to write ``weight * dl/dz`` into, or ``student`` itself (in place).
    Returns ``(outputs, flags)``: a dict of ``OUTPUTS`` ``[N]`` float32 tensors and int32 flags.

    With a gradient to write, two strategies are timed once per problem and the faster is kept:
    ``fused`` writes it from the same program right after the row's statistics (three passes over
    ``[N, V]`` when the re-read student row is still in L2), ``split`` runs the forward without it
    and then the row backward kernel (four passes, every program lighter). Options that need every
    token of a sequence first (``needs_sequence_pass``) always split, with the token epilogue kernel
    in between."""
    s_rows = as_rows(student, "student_logits")
    t_rows = None if teacher is None else as_rows(teacher, "teacher_logits")
    if not use_triton(student):
        return _cpu.rlsd_fwd(s_rows, t_rows, inputs, params, grad)
    n, device = s_rows.n, student.device
    out = {k: _utils.empty((n,), dtype=torch.float32, device=device) for k in OUTPUTS}
    flags = _utils.empty((n,), dtype=torch.int32, device=device)
    temperature, scalars = params["temperature"], kernel_scalars(params)
    sequence_pass = needs_sequence_pass(inputs, params)
    row_flags = kernel_flags(inputs, params)
    entropy = bool(params["want_entropy"])
    adv = inputs["adv"]

    def run(config, n_rows, dest=None, dest_strides=(0, 0)):
        _rlsd_fwd_kernel[config.grid(n_rows, device)](
            student, s_rows.stride_b, s_rows.stride_t,
            teacher if teacher is not None else student,
            *((t_rows.stride_b, t_rows.stride_t) if t_rows is not None else (0, 0)),
            dest if dest is not None else student, *dest_strides,
            inputs["tokens"], adv, *(_optional(inputs, k, adv) for k in ("lp_t", "lp_old")), inputs["weight"],
            *(_optional(inputs, k, adv) for k in ("credit", "seq_ratio", "rollout", "log_is", "ref")),
            *(out[k] for k in OUTPUTS), flags,
            n_rows, s_rows.seqlen, s_rows.vocab, 1.4426950408889634 / temperature, 1.0 / temperature, *scalars,
            HAS_T_LOGITS=teacher is not None, ENTROPY=entropy, WRITE_GRAD=dest is not None, **row_flags,
            BLOCK_V=config.block_v, num_warps=config.num_warps,
        )

    trial_rows = min(n, TRIAL_ROWS)
    key = ("rlsd_fwd", student.dtype, None if teacher is None else teacher.dtype, tuple(row_flags.values()), entropy)
    itemsize = student.element_size()
    plain = pick_row_config(key + (False,), s_rows.vocab, device, lambda c: run(c, trial_rows), itemsize)
    if grad is None and not sequence_pass:
        run(plain, n)
        return out, flags
    if sequence_pass:
        run(plain, n)
        inputs = sequence_terms(out["lp_s"], inputs, params)
        rlsd_token_epilogue(out, flags, inputs, params)
        if grad is not None:
            _row_backward(student, inputs, params, out, grad)
        return out, flags

    trial_dest = trial_destination(grad, s_rows)
    fused = pick_row_config(key + (True,), s_rows.vocab, device, lambda c: run(c, trial_rows, *trial_dest()),
                            itemsize)
    coef = torch.empty_like(inputs["weight"])
    coef_h = torch.empty_like(inputs["weight"]) if params["entropy_coef"] != 0 else None
    backward = bwd_launcher(s_rows, inputs["tokens"], out["lse"], coef, coef_h, out["entropy"], temperature)
    bwd_key = ("logprobs_bwd", student.dtype, grad.dtype, coef_h is not None)
    bwd_config = pick_row_config(bwd_key, s_rows.vocab, device, lambda c: backward(c, trial_rows, *trial_dest()),
                                 itemsize)

    def split(n_rows, dest, dest_strides):
        run(plain, n_rows)
        _backward_coefficients(inputs, params, out, coef, coef_h)
        backward(bwd_config, n_rows, dest, dest_strides)

    strategies = {"fused": lambda: run(fused, trial_rows, *trial_dest()),
                  "split": lambda: split(trial_rows, *trial_dest())}
    g_rows = as_rows(grad, "grad")
    if pick_choice(key + ("strategy",), device, strategies, default="fused") == "fused":
        run(fused, n, grad, (g_rows.stride_b, g_rows.stride_t))
    else:
        split(n, grad, (g_rows.stride_b, g_rows.stride_t))
    return out, flags


def _backward_coefficients(inputs, params, out, coef, coef_h):
    """The row backward's coefficients: ``weight * dl/dlp`` and ``weight * dl/dH``."""
    torch.mul(inputs["weight"], out["d_lp"], out=coef)
    if coef_h is not None:
        torch.mul(inputs["weight"], -params["entropy_coef"], out=coef_h)


def _row_backward(student, inputs, params, out, grad):
    coef = torch.empty_like(inputs["weight"])
    coef_h = torch.empty_like(inputs["weight"]) if params["entropy_coef"] != 0 else None
    _backward_coefficients(inputs, params, out, coef, coef_h)
    logprobs_bwd(student, inputs["tokens"], out["lse"], coef, coef_h, out["entropy"], params["temperature"], out=grad)


def rlsd_token_epilogue(out, flags, inputs, params):
    """Reruns the epilogue over the tokens with everything in ``inputs`` known (sequence-level
    terms included), overwriting the loss, derivative, weight, ratio, importance weight, KL and clip
    flags in ``out`` and ``flags``; the log-probs and entropies stay. Tensors the Triton kernels
    do not take go to the PyTorch counterpart in ``_cpu``."""
    if not use_triton(flags):
        return _cpu.rlsd_token_epilogue(out, flags, inputs, params)
    n = flags.numel()
    adv = inputs["adv"]
    _rlsd_token_kernel[(triton.cdiv(n, TOKEN_BLOCK),)](
        out["lp_s"], out["lp_t"], out["entropy"], adv, _optional(inputs, "lp_old", adv), inputs["weight"],
        *(_optional(inputs, k, adv) for k in ("credit", "seq_ratio", "rollout", "log_is", "ref")),
        *(out[k] for k in ("loss", "d_lp", "w", "ratio", "is_weight", "kl")), flags,
        n, *kernel_scalars(params), **kernel_flags(inputs, params), BLOCK=TOKEN_BLOCK,
    )


def scale_grad_(grad, scale):
    """``grad *= scale`` in place, skipped on the device when ``scale`` is 1 (no host sync)."""
    if not use_triton(grad):
        if not bool(scale == 1):
            # In float32, then rounded once: a float16 2**16 (loss scaling) is inf, a bfloat16 1/3 biased.
            grad.mul_(scale.float())
        return
    rows = as_rows(grad, "grad")
    block = min(triton.next_power_of_2(rows.vocab), 4096)
    _scale_kernel[(rows.n,)](grad, rows.stride_b, rows.stride_t, scale, rows.n, rows.seqlen, rows.vocab, BLOCK_V=block)


def _forward(student, teacher, tensors, floats, ints, grad, validate):
    inputs, params = unpack(tensors, floats, ints)
    out, flags = rlsd_fwd(student, teacher, inputs, params, grad)
    if validate:
        names = {"tokens": "tokens", "student": "student_logits", "teacher": "teacher_logits"}
        raise_on_error_flags(flags, inputs["tokens"], student.shape[-1], names)
    return tuple(out[k] for k in OUTPUTS) + (flags,)


def _fake_outputs(student_logits, tensors):
    n = tensors[0].numel()
    return [student_logits.new_empty((n,), dtype=torch.float32) for _ in OUTPUTS] + [
        student_logits.new_empty((n,), dtype=torch.int32)
    ]


@custom_op("rlsd_kernels::rlsd_fwd", mutates_args=())
def _fwd_op(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, tensors: list[torch.Tensor | None],
    floats: list[float], ints: list[int], write_grad: bool, validate: bool, pad_before: int, pad_after: int,
) -> list[torch.Tensor]:
    """Per-token outputs, flags, and the gradient (empty unless ``write_grad``). With ``pad_before``
    / ``pad_after`` the gradient is for ``base``, of which the logits are ``base[:, pad_before:-pad_after]``,
    with zero rows there (see ``_slice_of_base``)."""
    grad = dest = None
    if write_grad:
        grad = _utils.empty(_grad_shape(student_logits, pad_before, pad_after), dtype=student_logits.dtype,
                            device=student_logits.device)
        dest = grad if grad.dim() == 2 else grad[:, pad_before:pad_before + student_logits.shape[1]]
        if pad_before or pad_after:
            grad[:, :pad_before].zero_()
            grad[:, pad_before + student_logits.shape[1]:].zero_()
    outs = _forward(student_logits, teacher_logits, tensors, floats, ints, dest, validate)
    return list(outs) + [grad if grad is not None else student_logits.new_empty(0)]


def _grad_shape(student_logits, pad_before, pad_after):
    if not (pad_before or pad_after):
        return student_logits.shape
    b, t, v = student_logits.shape
    return (b, pad_before + t + pad_after, v)


@_fwd_op.register_fake
def _(student_logits, teacher_logits, tensors, floats, ints, write_grad, validate, pad_before, pad_after):
    grad_shape = _grad_shape(student_logits, pad_before, pad_after) if write_grad else (0,)
    return _fake_outputs(student_logits, tensors) + [student_logits.new_empty(grad_shape)]


@custom_op("rlsd_kernels::rlsd_fwd_inplace", mutates_args=("student_logits",))
def _fwd_inplace_op(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, tensors: list[torch.Tensor | None],
    floats: list[float], ints: list[int], validate: bool,
) -> list[torch.Tensor]:
    return list(_forward(student_logits, teacher_logits, tensors, floats, ints, student_logits, validate))


@_fwd_inplace_op.register_fake
def _(student_logits, teacher_logits, tensors, floats, ints, validate):
    return _fake_outputs(student_logits, tensors)


@custom_op("rlsd_kernels::scale_grad_", mutates_args=("grad",))
def _scale_op(grad: torch.Tensor, scale: torch.Tensor) -> None:
    scale_grad_(grad, scale)


@_scale_op.register_fake
def _(grad, scale):
    return None


def _returned(ctx, outs):
    """The autograd outputs: the loss, then detached per-token outputs and the flags."""
    per_token = dict(zip(OUTPUTS + ("flags",), outs, strict=True))
    ctx.mark_non_differentiable(*(per_token[k] for k in OUTPUTS[1:]), per_token["flags"])
    return tuple(per_token[k] for k in OUTPUTS[1:]) + (per_token["flags"],)


class RLSDLossFunction(torch.autograd.Function):
    """Scalar RLSD loss with its student-logit gradient written in the forward pass.

    The differentiable input is the student logits, or the tensor ``base`` they are a
    ``base[:, start:start + length]`` slice of (then the gradient is ``base``-shaped and autograd
    skips the zero-filled copy a slice's backward would make)."""

    @staticmethod
    def forward(ctx, logits_or_base, start, length, teacher, tensors, floats, ints, write_grad, inplace, validate):
        student = logits_or_base if start is None else logits_or_base[:, start:start + length]
        pads = (0, 0) if start is None else (start, logits_or_base.shape[1] - start - length)
        if write_grad and inplace:
            outs = call_op(_fwd_inplace_op, student, teacher, tensors, floats, ints, validate)
            grad = logits_or_base
        else:
            *outs, grad = call_op(_fwd_op, student, teacher, tensors, floats, ints, write_grad, validate, *pads)
        weight = tensors[4]
        loss = (weight * outs[0]).sum()
        # In place, ``grad`` is the student logits (or their base) themselves, saved after the kernel
        # wrote them; rows of the base outside the slice are zeroed in the backward.
        ctx.save_for_backward(grad.detach())
        ctx.pads = pads if inplace else (0, 0)
        ctx.used = False
        return (loss,) + _returned(ctx, outs)

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
        return (grad,) + (None,) * 9


class RLSDTokenLossFunction(torch.autograd.Function):
    """Per-token RLSD losses (``loss_agg="none"``); the backward streams the student rows again."""

    @staticmethod
    def forward(ctx, student, teacher, tensors, floats, ints, inplace, validate):
        *outs, _ = call_op(_fwd_op, student, teacher, tensors, floats, ints, False, validate, 0, 0)
        per_token = dict(zip(OUTPUTS, outs[:-1], strict=True))
        weight, tokens = tensors[4], tensors[0]
        entropy_coef = floats[8]
        ctx.save_for_backward(student, tokens, weight, per_token["lse"], per_token["d_lp"], per_token["entropy"])
        ctx.temperature, ctx.inplace, ctx.entropy_coef = floats[9], inplace, entropy_coef
        return (weight * per_token["loss"],) + _returned(ctx, outs)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        student, tokens, weight, lse, d_lp, entropy = ctx.saved_tensors
        upstream = grad_loss.float().reshape(-1) * weight
        coef = (upstream * d_lp).contiguous()
        coef_h, h = None, None
        if ctx.entropy_coef != 0:
            coef_h, h = (upstream * -ctx.entropy_coef).contiguous(), entropy
        if ctx.inplace:
            call_op(_bwd_inplace_op, student, tokens, lse, coef, coef_h, h, ctx.temperature)
            return (student,) + (None,) * 6
        grad = call_op(_bwd_op, student, tokens, lse, coef, coef_h, h, ctx.temperature)
        return (grad,) + (None,) * 6


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
    surrogate="ppo",
    ratio_level="token",
    eps_w_low=None,
    eps_w_high=None,
    credit_base="current",
    credit_mask=None,
    credit_negative_only=False,
    rollout_logprobs=None,
    tis_level="token",
    tis_cap=2.0,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy_coef=0.0,
    cu_seqlens=None,
    validate=True,
    process_group=None,
):
    """The RLSD policy loss, fused over the vocabulary: GRPO's direction, the teacher's magnitude.

    Per token, with ``lp`` the log-prob of the sampled token under ``softmax(z / temperature)``::

        w     = clip(exp(sign(A) * (lp_T - sg(lp_S))), 1 - eps_w, 1 + eps_w)
        A_hat = A * ((1 - lam) + lam * w)                              (detached, sign of A)
        rho   = exp(lp_S - lp_old)                                     (1 when old_logprobs is None)
        l     = -min(rho * A_hat, clip(rho, 1 - clip_low, 1 + clip_high) * A_hat)
        l     = min(l, -dual_clip * A_hat) where A_hat < 0             (dual clip; None disables it)

    then aggregated by ``loss_agg`` (see ``reference.aggregate_loss``). Only the student logits get
    a gradient. ``lam=0`` is plain GRPO/DAPO. Defaults are the official RLSD recipe; every option is
    specified in ``reference.rlsd_token_terms``.

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
        surrogate: ``"ppo"`` (clipped, with the dual clip) or ``"cispo"`` (``-sg(clip(rho)) * A_hat *
            lp_S``: clipped tokens keep their gradient; the dual clip does not apply).
        ratio_level: ``"token"`` or ``"sequence"`` (GSPO-token: each token's ratio has the value
            ``exp(mean over its sequence of lp_S - lp_old)`` and the gradient of its own log-prob;
            GSPO's own clip range is tiny, e.g. ``clip_low=3e-4, clip_high=4e-4``).
        eps_w_low, eps_w_high: separate credit-weight clip range, ``[1 - eps_w_low, 1 + eps_w_high]``
            (each defaults to ``eps_w``).
        credit_base: ``"current"`` (``delta = lp_T - sg(lp_S)``, the official code) or ``"old"``
            (``lp_T - lp_old``).
        credit_mask: ``[B, T]`` / ``[N]`` bool: reweight only these tokens (e.g. the thought span);
            the others keep ``w = 1``. ``credit_negative_only``: reweight only tokens with ``A < 0``.
        rollout_logprobs: the rollout engine's log-probs; the policy term is multiplied by the
            truncated importance weight ``min(exp(lp_old - lp_rollout), tis_cap)`` (detached), per
            token or, with ``tis_level="sequence"``, with the sum of the sequence's log-ratios.
        ref_logprobs, kl_coef, kl_estimator: adds ``kl_coef * k(lp_ref - lp_S)`` with ``k1 = -d``,
            ``k2 = d^2 / 2`` or ``k3 = exp(d) - d - 1`` (``d`` clamped to [-20, 20]).
        entropy_coef: adds ``-entropy_coef * H`` with the exact entropy of each row (computed in the
            same pass) and its gradient. The entropy mean is in the metrics whenever they are asked for.
        cu_seqlens: ``[S + 1]`` sequence boundaries of packed tokens, for the sequence-level options.
        validate: raise ``ValueError`` for token ids outside ``[0, V)`` at unmasked positions and for
            unmasked rows holding NaN or ``+inf`` (one device-to-host sync per call). With
            ``False`` such rows give non-finite values; use it where syncs are not allowed.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded (tensor
            parallelism): the logits (student and teacher alike) are this rank's contiguous slice of
            the vocabulary, in group rank order, sizes may differ. One all-gather per forward, none
            in the backward; the loss and metrics are the same on every rank and the gradient is
            this rank's slice. See ``rlsd_kernels.distributed``.

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
        normalizer=normalizer, cu_seqlens=cu_seqlens, validate=validate, eps_w_low=eps_w_low, eps_w_high=eps_w_high,
        surrogate=surrogate, ratio_level=ratio_level, credit_base=credit_base, credit_mask=credit_mask,
        credit_negative_only=credit_negative_only, rollout_logprobs=rollout_logprobs, tis_level=tis_level,
        tis_cap=tis_cap, ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, want_entropy=return_metrics,
    )
    inputs, params, m, token_shape = prepared
    if s_rows.n == 0:
        loss = student_logits.float().sum() * 0.0
        loss = loss.expand(token_shape) if loss_agg == "none" else loss
        empty = {k: m for k in OUTPUTS}
        return (loss, output_metrics(empty, m.int(), m, inputs, params)) if return_metrics else loss
    if inplace_backward and torch.compiler.is_compiling():
        raise ValueError("inplace_backward=True is not supported under torch.compile")

    teacher = None if teacher_logits is None else teacher_logits.detach()
    if process_group is not None:
        from . import distributed

        return distributed.sharded_loss(
            distributed.LogitsShard(params["temperature"], teacher), (s_rows.tensor,), prepared, process_group,
            loss_agg=loss_agg, inplace=inplace_backward, return_metrics=return_metrics, validate=validate,
        )
    tensors, floats, ints = pack(inputs, params)
    if loss_agg == "none":
        loss, *per_token = RLSDTokenLossFunction.apply(s_rows.tensor, teacher, tensors, floats, ints,
                                                       inplace_backward, validate)
        loss = loss.view(token_shape)
    else:
        write_grad = student_logits.requires_grad and torch.is_grad_enabled()
        target, start, length = s_rows.tensor, None, None
        sliced = _slice_of_base(s_rows.tensor) if write_grad else None
        if sliced is not None:
            target, start = sliced
            length = s_rows.tensor.shape[1]
        loss, *per_token = RLSDLossFunction.apply(target, start, length, teacher, tensors, floats, ints, write_grad,
                                                  inplace_backward, validate)
    if return_metrics:
        outputs = dict(zip(OUTPUTS[1:], per_token[:-1], strict=True))
        return loss, output_metrics(outputs, per_token[-1], m, inputs, params)
    return loss
