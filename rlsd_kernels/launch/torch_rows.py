"""The PyTorch path behind the launchers for tensors the Triton kernels do not take (CPU).

Same contract as the Triton launchers, same outputs, computed chunk by chunk over tokens so that
no more than ``CHUNK_ELEMENTS`` float32 values of a ``[rows, V]`` block are alive at once. The
per-token RLSD terms and their closed-form derivative come from ``reference.rlsd_token_terms``
itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import reference
from ..flags import ERRORS, Flag
from . import common
from .common import Rows
from .terms import FLAG_TERMS, OUTPUTS, needs_sequence_pass, sequence_terms

CHUNK_ELEMENTS = 1 << 22


def _row_chunks(rows: Rows, *tensors):
    """Yields ``(row slice, views)`` over the flat rows ``b * seqlen + t``, at most ``CHUNK_ELEMENTS``
    logits per chunk: views of ``tensors`` (shaped like the rows) of whole sequences ``[b0:b1]``
    (``[C, T, V]``) while a sequence fits, else of parts of one sequence (``[C, V]``): many short
    sequences make few chunks, not one each. The ops over the last dimension take either shape;
    ``_flat`` and ``_write`` are for code that needs ``[C, V]`` rows."""
    seq_elements = rows.seqlen * rows.vocab
    if rows.batch > 1 and seq_elements <= CHUNK_ELEMENTS:
        step = max(1, CHUNK_ELEMENTS // max(seq_elements, 1))
        for b0 in range(0, rows.batch, step):
            b1 = min(b0 + step, rows.batch)
            yield slice(b0 * rows.seqlen, b1 * rows.seqlen), [x[b0:b1] for x in tensors]
        return
    step = max(1, CHUNK_ELEMENTS // rows.vocab)
    for b in range(rows.batch):
        for t0 in range(0, rows.seqlen, step):
            t1 = min(t0 + step, rows.seqlen)
            start = b * rows.seqlen
            views = [x[b, t0:t1] if x.dim() == 3 else x[t0:t1] for x in tensors]
            yield slice(start + t0, start + t1), views


def _flat(view):
    """A chunk of ``_row_chunks`` as ``[C, V]`` rows (a copy of that chunk only when not viewable)."""
    return view.reshape(-1, view.shape[-1])


def _write(view, value):
    """Writes ``[C, V]`` rows into a chunk of ``_row_chunks``."""
    view.copy_(value.view(view.shape))


def _scaled(chunk, temperature):
    """A ``[C, V]`` chunk as float32 logits divided by the temperature (no copy for float32 at 1)."""
    z = chunk.float()
    return z if temperature == 1 else z / temperature


class RowSoftmax(NamedTuple):
    """A chunk's softmax rows: the logits centred on their rows' maxima ``ref`` (logits' units) and
    divided by the temperature (``shifted``), their exponentials and the rows' sums and log-sums; or,
    from a stored logsumexp, the log-probs alone (``shifted``, the rest None)."""

    shifted: torch.Tensor
    e: torch.Tensor | None = None
    total: torch.Tensor | None = None
    log_total: torch.Tensor | None = None
    ref: torch.Tensor | None = None

    def log_probs(self):
        return self.shifted if self.log_total is None else self.shifted - self.log_total[..., None]

    def probs_(self, out=None):
        """The probabilities, into ``out`` when given, else over ``e`` (spent) or a new tensor."""
        if self.e is None:
            return torch.exp(self.shifted, out=out)
        return torch.div(self.e, self.total[..., None], out=self.e if out is None else out)


def _stats(chunk, y, temperature, active, want_entropy=False):
    """``RowSoftmax`` of a chunk of rows (``[C, V]``, or a ``[b, T, V]`` view read in place), then flat
    ``[C]`` logsumexp, log-prob, entropy and error masks; ``y`` and ``active`` are flat.

    Log-probs come from ``(x - m) / tau`` with the row's maximum ``m`` (as the kernels centre), not
    from ``x / tau - lse``: their error does not grow with the logits' magnitude."""
    x = chunk.float()
    y, active = y.view(x.shape[:-1]), active.view(x.shape[:-1])
    m = x.amax(-1)
    # A row without a finite logit takes 0 as its reference; a +inf logit makes its sums NaN, as in
    # the kernels' online logsumexp.
    m = torch.where(m == float("-inf"), 0.0, m)
    shifted = x - m[..., None]
    if temperature != 1:
        shifted /= temperature
    e = shifted.exp()
    total = e.sum(-1)
    log_s = total.log()
    lse = (m if temperature == 1 else m / temperature) + log_s
    ok = (y >= 0) & (y < x.shape[-1])
    gathered = shifted.gather(-1, torch.where(ok, y, 0).long()[..., None]).squeeze(-1)
    zy = torch.where(active & ok, gathered, float("-inf"))
    lp = torch.where(active, (zy - log_s).clamp(max=0.0), 0.0)
    entropy = None
    if want_entropy:
        # p * log p is 0 where p is 0 (a -inf logit), never 0 * -inf.
        plogp = torch.where(e > 0, e * (shifted - log_s[..., None]), 0.0)
        entropy = torch.where(active, -plogp.sum(-1) / total, 0.0).reshape(-1)
    flat = (torch.where(active, lse, 0.0), lp, active & ~ok, active & ~torch.isfinite(lse))
    lse, lp, bad, nonfinite = (x.reshape(-1) for x in flat)
    return RowSoftmax(shifted, e, total, log_s, m.reshape(-1)), lse, lp, entropy, bad, nonfinite


def _token_logprobs(chunk, y, temperature, active):
    """``(lp, nonfinite)``, flat: the tokens' log-probs alone (the teacher's), by ``torch.log_softmax``
    (centred on the row's maximum), and where an active row holds no finite logit, NaN or ``+inf``."""
    z = _scaled(chunk, temperature)
    y, active = y.view(z.shape[:-1]), active.view(z.shape[:-1])
    log_p = torch.log_softmax(z, -1)
    ok = (y >= 0) & (y < z.shape[-1])
    gathered = log_p.gather(-1, torch.where(ok, y, 0).long()[..., None]).squeeze(-1)
    lp = torch.where(active, torch.where(ok, gathered, float("-inf")).clamp(max=0.0), 0.0)
    # The largest log-prob, -log(sum exp(z - m)), is finite exactly where the row's logsumexp is.
    return lp.reshape(-1), (active & ~torch.isfinite(log_p.amax(-1))).reshape(-1)


def _softmax_grad(p, y, coef, coef_h=None, entropy=None, log_p=None):
    """``coef * (1[v = y] - p) - coef_h * p * (log p + H)`` over the probabilities ``p`` (overwritten)
    of rows (mirrors the kernel); ``y``, ``coef`` (and ``coef_h``, ``entropy``) are shaped like ``p``
    without its last dimension, and ``log_p`` is needed only with ``coef_h``."""
    if coef_h is not None:
        h_term = coef_h[..., None] * torch.where(p > 0, p * (log_p + entropy[..., None]), 0.0)
    # Like the kernels, an id outside [0, V) (only with validate=False) matches no column.
    ok = (y >= 0) & (y < p.shape[-1])
    g = p.neg_().scatter_add_(-1, torch.where(ok, y, 0).long()[..., None], ok.to(p.dtype)[..., None])
    g.mul_(coef[..., None])
    return g.sub_(h_term) if coef_h is not None else g


def logprobs_fwd(rows: Rows, tokens, temperature, want_entropy):
    n, device = rows.n, rows.tensor.device
    lp = common.empty((n,), dtype=torch.float32, device=device)
    lse = common.empty((n,), dtype=torch.float32, device=device)
    ent = common.empty((n if want_entropy else 0,), dtype=torch.float32, device=device)
    flags = common.empty((n,), dtype=torch.int32, device=device)
    for sl, (chunk,) in _row_chunks(rows, rows.tensor):
        y = tokens[sl]
        active = y != reference.IGNORE_INDEX
        _, lse[sl], lp[sl], e, bad, nonfinite = _stats(chunk, y, temperature, active, want_entropy)
        if want_entropy:
            ent[sl] = e
        flags[sl] = bad.int() * int(Flag.BAD_TOKEN) + nonfinite.int() * int(Flag.NONFINITE_STUDENT)
    return lp, lse, ent, flags


def partial_stats(rows: Rows, tokens, vocab_start, temperature, want_entropy):
    """``(stats, flags)`` of one vocabulary shard, as ``logprobs.partial_stats`` returns them, from
    ``_stats`` (the reference is the row's maximum here, its first block's there: the frames differ,
    not the values they give)."""
    n, device = rows.n, rows.tensor.device
    stats = common.empty((4, n), dtype=torch.float32, device=device)
    flags = common.empty((n,), dtype=torch.int32, device=device)
    log2e = 1.4426950408889634
    for sl, (chunk,) in _row_chunks(rows, rows.tensor):
        y = tokens[sl]
        active = y != reference.IGNORE_INDEX
        local = y - vocab_start
        in_shard = active & (local >= 0) & (local < rows.vocab)
        soft, lse, lp, entropy, _, _ = _stats(_flat(chunk), torch.where(in_shard, local, -1), temperature, active,
                                              want_entropy)
        total = soft.total.reshape(-1)
        stats[0, sl] = torch.where(active, soft.ref, 0.0)
        stats[1, sl] = torch.where(active, soft.log_total.reshape(-1) * log2e, float("-inf"))
        # A shard without a finite logit gives its tokens a log-prob of -inf, never -inf - -inf.
        stats[2, sl] = torch.where(in_shard & (total != 0), lp * log2e, float("-inf"))
        stats[3, sl] = torch.where(active & (total > 0), entropy * log2e, 0.0) if want_entropy else 0.0
        # A shard may hold no finite logit (padding): only NaN and +inf are errors here.
        flags[sl] = (active & (torch.isnan(lse) | (lse == float("inf")))).int() * int(Flag.NONFINITE_STUDENT)
    return stats, flags


def logprobs_bwd(rows: Rows, tokens, lse, coef, coef_h, entropy, temperature, grad):
    for sl, (chunk, g_chunk) in _row_chunks(rows, rows.tensor, grad):
        # The chunk is read in place (a [b, T, V] view of strided rows too) and written once.
        log_p = _scaled(chunk, temperature) - lse[sl].view(chunk.shape[:-1])[..., None]
        _grad_chunk(RowSoftmax(log_p), g_chunk, sl, tokens, coef, coef_h, entropy, temperature)
    return grad


def _grad_chunk(rows, g_chunk, sl, tokens, coef, coef_h, entropy, temperature):
    """Writes ``(coef * (1[v = y] - p) - coef_h * p * (log p + H)) / tau`` for the rows ``sl`` from their
    ``RowSoftmax`` into ``g_chunk``; rows whose coefficients are zero, or that are masked, get 0."""
    inv = 1.0 / temperature
    shape = rows.shifted.shape[:-1]
    y, c = tokens[sl].view(shape), coef[sl].view(shape)
    active = (y != reference.IGNORE_INDEX) & (c != 0)
    c_h = h = None
    if coef_h is not None:
        c_h, h = coef_h[sl].view(shape) * inv, entropy[sl].view(shape)
        active |= (y != reference.IGNORE_INDEX) & (c_h != 0)
    # A float32 gradient is formed in place (a view of strided rows too); others are rounded once.
    in_place = g_chunk.dtype == torch.float32
    log_p = rows.log_probs() if c_h is not None else None
    g = _softmax_grad(rows.probs_(g_chunk if in_place else None), y, c * inv, c_h, h, log_p)
    if not bool(active.all()):
        g.masked_fill_(~active[..., None], 0.0)
    if not in_place:
        g_chunk.copy_(g)


def rlsd_fwd(s_rows: Rows, t_rows, inputs, params, grad):
    """Per-token outputs as the Triton launcher returns them; writes ``weight * dl/dz`` into ``grad``.

    Three phases, like the kernels' split strategy: row statistics chunk by chunk, the per-token
    terms of every token (after the sequence-level ones), then the gradient chunk by chunk. When
    every row fits in one chunk, its softmax rows stay alive from the first phase to the last."""
    n, device = s_rows.n, s_rows.tensor.device
    out, flags = common.outputs(OUTPUTS, n, device)
    temperature = params.temperature
    active = inputs.weight != 0
    tensors = [s_rows.tensor] + ([t_rows.tensor] if t_rows is not None else [])
    chunks = list(_row_chunks(s_rows, *tensors, *([grad] if grad is not None else [])))
    kept = None
    for sl, views in chunks:
        y, on = inputs.tokens[sl], active[sl]
        rows, out["lse"][sl], out["lp_s"][sl], entropy, bad, nonfinite_s = _stats(
            views[0], y, temperature, on, want_entropy=bool(params.want_entropy))
        kept = rows if len(chunks) == 1 else None
        out["entropy"][sl] = entropy if entropy is not None else 0.0
        nonfinite_t = torch.zeros_like(on)
        if t_rows is not None:
            out["lp_t"][sl], nonfinite_t = _token_logprobs(views[1], y, temperature, on)
        else:
            out["lp_t"][sl] = torch.where(on, inputs.lp_t[sl], 0.0)
        flags[sl] = (bad.int() * int(Flag.BAD_TOKEN) + nonfinite_s.int() * int(Flag.NONFINITE_STUDENT)
                     + nonfinite_t.int() * int(Flag.NONFINITE_TEACHER))

    if needs_sequence_pass(inputs, params):
        inputs = sequence_terms(out["lp_s"], inputs, params)
    rlsd_token_epilogue(out, flags, inputs, params)

    if grad is not None:
        coef = torch.where(active, inputs.weight * out["d_lp"], 0.0)
        coef_h = None
        if params.entropy_coef != 0:
            coef_h = torch.where(active, -inputs.weight * params.entropy_coef, 0.0)
        if kept is None:
            logprobs_bwd(s_rows, inputs.tokens, out["lse"], coef, coef_h, out["entropy"], temperature, grad)
        else:
            sl, views = chunks[0]
            _grad_chunk(kept, views[-1], sl, inputs.tokens, coef, coef_h, out["entropy"], temperature)
    return out, flags


def rlsd_token_epilogue(out, flags, inputs, params):
    """The per-token terms of every token whose log-probs (and entropies) ``out`` holds, as
    ``rlsd.rlsd_token_epilogue`` computes them: overwrites the loss, derivative, weight, ratio,
    importance weight and KL in ``out`` and the clip bits of ``flags``, keeping its error bits."""
    active = inputs.weight != 0
    terms = reference.rlsd_token_terms(
        out["lp_s"], out["lp_t"], inputs.adv, lp_old=inputs.lp_old, eps_w_low=params.eps_w_low,
        eps_w_high=params.eps_w_high, lam=params.lam, clip_low=params.clip_low,
        clip_high=params.clip_high, dual_clip=params.dual_clip, surrogate=params.surrogate,
        sapo_tau_pos=params.sapo_tau_pos, sapo_tau_neg=params.sapo_tau_neg,
        credit_base=params.credit_base, credit_on=inputs.credit, log_seq_ratio=inputs.seq_ratio,
        lp_rollout=inputs.rollout if inputs.log_is is None else None, log_seq_is=inputs.log_is,
        tis_cap=params.tis_cap, lp_ref=inputs.ref, kl_coef=params.kl_coef,
        kl_estimator=params.kl_estimator, entropy=out["entropy"], entropy_coef=params.entropy_coef,
    )
    for key, name in (("loss", "loss"), ("d_lp", "d_loss"), ("w", "weight"), ("ratio", "ratio"),
                      ("is_weight", "is_weight"), ("kl", "kl")):
        out[key].copy_(torch.where(active, terms[name], 0.0))
    flags &= int(ERRORS)
    # The bits are distinct powers of two: their sum over the terms is their OR.
    hits = torch.stack([terms[name] for name, _ in FLAG_TERMS]) & active
    bits = torch.tensor([int(bit) for _, bit in FLAG_TERMS], dtype=torch.int32, device=flags.device)
    flags |= (hits.int() * bits[:, None]).sum(0, dtype=torch.int32)
