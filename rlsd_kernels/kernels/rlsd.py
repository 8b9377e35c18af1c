"""Triton kernels of the RLSD loss: the row kernel, the token epilogue kernel, the gradient scale.

``_rlsd_fwd_kernel``: one program per token row streams the student row and its teacher row
together (per-lane exp2 sums, see ``common.row_reference``), runs the shared epilogue
(``common.rlsd_epilogue``) on the token and, with ``WRITE_GRAD``, writes the student logits' gradient
right away, walking the row backwards so that the blocks read last come first.

``_rlsd_token_kernel``: the same epilogue over blocks of tokens whose log-probs are already known,
for what needs every token of a sequence first (sequence-level ratios and importance weights).
"""

import triton
import triton.language as tl

from .common import (
    FLAG_BAD_TOKEN,
    FLAG_NONFINITE_STUDENT,
    FLAG_NONFINITE_TEACHER,
    LN2,
    entropy_finish,
    entropy_terms,
    finish_sum,
    finish_sums,
    is_finite,
    log_diff,
    rlsd_epilogue,
    row_centre,
    row_lse_exact,
    row_reference,
    softmax_grad_block,
    token_logprob,
)

ERROR_BITS = tl.constexpr(FLAG_BAD_TOKEN.value | FLAG_NONFINITE_STUDENT.value | FLAG_NONFINITE_TEACHER.value)


