"""Plain PyTorch specification of every public op.

Everything here is written for clarity, not speed: full ``[N, V]`` log-softmax tensors, autograd for
every gradient, and float64 whenever the inputs are float64 (anything narrower is computed in
float32). The fused kernels are tested against these functions, forward and every gradient; the
Triton epilogue in ``kernels/common.py`` mirrors :func:`rlsd_token_terms` line by line.

Notation, per response token (see the README for the algorithm)::

    lse   = logsumexp(z / tau)                 lp = min(z[y] / tau - lse, 0)
    H     = lse - sum_v softmax(z / tau)_v * z_v / tau                      (entropy)
    delta = lp_T - sg(lp_S)                    (teacher minus detached student log-prob)
    w     = exp(clamp(sign(A) * delta, log(1 - eps_w), log(1 + eps_w)))    (credit weight)
    c     = (1 - lam) + lam * w                A_hat = A * c              (detached)
    rho   = exp(clamp(lp_S - lp_old, -20, 20)) (lp_old = sg(lp_S) when not given: rho = 1)
    l     = -min(rho * A_hat, clip(rho, 1 - clip_low, 1 + clip_high) * A_hat)
    l     = min(l, -dual_clip * A_hat)  where A_hat < 0 and dual_clip is set

A token id of ``IGNORE_INDEX`` (-100) marks a masked token, as trainers' label tensors do. Masked
tokens get exactly zero loss and zero gradient.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "sum",
    "none",
)
RATIO_LOG_CLAMP = 20.0
SURROGATES = ("ppo", "cispo", "sapo")
KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")
CREDIT_BASES = ("current", "old")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a - b`` for log-probs, where two impossible tokens ((-inf) - (-inf), else NaN) differ by 0.

    NaN inputs stay NaN: only the validation check may turn them into an error.
    """
    both_impossible = (a == float("-inf")) & (b == float("-inf"))
    return torch.where(both_impossible, torch.zeros_like(a), a - b)


def token_logprobs(logits, tokens, *, temperature=1.0, return_entropy=False):
    """Log-probability of each token, and optionally the entropy of each row.

    ``lp = min(z[y] / tau - logsumexp(z / tau), 0)``, ``H = -sum_v p_v log p_v`` with
    ``p = softmax(z / tau)``. Rows whose token is ``IGNORE_INDEX`` give ``lp = 0`` and ``H = 0``.
    Shapes: logits ``[..., V]``, tokens ``[...]``; returns ``[...]`` in float32 (float64 for
    float64 logits).
    """
    z = logits.to(_compute_dtype(logits)) / temperature
    ignored = tokens == IGNORE_INDEX
    safe_tokens = tokens.masked_fill(ignored, 0).long()
    lse = torch.logsumexp(z, dim=-1)
    target = z.gather(-1, safe_tokens.unsqueeze(-1)).squeeze(-1)
    lp = (target - lse).clamp(max=0.0).masked_fill(ignored, 0.0)
    if not return_entropy:
        return lp
    p = torch.softmax(z, dim=-1)
    # p * log p is 0 where p is 0 (a -inf logit), never 0 * -inf.
    log_p = torch.where(p > 0, z - lse.unsqueeze(-1), torch.zeros_like(z))
    entropy = -(p * log_p).sum(-1)
    return lp, entropy.masked_fill(ignored, 0.0)


