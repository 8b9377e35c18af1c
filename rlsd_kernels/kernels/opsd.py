"""Triton kernels of the OPSD losses: the row kernel and the row gradient kernel.

``_opsd_fwd_kernel``: one program per token row streams the student row and its teacher row together
(per-lane exp2 sums against each row's first-block max, as ``rlsd`` does). The forward and
reverse KL come out of that same sweep: next to the sums it accumulates ``exp2(z - ref)`` times the
difference of the two centred logits, so ``KL = sum_v T_v (b_v - a_v)`` needs no second read. The
JSD needs both logsumexps before its first term, so it walks the rows a second time, backwards. The
sampled-token surrogate needs only the token's two log-probs. With ``GRPO`` the program also runs the
RLSD epilogue (``rlsd._token_terms``) on the token, and with ``WRITE_GRAD`` it writes the
student logits' gradient of both terms, walking against the previous sweep's direction so that the
blocks read last come first.

``_opsd_bwd_kernel``: the gradient alone, from the per-row statistics the row kernel wrote (the
split strategy and per-token upstream gradients), or from the whole rows' statistics combined across
vocabulary shards (``forms/sharded.py``).

The per-shard statistics of the vocabulary-parallel form are in ``opsd_shard.py``.
"""

import triton
import triton.language as tl

from .common import (
    FLAG_BAD_TOKEN,
    FLAG_NONFINITE_STUDENT,
    FLAG_NONFINITE_TEACHER,
    LN2,
    LOG2E,
    divergence_grad_block,
    entropy_finish,
    entropy_terms,
    is_finite,
    jsd_mixture,
    log_diff,
    nan_min,
    row_centre,
    row_reference,
    softmax_grad_block,
    span_max,
    token_logprob,
)
from .rlsd import _token_terms

DIV_FORWARD_KL = tl.constexpr(0)
DIV_REVERSE_KL = tl.constexpr(1)
DIV_JSD = tl.constexpr(2)
DIV_SAMPLED = tl.constexpr(3)