@triton.jit
def _rlsd_fwd_kernel(
    S, stride_sb, stride_st,
    T, stride_tb, stride_tt,
    dS, stride_db, stride_dt,
    tokens, adv, lp_t_in, lp_old_in, weight, credit_in, seq_ratio_in, rollout_in, log_is_in, ref_in,
    out, stride_out, flags_out,
    n_rows, seqlen, V, scale2, inv_temp,
    log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip, log_tis_cap, kl_coef, entropy_coef,
    sapo_tau_pos, sapo_tau_neg,
    HAS_T_LOGITS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DUAL: tl.constexpr, CISPO: tl.constexpr, SAPO: tl.constexpr,
    CREDIT_OLD: tl.constexpr, HAS_CREDIT: tl.constexpr, SEQ_RATIO: tl.constexpr, IS_MODE: tl.constexpr,
    KL: tl.constexpr, ENTROPY: tl.constexpr, ENTROPY_GRAD: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
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
        ref_s = row_reference(zs_next.to(tl.float32))
        acc_s = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc_e = tl.zeros([BLOCK_V], dtype=tl.float32)
        zt_next = zs_next
        ref_t = ref_s
        acc_t = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_T_LOGITS:
            zt_next = tl.load(t_row + offs, mask=offs < read_end, other=float("-inf"), eviction_policy="evict_first")
            ref_t = row_reference(zt_next.to(tl.float32))
        for i in tl.range(0, tl.where(active, n_blocks, 0)):
            xs = zs_next.to(tl.float32)
            zs = (xs - ref_s) * scale2
            zt = zt_next
            cols = (i + 1) * BLOCK_V + offs
            zs_next = tl.load(s_row + cols, mask=cols < read_end, other=float("-inf"), eviction_policy="evict_last")
            if HAS_T_LOGITS:
                zt_next = tl.load(t_row + cols, mask=cols < read_end, other=float("-inf"),
                                  eviction_policy="evict_first")
            if ENTROPY:
                e, ez = entropy_terms(zs)
                acc_s += e
                acc_e += ez
            else:
                acc_s += tl.exp2(zs)
            if HAS_T_LOGITS:
                acc_t += tl.exp2((zt.to(tl.float32) - ref_t) * scale2)
        lse2_s, sum_s, sum_e, ok = finish_sums(ref_s * scale2, acc_s, acc_e)
        exact = active & ~ok
        if exact:
            ref_s, lse2_s, sum_s, sum_e = row_lse_exact(s_row, V, scale2, BLOCK_V, ENTROPY)
        # Log-probs (and the gradient) from the logits centred on the row's reference: precise at any
        # magnitude (see ``row_centre``).
        r_s, c_s = row_centre(ref_s, sum_s)
        entropy = 0.0
        if ENTROPY:
            entropy = tl.where(active, entropy_finish(c_s, sum_s, sum_e), 0.0)
        zy_s = tl.load(s_row + y_safe, mask=active & y_ok, other=float("-inf")).to(tl.float32)
        lp_s = token_logprob(zy_s, r_s, c_s, scale2)
        flags = tl.where(active & ~y_ok, FLAG_BAD_TOKEN, 0)
        flags |= tl.where(active & ~is_finite(lse2_s), FLAG_NONFINITE_STUDENT, 0)
        if HAS_T_LOGITS:
            lse2_t, sum_t, ok = finish_sum(ref_t * scale2, acc_t)
            exact_t = active & ~ok
            if exact_t:
                ref_t, lse2_t, sum_t, _ = row_lse_exact(t_row, V, scale2, BLOCK_V, False)
            r_t, c_t = row_centre(ref_t, sum_t)
            zy_t = tl.load(t_row + y_safe, mask=active & y_ok, other=float("-inf")).to(tl.float32)
            lp_t = token_logprob(zy_t, r_t, c_t, scale2)
            flags |= tl.where(active & ~is_finite(lse2_t), FLAG_NONFINITE_TEACHER, 0)
        else:
            lp_t = tl.load(lp_t_in + row)

        loss, d_lp, w, ratio, is_w, kl, clip_flags = _token_terms(
            row, lp_s, lp_t, entropy, adv, lp_old_in, credit_in, seq_ratio_in, rollout_in, log_is_in, ref_in,
            log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip, log_tis_cap, kl_coef, entropy_coef,
            sapo_tau_pos, sapo_tau_neg,
            HAS_OLD, HAS_DUAL, CISPO, SAPO, CREDIT_OLD, HAS_CREDIT, SEQ_RATIO, IS_MODE, KL, ENTROPY_GRAD, row < n_rows,
        )
        store_row_outputs(out, stride_out, flags_out, row, active, loss, lp_s, lp_t, lse2_s, d_lp, w, ratio, is_w, kl,
                          entropy, flags | tl.where(active, clip_flags, 0))

        if WRITE_GRAD:
            d_row = dS + b * stride_db + t * stride_dt
            coef = tl.where(active, wt * d_lp, 0.0)
            coef_h = tl.where(active, -wt * entropy_coef, 0.0)
            r_ref = tl.where(active, r_s, 0.0)
            c_ref = tl.where(active, c_s, 0.0)
            # Backwards over the row (its last blocks were read most recently), prefetching as above.
            cols = (n_blocks - 1) * BLOCK_V + offs
            zs_next = tl.load(s_row + cols, mask=cols < read_end, other=float("-inf"), eviction_policy="evict_first")
            for i in tl.range(0, n_blocks):
                cols = (n_blocks - 1 - i) * BLOCK_V + offs
                zs = zs_next
                prev = cols - BLOCK_V
                zs_next = tl.load(s_row + prev, mask=(prev >= 0) & (prev < read_end), other=float("-inf"),
                                  eviction_policy="evict_first")
                g = softmax_grad_block((zs.to(tl.float32) - r_ref) * scale2, c_ref, cols, y, coef, coef_h, entropy,
                                       ENTROPY_GRAD)
                tl.store(d_row + cols, (g * inv_temp).to(dS.dtype.element_ty), mask=cols < V,
                         eviction_policy="evict_first")


@triton.jit
def store_row_outputs(out, stride_out, flags_out, row, active, loss, lp_s, lp_t, lse2_s, d_lp, w, ratio, is_w, kl,
                      entropy, flags):
    """One token row's outputs: the rows of ``out`` ([10, N] float32), in the order of
    ``launch/terms.py: OUTPUTS`` (0 for a masked row), and its flags."""
    # Each store's address from the previous one's: a product of the loop-invariant stride would
    # be hoisted out of the row loop and held in registers through it.
    o = out + row
    tl.store(o, tl.where(active, loss, 0.0))
    o += stride_out
    tl.store(o, tl.where(active, lp_s, 0.0))
    o += stride_out
    tl.store(o, tl.where(active, lp_t, 0.0))
    o += stride_out
    tl.store(o, tl.where(active, lse2_s * LN2, 0.0))
    o += stride_out
    tl.store(o, tl.where(active, d_lp, 0.0))
    o += stride_out
    tl.store(o, tl.where(active, w, 0.0))
    o += stride_out
    tl.store(o, tl.where(active, ratio, 0.0))
    o += stride_out
    tl.store(o, tl.where(active, is_w, 0.0))
    o += stride_out
    tl.store(o, tl.where(active, kl, 0.0))
    o += stride_out
    tl.store(o, entropy)
    tl.store(flags_out + row, flags)


@triton.jit
def _token_terms(
    idx, lp_s, lp_t, entropy, adv, lp_old_in, credit_in, seq_ratio_in, rollout_in, log_is_in, ref_in,
    log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip, log_tis_cap, kl_coef, entropy_coef,
    sapo_tau_pos, sapo_tau_neg,
    HAS_OLD: tl.constexpr, HAS_DUAL: tl.constexpr, CISPO: tl.constexpr, SAPO: tl.constexpr, CREDIT_OLD: tl.constexpr,
    HAS_CREDIT: tl.constexpr, SEQ_RATIO: tl.constexpr, IS_MODE: tl.constexpr, KL: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr, mask,
):
    """Loads the optional per-token inputs at ``idx`` (a row, or a block of tokens) and runs the
    epilogue. ``IS_MODE``: 0 no importance weight, 1 from ``rollout_in`` per token, 2 the
    precomputed log-weight ``log_is_in`` (sequence level)."""
    a = tl.load(adv + idx, mask=mask, other=0.0)
    lp_old = lp_s
    if HAS_OLD:
        lp_old = tl.load(lp_old_in + idx, mask=mask, other=0.0)
    credit = tl.full(lp_s.shape, 1.0, tl.float32)
    if HAS_CREDIT:
        credit = tl.load(credit_in + idx, mask=mask, other=0.0)
    log_seq_ratio = 0.0
    if SEQ_RATIO:
        log_seq_ratio = tl.load(seq_ratio_in + idx, mask=mask, other=0.0)
    log_is = 0.0
    if IS_MODE == 1:
        log_is = log_diff(lp_old, tl.load(rollout_in + idx, mask=mask, other=0.0))
    elif IS_MODE == 2:
        log_is = tl.load(log_is_in + idx, mask=mask, other=0.0)
    lp_ref = 0.0
    if KL != 0:
        lp_ref = tl.load(ref_in + idx, mask=mask, other=0.0)
    return rlsd_epilogue(
        lp_s, lp_t, lp_old, a, credit, log_seq_ratio, log_is, lp_ref, entropy,
        log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip, log_tis_cap, kl_coef, entropy_coef,
        sapo_tau_pos, sapo_tau_neg, HAS_DUAL, CISPO, SAPO, CREDIT_OLD, SEQ_RATIO, IS_MODE != 0, KL, ENTROPY_GRAD,
    )


@triton.jit
def _rlsd_token_kernel(
    lp_s_in, lp_t_in, entropy_in, adv, lp_old_in, weight, credit_in, seq_ratio_in, rollout_in, log_is_in, ref_in,
    loss_out, d_lp_out, w_out, ratio_out, is_out, kl_out, flags_out,
    n,
    log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip, log_tis_cap, kl_coef, entropy_coef,
    sapo_tau_pos, sapo_tau_neg,
    HAS_OLD: tl.constexpr, HAS_DUAL: tl.constexpr, CISPO: tl.constexpr, SAPO: tl.constexpr, CREDIT_OLD: tl.constexpr,
    HAS_CREDIT: tl.constexpr, SEQ_RATIO: tl.constexpr, IS_MODE: tl.constexpr, KL: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """The epilogue for tokens whose log-probs (and entropies) the row kernel already wrote; keeps
    the error bits of ``flags_out`` and replaces the rest."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = idx < n
    active = (tl.load(weight + idx, mask=in_range, other=0.0) != 0.0) & in_range
    lp_s = tl.load(lp_s_in + idx, mask=in_range, other=0.0)
    lp_t = tl.load(lp_t_in + idx, mask=in_range, other=0.0)
    entropy = 0.0
    if ENTROPY_GRAD:
        entropy = tl.load(entropy_in + idx, mask=in_range, other=0.0)
    loss, d_lp, w, ratio, is_w, kl, clip_flags = _token_terms(
        idx, lp_s, lp_t, entropy, adv, lp_old_in, credit_in, seq_ratio_in, rollout_in, log_is_in, ref_in,
        log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip, log_tis_cap, kl_coef, entropy_coef,
        sapo_tau_pos, sapo_tau_neg,
        HAS_OLD, HAS_DUAL, CISPO, SAPO, CREDIT_OLD, HAS_CREDIT, SEQ_RATIO, IS_MODE, KL, ENTROPY_GRAD, in_range,
    )
    tl.store(loss_out + idx, tl.where(active, loss, 0.0), mask=in_range)
    tl.store(d_lp_out + idx, tl.where(active, d_lp, 0.0), mask=in_range)
    tl.store(w_out + idx, tl.where(active, w, 0.0), mask=in_range)
    tl.store(ratio_out + idx, tl.where(active, ratio, 0.0), mask=in_range)
    tl.store(is_out + idx, tl.where(active, is_w, 0.0), mask=in_range)
    tl.store(kl_out + idx, tl.where(active, kl, 0.0), mask=in_range)
    errors = tl.load(flags_out + idx, mask=in_range, other=0) & ERROR_BITS
    tl.store(flags_out + idx, errors | tl.where(active, clip_flags, 0), mask=in_range)


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
