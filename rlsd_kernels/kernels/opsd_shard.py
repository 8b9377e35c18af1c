"""Triton kernels of the OPSD losses' vocabulary-parallel form (``forms/sharded.py``):
``_opsd_stats_kernel``, the first sweep alone (logsumexps, token logits, entropy, the shard's own KL),
and ``_jsd_sums_kernel``, the JSD's second sweep under the logsumexps of the whole rows.
"""

import triton
import triton.language as tl

from .common import IGNORE_INDEX
from .opsd import DIV_JSD, _jsd_sweep, _pair_sweep


@triton.jit
def _opsd_stats_kernel(
    S, stride_sb, stride_st,
    T, stride_tb, stride_tt,
    tokens, r_s_out, c_s_out, lp_s_out, h_s_out, r_t_out, c_t_out, lp_t_out, d_out,
    n_rows, seqlen, V, vocab_start, scale2,
    DIV: tl.constexpr, NEED_LP: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row of one vocabulary shard (ids from ``vocab_start``), under the shard's own softmaxes and
    in each row's ``row_centre`` frame: both references (logits' units) and base-2 log-sums, the
    token's base-2 log-probs (``NEED_LP``; -inf when the token is in another shard), the student's
    entropy (``ENTROPY``, base 2) and, for ``DIV`` 0 or 1, the shard's own forward or reverse KL (base
    2). Rows whose token is ``IGNORE_INDEX`` are not read (log-sums -inf)."""
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        b = row // seqlen
        t = row - b * seqlen
        s_row = S + b * stride_sb + t * stride_st
        t_row = T + b * stride_tb + t * stride_tt
        y = tl.load(tokens + row).to(tl.int64)
        active = y != IGNORE_INDEX
        read_end = tl.where(active, V, 0)
        r_s, c_s, _, sum_s, r_t, c_t, _, kl2, sum_e = _pair_sweep(
            s_row, t_row, V, read_end, active, scale2, DIV, ENTROPY, True, False, False, BLOCK_V)
        tl.store(r_s_out + row, tl.where(active, r_s, 0.0))
        tl.store(c_s_out + row, tl.where(active, c_s, float("-inf")))
        tl.store(r_t_out + row, tl.where(active, r_t, 0.0))
        tl.store(c_t_out + row, tl.where(active, c_t, float("-inf")))
        if NEED_LP:
            y = y - vocab_start
            mine = active & (y >= 0) & (y < V)
            y = tl.where(mine, y, 0)
            zy_s = tl.load(s_row + y, mask=mine, other=float("-inf")).to(tl.float32)
            zy_t = tl.load(t_row + y, mask=mine, other=float("-inf")).to(tl.float32)
            # A logit of -inf (or a token in another shard) is a log-prob of -inf, never -inf - -inf.
            tl.store(lp_s_out + row, tl.where(zy_s == float("-inf"), float("-inf"), (zy_s - r_s) * scale2 - c_s))
            tl.store(lp_t_out + row, tl.where(zy_t == float("-inf"), float("-inf"), (zy_t - r_t) * scale2 - c_t))
        if ENTROPY:
            tl.store(h_s_out + row, tl.where(active & (sum_s > 0.0), c_s - sum_e / sum_s, 0.0))
        if DIV < DIV_JSD:
            tl.store(d_out + row, tl.where(active, kl2, 0.0))


@triton.jit
def _jsd_sums_kernel(
    S, stride_sb, stride_st,
    T, stride_tb, stride_tt,
    tokens, r_s, c_s, r_t, c_t, sum_t_out, sum_s_out,
    n_rows, seqlen, V, scale2, beta,
    BLOCK_V: tl.constexpr,
):
    """Per row of one vocabulary shard, the JSD's two sums (``_jsd_sweep``) over the shard's columns
    under the whole rows' softmaxes, given in ``row_centre`` frames (``r_*`` in logits' units, ``c_*``
    base 2); 0 where the token is ``IGNORE_INDEX``. The sums over every shard give the row's JSD and
    ``KL(S || M)``."""
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        b = row // seqlen
        t = row - b * seqlen
        active = tl.load(tokens + row) != IGNORE_INDEX
        rs = tl.where(active, tl.load(r_s + row), 0.0)
        cs = tl.where(active, tl.load(c_s + row), 0.0)
        rt = tl.where(active, tl.load(r_t + row), 0.0)
        ct = tl.where(active, tl.load(c_t + row), 0.0)
        sum_tm, sum_sm = _jsd_sweep(S + b * stride_sb + t * stride_st, T + b * stride_tb + t * stride_tt, V,
                                    tl.where(active, V, 0), active, scale2, rs, cs, rt, ct, beta, False, BLOCK_V)
        tl.store(sum_t_out + row, sum_tm)
        tl.store(sum_s_out + row, sum_sm)
