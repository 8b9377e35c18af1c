"""Plain PyTorch specification of every public op.

Everything here is written for clarity, not speed: full ``[N, V]`` log-softmax tensors, autograd for
every gradient, and float64 whenever the inputs are float64 (anything narrower is computed in
float32). The fused kernels are tested against these functions, forward and every gradient; the
Triton epilogue in ``_jit.py`` mirrors :func:`rlsd_token_terms` line by line.

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
    lam=1.0,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=3.0,
):
    """The per-token RLSD policy loss and what a trainer logs about it.

    All inputs have one shape; only ``lp_student`` carries a gradient. Returns a dict of tensors
    of that shape: ``loss`` (differentiable), the detached ``delta``, ``weight`` (w), ``ratio``
    (rho), and the booleans ``weight_clip_low`` / ``weight_clip_high`` (w was clipped),
    ``ppo_clip_low`` / ``ppo_clip_high`` (the clipped PPO branch was taken, for A_hat < 0 / > 0)
    and ``dual_clip`` (the dual-clip bound was taken).

    ``d_loss`` is the derivative of ``loss`` by ``lp_student`` in closed form (what the kernels
    compute; the tests hold it equal to autograd's)::

        d_loss = -A_hat * rho   where the unclipped branch is taken, |log rho| <= 20 and lp_S > -inf
               = 0              elsewhere, and where the dual clip binds
    """
    lp_s = lp_student.detach()
    delta = _log_diff(lp_teacher, lp_s)
    sign = torch.sign(advantages)
    x = sign * delta
    log_lo, log_hi = math.log1p(-eps_w), math.log1p(eps_w)
    weight = torch.exp(x.clamp(log_lo, log_hi))
    credit = (1.0 - lam) + lam * weight
    a_hat = advantages * credit

    old = lp_s if lp_old is None else lp_old
    log_ratio = _log_diff(lp_student, old)
    ratio = torch.exp(log_ratio.clamp(-RATIO_LOG_CLAMP, RATIO_LOG_CLAMP))
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    surrogate = ratio * a_hat
    clipped_surrogate = clipped_ratio * a_hat
    unclipped = surrogate <= clipped_surrogate
    loss = -torch.where(unclipped, surrogate, clipped_surrogate)

    in_clamp = (log_ratio >= -RATIO_LOG_CLAMP) & (log_ratio <= RATIO_LOG_CLAMP) & (lp_s > float("-inf"))
    d_loss = torch.where(unclipped & in_clamp, -a_hat * ratio, torch.zeros_like(a_hat)).detach()

    dual = torch.zeros_like(unclipped)
    if dual_clip is not None:
        bound = -dual_clip * a_hat
        dual = (a_hat < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        d_loss = torch.where(dual, torch.zeros_like(d_loss), d_loss)

    nonzero = sign != 0
    return {
        "loss": loss,
        "d_loss": d_loss,
        "delta": delta,
        "weight": weight,
        "ratio": ratio.detach(),
        "weight_clip_low": nonzero & (x < log_lo),
        "weight_clip_high": nonzero & (x > log_hi),
        "ppo_clip_low": ~unclipped & (a_hat < 0),
        "ppo_clip_high": ~unclipped & (a_hat > 0),
        "dual_clip": dual,
    }


def _sequence_sums(values, seq_ids, num_seqs):
    """Per-sequence sums of per-token ``values`` ``[B, T]`` (rows) or packed ``[N]`` (``seq_ids``)."""
    if seq_ids is None:
        return values.sum(-1)
    return values.new_zeros(num_seqs).index_add_(0, seq_ids, values)


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

    A denominator of zero (a fully masked batch) is taken as one, so the loss is 0.
    """
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
    m = mask.to(loss.dtype)
    masked = torch.where(m != 0, loss * m, torch.zeros_like(loss))
    if loss_agg == "none":
        return masked
    seq_ids, num_seqs, max_len = None, None, None
    if loss.dim() == 2:
        num_seqs, max_len = loss.shape
    elif loss_agg.startswith("seq-mean"):
        if cu_seqlens is None:
            raise ValueError(f"loss_agg={loss_agg!r} on packed tokens needs cu_seqlens")
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        num_seqs = lengths.numel()
        seq_ids = torch.repeat_interleave(torch.arange(num_seqs, device=loss.device), lengths)
        max_len = lengths.max()

    if loss_agg == "token-mean":
        numerator, denominator = masked.sum(), m.sum()
    elif loss_agg == "seq-mean-token-mean":
        counts = _sequence_sums(m, seq_ids, num_seqs)
        sums = _sequence_sums(masked, seq_ids, num_seqs)
        per_seq = torch.where(counts != 0, sums / torch.where(counts != 0, counts, 1), 0)
        numerator, denominator = per_seq.sum(), num_seqs
    elif loss_agg == "seq-mean-token-sum":
        numerator, denominator = masked.sum(), num_seqs
    elif loss_agg == "seq-mean-token-sum-norm":
        numerator, denominator = masked.sum(), num_seqs * max_len
    else:
        numerator, denominator = masked.sum(), 1
    if normalizer is not None:
        denominator = normalizer
    denominator = torch.as_tensor(denominator, dtype=loss.dtype, device=loss.device)
    return numerator / torch.where(denominator != 0, denominator, 1)


def rlsd_metrics(terms, mask):
    """Masked means of the per-token terms, as a dict of detached 0-d tensors.

    ``num_tokens`` is ``sum(m)``: multiply a mean by it to get a sum that reduces across ranks.
    """
    m = mask.to(torch.float64 if terms["weight"].dtype == torch.float64 else torch.float32)
    total = m.sum()
    denominator = torch.where(total != 0, total, torch.ones_like(total))

    def mean(x):
        x = x.detach().to(m.dtype)
        return torch.where(m != 0, x * m, torch.zeros_like(m)).sum() / denominator

    return {
        "credit_weight_mean": mean(terms["weight"]),
        "credit_clip_low_frac": mean(terms["weight_clip_low"]),
        "credit_clip_high_frac": mean(terms["weight_clip_high"]),
        "delta_mean": mean(terms["delta"]),
        "ratio_mean": mean(terms["ratio"]),
        "ppo_clip_low_frac": mean(terms["ppo_clip_low"]),
        "ppo_clip_high_frac": mean(terms["ppo_clip_high"]),
        "dual_clip_frac": mean(terms["dual_clip"]),
        "num_tokens": total.detach(),
    }


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
    cu_seqlens=None,
    return_metrics=False,
):
    """The RLSD policy loss from student and teacher logits (see the module docstring).

    Shapes: logits ``[B, T, V]`` or packed ``[N, V]``; tokens, mask, old and teacher log-probs
    ``[B, T]`` / ``[N]``; advantages ``[B]``, ``[B, 1]``, ``[B, T]`` or ``[N]``. ``teacher_logits``
    may be ``None`` when ``teacher_logprobs`` is given. The teacher gets no gradient.
    """
    valid = tokens != IGNORE_INDEX
    if mask is not None:
        valid = valid & (mask != 0)
    # Masked positions may hold any id (padding): score them as ignored tokens.
    scored = torch.where(valid, tokens, IGNORE_INDEX)
    lp_s = token_logprobs(student_logits, scored, temperature=temperature)
    if teacher_logits is not None:
        with torch.no_grad():
            lp_t = token_logprobs(teacher_logits, scored, temperature=temperature)
    else:
        lp_t = teacher_logprobs.to(lp_s.dtype)
    adv = advantages.to(lp_s.dtype)
    if adv.dim() == 1 and tokens.dim() == 2:
        adv = adv[:, None]
    adv = adv.expand_as(lp_s)
    m = valid.to(lp_s.dtype) if mask is None else torch.where(valid, mask.to(lp_s.dtype), 0)
    old = None if old_logprobs is None else old_logprobs.to(lp_s.dtype)
    terms = rlsd_token_terms(
        lp_s, lp_t, adv, lp_old=old, eps_w=eps_w, lam=lam,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
    )
    loss = aggregate_loss(terms["loss"], m, loss_agg, normalizer=normalizer, cu_seqlens=cu_seqlens)
    if return_metrics:
        return loss, rlsd_metrics(terms, m)
    return loss
