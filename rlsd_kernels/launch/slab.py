"""Launchers of the slab schedule's row kernels (``kernels/slab.py``), with their PyTorch-path twins
for the tensors the Triton kernels do not take (``common.use_triton`` picks)."""

from __future__ import annotations

import torch

from ..kernels.slab import _slab_probs_kernel, _slab_rescale_kernel
from .common import use_triton
from .tuning import pick_row_config

LOG2E = 1.4426950408889634
_UNTIMED = torch.device("cpu")


def _config(key, cols):
    """The configuration a test forces, else the heuristic one: these kernels read and write a row
    once, and the rescale works in place, so there is no trial to time."""
    return pick_row_config(key, cols, _UNTIMED, None)


def slab_probs(logits, ref, lse2, temperature, out):
    """Writes the slab's own softmax ``exp2((x - ref) * log2(e) / tau - lse2)`` of the float32 slab
    logits ``logits`` ``[c, w]`` into ``out`` ``[c, w]`` (any float dtype, unit column stride), from
    the slab's frame as ``partial_stats`` gives it (``ref`` its reference in the logits' units,
    ``lse2`` the base-2 log-sum there, ``[c]``); rows with ``lse2 = -inf`` (no mass) get zeros."""
    c, w = logits.shape
    if c == 0:
        return out
    scale2 = LOG2E / temperature
    if not use_triton(logits):
        empty = lse2 == float("-inf")
        q = torch.exp2((logits - ref[:, None]) * scale2 - torch.where(empty, 0.0, lse2)[:, None])
        out.copy_(q.masked_fill_(empty[:, None], 0.0))
        return out
    config = _config(("slab_probs", out.dtype), w)
    _slab_probs_kernel[config.grid(c, logits.device)](
        logits, logits.stride(0), out, out.stride(0), ref, lse2, c, w, scale2,
        BLOCK_V=config.block_v, num_warps=config.num_warps,
    )
    return out


def slab_rescale(dz, factor, tokens, token_value, coef, slab_cols):
    """Turns ``dz`` ``[c, V]`` holding every slab's own softmax (``slab_probs``) into the logit gradient
    in place: ``-factor[j] * q`` over the columns of slab ``j`` (slabs of ``slab_cols`` columns, the
    last one narrower), ``token_value`` at the column of ``tokens`` (ids matching no column are
    allowed), and zeros in the rows whose ``coef`` is 0 (whatever the buffer held there)."""
    c, vocab = dz.shape
    if c == 0:
        return dz
    live = coef != 0
    if not use_triton(dz):
        for j, a in enumerate(range(0, vocab, slab_cols)):
            cols = dz[:, a : a + slab_cols]
            g = cols.float().mul_(-factor[j][:, None])
            cols.copy_(torch.where(live[:, None], g, 0.0))
        hit = live & (tokens >= 0) & (tokens < vocab)
        rows = torch.nonzero(hit).squeeze(1)
        dz[rows, tokens[rows]] = token_value[rows].to(dz.dtype)
        return dz
    config = _config(("slab_rescale", dz.dtype), min(slab_cols, vocab))
    _slab_rescale_kernel[config.grid(c, dz.device)](
        dz, dz.stride(0), factor, factor.stride(0), tokens, token_value, coef, c, vocab, slab_cols,
        BLOCK_V=config.block_v, num_warps=config.num_warps,
    )
    return dz