def rlsd_token_terms(
    lp_student,
    lp_teacher,
    advantages,
    *,
    lp_old=None,
    eps_w=0.2,
    eps_w_low=None,
    eps_w_high=None,
    lam=1.0,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=3.0,
    surrogate="ppo",
    sapo_tau_pos=1.0,
    sapo_tau_neg=1.05,
    credit_base="current",
    credit_on=None,
    log_seq_ratio=None,
    lp_rollout=None,
    log_seq_is=None,
    tis_cap=2.0,
    lp_ref=None,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy=None,
    entropy_coef=0.0,
):
    """The per-token RLSD loss and what a trainer logs about it.

    All inputs have one shape; ``lp_student`` (and ``entropy``) carry the gradient, everything else
    is detached. ``lp_old=None`` is on-policy (``lp_old = sg(lp_S)``)::

        delta = lp_T - sg(lp_S)              (credit_base "current"; "old": lp_T - lp_old)
        w     = exp(clamp(sign(A) * delta, log(1 - eps_w_low), log(1 + eps_w_high)))
                where credit_on (default everywhere), else 1        (eps_w_low/high default eps_w)
        A_hat = A * ((1 - lam) + lam * w)
        log r = lp_S - lp_old                (token level), or
              = log_seq_ratio + lp_S - sg(lp_S)   (sequence level, GSPO-token: the value is the
                                              sequence's, the gradient the token's own)
        rho   = exp(clamp(log r, -20, 20))
        l_pg  = -min(rho * A_hat, clip(rho, 1 - clip_low, 1 + clip_high) * A_hat)   (ppo), then
                min(l_pg, -dual_clip * A_hat) where A_hat < 0 (dual clip, ppo only)
              = -sg(clip(rho, 1 - clip_low, 1 + clip_high)) * A_hat * lp_S          (cispo)
              = -(4 / k) * sigmoid(k * (rho - 1)) * A_hat, k = sapo_tau_pos where A > 0,
                sapo_tau_neg elsewhere                   (sapo: a soft gate instead of the clip)
        is    = min(exp(sg(lp_old) - lp_rollout), tis_cap), or min(exp(log_seq_is), tis_cap)
                with the sequence's sum of those log-ratios (truncated importance sampling)
        d     = clamp(lp_ref - lp_S, -20, 20);  k1 = -d,  k2 = d^2 / 2,  k3 = exp(d) - d - 1
        loss  = is * l_pg + kl_coef * k - entropy_coef * H

    Returns a dict of tensors of that shape: ``loss`` (differentiable); ``d_loss``, its derivative by
    ``lp_student`` in closed form (what the kernels compute; the tests hold it equal to autograd's)
    and ``d_entropy`` (by ``entropy``: ``-entropy_coef``); the detached ``delta``, ``weight`` (w),
    ``ratio`` (rho), ``is_weight`` and ``kl`` (k); and the booleans ``weight_clip_low`` /
    ``weight_clip_high`` (w was clipped), ``ppo_clip_low`` / ``ppo_clip_high`` (the clip binds:
    the clipped branch was taken for A_hat < 0 / > 0 with ppo; rho outside the range with cispo) and
    ``dual_clip``. In closed form, with ``in_range`` for |log r| <= 20 and lp_S > -inf::

        d l_pg = -A_hat * rho            (ppo, unclipped branch taken, in_range, dual clip not bound)
               = -clip(rho) * A_hat      (cispo)
               = -4 * s * (1 - s) * rho * A_hat, s = sigmoid(k * (rho - 1))   (sapo, in_range)
               = 0                       elsewhere
        d k    = 1, -d, 1 - exp(d)       (k1, k2, k3; 0 where lp_ref - lp_S is outside [-20, 20])
        d_loss = is * d l_pg + kl_coef * d k
    """
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    lp_s = lp_student.detach()
    old = lp_s if lp_old is None else lp_old
    delta = _log_diff(lp_teacher, old if credit_base == "old" else lp_s)
    sign = torch.sign(advantages)
    # sign(0) = 0 gives w = 1 whatever delta is: an infinite delta (a -inf teacher or student log-prob)
    # is made the largest finite value first, never 0 * (+-inf) = NaN at A = 0, the commonest
    # advantage; the clip below gives the same w and clip flags as the infinite one. NaN stays NaN.
    big = torch.finfo(delta.dtype).max
    x = sign * delta.clamp(-big, big)
    log_lo = math.log1p(-(eps_w if eps_w_low is None else eps_w_low))
    log_hi = math.log1p(eps_w if eps_w_high is None else eps_w_high)
    weight = torch.exp(x.clamp(log_lo, log_hi))
    nonzero = sign != 0
    if credit_on is not None:
        weight = torch.where(credit_on.bool(), weight, 1.0)
        nonzero = nonzero & credit_on.bool()
    credit = (1.0 - lam) + lam * weight
    a_hat = advantages * credit

    if log_seq_ratio is None:
        log_ratio = _log_diff(lp_student, old)
    else:
        log_ratio = log_seq_ratio + _log_diff(lp_student, lp_s)
    ratio = torch.exp(log_ratio.clamp(-RATIO_LOG_CLAMP, RATIO_LOG_CLAMP))
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    in_range = (log_ratio >= -RATIO_LOG_CLAMP) & (log_ratio <= RATIO_LOG_CLAMP) & (lp_s > float("-inf"))
    dual = torch.zeros_like(nonzero)
    if surrogate == "ppo":
        surrogate_value = ratio * a_hat
        clipped_surrogate = clipped_ratio * a_hat
        unclipped = surrogate_value <= clipped_surrogate
        loss_pg = -torch.where(unclipped, surrogate_value, clipped_surrogate)
        d_pg = torch.where(unclipped & in_range, -a_hat * ratio, torch.zeros_like(a_hat)).detach()
        clip_low_hit, clip_high_hit = ~unclipped & (a_hat < 0), ~unclipped & (a_hat > 0)
        if dual_clip is not None:
            bound = -dual_clip * a_hat
            dual = (a_hat < 0) & (loss_pg > bound)
            loss_pg = torch.where(dual, bound, loss_pg)
            d_pg = torch.where(dual, torch.zeros_like(d_pg), d_pg)
    elif surrogate == "sapo":
        k = torch.where(advantages > 0, torch.full_like(ratio, sapo_tau_pos), torch.full_like(ratio, sapo_tau_neg))
        gate = torch.sigmoid(k * (ratio - 1.0))
        loss_pg = -(4.0 / k) * gate * a_hat
        d_pg = torch.where(in_range, -4.0 * gate * (1.0 - gate) * ratio * a_hat, torch.zeros_like(a_hat)).detach()
        # A soft gate: no clip binds.
        clip_low_hit = clip_high_hit = torch.zeros_like(nonzero)
    else:
        factor = clipped_ratio.detach() * a_hat
        loss_pg = -factor * torch.where(lp_s > float("-inf"), lp_student, torch.zeros_like(lp_s))
        d_pg = torch.where(lp_s > float("-inf"), -factor, torch.zeros_like(factor)).detach()
        clip_low_hit, clip_high_hit = ratio < 1.0 - clip_low, ratio > 1.0 + clip_high

    loss, d_loss, is_weight = loss_pg, d_pg, torch.ones_like(lp_s)
    if log_seq_is is not None or lp_rollout is not None:
        log_is = log_seq_is if log_seq_is is not None else _log_diff(old, lp_rollout)
        is_weight = torch.exp(log_is.clamp(max=math.log(tis_cap)))
        loss, d_loss = is_weight * loss_pg, is_weight * d_pg

    kl = torch.zeros_like(lp_s)
    if lp_ref is not None:
        d_raw = _log_diff(lp_ref, lp_student)
        d = d_raw.clamp(-RATIO_LOG_CLAMP, RATIO_LOG_CLAMP)
        kl_in_range = (d_raw >= -RATIO_LOG_CLAMP) & (d_raw <= RATIO_LOG_CLAMP) & (lp_s > float("-inf"))
        dd = d.detach()
        if kl_estimator == "k1":
            kl, d_kl = -d, torch.ones_like(dd)
        elif kl_estimator == "k2":
            kl, d_kl = 0.5 * d * d, -dd
        else:
            kl, d_kl = torch.exp(d) - d - 1.0, 1.0 - torch.exp(dd)
        loss = loss + kl_coef * kl
        d_loss = d_loss + kl_coef * torch.where(kl_in_range, d_kl, torch.zeros_like(d_kl))
    if entropy is not None and entropy_coef != 0:
        loss = loss - entropy_coef * entropy

    return {
        "loss": loss,
        "d_loss": d_loss,
        "d_entropy": torch.full_like(lp_s, -entropy_coef),
        "delta": delta,
        "weight": weight,
        "ratio": ratio.detach(),
        "is_weight": is_weight,
        "kl": kl.detach(),
        "weight_clip_low": nonzero & (x < log_lo),
        "weight_clip_high": nonzero & (x > log_hi),
        "ppo_clip_low": clip_low_hit,
        "ppo_clip_high": clip_high_hit,
        "dual_clip": dual,
    }