@triton.jit
def _load_block(row, cols, end, KEEP: tl.constexpr):
    """One block of a row (``-inf`` outside ``[0, end)``); ``KEEP`` asks the cache to hold it for a re-read."""
    mask = (cols >= 0) & (cols < end)
    if KEEP:
        x = tl.load(row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last")
    else:
        x = tl.load(row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_first")
    return x


@triton.jit
def _pair_sums(s_row, t_row, zs_first, zt_first, ref_s, ref_t, n_blocks, read_end, scale2, DIV: tl.constexpr,
               ENTROPY: tl.constexpr, HAS_T: tl.constexpr, KEEP_S: tl.constexpr, KEEP_T: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """``(sum_s, sum_t, x, sum_e)`` over ``n_blocks`` blocks of a student row and its teacher row, the
    logits centred on the references ``ref_s``, ``ref_t`` (logits' units): the sums of exponentials,
    the forward or reverse KL's cross sum and the entropy sum, per lane until the end. ``zs_first``,
    ``zt_first`` are the first blocks, already loaded; each next block is loaded before the current
    one is used. The KL cross terms take the difference of the two centred logits,
    ``(zt - ref_t) - (zs - ref_s)``, so their error does not grow with the logits' magnitude."""
    offs = tl.arange(0, BLOCK_V)
    zs_next = zs_first
    zt_next = zt_first
    acc_s = tl.zeros([BLOCK_V], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_V], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK_V], dtype=tl.float32)
    acc_e = tl.zeros([BLOCK_V], dtype=tl.float32)
    for i in tl.range(0, n_blocks):
        xs = zs_next.to(tl.float32)
        ds = (xs - ref_s) * scale2
        dt = (zt_next.to(tl.float32) - ref_t) * scale2
        cols = (i + 1) * BLOCK_V + offs
        zs_next = _load_block(s_row, cols, read_end, KEEP_S)
        if HAS_T:
            zt_next = _load_block(t_row, cols, read_end, KEEP_T)
        if ENTROPY:
            es, ez = entropy_terms(ds)
            acc_e += ez
        else:
            es = tl.exp2(ds)
        acc_s += es
        if HAS_T:
            et = tl.exp2(dt)
            acc_t += et
            if DIV == DIV_FORWARD_KL:
                acc_x += tl.where(dt > float("-inf"), et * (dt - ds), 0.0)
            elif DIV == DIV_REVERSE_KL:
                acc_x += tl.where(ds > float("-inf"), es * (ds - dt), 0.0)
    return tl.sum(acc_s, axis=0), tl.sum(acc_t, axis=0), tl.sum(acc_x, axis=0), tl.sum(acc_e, axis=0)


@triton.jit
def _sums_ok(sum_s, sum_t, x, sum_e, DIV: tl.constexpr, HAS_T: tl.constexpr):
    """Whether a row's sums from ``_pair_sums`` are usable: each sum of exponentials in ``(0, inf)``,
    and the entropy's and the KL's sums, which multiply exponentials by differences and so overflow
    before the sums of exponentials do, finite."""
    ok = (sum_s > 0.0) & (sum_s < float("inf")) & (sum_e < float("inf"))
    if HAS_T:
        ok = ok & (sum_t > 0.0) & (sum_t < float("inf"))
    if DIV == DIV_FORWARD_KL or DIV == DIV_REVERSE_KL:
        ok = ok & is_finite(x)
    return ok


@triton.jit
def _exact_reference(row, V, BLOCK_V: tl.constexpr):
    """A row's max (logits' units; 0 while all -inf): the exact pass's reference."""
    m = span_max(row, 0, V, BLOCK_V)
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _pair_sweep(s_row, t_row, V, read_end, active, scale2, DIV: tl.constexpr, ENTROPY: tl.constexpr,
                HAS_T: tl.constexpr, KEEP_S: tl.constexpr, KEEP_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """The first sweep over a student row and its teacher row: ``(r_s, c_s, lse2_s, sum_s, r_t, c_t,
    lse2_t, kl2, sum_e)``: each row's ``row_centre`` pair and base-2 logsumexp, the student's sum,
    the forward or reverse KL in base 2 and the entropy sum; the exact pass for a row whose per-lane
    sums overflowed. Without ``HAS_T`` the teacher's values are the student's."""
    offs = tl.arange(0, BLOCK_V)
    n_blocks = tl.where(active, tl.cdiv(V, BLOCK_V), 0)
    # Per-lane sums against each row's first-block max (logits' units).
    zs_first = _load_block(s_row, offs, read_end, KEEP_S)
    ref_s = row_reference(zs_first.to(tl.float32))
    zt_first = zs_first
    ref_t = ref_s
    if HAS_T:
        zt_first = _load_block(t_row, offs, read_end, KEEP_T)
        ref_t = row_reference(zt_first.to(tl.float32))
    sum_s, sum_t, x, sum_e = _pair_sums(s_row, t_row, zs_first, zt_first, ref_s, ref_t, n_blocks, read_end, scale2,
                                        DIV, ENTROPY, HAS_T, KEEP_S, KEEP_T, BLOCK_V)
    if active & ~_sums_ok(sum_s, sum_t, x, sum_e, DIV, HAS_T):
        # The exact pass: the same sums against each row's max. No logit lies above its reference,
        # so nothing overflows; only an infinite KL, NaN or inf in the input stay non-finite.
        ref_s = _exact_reference(s_row, V, BLOCK_V)
        ref_t = ref_s
        zs_first = _load_block(s_row, offs, read_end, KEEP_S)
        zt_first = zs_first
        if HAS_T:
            ref_t = _exact_reference(t_row, V, BLOCK_V)
            zt_first = _load_block(t_row, offs, read_end, KEEP_T)
        sum_s, sum_t, x, sum_e = _pair_sums(s_row, t_row, zs_first, zt_first, ref_s, ref_t, n_blocks, read_end,
                                            scale2, DIV, ENTROPY, HAS_T, KEEP_S, KEEP_T, BLOCK_V)
    if not HAS_T:
        sum_t = sum_s
    lse2_s = ref_s * scale2 + tl.log2(sum_s)
    lse2_t = ref_t * scale2 + tl.log2(sum_t)
    r_s, c_s = row_centre(ref_s, sum_s)
    r_t, c_t = row_centre(ref_t, sum_t)
    kl2 = 0.0
    if DIV == DIV_FORWARD_KL:
        kl2 = x / sum_t - tl.log2(sum_t) + tl.log2(sum_s)
    elif DIV == DIV_REVERSE_KL:
        kl2 = x / sum_s - tl.log2(sum_s) + tl.log2(sum_t)
    return r_s, c_s, lse2_s, sum_s, r_t, c_t, lse2_t, kl2, sum_e


@triton.jit
def _jsd_sweep(s_row, t_row, V, read_end, active, scale2, r_s, c_s, r_t, c_t, beta, KEEP: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """``(sum_v T_v (b_v - log2 M_v), sum_v S_v (a_v - log2 M_v))`` over a row in base 2, with ``a``,
    ``b`` the log-probs under the ``row_centre`` pairs ``(r_s, c_s)``, ``(r_t, c_t)``: a sweep backwards
    (the blocks read last first), each block loaded where it is used (the next blocks of both rows
    held as well spill at 8 warps)."""
    offs = tl.arange(0, BLOCK_V)
    n_blocks = tl.cdiv(V, BLOCK_V)
    acc_t = tl.zeros([BLOCK_V], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for i in tl.range(0, tl.where(active, n_blocks, 0)):
        cols = (n_blocks - 1 - i) * BLOCK_V + offs
        a2 = (_load_block(s_row, cols, read_end, KEEP).to(tl.float32) - r_s) * scale2 - c_s
        b2 = (_load_block(t_row, cols, read_end, KEEP).to(tl.float32) - r_t) * scale2 - c_t
        p_s, p_t, log_m = jsd_mixture(a2, b2, beta)
        # Zero-probability entries add nothing; NaN (an invalid row) stays NaN.
        acc_t += tl.where(p_t == 0.0, 0.0, p_t * (b2 - log_m))
        acc_s += tl.where(p_s == 0.0, 0.0, p_s * (a2 - log_m))
    return tl.sum(acc_t, axis=0), tl.sum(acc_s, axis=0)


@triton.jit
def _write_grad(
    s_row, t_row, d_row, V, read_end, scale2, inv_temp, r_s, c_s, r_t, c_t, y, c_lp, c_h, entropy, c_d, k, beta,
    NEED_LP: tl.constexpr, ENTROPY_GRAD: tl.constexpr, DIV: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Writes ``(c_lp * (1[v = y] - p) - c_h * p * (log p + H) + c_d * tau * dD/dz_S) / tau`` over a
    row, one block ahead in flight, backwards or forwards; the rows' log-probs from their
    ``row_centre`` pairs (``(0, lse2)`` where only the logsumexp is known)."""
    offs = tl.arange(0, BLOCK_V)
    n_blocks = tl.cdiv(V, BLOCK_V)
    first = 0
    if BACKWARD:
        first = n_blocks - 1
    zs_next = _load_block(s_row, first * BLOCK_V + offs, read_end, False)
    zt_next = zs_next
    if DIV != DIV_SAMPLED:
        zt_next = _load_block(t_row, first * BLOCK_V + offs, read_end, False)
    for i in tl.range(0, n_blocks):
        if BACKWARD:
            cols = (n_blocks - 1 - i) * BLOCK_V + offs
            following = cols - BLOCK_V
        else:
            cols = i * BLOCK_V + offs
            following = cols + BLOCK_V
        zs = (zs_next.to(tl.float32) - r_s) * scale2
        zt = zt_next
        zs_next = _load_block(s_row, following, read_end, False)
        if DIV != DIV_SAMPLED:
            zt_next = _load_block(t_row, following, read_end, False)
        g = tl.zeros([BLOCK_V], dtype=tl.float32)
        if NEED_LP:
            g = softmax_grad_block(zs, c_s, cols, y, c_lp, c_h, entropy, ENTROPY_GRAD)
        if DIV != DIV_SAMPLED:
            dd = divergence_grad_block(zs, (zt.to(tl.float32) - r_t) * scale2, c_s, c_t, k, beta, DIV)
            # A clipped token's infinite divergence must not turn its zero coefficient into NaN.
            g += tl.where(c_d != 0.0, c_d * dd, 0.0)
        tl.store(d_row + cols, (g * inv_temp).to(d_row.dtype.element_ty), mask=cols < V,
                 eviction_policy="evict_first")


@triton.jit
def _opsd_fwd_kernel(
    S, stride_sb, stride_st,
    T, stride_tb, stride_tt,
    dS, stride_db, stride_dt,
    tokens, adv, lp_t_in, lp_old_in, weight, credit_in, seq_ratio_in, rollout_in, log_is_in, ref_in,
    loss_out, lp_s_out, lp_t_out, lse_out, d_lp_out, w_out, ratio_out, is_out, kl_out, entropy_out,
    lse_t_out, div_out, opsd_out, k_out, d_div_out, flags_out,
    n_rows, seqlen, V, scale2, inv_temp, alpha, beta, token_clip,
    log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip, log_tis_cap, kl_coef, entropy_coef,
    sapo_tau_pos, sapo_tau_neg,
    DIV: tl.constexpr, HAS_T_LOGITS: tl.constexpr, NEED_LP: tl.constexpr, GRPO: tl.constexpr,
    HAS_OLD: tl.constexpr, HAS_DUAL: tl.constexpr, CISPO: tl.constexpr, SAPO: tl.constexpr, CREDIT_OLD: tl.constexpr,
    HAS_CREDIT: tl.constexpr, SEQ_RATIO: tl.constexpr, IS_MODE: tl.constexpr, KL: tl.constexpr,
    ENTROPY: tl.constexpr, ENTROPY_GRAD: tl.constexpr, WRITE_GRAD: tl.constexpr, KEEP_S: tl.constexpr,
    KEEP_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # int64 rows: offsets into [N, V] pass 2**31 at real sizes.
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        b = row // seqlen
        t = row - b * seqlen
        s_row = S + b * stride_sb + t * stride_st
        t_row = T + b * stride_tb + t * stride_tt
        wt = tl.load(weight + row)
        # A zero weight is a masked token: nothing of its rows is read, its gradient row is zero.
        active = wt != 0.0
        y = tl.zeros([], dtype=tl.int64)
        y_ok = active
        if NEED_LP:
            y = tl.load(tokens + row).to(tl.int64)
            y_ok = (y >= 0) & (y < V)
        y_safe = tl.where(y_ok, y, 0)
        read_end = tl.where(active, V, 0)

        r_s, c_s, lse2_s, sum_s, r_t, c_t, lse2_t, kl2, sum_e = _pair_sweep(
            s_row, t_row, V, read_end, active, scale2, DIV, ENTROPY, HAS_T_LOGITS, KEEP_S, KEEP_T, BLOCK_V)
        flags = tl.where(active & ~is_finite(lse2_s), FLAG_NONFINITE_STUDENT, 0)
        if HAS_T_LOGITS:
            flags |= tl.where(active & ~is_finite(lse2_t), FLAG_NONFINITE_TEACHER, 0)
        entropy = 0.0
        if ENTROPY:
            entropy = tl.where(active, entropy_finish(c_s, sum_s, sum_e), 0.0)
        lp_s = 0.0
        lp_t = 0.0
        if NEED_LP:
            # Log-probs from the logits centred on the row's reference: precise at any magnitude.
            zy_s = tl.load(s_row + y_safe, mask=active & y_ok, other=float("-inf")).to(tl.float32)
            lp_s = token_logprob(zy_s, r_s, c_s, scale2)
            if HAS_T_LOGITS:
                zy_t = tl.load(t_row + y_safe, mask=active & y_ok, other=float("-inf")).to(tl.float32)
                lp_t = token_logprob(zy_t, r_t, c_t, scale2)
            else:
                lp_t = tl.load(lp_t_in + row)
            flags |= tl.where(active & ~y_ok, FLAG_BAD_TOKEN, 0)

        k = 0.0
        if DIV == DIV_FORWARD_KL:
            div = LN2 * kl2
        elif DIV == DIV_REVERSE_KL:
            div = LN2 * kl2
            k = div
        elif DIV == DIV_JSD:
            # log M needs both logsumexps: a second sweep, backwards (the blocks read last first).
            sum_tm, sum_sm = _jsd_sweep(s_row, t_row, V, read_end, active, scale2, r_s, c_s, r_t, c_t, beta, WRITE_GRAD,
                                        BLOCK_V)
            k = LN2 * sum_sm
            div = beta * LN2 * sum_tm + (1.0 - beta) * k
        else:
            div = log_diff(lp_s, lp_t)
        clipped = div > token_clip
        if DIV == DIV_SAMPLED:
            # D = 0 (both log-probs -inf: a token neither model can sample) adds 0, not 0 * -inf.
            opsd = tl.where(div == 0.0, 0.0, nan_min(div, token_clip) * lp_s)
            d_div = tl.where(clipped, 0.0, div)
        else:
            opsd = nan_min(div, token_clip)
            d_div = tl.where(clipped, 0.0, 1.0)

        d_lp = 0.0
        if GRPO:
            loss, d_lp, w, ratio, is_w, kl, clip_flags = _token_terms(
                row, lp_s, lp_t, entropy, adv, lp_old_in, credit_in, seq_ratio_in, rollout_in, log_is_in, ref_in,
                log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip, log_tis_cap, kl_coef, entropy_coef,
                sapo_tau_pos, sapo_tau_neg, HAS_OLD, HAS_DUAL, CISPO, SAPO, CREDIT_OLD, HAS_CREDIT, SEQ_RATIO, IS_MODE,
                KL, ENTROPY_GRAD, row < n_rows,
            )
            tl.store(loss_out + row, tl.where(active, loss, 0.0))
            tl.store(d_lp_out + row, tl.where(active, d_lp, 0.0))
            tl.store(w_out + row, tl.where(active, w, 0.0))
            tl.store(ratio_out + row, tl.where(active, ratio, 0.0))
            tl.store(is_out + row, tl.where(active, is_w, 0.0))
            tl.store(kl_out + row, tl.where(active, kl, 0.0))
            tl.store(entropy_out + row, entropy)
            flags |= tl.where(active, clip_flags, 0)
        tl.store(lp_s_out + row, tl.where(active, lp_s, 0.0))
        tl.store(lp_t_out + row, tl.where(active, lp_t, 0.0))
        tl.store(lse_out + row, tl.where(active, lse2_s * LN2, 0.0))
        tl.store(lse_t_out + row, tl.where(active, lse2_t * LN2, 0.0))
        tl.store(div_out + row, tl.where(active, div, 0.0))
        tl.store(opsd_out + row, tl.where(active, opsd, 0.0))
        tl.store(k_out + row, tl.where(active, k, 0.0))
        tl.store(d_div_out + row, tl.where(active, d_div, 0.0))
        tl.store(flags_out + row, flags)

        if WRITE_GRAD:
            c_lp = wt * d_lp
            c_d = 0.0
            if DIV == DIV_SAMPLED:
                c_lp += wt * alpha * d_div
            else:
                c_d = tl.where(active, wt * alpha * d_div, 0.0)
            _write_grad(
                s_row, t_row, dS + b * stride_db + t * stride_dt, V, read_end, scale2, inv_temp,
                tl.where(active, r_s, 0.0), tl.where(active, c_s, 0.0), tl.where(active, r_t, 0.0),
                tl.where(active, c_t, 0.0), y, tl.where(active, c_lp, 0.0),
                tl.where(active, -wt * entropy_coef, 0.0), entropy, c_d, tl.where(active, k, 0.0), beta,
                NEED_LP, ENTROPY_GRAD, DIV, DIV != DIV_JSD, BLOCK_V,
            )


@triton.jit
def _opsd_bwd_kernel(
    S, stride_sb, stride_st,
    T, stride_tb, stride_tt,
    dS, stride_db, stride_dt,
    tokens, lse_s, lse_t, k_in, coef_lp, coef_h, entropy_in, coef_d,
    n_rows, seqlen, V, scale2, inv_temp, beta,
    DIV: tl.constexpr, NEED_LP: tl.constexpr, ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The gradient of ``c_lp * lp + c_h * H + c_d * D`` by the student logits, from the per-row
    logsumexps and ``k``; a row whose coefficients are all zero is written as zeros without reading."""
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        b = row // seqlen
        t = row - b * seqlen
        c_d = tl.load(coef_d + row)
        active = c_d != 0.0
        y = tl.zeros([], dtype=tl.int64)
        c_lp = 0.0
        if NEED_LP:
            y = tl.load(tokens + row).to(tl.int64)
            c_lp = tl.load(coef_lp + row)
            active |= c_lp != 0.0
        c_h = 0.0
        h = 0.0
        if ENTROPY_GRAD:
            c_h = tl.load(coef_h + row)
            h = tl.load(entropy_in + row)
            active |= c_h != 0.0
        _write_grad(
            S + b * stride_sb + t * stride_st, T + b * stride_tb + t * stride_tt, dS + b * stride_db + t * stride_dt,
            V, tl.where(active, V, 0), scale2, inv_temp, 0.0, tl.where(active, tl.load(lse_s + row) * LOG2E, 0.0),
            0.0, tl.where(active, tl.load(lse_t + row) * LOG2E, 0.0), y, c_lp, c_h, h, c_d,
            tl.where(active, tl.load(k_in + row), 0.0), beta, NEED_LP, ENTROPY_GRAD, DIV, False, BLOCK_V,
        )
