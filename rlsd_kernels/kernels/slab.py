"""Triton row kernels of the slab schedule of the fused linear form (``forms/slab.py``).

``_slab_probs_kernel``: a vocabulary slab's own softmax, ``exp2((x - r) * scale2 - c)`` in the
frame ``(r, c)`` that ``launch/logprobs.py: partial_stats`` gives the slab, written into the chunk's
gradient buffer. The values lie in [0, 1] whatever the frame (the first block's reference, or the
exact pass's absolute one), so they never overflow a float16 or bfloat16 buffer.

``_slab_rescale_kernel``: the buffer turned into the logit gradient in place, ``-f_j * q`` over the
columns of slab ``j`` with ``f_j`` the row's coefficient times the slab's share of the row's mass,
and the token's own column written from a float32 value that the caller forms from the token's
float32 log-prob. Rows whose coefficient is 0 are written as zeros without reading the buffer.
"""

import triton
import triton.language as tl


@triton.jit
def _slab_probs_kernel(
    X, stride_x, Q, stride_q, ref, lse2,
    n_rows, V, scale2,
    BLOCK_V: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_V)
    # int64 rows: offsets into [C, V] pass 2**31 at real sizes.
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        r = tl.load(ref + row)
        c = tl.load(lse2 + row)
        # No mass in the slab (a masked row, or only -inf logits): zeros, never -inf - -inf.
        empty = c == float("-inf")
        read_end = tl.where(empty, 0, V)
        for start in tl.range(0, V, BLOCK_V):
            cols = start + offs
            x = tl.load(X + row * stride_x + cols, mask=cols < read_end, other=float("-inf"))
            q = tl.exp2((x - r) * scale2 - tl.where(empty, 0.0, c))
            tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=cols < V)


@triton.jit
def _slab_rescale_kernel(
    D, stride_d, factor, stride_f, tokens, token_value, coef,
    n_rows, V, slab_cols,
    BLOCK_V: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_V)
    n_slabs = tl.cdiv(V, slab_cols)
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        y = tl.load(tokens + row).to(tl.int64)
        live = tl.load(coef + row) != 0.0
        t = tl.load(token_value + row)
        d_row = D + row * stride_d
        for j in tl.range(0, n_slabs):
            f = tl.load(factor + j * stride_f + row)
            end = tl.minimum((j + 1) * slab_cols, V)
            read_end = tl.where(live, end, 0)
            for start in tl.range(j * slab_cols, end, BLOCK_V):
                cols = start + offs
                q = tl.load(d_row + cols, mask=cols < read_end, other=0.0).to(tl.float32)
                g = tl.where(cols == y, t, -f * q)
                g = tl.where(live, g, 0.0)
                tl.store(d_row + cols, g.to(D.dtype.element_ty), mask=cols < end)