def sequence_ids(shape, cu_seqlens=None, device=None):
    """``(seq_ids, num_seqs, max_len)`` of the tokens of a ``[B, T]`` (a row per sequence) or packed
    ``[N]`` (``cu_seqlens`` ``[S + 1]``) layout; ``seq_ids`` is flat ``[N]``."""
    if len(shape) == 2:
        num_seqs, max_len = shape
        return torch.arange(num_seqs, device=device).repeat_interleave(max_len), num_seqs, max_len
    if cu_seqlens is None:
        raise ValueError("sequence-level options on packed [N, ...] tokens need cu_seqlens")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    num_seqs = lengths.numel()
    seq_ids = torch.arange(num_seqs, device=device).repeat_interleave(lengths, output_size=shape[0])
    return seq_ids, num_seqs, lengths.max() if num_seqs else 0


def sequence_sums(values, seq_ids, num_seqs):
    """Per-sequence sums of flat per-token ``values``, broadcast back to the tokens."""
    return values.new_zeros(num_seqs).index_add_(0, seq_ids, values)[seq_ids]


def aggregate_loss(loss, mask, loss_agg="token-mean", *, normalizer=None, cu_seqlens=None):
    """Reduce per-token losses to what the trainer backpropagates.

    ``loss`` and ``mask`` are ``[B, T]`` (a row per sequence) or packed ``[N]`` with sequence
    boundaries ``cu_seqlens`` ``[S + 1]``. With ``m`` the mask, ``S`` the number of sequences
    (all of them, empty ones included) and ``L`` the padded length ``T`` (packed: the longest
    sequence), the denominator ``D`` of each mode is replaced by ``normalizer`` when it is given:

    - ``token-mean``: ``sum(m * l) / D``, ``D = sum(m)``
    - ``seq-mean-token-mean``: ``sum_i (sum_t m * l / sum_t m) / D``, ``D = S`` (empty sequences add 0)
    - ``seq-mean-token-sum``: ``sum_i sum_t m * l / D``, ``D = S``
    - ``seq-mean-token-sum-norm``: ``sum(m * l) / D``, ``D = S * L`` (Dr. GRPO)
    - ``sum``: ``sum(m * l) / D``, ``D = 1``
    - ``none``: ``m * l`` per token (no normalizer).

    A mode's own denominator of zero (a fully masked batch) is taken as one, so the loss is 0; a
    ``normalizer`` must be positive and finite (the library raises for others, or with
    ``validate=False`` returns NaN).
    """
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
    m = mask.to(loss.dtype)
    masked = torch.where(m != 0, loss * m, torch.zeros_like(loss))
    if loss_agg == "none":
        return masked
    if loss_agg == "token-mean":
        numerator, denominator = masked.sum(), m.sum()
    elif loss_agg == "sum":
        numerator, denominator = masked.sum(), 1
    else:
        seq_ids, num_seqs, max_len = sequence_ids(loss.shape, cu_seqlens, loss.device)
        numerator = masked.sum()
        if loss_agg == "seq-mean-token-mean":
            counts = sequence_sums(m.reshape(-1), seq_ids, num_seqs)
            numerator = torch.where(counts != 0, masked.reshape(-1) / torch.where(counts != 0, counts, 1), 0).sum()
        denominator = num_seqs * max_len if loss_agg == "seq-mean-token-sum-norm" else num_seqs
    if normalizer is not None:
        return numerator / torch.as_tensor(normalizer, dtype=loss.dtype, device=loss.device).reshape(())
    denominator = torch.as_tensor(denominator, dtype=loss.dtype, device=loss.device)
    return numerator / torch.where(denominator != 0, denominator, 1)


