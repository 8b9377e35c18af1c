"""On-policy self-distillation (OPSD) losses fused over the vocabulary, alone and added to the RLSD /
GRPO policy loss: custom ops, autograd, API.

The kernels are in ``_opsd_kernels.py``, their launchers in ``_opsd_launch.py``, the CPU path in
``_opsd_cpu.py``. As for ``rlsd_loss``, a
scalar loss gets its student-logit gradient written in the forward pass (the backward only scales
it), and per-token upstream gradients (``loss_agg="none"``) take a backward that streams the rows
again. Passes over ``[N, V]`` per divergence, fused: forward and reverse KL read S and T, then read
them again backwards (from L2 where it holds them) while writing dS; the JSD reads them three times
(the second sweep for ``log M``); the sampled-token surrogate re-reads S only.

With a ``process_group`` (vocabulary-sharded logits) the losses go through ``distributed``, which
runs the shard launchers of ``_opsd_launch`` (``partial_stats``: one sweep over both shards; ``jsd_sums``: the JSD's
second sweep) around its collectives, then the same row gradient (``opsd_bwd``), always split: the
KLs read S and T twice, the JSD three times, the sampled token S twice and T once.
"""

from __future__ import annotations

import math

import torch

from . import _utils
from ._opsd_cpu import (
    SAMPLED,
    grad_coefficients,
    output_names,
)
from ._opsd_launch import (
    divergence_code,
    opsd_bwd,
    opsd_fwd,
)
from ._prepare import (
    _check_range,
    output_metrics,
    pack,
    prepare_loss_inputs,
    unpack,
)
from ._utils import as_rows, call_op, custom_op, raise_on_error_flags, same_rows
from .logprobs import _bwd_inplace_op, _bwd_op
from .reference import OPSD_DIVERGENCES, opsd_metrics
from .rlsd import _grad_shape, _scale_op, _slice_of_base


def _opsd_scalars(opsd):
    """The OPSD options as the custom ops take them: three floats and two ints."""
    clip = float("nan") if opsd["token_clip"] is None else opsd["token_clip"]
    return [opsd["alpha"], opsd["beta"], clip], [opsd["div"], int(opsd["grpo"])]


def _opsd_options(floats, ints):
    alpha, beta, clip = floats[-3:]
    return dict(alpha=alpha, beta=beta, token_clip=None if math.isnan(clip) else clip, div=ints[-2],
                grpo=bool(ints[-1]))


def _pack(inputs, params, opsd):
    tensors, floats, ints = pack(inputs, params)
    more_floats, more_ints = _opsd_scalars(opsd)
    return tensors, floats + more_floats, ints + more_ints


def _unpack(tensors, floats, ints):
    inputs, params = unpack(tensors, floats[:-3], ints[:-2])
    return inputs, params, _opsd_options(floats, ints)


def _forward(student, teacher, tensors, floats, ints, grad, validate):
    inputs, params, opsd = _unpack(tensors, floats, ints)
    out, flags = opsd_fwd(student, teacher, inputs, params, opsd, grad)
    if validate:
        names = {"tokens": "tokens", "student": "student_logits", "teacher": "teacher_logits"}
        raise_on_error_flags(flags, inputs["tokens"], student.shape[-1], names)
    return [out[k] for k in output_names(opsd["grpo"])] + [flags]


def _fake_outputs(student_logits, tensors, ints):
    n = tensors[0].numel()
    return [student_logits.new_empty((n,), dtype=torch.float32) for _ in output_names(bool(ints[-1]))] + [
        student_logits.new_empty((n,), dtype=torch.int32)
    ]


@custom_op("rlsd_kernels::opsd_fwd", mutates_args=())
def _fwd_op(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, tensors: list[torch.Tensor | None],
    floats: list[float], ints: list[int], write_grad: bool, validate: bool, pad_before: int, pad_after: int,
) -> list[torch.Tensor]:
    """Per-token outputs, flags, and the gradient (empty unless ``write_grad``; for ``base`` when the
    logits are ``base[:, pad_before:-pad_after]``, as in ``rlsd._fwd_op``)."""
    grad = dest = None
    if write_grad:
        grad = _utils.empty(_grad_shape(student_logits, pad_before, pad_after), dtype=student_logits.dtype,
                            device=student_logits.device)
        dest = grad if grad.dim() == 2 else grad[:, pad_before:pad_before + student_logits.shape[1]]
        if pad_before or pad_after:
            grad[:, :pad_before].zero_()
            grad[:, pad_before + student_logits.shape[1]:].zero_()
    outs = _forward(student_logits, teacher_logits, tensors, floats, ints, dest, validate)
    return outs + [grad if grad is not None else student_logits.new_empty(0)]


