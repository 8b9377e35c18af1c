"""Triton kernels of the token log-probs (and entropies), and the general row backward
``dz = (c * (1[v = y] - p) - c_H * p * (log p + H)) / tau`` that every loss reuses when its gradient
is not written in its forward.
"""

import triton
import triton.language as tl

from .common import (
    FLAG_BAD_TOKEN,
    FLAG_NONFINITE_STUDENT,
    IGNORE_INDEX,
    LN2,
    LOG2E,
    entropy_finish,
    entropy_terms,
    finish_sums,
    is_finite,
    row_centre,
    row_lse_exact,
    row_reference,
    softmax_grad_block,
    token_logprob,
)


@triton.jit
def _logprobs_fwd_kernel(
    X, stride_xb, stride_xt,
    tokens, lp_out, lse_out, entropy_out, ref_out, flags_out,
    n_rows, seqlen, V, vocab_start, scale2,
    ENTROPY: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row: the log-prob of the token (and the entropy). With ``PARTIAL`` the row is one shard of
    the vocabulary, starting at id ``vocab_start``, and the outputs are the shard's statistics under
    its own softmax, in its ``row_centre`` frame: ``ref_out`` the reference (logits' units),
    ``lse_out`` the base-2 log of the sum there, ``lp_out`` the token's base-2 log-prob (-inf outside
    the shard), ``entropy_out`` the entropy (base 2). ``ref_out`` is not written otherwise."""
    offs = tl.arange(0, BLOCK_V)
    n_blocks = tl.cdiv(V, BLOCK_V)
    # int64 rows: offsets into [N, V] pass 2**31 at real sizes.
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        b = row // seqlen
        x_row = X + b * stride_xb + (row - b * seqlen) * stride_xt
        y = tl.load(tokens + row).to(tl.int64)
        active = y != IGNORE_INDEX
        y = y - vocab_start
        y_ok = (y >= 0) & (y < V)
        read_end = tl.where(active, V, 0)
        # Per-lane sums against the first block's max, the next block loaded before this one is used.
        x_next = tl.load(x_row + offs, mask=offs < read_end, other=float("-inf"))
        ref = row_reference(x_next.to(tl.float32))
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_V], dtype=tl.float32)
        for i in tl.range(0, tl.where(active, n_blocks, 0)):
            x = x_next.to(tl.float32)
            z = (x - ref) * scale2
            cols = (i + 1) * BLOCK_V + offs
            x_next = tl.load(x_row + cols, mask=cols < read_end, other=float("-inf"))
            if ENTROPY:
                e, ez = entropy_terms(z)
                acc += e
                acc_t += ez
            else:
                acc += tl.exp2(z)
        lse2, s, t, ok = finish_sums(ref * scale2, acc, acc_t)
        exact = active & ~ok
        if exact:
            ref, lse2, s, t = row_lse_exact(x_row, V, scale2, BLOCK_V, ENTROPY)
        r, c = row_centre(ref, s)
        zy = tl.load(x_row + tl.where(y_ok, y, 0), mask=active & y_ok, other=float("-inf")).to(tl.float32)
        if PARTIAL:
            # A logit of -inf (or a token in another shard) is a log-prob of -inf, never -inf - -inf.
            lp2 = tl.where(zy == float("-inf"), float("-inf"), (zy - r) * scale2 - c)
            tl.store(lp_out + row, tl.where(active, lp2, float("-inf")))
            tl.store(lse_out + row, tl.where(active, c, float("-inf")))
            tl.store(ref_out + row, tl.where(active, r, 0.0))
            if ENTROPY:
                tl.store(entropy_out + row, tl.where(active & (s > 0.0), c - t / s, 0.0))
            # A shard may hold no finite logit (padding): only NaN and +inf are errors here.
            tl.store(flags_out + row, tl.where(active & ((lse2 != lse2) | (lse2 == float("inf"))),
                                               FLAG_NONFINITE_STUDENT, 0))
        else:
            lp = token_logprob(zy, r, c, scale2)
            tl.store(lp_out + row, tl.where(active, lp, 0.0))
            tl.store(lse_out + row, tl.where(active, lse2 * LN2, 0.0))
            if ENTROPY:
                tl.store(entropy_out + row, tl.where(active, entropy_finish(c, s, t), 0.0))
            flags = tl.where(active & ~y_ok, FLAG_BAD_TOKEN, 0)
            flags |= tl.where(active & ~is_finite(lse2), FLAG_NONFINITE_STUDENT, 0)
            tl.store(flags_out + row, flags)


@triton.jit
def _logprobs_bwd_kernel(
    X, stride_xb, stride_xt,
    dX, stride_db, stride_dt,
    tokens, lse, coef, coef_h, entropy,
    n_rows, seqlen, V, scale2, inv_temp,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_V)
    n_blocks = tl.cdiv(V, BLOCK_V)
    # int64 rows: offsets into [N, V] pass 2**31 at real sizes.
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        b = row // seqlen
        t = row - b * seqlen
        x_row = X + b * stride_xb + t * stride_xt
        d_row = dX + b * stride_db + t * stride_dt
        y = tl.load(tokens + row).to(tl.int64)
        c = tl.load(coef + row)
        # Rows without an upstream gradient (masked, ignored) are written as zeros without reading.
        active = (y != IGNORE_INDEX) & (c != 0.0)
        c_h = 0.0
        h = 0.0
        if HAS_ENTROPY:
            c_h = tl.load(coef_h + row)
            h = tl.load(entropy + row)
            active = (y != IGNORE_INDEX) & ((c != 0.0) | (c_h != 0.0))
        lse2 = tl.where(active, tl.load(lse + row) * LOG2E, 0.0)
        read_end = tl.where(active, V, 0)
        for i in tl.range(0, n_blocks):
            cols = i * BLOCK_V + offs
            z = tl.load(x_row + cols, mask=cols < read_end, other=float("-inf")).to(tl.float32) * scale2
            g = softmax_grad_block(z, lse2, cols, y, c, c_h, h, HAS_ENTROPY)
            tl.store(d_row + cols, (g * inv_temp).to(dX.dtype.element_ty), mask=cols < V)