def rlsd_metrics(terms, mask):
    """Masked means of the per-token terms, as a dict of detached 0-d tensors.

    ``num_tokens`` is ``sum(m)``: multiply a mean by it to get a sum that reduces across ranks. The
    credit metrics (``credit_weight_mean``, ``credit_clip_low_frac``, ``credit_clip_high_frac``,
    ``delta_mean``) are means over the tokens with a non-zero advantage only (``terms["advantage"]``;
    at A = 0 the weight is 1 by definition and would dilute them), whose weighted count is
    ``num_credit_tokens``; without a teacher (``"weight"`` absent) they are left out.
    ``entropy_mean``, ``kl_mean`` and ``is_weight_mean`` are there when the terms hold them.
    """
    m = mask.to(torch.float64 if terms["ratio"].dtype == torch.float64 else torch.float32)

    def mean(x, weights=m):
        total = weights.sum()
        x = x.detach().to(m.dtype)
        return torch.where(weights != 0, x * weights, torch.zeros_like(m)).sum() / torch.where(total != 0, total, 1.0)

    metrics = {}
    if "weight" in terms:
        on = torch.where(terms["advantage"] != 0, m, torch.zeros_like(m))
        metrics.update({
            "credit_weight_mean": mean(terms["weight"], on),
            "credit_clip_low_frac": mean(terms["weight_clip_low"], on),
            "credit_clip_high_frac": mean(terms["weight_clip_high"], on),
            "delta_mean": mean(terms["delta"], on),
            "num_credit_tokens": on.sum().detach(),
        })
    metrics.update({
        "ratio_mean": mean(terms["ratio"]),
        "ppo_clip_low_frac": mean(terms["ppo_clip_low"]),
        "ppo_clip_high_frac": mean(terms["ppo_clip_high"]),
        "dual_clip_frac": mean(terms["dual_clip"]),
    })
    for key in ("entropy", "kl", "is_weight"):
        if key in terms:
            metrics[f"{key}_mean"] = mean(terms[key])
    metrics["num_tokens"] = m.sum().detach()
    return metrics


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
    eps_w_low=None,
    eps_w_high=None,
    lam=1.0,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=3.0,
    surrogate="ppo",
    sapo_tau_pos=1.0,
    sapo_tau_neg=1.05,
    ratio_level="token",
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
    temperature=1.0,
    loss_agg="token-mean",
    normalizer=None,
    cu_seqlens=None,
    return_metrics=False,
    is_weights=None,
):
    """The RLSD loss from student and teacher logits (see ``rlsd_token_terms`` for the formulas).

    Shapes: logits ``[B, T, V]`` or packed ``[N, V]``; tokens, mask and every per-token log-prob
    ``[B, T]`` / ``[N]``; advantages ``[B]``, ``[B, 1]``, ``[B, T]`` or ``[N]``. ``teacher_logits``
    may be ``None`` when ``teacher_logprobs`` is given. The teacher gets no gradient.

    Sequence-level terms are over each sequence's unmasked tokens: with ``ratio_level="sequence"``
    ``log_seq_ratio`` is the mean of ``lp_S - lp_old``; with ``tis_level="sequence"`` the
    importance log-ratio is the sum of ``sg(lp_old) - lp_rollout``. Packed tokens give the
    sequences with ``cu_seqlens``. ``credit_mask`` (bool) limits the reweighting to some tokens and
    ``credit_negative_only`` to tokens with ``A < 0``. ``is_weights`` (detached, non-negative,
    shaped like the advantages) multiply each token's policy term, uncapped, in the importance
    weight's place (so not together with ``rollout_logprobs``).
    """
    if ratio_level not in RATIO_LEVELS or tis_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level and tis_level must be one of {RATIO_LEVELS}")
    valid = tokens != IGNORE_INDEX
    if mask is not None:
        valid = valid & (mask != 0)
    # Masked positions may hold any id (padding): score them as ignored tokens.
    scored = torch.where(valid, tokens, IGNORE_INDEX)
    lp_s, entropy = token_logprobs(student_logits, scored, temperature=temperature, return_entropy=True)
    no_teacher = teacher_logits is None and teacher_logprobs is None
    if no_teacher and lam != 0:
        raise ValueError("the credit weight (lam > 0) needs teacher_logits or teacher_logprobs")
    if teacher_logits is not None:
        with torch.no_grad():
            lp_t = token_logprobs(teacher_logits, scored, temperature=temperature)
    elif no_teacher:
        # lam = 0 (GRPO): the weight does not enter the loss; the credit metrics are left out.
        lp_t = torch.zeros_like(lp_s)
    else:
        lp_t = teacher_logprobs.to(lp_s.dtype)
    adv = advantages.to(lp_s.dtype)
    if adv.dim() == 1 and tokens.dim() == 2:
        adv = adv[:, None]
    adv = adv.expand_as(lp_s)
    m = valid.to(lp_s.dtype) if mask is None else torch.where(valid, mask.to(lp_s.dtype), 0)
    as_float = lambda x: None if x is None else x.to(lp_s.dtype)  # noqa: E731
    old, rollout, ref = as_float(old_logprobs), as_float(rollout_logprobs), as_float(ref_logprobs)
    old_value = lp_s.detach() if old is None else old

    def per_sequence(x, mean):
        seq_ids, num_seqs, _ = sequence_ids(lp_s.shape, cu_seqlens, lp_s.device)
        on = valid.reshape(-1)
        sums = sequence_sums(torch.where(on, x.reshape(-1), 0.0), seq_ids, num_seqs)
        if mean:
            counts = sequence_sums(on.to(x.dtype), seq_ids, num_seqs)
            sums = sums / torch.where(counts != 0, counts, 1.0)
        return sums.view(lp_s.shape)

    log_seq_ratio = log_seq_is = None
    if ratio_level == "sequence":
        log_seq_ratio = per_sequence(_log_diff(lp_s.detach(), old_value), mean=True)
    if rollout is not None and tis_level == "sequence":
        log_seq_is = per_sequence(_log_diff(old_value, rollout), mean=False)
    if is_weights is not None:
        if rollout is not None:
            raise ValueError("give rollout_logprobs or is_weights, not both")
        w_is = is_weights.to(lp_s.dtype)
        if w_is.dim() == 1 and tokens.dim() == 2:
            w_is = w_is[:, None]
        log_seq_is, tis_cap = torch.log(w_is.expand_as(lp_s)), math.inf
    credit_on = torch.ones_like(valid) if credit_mask is None else credit_mask.bool()
    if credit_negative_only:
        credit_on = credit_on & (adv < 0)
    terms = rlsd_token_terms(
        lp_s, lp_t, adv, lp_old=old, eps_w=eps_w, eps_w_low=eps_w_low, eps_w_high=eps_w_high, lam=lam,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, surrogate=surrogate,
        sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, credit_base=credit_base, credit_on=credit_on,
        log_seq_ratio=log_seq_ratio, lp_rollout=rollout, log_seq_is=log_seq_is,
        tis_cap=tis_cap, lp_ref=ref, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy=entropy,
        entropy_coef=entropy_coef,
    )
    loss = aggregate_loss(terms["loss"], m, loss_agg, normalizer=normalizer, cu_seqlens=cu_seqlens)
    if return_metrics:
        shown = {k: v for k, v in terms.items() if k not in ("kl", "is_weight")}
        shown["entropy"], shown["advantage"] = entropy, adv
        if no_teacher:
            for key in ("weight", "delta", "weight_clip_low", "weight_clip_high"):
                del shown[key]
        if ref is not None:
            shown["kl"] = terms["kl"]
        if rollout is not None or is_weights is not None:
            shown["is_weight"] = terms["is_weight"]
        return loss, rlsd_metrics(shown, m)
    return loss