@_fwd_op.register_fake
def _(student_logits, teacher_logits, tensors, floats, ints, write_grad, validate, pad_before, pad_after):
    grad_shape = _grad_shape(student_logits, pad_before, pad_after) if write_grad else (0,)
    return _fake_outputs(student_logits, tensors, ints) + [student_logits.new_empty(grad_shape)]


@custom_op("rlsd_kernels::opsd_fwd_inplace", mutates_args=("student_logits",))
def _fwd_inplace_op(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, tensors: list[torch.Tensor | None],
    floats: list[float], ints: list[int], validate: bool,
) -> list[torch.Tensor]:
    return _forward(student_logits, teacher_logits, tensors, floats, ints, student_logits, validate)


@_fwd_inplace_op.register_fake
def _(student_logits, teacher_logits, tensors, floats, ints, validate):
    return _fake_outputs(student_logits, tensors, ints)


@custom_op("rlsd_kernels::opsd_bwd", mutates_args=())
def _opsd_bwd_op(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor, stats: list[torch.Tensor],
    coefs: list[torch.Tensor | None], temperature: float, floats: list[float], ints: list[int],
) -> torch.Tensor:
    """The row gradient of the full-vocabulary divergences: ``stats`` are ``lse, lse_t, k, entropy``;
    ``floats`` and ``ints`` the OPSD options (``_opsd_scalars``)."""
    opsd = _opsd_options(floats, ints)
    stats = dict(zip(("lse", "lse_t", "k", "entropy"), stats, strict=True))
    return opsd_bwd(student_logits, teacher_logits, tokens, stats, coefs, temperature, opsd)


@_opsd_bwd_op.register_fake
def _(student_logits, teacher_logits, tokens, stats, coefs, temperature, floats, ints):
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


@custom_op("rlsd_kernels::opsd_bwd_", mutates_args=("student_logits",))
def _opsd_bwd_inplace_op(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor, stats: list[torch.Tensor],
    coefs: list[torch.Tensor | None], temperature: float, floats: list[float], ints: list[int],
) -> None:
    stats = dict(zip(("lse", "lse_t", "k", "entropy"), stats, strict=True))
    opsd_bwd(student_logits, teacher_logits, tokens, stats, coefs, temperature, _opsd_options(floats, ints),
             out=student_logits)


@_opsd_bwd_inplace_op.register_fake
def _(student_logits, teacher_logits, tokens, stats, coefs, temperature, floats, ints):
    return None


def _per_token_loss(per_token, opsd):
    """The per-token loss before aggregation: ``alpha * opsd`` (plus the policy term)."""
    distill = opsd["alpha"] * per_token["opsd"]
    return per_token["loss"] + distill if opsd["grpo"] else distill


class OPSDLossFunction(torch.autograd.Function):
    """Scalar OPSD (or GRPO+OPSD) loss with its student-logit gradient written in the forward pass;
    ``logits_or_base`` as in ``rlsd.RLSDLossFunction``. Returns the loss and the detached outputs."""

    @staticmethod
    def forward(ctx, logits_or_base, start, length, teacher, tensors, floats, ints, write_grad, inplace, validate):
        student = logits_or_base if start is None else logits_or_base[:, start:start + length]
        pads = (0, 0) if start is None else (start, logits_or_base.shape[1] - start - length)
        if write_grad and inplace:
            outs = call_op(_fwd_inplace_op, student, teacher, tensors, floats, ints, validate)
            grad = logits_or_base
        else:
            *outs, grad = call_op(_fwd_op, student, teacher, tensors, floats, ints, write_grad, validate, *pads)
        opsd = _opsd_options(floats, ints)
        per_token = dict(zip(output_names(opsd["grpo"]), outs[:-1], strict=True))
        loss = (tensors[4] * _per_token_loss(per_token, opsd)).sum()
        ctx.save_for_backward(grad.detach())
        ctx.pads = pads if inplace else (0, 0)
        ctx.used = False
        ctx.mark_non_differentiable(*outs)
        return (loss, *outs)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.used:
            raise RuntimeError("opsd_loss: the gradient was computed in the forward pass and is already used; "
                               "backward through it twice is not supported")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        before, after = ctx.pads
        if before or after:
            grad[:, :before].zero_()
            grad[:, grad.shape[1] - after:].zero_()
        call_op(_scale_op, grad, grad_loss.float().reshape(1))
        return (grad,) + (None,) * 9


