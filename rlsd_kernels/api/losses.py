"""The losses from given logits: the RLSD policy loss, OPSD, and GRPO+OPSD."""

from __future__ import annotations

import sys

import torch

from ..forms.logits import is_temporary
from .compose import check_teacher, describe, logits_form, run_loss


def distill_tokens(tokens, divergence, token_shape, device):
    """``(tokens, advantages)`` of a distillation-only call: the full-vocabulary divergences take the
    ids only as a mask (zeros when None); the sampled-token surrogate needs them."""
    if tokens is None:
        if divergence == "sampled_token":
            raise ValueError("divergence='sampled_token' needs tokens (the sampled ids)")
        tokens = torch.zeros(token_shape, dtype=torch.int32, device=device)
    return tokens, torch.zeros(token_shape, dtype=torch.float32, device=device)


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
    sapo_tau_pos=1.0,
    sapo_tau_neg=1.05,
    ratio_level="token",
    eps_w_low=None,
    eps_w_high=None,
    credit_base="current",
    credit_mask=None,
    credit_negative_only=False,
    rollout_logprobs=None,
    is_weights=None,
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
    a gradient. ``lam=0`` is plain GRPO/DAPO. Defaults are the official RLSD recipe, except ``lam`` (1; the
    recipe passes ``lam_schedule(step)``); every option is specified in ``reference.rlsd_token_terms``.

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
            ``N * V`` elements; the logits must not be used after the call: a scalar loss writes the
            gradient in its forward, ``loss_agg="none"`` in its backward).
        return_metrics: also return a dict of detached metrics (masked means and ``num_tokens``).
        surrogate: ``"ppo"`` (clipped, with the dual clip), ``"cispo"`` (``-sg(clip(rho)) * A_hat *
            lp_S``: clipped tokens keep their gradient; the dual clip does not apply) or ``"sapo"``
            (``-(4 / k) * sigmoid(k * (rho - 1)) * A_hat``: a soft gate instead of the clip; no clip
            and no dual clip apply).
        sapo_tau_pos, sapo_tau_neg: SAPO's gate temperature ``k`` for tokens with ``A > 0`` and
            ``A <= 0`` (TRL's ``sapo_temperature_pos`` / ``_neg``); used only by ``"sapo"``.
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
        is_weights: precomputed, detached importance weights (``[B, T]``, ``[B]``, ``[B, 1]`` or
            ``[N]``, non-negative), e.g. a trainer's rollout correction (TRL's vLLM importance
            sampling, verl's ``rollout_is_weights``): each token's policy term is multiplied by its
            weight, as ``rollout_logprobs``' truncated weight would be (not the KL or entropy terms).
            Not together with ``rollout_logprobs``. A token of weight 0 still counts in the
            sequence-level ratios.
        ref_logprobs, kl_coef, kl_estimator: adds ``kl_coef * k(lp_ref - lp_S)`` with ``k1 = -d``,
            ``k2 = d^2 / 2`` or ``k3 = exp(d) - d - 1`` (``d`` clamped to [-20, 20]).
        entropy_coef: adds ``-entropy_coef * H`` with the exact entropy of each row (computed in the
            same pass) and its gradient. The entropy mean is in the metrics whenever they are asked for.
        cu_seqlens: ``[S + 1]`` sequence boundaries of packed tokens, for the sequence-level options.
        validate: raise ``ValueError`` for token ids outside ``[0, V)`` at unmasked positions and for
            unmasked rows holding NaN or ``+inf`` (one device-to-host sync per call). With
            ``False`` such rows give non-finite values; use it where syncs are not allowed.
            ``"deferred"`` (CUDA, opt-in) checks the same without blocking: the error bits are
            copied to the host in the background and the next deferred call (or
            ``rlsd_kernels.check_deferred()``) raises for the call that had them; by then the
            gradient of that call exists. Under torch.compile and with ``process_group`` it is
            ``True``.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded (tensor
            parallelism): the logits (student and teacher alike) are this rank's contiguous slice of
            the vocabulary, in group rank order, sizes may differ. One all-gather per forward, none
            in the backward; the loss and metrics are the same on every rank and the gradient is
            this rank's slice. See ``docs/vocab-parallel.md``.

    Returns:
        The loss (a scalar, or per-token ``[B, T]`` / ``[N]`` for ``none``), or ``(loss, metrics)``.
    """
    temporary = not torch.compiler.is_compiling() and is_temporary(sys.getrefcount(student_logits))
    form, tensors = logits_form(student_logits, teacher_logits, inplace=inplace_backward, temporary=temporary,
                                process_group=process_group, scalar=loss_agg != "none")
    no_teacher = check_teacher(teacher_logits, teacher_logprobs, None, "teacher_logits", lam)
    loss, call = describe(locals(), student_logits.shape[:-1], student_logits.device, tokens, advantages,
                          want_entropy=return_metrics, no_teacher=no_teacher)
    return run_loss(form, tensors, loss, call, return_metrics=return_metrics, validate=validate)


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
            See ``docs/vocab-parallel.md``.

    Returns:
        The loss (a scalar, or per-token ``[B, T]`` / ``[N]`` for ``none``), or ``(loss, metrics)``.
    """
    temporary = not torch.compiler.is_compiling() and is_temporary(sys.getrefcount(student_logits))
    form, tensors = logits_form(student_logits, teacher_logits, inplace=inplace_backward, temporary=temporary,
                                process_group=process_group, scalar=loss_agg != "none")
    token_shape, device = tuple(student_logits.shape[:-1]), student_logits.device
    distill = dict(divergence=divergence, beta=beta, token_clip=token_clip)
    keywords = dict(temperature=temperature, lam=0.0, dual_clip=None, mask=mask, normalizer=normalizer,
                    cu_seqlens=cu_seqlens, teacher_logprobs=teacher_logprobs, loss_agg=loss_agg, validate=validate)
    tokens, advantages = distill_tokens(tokens, divergence, token_shape, device)
    loss, call = describe(keywords, token_shape, device, tokens, advantages, distill=distill)
    check_teacher(teacher_logits, teacher_logprobs, loss, "teacher_logits")
    return run_loss(form, tensors, loss, call, return_metrics=return_metrics, validate=validate)


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
    sapo_tau_pos=1.0,
    sapo_tau_neg=1.05,
    ratio_level="token",
    eps_w_low=None,
    eps_w_high=None,
    credit_base="current",
    credit_mask=None,
    credit_negative_only=False,
    rollout_logprobs=None,
    is_weights=None,
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
    temporary = not torch.compiler.is_compiling() and is_temporary(sys.getrefcount(student_logits))
    form, tensors = logits_form(student_logits, teacher_logits, inplace=inplace_backward, temporary=temporary,
                                process_group=process_group, scalar=loss_agg != "none")
    distill = dict(divergence=divergence, beta=beta, token_clip=token_clip, alpha=alpha)
    loss, call = describe(locals(), student_logits.shape[:-1], student_logits.device, tokens, advantages,
                          distill=distill, grpo=True, want_entropy=return_metrics)
    check_teacher(teacher_logits, teacher_logprobs, loss, "teacher_logits")
    return run_loss(form, tensors, loss, call, return_metrics=return_metrics, validate=validate)