OPSD_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "sampled_token")


def _weighted_log_ratio(p, x, y):
    """``sum_v p_v * (x_v - y_v)`` over the last dimension, where entries with ``p_v = 0`` give 0
    (never ``0 * inf`` or ``(-inf) - (-inf)``, in the value or in the gradient); NaN stays NaN."""
    on = p != 0
    zero = torch.zeros_like(p)
    return torch.where(on, p * (torch.where(on, x, zero) - torch.where(on, y, zero)), zero).sum(-1)


def opsd_token_divergence(student_logits, teacher_logits, *, divergence="jsd", beta=0.5, temperature=1.0):
    """Per-token divergence between the student and the (detached) teacher over the full vocabulary.

    With ``S = softmax(z_S / tau)``, ``T = softmax(z_T / tau)``, ``a = log S``, ``b = log T``::

        forward_kl  KL(T || S) = sum_v T_v (b_v - a_v)          d/dz_S = (S - T) / tau
        reverse_kl  KL(S || T) = sum_v S_v (a_v - b_v)          d/dz_S = S * ((a - b) - KL(S || T)) / tau
        jsd         M = beta * T + (1 - beta) * S,  log M_v = logsumexp(log beta + b_v, log(1 - beta) + a_v)
                    JSD = beta * KL(T || M) + (1 - beta) * KL(S || M)
                    d/dz_S = (1 - beta) * S * ((a - log M) - KL(S || M)) / tau

    ``beta = 0`` is the forward KL and ``beta = 1`` the reverse KL (TRL's generalised JSD special-cases
    the two endpoints the same way; the mixture formula itself would give 0 there). Entries where a
    distribution is zero (``-inf`` logits, a padded vocabulary) contribute nothing. Shapes: logits
    ``[..., V]``; returns ``[...]`` in float32 (float64 for float64 logits), differentiable in the
    student logits only.
    """
    if divergence not in OPSD_DIVERGENCES[:3]:
        raise ValueError(f"divergence must be one of {OPSD_DIVERGENCES[:3]}, got {divergence!r}")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if divergence == "jsd" and beta in (0, 1):
        divergence = "forward_kl" if beta == 0 else "reverse_kl"
    a = torch.log_softmax(student_logits.to(_compute_dtype(student_logits)) / temperature, dim=-1)
    b = torch.log_softmax(teacher_logits.detach().to(a.dtype) / temperature, dim=-1)
    s, t = a.exp(), b.exp()
    if divergence == "forward_kl":
        return _weighted_log_ratio(t, b, a)
    if divergence == "reverse_kl":
        return _weighted_log_ratio(s, a, b)
    # Both -inf (a padded entry): any finite stand-in, the entry is masked out below.
    both = (a == float("-inf")) & (b == float("-inf"))
    a0, b0 = torch.where(both, 0.0, a), torch.where(both, 0.0, b)
    log_m = torch.logsumexp(torch.stack([b0 + math.log(beta), a0 + math.log1p(-beta)]), dim=0)
    return beta * _weighted_log_ratio(t, b, log_m) + (1 - beta) * _weighted_log_ratio(s, a, log_m)


