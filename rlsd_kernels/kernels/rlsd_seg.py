"""The policy loss's segmented kernel: the fused forward and student-logit gradient, with each token
row split into vocabulary segments spread over a persistent grid (three passes over the logits).

One program per row (``rlsd._rlsd_fwd_kernel``) keeps about one row per multiprocessor in flight
between a row's statistics and its gradient: on an H200 ~40 MB of student rows wait in L2 for
their re-read while the teacher's rows pass through, and most of the re-read comes from memory.
Here the work items are (row, segment) pairs in row-major order, and program ``p`` of a grid of
``G`` takes item ``p + j * G`` at step ``j``. At each step a program

1. *publishes* its item: streams the student's (and teacher's) segment into the segment's
   statistics (``segment_sums``), stores them in ``stats`` (the segment holding the sampled token
   also stores that token's logits) and releases them by adding 1 to the row's counter;
2. *finishes* its item from ``LAG`` steps back: waits (acquire) until every segment of that row is
   published, merges the row's statistics (``merge_segments``), runs the epilogue (segment 0 stores
   the row's outputs) and writes the segment's gradient, re-reading logits that the grid read at
   most ``LAG * G`` items ago, so from L2.

A program only waits for items of its own or earlier steps, published before any program's wait of
that step: a grid whose programs are all resident at once cannot deadlock, and the launcher makes it
a cooperative grid no larger than the occupancy. Under the Triton interpreter programs run one
after another, so the launcher uses one program (``G = 1``) and ``LAG = n_seg - 1``: every wait is
already met when it is reached, and the same code runs. Masked rows (weight 0) publish nothing,
read nothing and wait for nothing; their gradient rows are written as zeros.

The counters start at zero each call (the launcher zeroes them): a counter left by an earlier
call would let a wait pass early, and CUDA-graph replays would reuse a baked-in epoch.
"""

import triton
import triton.language as tl

from .common import (
    FLAG_BAD_TOKEN,
    FLAG_NONFINITE_STUDENT,
    FLAG_NONFINITE_TEACHER,
    entropy_finish,
    first_block,
    is_finite,
    lane_sums,
    max_sums,
    row_reference,
    softmax_grad_block,
    token_logprob,
)
from .rlsd import _token_terms, store_row_outputs