class OPSDTokenLossFunction(torch.autograd.Function):
    """Per-token losses (``loss_agg="none"``); the backward streams the rows again."""

    @staticmethod
    def forward(ctx, student, teacher, tensors, floats, ints, inplace, validate):
        *outs, _ = call_op(_fwd_op, student, teacher, tensors, floats, ints, False, validate, 0, 0)
        opsd = _opsd_options(floats, ints)
        per_token = dict(zip(output_names(opsd["grpo"]), outs[:-1], strict=True))
        weight, tokens = tensors[4], tensors[0]
        stats = [per_token[k] for k in ("lse", "lse_t", "k", "d_div")]
        if opsd["grpo"]:
            stats += [per_token["d_lp"], per_token["entropy"]]
        ctx.save_for_backward(student, teacher, tokens, weight, *stats)
        ctx.temperature, ctx.entropy_coef, ctx.inplace = floats[9], floats[8], inplace
        ctx.opsd_floats, ctx.opsd_ints = floats[-3:], ints[-2:]
        ctx.mark_non_differentiable(*outs)
        return (weight * _per_token_loss(per_token, opsd), *outs)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        student, teacher, tokens, weight, *saved = ctx.saved_tensors
        opsd = _opsd_options(ctx.opsd_floats, ctx.opsd_ints)
        stats = dict(zip(("lse", "lse_t", "k", "d_div", "d_lp", "entropy"), saved, strict=False))
        c_lp, c_h, c_d = grad_coefficients(stats, grad_loss.float().reshape(-1) * weight, ctx.entropy_coef, opsd)
        entropy = stats.get("entropy") if c_h is not None else None
        if opsd["div"] == SAMPLED:
            args = (student, tokens, stats["lse"], c_lp, c_h, entropy, ctx.temperature)
            op, inplace_op = _bwd_op, _bwd_inplace_op
        else:
            row_stats = [stats["lse"], stats["lse_t"], stats["k"], entropy if entropy is not None else stats["lse"]]
            args = (student, teacher, tokens, row_stats, [c_lp, c_h, c_d], ctx.temperature, ctx.opsd_floats,
                    ctx.opsd_ints)
            op, inplace_op = _opsd_bwd_op, _opsd_bwd_inplace_op
        if ctx.inplace:
            call_op(inplace_op, *args)
            return (student,) + (None,) * 6
        return (call_op(op, *args),) + (None,) * 6


def _check_opsd_options(divergence, beta, token_clip, alpha):
    if divergence not in OPSD_DIVERGENCES:
        raise ValueError(f"divergence must be one of {OPSD_DIVERGENCES}, got {divergence!r}")
    _check_range("beta", beta, lambda v: 0 <= v <= 1, "in [0, 1]")
    _check_range("alpha", alpha, lambda v: 0 <= v < math.inf, "a finite number >= 0")
    if token_clip is not None:
        _check_range("token_clip", token_clip, lambda v: abs(v) < math.inf, "None or a finite number")


def _metrics(per_token, flags, m, inputs, params, opsd):
    clip = opsd["token_clip"]
    clipped = per_token["div"] > clip if clip is not None else torch.zeros_like(m, dtype=torch.bool)
    metrics = opsd_metrics(per_token["div"], clipped, m)
    if opsd["grpo"]:
        metrics = {**output_metrics(per_token, flags, m, inputs, params), **metrics}
    return metrics