def opsd_metrics(divergence, clipped, mask):
    """``divergence_mean`` (the unclipped per-token divergence), ``token_clip_frac`` and
    ``num_tokens``: masked means and their count, detached 0-d tensors."""
    m = mask.to(torch.float64 if divergence.dtype == torch.float64 else torch.float32)
    total = m.sum()
    denominator = torch.where(total != 0, total, torch.ones_like(total))

    def mean(x):
        x = x.detach().to(m.dtype)
        return torch.where(m != 0, x * m, torch.zeros_like(m)).sum() / denominator

    return {"divergence_mean": mean(divergence), "token_clip_frac": mean(clipped), "num_tokens": total.detach()}


def opsd_loss(
    student_logits,
    teacher_logits,
    tokens=None,
    *,
    teacher_logprobs=None,
    mask=None,
    divergence="jsd",
    beta=0.5,
    temperature=1.0,
    token_clip=None,
    loss_agg="token-mean",
    normalizer=None,
    cu_seqlens=None,
    return_metrics=False,
):
    """On-policy self-distillation: the teacher distribution as the student's target.

    Per token, ``D`` is :func:`opsd_token_divergence` for the full-vocabulary divergences, and the
    loss is ``min(D, token_clip)``: a token whose divergence exceeds ``token_clip`` adds the constant
    ``token_clip`` and no gradient. ``divergence="sampled_token"`` is the sampled-token surrogate
    with the log-probs of the sampled tokens (``tokens`` needed)::

        D = sg(lp_S - lp_T)      loss = D * lp_S      d/dz_S = D * (1[v = y] - S) / tau

    (a one-sample estimate of the reverse KL's gradient; clipped tokens add ``token_clip * sg(lp_S)``).
    Its teacher may be given as ``teacher_logprobs`` instead of logits. ``tokens`` (optional for the
    full-vocabulary divergences) mask with ``IGNORE_INDEX``, as ``mask`` does; the losses are
    aggregated by :func:`aggregate_loss`. Metrics: :func:`opsd_metrics`.
    """
    if divergence not in OPSD_DIVERGENCES:
        raise ValueError(f"divergence must be one of {OPSD_DIVERGENCES}, got {divergence!r}")
    token_shape = student_logits.shape[:-1]
    valid = torch.ones(token_shape, dtype=torch.bool, device=student_logits.device)
    if tokens is not None:
        valid = valid & (tokens != IGNORE_INDEX)
    if mask is not None:
        valid = valid & (mask != 0)
    dtype = _compute_dtype(student_logits)
    if divergence == "sampled_token":
        scored = torch.where(valid, tokens, IGNORE_INDEX)
        lp_s = token_logprobs(student_logits, scored, temperature=temperature)
        if teacher_logits is not None:
            with torch.no_grad():
                lp_t = token_logprobs(teacher_logits, scored, temperature=temperature)
        else:
            lp_t = torch.where(valid, teacher_logprobs.to(dtype), 0.0)
        d = _log_diff(lp_s.detach(), lp_t)
        clipped = d > token_clip if token_clip is not None else torch.zeros_like(valid)
        # D = 0 (both log-probs -inf) adds 0, not 0 * -inf; a clipped D takes no part in the gradient
        # (not even as 0 * inf).
        live = torch.where(clipped, torch.zeros_like(d), d)
        per_token = torch.where(clipped, d.clamp(max=token_clip or 0.0) * lp_s.detach(),
                                torch.where(d == 0, torch.zeros_like(d), live * lp_s))
    else:
        divergence_of = lambda s: opsd_token_divergence(  # noqa: E731
            s, teacher_logits, divergence=divergence, beta=beta, temperature=temperature)
        d = divergence_of(student_logits)
        clipped = d.detach() > token_clip if token_clip is not None else torch.zeros_like(valid)
        if bool(clipped.any()):
            # Clipped rows take no part in the gradient, not even as 0 * inf (an infinite divergence).
            d = divergence_of(torch.where(clipped[..., None], student_logits.detach(), student_logits))
        per_token = torch.where(clipped, torch.full_like(d, token_clip or 0.0), d)
    m = valid.to(dtype) if mask is None else torch.where(valid, mask.to(dtype), 0)
    loss = aggregate_loss(per_token, m, loss_agg, normalizer=normalizer, cu_seqlens=cu_seqlens)
    if return_metrics:
        return loss, opsd_metrics(d, clipped & valid, m)
    return loss


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
    mask=None,
    lam=0.0,
    temperature=1.0,
    loss_agg="token-mean",
    normalizer=None,
    cu_seqlens=None,
    return_metrics=False,
    **rlsd_options,
):
    """``rlsd_loss(...) + alpha * opsd_loss(...)`` on the same tokens, mask and aggregation.

    The policy term takes every option of :func:`rlsd_loss` (``lam = 0``, the default here, is
    GRPO/DAPO); the OPSD term is :func:`opsd_loss` with ``divergence``, ``beta`` and ``token_clip``.
    The metrics are both dicts merged (they share ``num_tokens``).
    """
    shared = dict(mask=mask, temperature=temperature, loss_agg=loss_agg, normalizer=normalizer,
                  cu_seqlens=cu_seqlens, return_metrics=return_metrics)
    pg = rlsd_loss(student_logits, teacher_logits, tokens, advantages, teacher_logprobs=teacher_logprobs, lam=lam,
                   **shared, **rlsd_options)
    distill = opsd_loss(student_logits, teacher_logits, tokens, teacher_logprobs=teacher_logprobs,
                        divergence=divergence, beta=beta, token_clip=token_clip, **shared)
    if return_metrics:
        (pg, pg_metrics), (distill, distill_metrics) = pg, distill
        return pg + alpha * distill, {**pg_metrics, **distill_metrics}
    return pg + alpha * distill