@triton.jit
def segment_sums(x_row, start, end, scale2, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    """``(ref, s, t)`` of the logits ``x_row[start:end]``: a reference (logits' units), ``s`` the sum of
    ``exp2(d)`` and ``t`` of ``exp2(d) * d`` with ``d = (x - ref) * scale2`` (``t`` only with ``ENTROPY``).

    Per-lane sums against the first block's max, as the row kernels stream; a segment whose sum is
    not in [1, inf) or whose ``t`` overflows (a logit far above the reference, a first block without
    a finite logit, NaN or inf) is redone against its max by ``max_sums``. A segment
    without a finite logit has ``ref = -inf`` and ``s = 0``."""
    x_first = first_block(x_row, start, end, BLOCK_V)
    ref = row_reference(x_first.to(tl.float32))
    s, t = lane_sums(x_row, start, end, ref, x_first, scale2, BLOCK_V, ENTROPY)
    # exp2(d) * d overflows some 7 bits of d before exp2(d) does.
    redo = ~((s >= 1.0) & (s < float("inf")) & (t < float("inf")))
    if redo:
        # Against the segment's max (``max_sums``); a segment without a finite logit: ref = -inf.
        ref, s, t = max_sums(x_row, start, end, scale2, BLOCK_V, ENTROPY)
    return ref, s, t


@triton.jit
def merge_segments(ref, s, t, scale2, ENTROPY: tl.constexpr):
    """``(r, c, sum, t)`` of a row from its segments' ``segment_sums`` (blocks of them, ``s = 0`` for
    none): a logit ``x`` has the base-2 log-prob ``(x - r) * scale2 - c``, as from ``row_centre``, and
    ``entropy_finish(c, sum, t)`` is the entropy. Empty segments take no part; a NaN stays.

    Several segments' sums can each lie near the float32 maximum (a logit far above its segment's
    first block), so they are added in the frame of the largest segment mass ``2^m``: ``sum`` and
    ``t`` come back scaled by ``2^-m`` alike (the entropy takes their ratio). No term is larger than
    its segment's own finite sums: ``s >= 1`` for a segment with a finite logit, so ``d - m <= 0``."""
    r = tl.max(ref, axis=0)
    r = tl.where(r == float("-inf"), 0.0, r)
    empty = s == 0.0
    d = tl.where(empty, 0.0, (ref - r) * scale2)
    log_mass = tl.where(empty, float("-inf"), d + tl.log2(s))
    m = tl.max(log_mass, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    mass = tl.exp2(log_mass - m)
    total = tl.sum(mass, axis=0)
    t_total = 0.0
    if ENTROPY:
        t_total = tl.sum(tl.where(empty, 0.0, tl.exp2(d - m) * t + d * mass), axis=0)
    return r, m + tl.log2(total), total, t_total


@triton.jit
def _publish(x_row, c0, c1, y_safe, y_ok, st, n_items, q, zy_at, scale2, BLOCK_V: tl.constexpr,
             ENTROPY: tl.constexpr):
    """Stores one model's segment statistics at ``st + q * n_items`` (q, q + 1, q + 2 with ``ENTROPY``)
    and, from the segment holding the sampled token, that token's logit at ``zy_at`` (-inf for a
    token outside the vocabulary, which then lands in segment 0)."""
    ref, s, t = segment_sums(x_row, c0, c1, scale2, BLOCK_V, ENTROPY)
    tl.store(st + q * n_items, ref)
    tl.store(st + (q + 1) * n_items, s)
    if ENTROPY:
        tl.store(st + (q + 2) * n_items, t)
    if (y_safe >= c0) & (y_safe < c1):
        zy = tl.load(x_row + y_safe, mask=y_ok, other=float("-inf")).to(tl.float32)
        tl.store(zy_at, zy)


@triton.jit
def _merged(stats, row, n_seg, n_items, q, active, scale2, BLOCK_SEG: tl.constexpr, ENTROPY: tl.constexpr):
    """``merge_segments`` over the row's published statistics of quantity ``q`` (read past L1: other
    programs wrote them)."""
    ks = tl.arange(0, BLOCK_SEG)
    live = ks < tl.where(active, n_seg, 0)
    base = stats + row * n_seg + ks
    ref = tl.load(base + q * n_items, mask=live, other=float("-inf"), cache_modifier=".cg")
    s = tl.load(base + (q + 1) * n_items, mask=live, other=0.0, cache_modifier=".cg")
    t = s
    if ENTROPY:
        t = tl.load(base + (q + 2) * n_items, mask=live, other=0.0, cache_modifier=".cg")
    return merge_segments(ref, s, t, scale2, ENTROPY)


@triton.jit
def _rlsd_seg_kernel(
    S, stride_sb, stride_st,
    T, stride_tb, stride_tt,
    dS, stride_db, stride_dt,
    tokens, adv, lp_t_in, lp_old_in, weight, credit_in, seq_ratio_in, rollout_in, log_is_in, ref_in,
    out, stride_out, flags_out,
    n_rows, seqlen, V, scale2, inv_temp,
    log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip, log_tis_cap, kl_coef, entropy_coef,
    sapo_tau_pos, sapo_tau_neg,
    stats, zy_out, counts, n_seg, seg_len, lag,
    HAS_T_LOGITS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DUAL: tl.constexpr, CISPO: tl.constexpr, SAPO: tl.constexpr,
    CREDIT_OLD: tl.constexpr, HAS_CREDIT: tl.constexpr, SEQ_RATIO: tl.constexpr, IS_MODE: tl.constexpr,
    KL: tl.constexpr, ENTROPY: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_SEG: tl.constexpr,
):
    """``stats``: float32 ``[5, n_rows * n_seg]`` (the student's ref, sum and entropy sum, the
    teacher's ref and sum per segment), ``zy_out`` float32 ``[2, n_rows]`` (the sampled token's
    logits), ``counts`` int32 ``[n_rows]`` of zeros. The other arguments are ``_rlsd_fwd_kernel``'s."""
    offs = tl.arange(0, BLOCK_V)
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_items = n_rows * n_seg
    n_steps = tl.cdiv(n_items - pid, n_programs)
    for j in tl.range(0, n_steps + lag):
        if j < n_steps:
            # 1. Publish item pid + j * G.
            item = pid + j * n_programs
            row = (item // n_seg).to(tl.int64)
            seg = item - (item // n_seg) * n_seg
            if tl.load(weight + row) != 0.0:
                b = row // seqlen
                t = row - b * seqlen
                y = tl.load(tokens + row).to(tl.int64)
                y_ok = (y >= 0) & (y < V)
                y_safe = tl.where(y_ok, y, 0)
                c0 = seg * seg_len
                c1 = tl.minimum(c0 + seg_len, V)
                st = stats + item
                _publish(S + b * stride_sb + t * stride_st, c0, c1, y_safe, y_ok, st, n_items, 0, zy_out + row,
                         scale2, BLOCK_V, ENTROPY)
                if HAS_T_LOGITS:
                    _publish(T + b * stride_tb + t * stride_tt, c0, c1, y_safe, y_ok, st, n_items, 3,
                             zy_out + n_rows + row, scale2, BLOCK_V, False)
                # Every thread's stores before the release (which one thread performs).
                tl.debug_barrier()
                tl.atomic_add(counts + row, 1, sem="release")
        if j >= lag:
            # 2. Finish item pid + (j - lag) * G.
            item = pid + (j - lag) * n_programs
            row = (item // n_seg).to(tl.int64)
            seg = item - (item // n_seg) * n_seg
            b = row // seqlen
            t = row - b * seqlen
            s_row = S + b * stride_sb + t * stride_st
            wt = tl.load(weight + row)
            active = wt != 0.0
            if active:
                seen = tl.atomic_add(counts + row, 0, sem="acquire")
                while seen < n_seg:
                    seen = tl.atomic_add(counts + row, 0, sem="acquire")
                tl.debug_barrier()
            y = tl.load(tokens + row).to(tl.int64)
            y_ok = (y >= 0) & (y < V)
            r_s, c_s, sum_s, sum_e = _merged(stats, row, n_seg, n_items, 0, active, scale2, BLOCK_SEG, ENTROPY)
            lse2_s = r_s * scale2 + c_s
            entropy = 0.0
            if ENTROPY:
                entropy = tl.where(active, entropy_finish(c_s, sum_s, sum_e), 0.0)
            zy_s = tl.load(zy_out + row, mask=active, other=float("-inf"), cache_modifier=".cg")
            lp_s = token_logprob(zy_s, r_s, c_s, scale2)
            flags = tl.where(active & ~y_ok, FLAG_BAD_TOKEN, 0)
            flags |= tl.where(active & ~is_finite(lse2_s), FLAG_NONFINITE_STUDENT, 0)
            if HAS_T_LOGITS:
                r_t, c_t, _, _ = _merged(stats, row, n_seg, n_items, 3, active, scale2, BLOCK_SEG, False)
                zy_t = tl.load(zy_out + n_rows + row, mask=active, other=float("-inf"), cache_modifier=".cg")
                lp_t = token_logprob(zy_t, r_t, c_t, scale2)
                flags |= tl.where(active & ~is_finite(r_t * scale2 + c_t), FLAG_NONFINITE_TEACHER, 0)
            else:
                lp_t = tl.load(lp_t_in + row)
            loss, d_lp, w, ratio, is_w, kl, clip_flags = _token_terms(
                row, lp_s, lp_t, entropy, adv, lp_old_in, credit_in, seq_ratio_in, rollout_in, log_is_in, ref_in,
                log_w_lo, log_w_hi, lam, clip_lo, clip_hi, dual_clip, log_tis_cap, kl_coef, entropy_coef,
                sapo_tau_pos, sapo_tau_neg,
                HAS_OLD, HAS_DUAL, CISPO, SAPO, CREDIT_OLD, HAS_CREDIT, SEQ_RATIO, IS_MODE, KL, ENTROPY_GRAD,
                row < n_rows,
            )
            if seg == 0:
                store_row_outputs(out, stride_out, flags_out, row, active, loss, lp_s, lp_t, lse2_s, d_lp, w, ratio,
                                  is_w, kl, entropy, flags | tl.where(active, clip_flags, 0))

            # The segment's gradient (zeros for a masked row: its logits read as -inf, its coefficients 0).
            d_row = dS + b * stride_db + t * stride_dt
            coef = tl.where(active, wt * d_lp, 0.0)
            coef_h = tl.where(active, -wt * entropy_coef, 0.0)
            r_ref = tl.where(active, r_s, 0.0)
            c_ref = tl.where(active, c_s, 0.0)
            c0 = seg * seg_len
            c1 = tl.minimum(c0 + seg_len, V)
            read_end = tl.where(active, c1, c0)
            for col in tl.range(c0, c1, BLOCK_V):
                cols = col + offs
                x = tl.load(s_row + cols, mask=cols < read_end, other=float("-inf"), eviction_policy="evict_first")
                g = softmax_grad_block((x.to(tl.float32) - r_ref) * scale2, c_ref, cols, y, coef, coef_h, entropy,
                                       ENTROPY_GRAD)
                tl.store(d_row + cols, (g * inv_temp).to(dS.dtype.element_ty), mask=cols < c1,
                         eviction_policy="evict_first")
