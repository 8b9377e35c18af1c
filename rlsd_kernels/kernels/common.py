"""Shared ``@triton.jit`` helpers: the logsumexp of a row, the per-token RLSD epilogue and the
softmax gradient of a row.

Rows are streamed in base-2 units: logits are multiplied by ``log2(e) / tau`` so that every
exponent is an ``exp2``; log-probs leave the helpers in natural units. The fast paths centre each
logit on its row's reference before scaling, ``(x - ref) * scale2``, so that a log-prob's error does
not grow with the logits' magnitude (``x * scale2 - lse2`` would lose ``ulp(x)``). The epilogue works on scalars
or on blocks of tokens alike (only elementwise ops, no control flow on values), and mirrors
``reference.rlsd_token_terms`` line by line.
"""

import triton
import triton.language as tl

from ..flags import Flag
from ..reference import IGNORE_INDEX as _IGNORE_INDEX

IGNORE_INDEX = tl.constexpr(_IGNORE_INDEX)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FLAG_WEIGHT_CLIP_LOW = tl.constexpr(int(Flag.WEIGHT_CLIP_LOW))
FLAG_WEIGHT_CLIP_HIGH = tl.constexpr(int(Flag.WEIGHT_CLIP_HIGH))
FLAG_PPO_CLIP_LOW = tl.constexpr(int(Flag.PPO_CLIP_LOW))
FLAG_PPO_CLIP_HIGH = tl.constexpr(int(Flag.PPO_CLIP_HIGH))
FLAG_DUAL_CLIP = tl.constexpr(int(Flag.DUAL_CLIP))
FLAG_BAD_TOKEN = tl.constexpr(int(Flag.BAD_TOKEN))
FLAG_NONFINITE_STUDENT = tl.constexpr(int(Flag.NONFINITE_STUDENT))
FLAG_NONFINITE_TEACHER = tl.constexpr(int(Flag.NONFINITE_TEACHER))


@triton.jit
def row_reference(z):
    """A row's exponent reference, from its first block (in the logits' units): the block max, 0
    while all -inf.

    The streaming loops add ``exp2((x - ref) * scale2)`` into per-lane accumulators: no reduction
    and no barrier per block, and one ``exp2`` per logit. A logit more than ~126 (base 2) above the
    reference overflows the sum; ``finish_sum`` says so and ``row_lse_exact`` redoes the row.
    """
    m = tl.max(z, axis=0)
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def finish_sum(ref, acc):
    """``(lse2, s, ok)`` from the per-lane sums and the base-2 reference; ``ok`` is False when the row
    needs the exact pass (an overflow above the reference, no finite logit, or NaN/inf in the input)."""
    s = tl.sum(acc, axis=0)
    return ref + tl.log2(s), s, (s > 0.0) & (s < float("inf"))


@triton.jit
def finish_sums(ref, acc, acc_e):
    """``finish_sum`` with the entropy's per-lane sums ``acc_e`` (zeros without the entropy):
    ``(lse2, s, t, ok)``; ``ok`` is also False where ``t`` overflows, which ``exp2(d) * d`` does some
    7 bits of ``d`` before ``exp2(d)`` does (a logit ~85 above the reference, in natural units)."""
    lse2, s, ok = finish_sum(ref, acc)
    t = tl.sum(acc_e, axis=0)
    return lse2, s, t, ok & (t < float("inf"))


@triton.jit
def entropy_terms(d):
    """Per-lane ``exp2(d)`` and ``exp2(d) * d`` (0 where d is -inf) for the entropy sums, from the
    centred base-2 logits: with ``row_centre``'s ``c`` the entropy is ``entropy_finish(c, s, t)``,
    its error independent of the logits' magnitude."""
    e = tl.exp2(d)
    return e, tl.where(d > float("-inf"), e * d, 0.0)


@triton.jit
def row_centre(ref, s):
    """``(r, c)`` such that a logit ``x`` of the row has the base-2 log-prob ``(x - r) * scale2 - c``:
    the reference (logits' units) the sum ``s`` was taken against, and ``log2`` of that sum. The fast
    paths' reference is the first block's max, the exact pass's the row's max (``row_lse_exact``):
    either way the log-prob's error does not grow with the logits' magnitude."""
    return ref, tl.log2(s)