def _loss(student_logits, teacher_logits, tokens, advantages, teacher_logprobs, opsd, options, *, loss_agg,
          inplace_backward, return_metrics, validate, process_group):
    """What ``opsd_loss`` and ``grpo_opsd_loss`` share: checks, preparation, the autograd call, metrics."""
    s_rows = as_rows(student_logits, "student_logits")
    sampled = opsd["div"] == SAMPLED
    if not sampled and (teacher_logits is None or teacher_logprobs is not None):
        raise ValueError("the full-vocabulary divergences need teacher_logits (teacher_logprobs is for "
                         "divergence='sampled_token' only)")
    if (teacher_logits is None) == (teacher_logprobs is None):
        raise ValueError("give exactly one of teacher_logits and teacher_logprobs")
    if teacher_logits is not None:
        same_rows(s_rows, teacher_logits, "teacher_logits", "student_logits")
    token_shape, device = tuple(student_logits.shape[:-1]), student_logits.device
    if tokens is None:
        if sampled:
            raise ValueError("divergence='sampled_token' needs tokens (the sampled ids)")
        tokens = torch.zeros(token_shape, dtype=torch.int32, device=device)
    if advantages is None:
        advantages = torch.zeros(token_shape, dtype=torch.float32, device=device)
    inputs, params, m, token_shape = prepare_loss_inputs(
        token_shape, device, tokens, advantages, teacher_logprobs=teacher_logprobs, loss_agg=loss_agg,
        validate=validate, want_entropy=opsd["grpo"] and return_metrics, **options,
    )
    if s_rows.n == 0:
        loss = student_logits.float().sum() * 0.0
        loss = loss.expand(token_shape) if loss_agg == "none" else loss
        if not return_metrics:
            return loss
        return loss, _metrics(dict.fromkeys(output_names(opsd["grpo"]), m), m.int(), m, inputs, params, opsd)
    if inplace_backward and torch.compiler.is_compiling():
        raise ValueError("inplace_backward=True is not supported under torch.compile")

    teacher = None if teacher_logits is None else teacher_logits.detach()
    if process_group is not None:
        from . import distributed

        loss, per_token, flags = distributed.sharded_opsd_loss(
            s_rows.tensor, teacher, (inputs, params, m, token_shape), opsd, process_group, loss_agg=loss_agg,
            inplace=inplace_backward, validate=validate)
        return (loss, _metrics(per_token, flags, m, inputs, params, opsd)) if return_metrics else loss
    tensors, floats, ints = _pack(inputs, params, opsd)
    if loss_agg == "none":
        loss, *outs = OPSDTokenLossFunction.apply(s_rows.tensor, teacher, tensors, floats, ints, inplace_backward,
                                                  validate)
        loss = loss.view(token_shape)
    else:
        write_grad = student_logits.requires_grad and torch.is_grad_enabled()
        target, start, length = s_rows.tensor, None, None
        sliced = _slice_of_base(s_rows.tensor) if write_grad else None
        if sliced is not None:
            target, start = sliced
            length = s_rows.tensor.shape[1]
        loss, *outs = OPSDLossFunction.apply(target, start, length, teacher, tensors, floats, ints, write_grad,
                                             inplace_backward, validate)
    if not return_metrics:
        return loss
    per_token = dict(zip(output_names(opsd["grpo"]), outs[:-1], strict=True))
    return loss, _metrics(per_token, outs[-1], m, inputs, params, opsd)


