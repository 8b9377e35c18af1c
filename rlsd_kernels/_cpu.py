"""The PyTorch path behind the launchers for tensors the Triton kernels do not take (CPU).

Same contract as the Triton launchers, same outputs, computed chunk by chunk over tokens so that
no more than ``CHUNK_ELEMENTS`` float32 values of a ``[rows, V]`` block are alive at once. The
per-token RLSD terms and their closed-form derivative come from ``reference.rlsd_token_terms``
itself.
"""

from __future__ import annotations

import torch

from . import _utils, reference
from ._prepare import OUTPUTS
from ._utils import Rows
from .flags import Flag

CHUNK_ELEMENTS = 1 << 22


def _row_chunks(rows: Rows, *tensors):
    """Yields ``(row slice, views)``: matching ``[C, V]`` views of ``tensors`` shaped like the rows."""
    step = max(1, CHUNK_ELEMENTS // rows.vocab)
    for b in range(rows.batch):
        for t0 in range(0, rows.seqlen, step):
            t1 = min(t0 + step, rows.seqlen)
            start = b * rows.seqlen
            views = [x[b, t0:t1] if x.dim() == 3 else x[t0:t1] for x in tensors]
            yield slice(start + t0, start + t1), views


def _stats(chunk, y, temperature, active, want_entropy=False):
    """Scaled logits, logsumexp, log-prob, entropy and error masks of a ``[C, V]`` chunk."""
    z = chunk.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    # As in the kernels' online logsumexp, a +inf logit makes the row's logsumexp NaN.
    lse = torch.where(lse == float("inf"), float("nan"), lse)
    vocab = z.shape[-1]
    ok = (y >= 0) & (y < vocab)
    gathered = z.gather(1, torch.where(ok, y, 0).long()[:, None]).squeeze(1)
    zy = torch.where(active & ok, gathered, float("-inf"))
    lp = torch.where(active, (zy - lse).clamp(max=0.0), 0.0)
    entropy = None
    if want_entropy:
        p = torch.softmax(z, dim=-1)
        log_p = torch.where(p > 0, z - lse[:, None], 0.0)
        entropy = torch.where(active, -(p * log_p).sum(-1), 0.0)
    return z, torch.where(active, lse, 0.0), lp, entropy, active & ~ok, active & ~torch.isfinite(lse)


def _softmax_grad(z, lse, y, coef, coef_h=None, entropy=None):
    """``coef * (1[v = y] - p) - coef_h * p * (log p + H)`` for scaled logits ``z`` (mirrors the kernel)."""
    p = torch.exp(z - lse[:, None])
    onehot = torch.zeros_like(z).scatter_(1, y.clamp(0, z.shape[-1] - 1).long()[:, None], 1.0)
    onehot = torch.where((y >= 0)[:, None], onehot, 0.0)
    g = coef[:, None] * (onehot - p)
    if coef_h is not None:
        log_p = torch.where(p > 0, z - lse[:, None], 0.0)
        g = g - coef_h[:, None] * p * (log_p + entropy[:, None])
    return g


def logprobs_fwd(rows: Rows, tokens, temperature, want_entropy):
    n, device = rows.n, rows.tensor.device
    lp = _utils.empty((n,), dtype=torch.float32, device=device)
    lse = _utils.empty((n,), dtype=torch.float32, device=device)
    ent = _utils.empty((n if want_entropy else 0,), dtype=torch.float32, device=device)
    flags = _utils.empty((n,), dtype=torch.int32, device=device)
    for sl, (chunk,) in _row_chunks(rows, rows.tensor):
        y = tokens[sl]
        _, lse[sl], lp[sl], e, bad, nonfinite = _stats(chunk, y, temperature, y != reference.IGNORE_INDEX, want_entropy)
        if want_entropy:
            ent[sl] = e
        flags[sl] = bad.int() * int(Flag.BAD_TOKEN) + nonfinite.int() * int(Flag.NONFINITE_STUDENT)
    return lp, lse, ent, flags


def logprobs_bwd(rows: Rows, tokens, lse, coef, coef_h, entropy, temperature, grad):
    for sl, (chunk, g_chunk) in _row_chunks(rows, rows.tensor, grad):
        y, c = tokens[sl], coef[sl]
        active = (y != reference.IGNORE_INDEX) & (c != 0)
        c_h = h = None
        if coef_h is not None:
            c_h, h = coef_h[sl], entropy[sl]
            active |= (y != reference.IGNORE_INDEX) & (c_h != 0)
        z = chunk.float() / temperature
        g = _softmax_grad(z, lse[sl], y, c, c_h, h) / temperature
        g_chunk.copy_(torch.where(active[:, None], g, 0.0))
    return grad


def rlsd_fwd(s_rows: Rows, t_rows, inputs, params, grad):
    """Per-token outputs as the Triton launcher returns them; writes ``weight * dl/dz`` into ``grad``."""
    n, device = s_rows.n, s_rows.tensor.device
    out = {k: _utils.empty((n,), dtype=torch.float32, device=device) for k in OUTPUTS}
    flags = _utils.empty((n,), dtype=torch.int32, device=device)
    temperature = params["temperature"]
    hyper = {k: params[k] for k in ("eps_w", "lam", "clip_low", "clip_high", "dual_clip")}
    tensors = [s_rows.tensor] + ([t_rows.tensor] if t_rows is not None else []) + ([grad] if grad is not None else [])
    for sl, views in _row_chunks(s_rows, *tensors):
        y, wt = inputs["tokens"][sl], inputs["weight"][sl]
        active = wt != 0
        z, lse, lp_s, _, bad, nonfinite_s = _stats(views[0], y, temperature, active)
        nonfinite_t = torch.zeros_like(active)
        if t_rows is not None:
            _, _, lp_t, _, _, nonfinite_t = _stats(views[1], y, temperature, active)
        else:
            lp_t = inputs["lp_t"][sl]
        old = None if inputs["lp_old"] is None else inputs["lp_old"][sl]
        terms = reference.rlsd_token_terms(lp_s, lp_t, inputs["adv"][sl], lp_old=old, **hyper)
        zero = torch.zeros_like(lp_s)
        for key, value in (("loss", terms["loss"]), ("lp_s", lp_s), ("lp_t", lp_t), ("lse", lse),
                           ("d_lp", terms["d_loss"]), ("w", terms["weight"]), ("ratio", terms["ratio"])):
            out[key][sl] = torch.where(active, value, zero)
        bits = zero.int()
        for name, bit in (("weight_clip_low", Flag.WEIGHT_CLIP_LOW), ("weight_clip_high", Flag.WEIGHT_CLIP_HIGH),
                          ("ppo_clip_low", Flag.PPO_CLIP_LOW), ("ppo_clip_high", Flag.PPO_CLIP_HIGH),
                          ("dual_clip", Flag.DUAL_CLIP)):
            bits |= (active & terms[name]).int() * int(bit)
        bits |= bad.int() * int(Flag.BAD_TOKEN) + nonfinite_s.int() * int(Flag.NONFINITE_STUDENT)
        flags[sl] = bits | nonfinite_t.int() * int(Flag.NONFINITE_TEACHER)
        if grad is not None:
            coef = torch.where(active, wt * out["d_lp"][sl], 0.0)
            g = _softmax_grad(z, lse, y, coef) / temperature
            views[-1].copy_(torch.where(active[:, None], g, 0.0))
    return out, flags