@triton.jit
def token_logprob(x, r, c, scale2):
    """``min(((x - r) * scale2 - c) * ln2, 0)``: a token's natural log-prob from ``row_centre``; NaN kept."""
    return nan_min(((x - r) * scale2 - c) * LN2, 0.0)


@triton.jit
def first_block(x_row, start, end, BLOCK_V: tl.constexpr):
    """The block of ``x_row`` from ``start`` (``-inf`` from ``end`` on)."""
    offs = start + tl.arange(0, BLOCK_V)
    return tl.load(x_row + offs, mask=offs < end, other=float("-inf"))


@triton.jit
def lane_sums(x_row, start, end, ref, x_first, scale2, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    """``(s, t)``: the sums of ``exp2(d)`` and ``exp2(d) * d`` over ``x_row[start:end]``, with
    ``d = (x - ref) * scale2``, kept per lane until the end (``t`` only with ``ENTROPY``, else 0);
    ``x_first`` is the first block, already loaded, and each next block is loaded before the current
    one is used."""
    offs = tl.arange(0, BLOCK_V)
    x_next = x_first
    acc_s = tl.zeros([BLOCK_V], dtype=tl.float32)
    acc_e = tl.zeros([BLOCK_V], dtype=tl.float32)
    for col in tl.range(start, end, BLOCK_V):
        d = (x_next.to(tl.float32) - ref) * scale2
        cols = col + BLOCK_V + offs
        x_next = tl.load(x_row + cols, mask=cols < end, other=float("-inf"))
        if ENTROPY:
            e, ez = entropy_terms(d)
            acc_s += e
            acc_e += ez
        else:
            acc_s += tl.exp2(d)
    return tl.sum(acc_s, axis=0), tl.sum(acc_e, axis=0)


@triton.jit
def span_max(x_row, start, end, BLOCK_V: tl.constexpr):
    """The max of ``x_row[start:end]`` in the logits' units, NaN kept; -inf when no logit is finite."""
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    for col in tl.range(start, end, BLOCK_V):
        cols = col + offs
        x = tl.load(x_row + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        m = nan_max(m, tl.max(x, axis=0))
    return m


@triton.jit
def max_sums(x_row, start, end, scale2, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    """``(m, s, t)``: ``span_max`` by a first pass, then ``lane_sums`` against it (against 0 where
    it is -inf): no logit lies above the reference, so no sum overflows at any range. NaN and +inf
    logits give a NaN sum (every logit enters the sum, whatever a max does with NaN)."""
    m = span_max(x_row, start, end, BLOCK_V)
    ref = tl.where(m == float("-inf"), 0.0, m)
    s, t = lane_sums(x_row, start, end, ref, first_block(x_row, start, end, BLOCK_V), scale2, BLOCK_V, ENTROPY)
    return m, s, t


@triton.jit
def row_lse_exact(x_row, V, scale2, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    """``(ref, lse2, s, t)`` of a row whose per-lane sums against its first block overflowed (or that
    has no finite logit, or NaN/inf): the sums again against the row's max ``ref`` (logits' units; 0
    while all -inf), centred as the fast paths' are, so ``row_centre(ref, s)`` and
    ``entropy_finish`` take them alike."""
    m, s, t = max_sums(x_row, 0, V, scale2, BLOCK_V, ENTROPY)
    ref = tl.where(m == float("-inf"), 0.0, m)
    return ref, ref * scale2 + tl.log2(s), s, t


@triton.jit
def entropy_finish(lse2, s, t):
    """Entropy in natural units from the base-2 sums: ``H = ln2 * (lse2 - t / s)``, where ``t`` sums
    ``exp2(z - m) * z`` over logits ``z`` centred as ``lse2`` is (``row_centre``'s ``c`` for the
    fast paths' sums, the logsumexp for ``row_lse_exact``'s)."""
    return LN2 * (lse2 - t / s)


@triton.jit
def nan_min(a, b):
    """``min(a, b)`` that keeps a NaN (a GPU's plain ``min.f32`` returns the other operand)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_max(a, b):
    """``max(a, b)`` that keeps a NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_clamp(x, lo, hi):
    """``x`` clamped to ``[lo, hi]``; NaN stays NaN."""
    return nan_min(nan_max(x, lo), hi)


@triton.jit
def is_finite(x):
    return (x == x) & (x < float("inf")) & (x > float("-inf"))


@triton.jit
def log_diff(a, b):
    """``a - b`` for log-probs, with (-inf) - (-inf) taken as 0; NaN stays NaN."""
    return tl.where((a == float("-inf")) & (b == float("-inf")), 0.0, a - b)


@triton.jit
def rlsd_epilogue(
    lp_s, lp_t, lp_old, adv, credit_on, log_seq_ratio, log_is, lp_ref, entropy,
    log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip, log_tis_cap, kl_coef, entropy_coef,
    sapo_tau_pos, sapo_tau_neg,
    HAS_DUAL: tl.constexpr, CISPO: tl.constexpr, SAPO: tl.constexpr, CREDIT_OLD: tl.constexpr, SEQ_RATIO: tl.constexpr,
    HAS_IS: tl.constexpr, KL: tl.constexpr, HAS_ENTROPY: tl.constexpr,
):
    """Per-token RLSD loss, its derivative by ``lp_s``, the credit weight, the ratio, the importance
    weight, the KL term and the flags. Mirrors ``reference.rlsd_token_terms`` line by line;
    ``lp_old`` is ``lp_s`` itself when on-policy. ``KL`` is 0 (none) or the estimator 1, 2, 3."""
    if CREDIT_OLD:
        delta = log_diff(lp_t, lp_old)
    else:
        delta = log_diff(lp_t, lp_s)
    sign = tl.where(adv > 0, 1.0, tl.where(adv < 0, -1.0, 0.0))
    # sign(0) = 0 gives w = 1 whatever delta is (never 0 * inf); a NaN delta stays NaN.
    x = tl.where((sign == 0.0) & (delta == delta), 0.0, sign * delta)
    on = credit_on != 0
    weight = tl.where(on, tl.exp(nan_clamp(x, log_w_lo, log_w_hi)), 1.0)
    credit = (1.0 - lam) + lam * weight
    a_hat = adv * credit

    if SEQ_RATIO:
        log_ratio = log_seq_ratio + log_diff(lp_s, lp_s)
    else:
        log_ratio = log_diff(lp_s, lp_old)
    ratio = tl.exp(nan_clamp(log_ratio, -20.0, 20.0))
    clipped_ratio = nan_clamp(ratio, 1.0 - clip_lo, 1.0 + clip_hi)
    in_range = (log_ratio >= -20.0) & (log_ratio <= 20.0) & (lp_s > float("-inf"))
    flags = tl.where(on & (sign != 0) & (x < log_w_lo), FLAG_WEIGHT_CLIP_LOW, 0)
    flags |= tl.where(on & (sign != 0) & (x > log_w_hi), FLAG_WEIGHT_CLIP_HIGH, 0)
    if CISPO:
        factor = clipped_ratio * a_hat
        possible = lp_s > float("-inf")
        loss = -factor * tl.where(possible, lp_s, 0.0)
        d_loss = tl.where(possible, -factor, 0.0)
        flags |= tl.where(ratio < 1.0 - clip_lo, FLAG_PPO_CLIP_LOW, 0)
        flags |= tl.where(ratio > 1.0 + clip_hi, FLAG_PPO_CLIP_HIGH, 0)
    elif SAPO:
        # A soft gate instead of the clip: no clip flag.
        k = tl.where(adv > 0, sapo_tau_pos, sapo_tau_neg)
        gate = tl.sigmoid(k * (ratio - 1.0))
        loss = -(4.0 / k) * gate * a_hat
        d_loss = tl.where(in_range, -4.0 * gate * (1.0 - gate) * ratio * a_hat, 0.0)
    else:
        surrogate = ratio * a_hat
        clipped_surrogate = clipped_ratio * a_hat
        unclipped = surrogate <= clipped_surrogate
        loss = -tl.where(unclipped, surrogate, clipped_surrogate)
        d_loss = tl.where(unclipped & in_range, -a_hat * ratio, 0.0)
        flags |= tl.where(~unclipped & (a_hat < 0), FLAG_PPO_CLIP_LOW, 0)
        flags |= tl.where(~unclipped & (a_hat > 0), FLAG_PPO_CLIP_HIGH, 0)
        if HAS_DUAL:
            bound = -dual_clip * a_hat
            dual = (a_hat < 0) & (loss > bound)
            loss = tl.where(dual, bound, loss)
            d_loss = tl.where(dual, 0.0, d_loss)
            flags |= tl.where(dual, FLAG_DUAL_CLIP, 0)

    is_weight = tl.full(lp_s.shape, 1.0, tl.float32)
    if HAS_IS:
        is_weight = tl.exp(nan_min(log_is, log_tis_cap))
        loss = is_weight * loss
        d_loss = is_weight * d_loss
    kl = tl.zeros(lp_s.shape, tl.float32)
    if KL != 0:
        d_raw = log_diff(lp_ref, lp_s)
        d = nan_clamp(d_raw, -20.0, 20.0)
        kl_in_range = (d_raw >= -20.0) & (d_raw <= 20.0) & (lp_s > float("-inf"))
        if KL == 1:
            kl = -d
            d_kl = tl.full(lp_s.shape, 1.0, tl.float32)
        elif KL == 2:
            kl = 0.5 * d * d
            d_kl = -d
        else:
            e = tl.exp(d)
            kl = e - d - 1.0
            d_kl = 1.0 - e
        loss = loss + kl_coef * kl
        d_loss = d_loss + kl_coef * tl.where(kl_in_range, d_kl, 0.0)
    if HAS_ENTROPY:
        loss = loss - entropy_coef * entropy
    return loss, d_loss, weight, ratio, is_weight, kl, flags


@triton.jit
def softmax_grad_block(z2, lse2, cols, y, coef, coef_h, entropy, HAS_ENTROPY: tl.constexpr):
    """Gradient of ``coef * lp + coef_h * H`` by the base-2 scaled logits of one block.

    Returns ``coef * (1[v = y] - p) - coef_h * p * (log p + H)``; the caller multiplies by 1/tau.
    """
    p = tl.exp2(z2 - lse2)
    g = coef * (tl.where(cols == y, 1.0, 0.0) - p)
    if HAS_ENTROPY:
        log_p = (z2 - lse2) * LN2
        g -= coef_h * tl.where(p > 0, p * (log_p + entropy), 0.0)
    return g


@triton.jit
def jsd_mixture(a2, b2, beta):
    """``(S, T, log2 M)`` per entry from the base-2 log-probs ``a2 = log2 S`` and ``b2 = log2 T``, with
    ``M = beta * T + (1 - beta) * S`` taken by logsumexp (never by adding probabilities): three
    transcendentals, the larger weighted term's ``exp2`` giving the smaller's through the ratio.
    ``log2 M`` is -inf only where both are -inf; ``0 < beta < 1``."""
    u = b2 + tl.log2(beta)
    w = a2 + tl.log2(1.0 - beta)
    hi = nan_max(u, w)
    r = tl.exp2(nan_min(u, w) - tl.where(hi == float("-inf"), 0.0, hi))
    e_hi = tl.exp2(hi)
    teacher_first = u >= w
    s = tl.where(teacher_first, e_hi * r, e_hi) * (1.0 / (1.0 - beta))
    t = tl.where(teacher_first, e_hi, e_hi * r) * (1.0 / beta)
    return s, t, hi + tl.log2(1.0 + r)


@triton.jit
def divergence_grad_block(zs2, zt2, lse2_s, lse2_t, k, beta, DIV: tl.constexpr):
    """``tau * dD/dz_S`` over one block of base-2 scaled logits, 0 wherever ``S = 0`` (and ``T = 0``);
    NaN stays NaN.

    ``DIV`` 0: forward KL, ``S - T``; 1: reverse KL, ``S * ((a - b) - k)``; 2: JSD_beta,
    ``(1 - beta) * S * ((a - log M) - k)``; ``k`` is the row's ``KL(S || T)`` or ``KL(S || M)`` in nats.
    """
    a2 = zs2 - lse2_s
    b2 = zt2 - lse2_t
    if DIV == 0:
        g = tl.exp2(a2) - tl.exp2(b2)
    elif DIV == 1:
        s = tl.exp2(a2)
        # An infinite KL (T = 0 where S > 0): the gradient's limit is +inf at those entries, not inf - inf.
        diff = (a2 - b2) * LN2 - k
        diff = tl.where(b2 == float("-inf"), tl.where(k == float("inf"), float("inf"), diff), diff)
        g = tl.where(s == 0.0, 0.0, s * diff)
    else:
        s, _, log_m = jsd_mixture(a2, b2, beta)
        g = tl.where(s == 0.0, 0.0, (1.0 - beta) * s * ((a2 - log_m) * LN2 - k))
    return g