def opsd_loss(
    student_logits,
    teacher_logits,
    tokens=None,
    *,
    mask=None,
    divergence="jsd",
    beta=0.5,
    temperature=1.0,
    token_clip=None,
    loss_agg="token-mean",
    normalizer=None,
    cu_seqlens=None,
    teacher_logprobs=None,
    inplace_backward=False,
    return_metrics=False,
    validate=True,
    process_group=None,
):
    """On-policy self-distillation: the teacher's distribution as the student's target, per token.

    With ``S = softmax(z_S / temperature)``, ``T`` the same for the (detached) teacher::

        forward_kl   D = KL(T || S) = sum_v T_v (log T_v - log S_v)
        reverse_kl   D = KL(S || T)
        jsd          D = beta * KL(T || M) + (1 - beta) * KL(S || M),  M = beta * T + (1 - beta) * S
                     (log M by logsumexp; beta = 0 is the forward KL, beta = 1 the reverse KL)
        sampled_token   D = sg(lp_S - lp_T) of the sampled token, loss D * lp_S

    The per-token loss is ``min(D, token_clip)``: a token whose divergence exceeds ``token_clip``
    adds the constant and no gradient (the sampled-token surrogate: ``min(D, token_clip) * sg(lp_S)``).
    Losses are aggregated by ``loss_agg`` as in ``rlsd_loss``. The full-vocabulary divergences are
    computed in one program per row without a ``[N, V]`` intermediate: the forward and reverse KL in
    the sweep that finds the logsumexps, the JSD in a second one (``log M`` needs both); the gradient
    is written in the forward pass for a scalar loss. The specification is ``reference.opsd_loss``.

    Args:
        student_logits: ``[B, T, V]`` (views such as ``logits[:, :-1]`` are read in place) or packed
            ``[N, V]``; float32, float16 or bfloat16. ``-inf`` entries (padded vocabulary) are allowed
            where the teacher's are ``-inf`` too (elsewhere a KL is infinite).
        teacher_logits: same shape, any of those dtypes; gets no gradient. ``None`` with
            ``teacher_logprobs`` ``[B, T]`` / ``[N]`` for ``divergence="sampled_token"``.
        tokens: ``[B, T]`` / ``[N]`` sampled ids: needed by ``sampled_token``; otherwise optional,
            ``-100`` marking masked tokens (their ids are not used).
        mask: ``[B, T]`` / ``[N]``, bool or float (token weights).
        divergence: ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` or ``"sampled_token"``.
        beta: the JSD's mixture weight of the teacher, in ``[0, 1]`` (0.5 in the official repo).
        token_clip: ``None`` or a number: the per-token cap on ``D``.
        loss_agg, normalizer, cu_seqlens, inplace_backward, validate: as in ``rlsd_loss`` (token ids
            are validated only where they are used: ``sampled_token``).
        return_metrics: also return detached metrics: ``divergence_mean`` (of the unclipped ``D``),
            ``token_clip_frac`` (masked means) and ``num_tokens`` (multiply a mean by it to reduce
            across ranks).
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded (tensor
            parallelism): student and teacher logits are this rank's contiguous slice of it, in group
            rank order (sizes may differ). One all-gather per forward for the KLs and the sampled
            token, an all-gather and an all-reduce for the JSD, none in the backward; the loss and
            metrics are the same on every rank, the gradient is this rank's slice. Eager mode only.
            See ``rlsd_kernels.distributed``.

    Returns:
        The loss (a scalar, or per-token ``[B, T]`` / ``[N]`` for ``none``), or ``(loss, metrics)``.
    """
    _check_opsd_options(divergence, beta, token_clip, 1.0)
    opsd = dict(div=divergence_code(divergence, beta), beta=float(beta), alpha=1.0,
                token_clip=None if token_clip is None else float(token_clip), grpo=False)
    options = dict(old_logprobs=None, mask=mask, eps_w=0.2, lam=0.0, clip_low=0.2, clip_high=0.28, dual_clip=None,
                   temperature=temperature, normalizer=normalizer, cu_seqlens=cu_seqlens)
    return _loss(student_logits, teacher_logits, tokens, None, teacher_logprobs, opsd, options, loss_agg=loss_agg,
                 inplace_backward=inplace_backward, return_metrics=return_metrics, validate=validate,
                 process_group=process_group)


def grpo_opsd_loss(
    student_logits,
    teacher_logits,
    tokens,
    advantages,
    *,
    alpha=1.0,
    divergence="jsd",
    beta=0.5,
    token_clip=None,
    teacher_logprobs=None,
    old_logprobs=None,
    mask=None,
    eps_w=0.2,
    lam=0.0,
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
    """The policy loss plus OPSD, ``L = L_PG + alpha * L_OPSD``, both aggregated by ``loss_agg``, in one
    pass: each program streams the student and teacher rows, and from the same statistics computes
    the policy term (``rlsd_loss``'s, every keyword of which is taken here; ``lam = 0``, the default
    here, is GRPO/DAPO, ``lam > 0`` RLSD), the divergence (``opsd_loss``'s ``divergence``, ``beta``,
    ``token_clip``) and the gradient of the sum.

    ``teacher_logprobs`` replaces ``teacher_logits`` only with ``divergence="sampled_token"``. The
    metrics are ``rlsd_loss``'s and ``opsd_loss``'s together; the specification is
    ``reference.grpo_opsd_loss``. With ``process_group`` (vocabulary-sharded logits, as in
    ``opsd_loss``) the policy term's statistics travel in the divergence's one all-gather.
    """
    _check_opsd_options(divergence, beta, token_clip, alpha)
    opsd = dict(div=divergence_code(divergence, beta), beta=float(beta), alpha=float(alpha),
                token_clip=None if token_clip is None else float(token_clip), grpo=True)
    options = dict(
        old_logprobs=old_logprobs, mask=mask, eps_w=eps_w, lam=lam, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, temperature=temperature, normalizer=normalizer, cu_seqlens=cu_seqlens,
        eps_w_low=eps_w_low, eps_w_high=eps_w_high, surrogate=surrogate, ratio_level=ratio_level,
        credit_base=credit_base, credit_mask=credit_mask, credit_negative_only=credit_negative_only,
        rollout_logprobs=rollout_logprobs, tis_level=tis_level, tis_cap=tis_cap, ref_logprobs=ref_logprobs,
        kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
    )
    return _loss(student_logits, teacher_logits, tokens, advantages, teacher_logprobs, opsd, options,
                 loss_agg=loss_agg, inplace_backward=inplace_backward, return_metrics=return_metrics,
                 validate=validate, process_group=process_group)
