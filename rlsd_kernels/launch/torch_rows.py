"""The PyTorch path behind the launchers for tensors the Triton kernels do not take (CPU).

Same contract as the Triton launchers, same outputs, computed chunk by chunk over tokens so that
no more than ``CHUNK_ELEMENTS`` float32 values of a ``[rows, V]`` block are alive at once. The
per-token RLSD terms and their closed-form derivative come from ``reference.rlsd_token_terms``
itself.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .. import reference
from ..flags import ERRORS, Flag
from . import common
from .common import Rows
from .terms import FLAG_TERMS, OUTPUTS, needs_sequence_pass, sequence_terms

CHUNK_ELEMENTS = 1 << 22
LOG2E = 1.4426950408889634


def _row_chunks(rows: Rows, *tensors):
    """Yields ``(row slice, views)`` over the flat rows ``b * seqlen + t``, at most ``CHUNK_ELEMENTS``
    logits per chunk: views of ``tensors`` (shaped like the rows) of whole sequences ``[b0:b1]``
    (``[C, T, V]``) while a sequence fits, else of parts of one sequence (``[C, V]``): many short
    sequences make few chunks, not one each. The ops over the last dimension take either shape;
    ``_flat`` is for code that needs ``[C, V]`` rows."""
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


def _exp(x, out=None):
    """``exp(x)`` as ``exp2(x * log2(e))``, into ``out`` when given: on CPU several times faster than
    ``exp`` (``_stats``)."""
    return torch.mul(x, LOG2E, out=out).exp2_()


def clear_rows(x, rows):
    """Sets to 0 the rows of ``x`` (``[..., V]``, a strided view too) where the bool ``rows`` (shaped
    like ``x`` without its last dimension) holds: a pass over those rows only, not over all of ``x``
    as a broadcast ``masked_fill_`` would make."""
    if bool(rows.any()):
        x[rows] = 0.0
    return x


def _scaled(chunk, temperature):
    """A ``[C, V]`` chunk as float32 logits divided by the temperature (no copy for float32 at 1)."""
    z = chunk.float()
    return z if temperature == 1 else z / temperature


class TokenIndex(NamedTuple):
    """The ids of a chunk's rows, shaped like the rows without their last dimension: where an id lies
    in ``[0, V)`` (``ok``), and the ids as a gather index, 0 elsewhere, with a trailing 1 (``index``)."""

    ok: torch.Tensor
    index: torch.Tensor


def _token_index(y, chunk):
    """``TokenIndex`` of the flat ids ``y`` of the rows of ``chunk`` (``[C, V]`` or ``[b, T, V]``)."""
    y = y.view(chunk.shape[:-1])
    ok = (y >= 0) & (y < chunk.shape[-1])
    return TokenIndex(ok, torch.where(ok, y, 0).long().unsqueeze(-1))


class RowSoftmax(NamedTuple):
    """A chunk's softmax rows: the logits centred on their rows' maxima ``ref`` (logits' units) and
    divided by the temperature (``shifted``, None where no log-probs of the rows are needed), their
    exponentials and the rows' sums and log-sums; or, from a stored logsumexp, the log-probs alone
    (``shifted``, the rest None)."""

    shifted: torch.Tensor | None
    e: torch.Tensor | None = None
    total: torch.Tensor | None = None
    log_total: torch.Tensor | None = None
    ref: torch.Tensor | None = None

    def log_probs(self):
        return self.shifted if self.log_total is None else self.shifted - self.log_total[..., None]

    def log_probs_(self):
        """The log-probabilities over ``shifted`` (spent)."""
        return self.shifted if self.log_total is None else self.shifted.sub_(self.log_total[..., None])

    def probs_(self, out=None):
        """The probabilities, into ``out`` when given, else over ``e`` (spent) or a new tensor."""
        if self.e is None:
            return _exp(self.shifted, out)
        return torch.div(self.e, self.total[..., None], out=self.e if out is None else out)


def _stats(chunk, tok, temperature, active, want_entropy=False, log_probs=False, scratch=None):
    """``RowSoftmax`` of a chunk of rows (``[C, V]``, or a ``[b, T, V]`` view read in place), then flat
    ``[C]`` logsumexp, log-prob, entropy and non-finite mask (for ``error_flags``); ``tok`` is the
    rows' ``TokenIndex``, ``active`` is flat. With ``log_probs`` (or the entropy) the centred logits
    stay alive for the rows' log-probs.
    ``scratch``: float32 rows shaped like the chunk to form the exponentials in, instead of new ones
    (without ``log_probs`` and the entropy, the centred logits too).

    Log-probs come from ``(x - m) / tau`` with the row's maximum ``m`` (as the kernels centre), not
    from ``x / tau - lse``: their error does not grow with the logits' magnitude. The exponentials
    are ``exp2`` of the centred logits in base 2, as in the kernels: on CPU several times faster than
    ``exp``, and the rounding of the factor moves an exponential by ``|x - m| / tau`` units in the
    last place at most, a relative ``1e-6`` for the terms ``exp(-20)`` and above that make up a sum."""
    # Half-precision rows are read as they are (a float32 reference promotes their difference).
    x = chunk if chunk.dtype in (torch.float16, torch.bfloat16) else chunk.float()
    active = active.view(x.shape[:-1])
    m = x.amax(-1).float()
    # A row without a finite logit takes 0 as its reference; a +inf logit makes its sums NaN, as in
    # the kernels' online logsumexp.
    m.masked_fill_(m == float("-inf"), 0.0)
    shifted = None
    keep = log_probs or want_entropy
    own = x if x is not chunk else None  # a float32 copy of the chunk's own
    centred = torch.sub(x, m[..., None], out=own if keep or scratch is None else scratch)
    zy = centred.gather(-1, tok.index).squeeze(-1)
    if keep:
        shifted = centred if temperature == 1 else centred.div_(temperature)
        e = _exp(shifted, scratch)
    else:
        e = centred.mul_(LOG2E / temperature).exp2_()
    if temperature != 1:
        zy /= temperature
    total = e.sum(-1)
    log_s = total.log()
    lse = (m if temperature == 1 else m / temperature) + log_s
    zy = torch.where(active & tok.ok, zy, float("-inf"))
    lp = torch.where(active, (zy - log_s).clamp_(max=0.0), 0.0)
    entropy = None
    if want_entropy:
        # p * log p is 0 where p is 0 (a -inf logit), never 0 * -inf.
        plogp = torch.where(e > 0, e * (shifted - log_s[..., None]), 0.0)
        entropy = torch.where(active, -plogp.sum(-1) / total, 0.0).reshape(-1)
    # |lse| < inf is false at NaN too (three ops; torch.isfinite is five).
    flat = (torch.where(active, lse, 0.0), lp, active & (lse.abs() < float("inf")).logical_not_())
    lse, lp, nonfinite = (x.reshape(-1) for x in flat)
    return RowSoftmax(shifted, e, total, log_s, m.reshape(-1)), lse, lp, entropy, nonfinite


def error_flags(tok, active, nonfinite_s, nonfinite_t=None):
    """A chunk's flat int32 error flags: ``BAD_TOKEN`` where an active row's id lies outside
    ``[0, V)`` (``tok``, a ``TokenIndex``; ``active`` shaped like its rows), ``NONFINITE_STUDENT``
    and ``NONFINITE_TEACHER`` where the flat masks ``_stats`` returns hold (the teacher's if given)."""
    masks = [(active & ~tok.ok).reshape(-1), nonfinite_s] + ([] if nonfinite_t is None else [nonfinite_t])
    bits = _bits((Flag.BAD_TOKEN, Flag.NONFINITE_STUDENT, Flag.NONFINITE_TEACHER)[:len(masks)], nonfinite_s.device)
    return (torch.stack(masks) * bits[:, None]).sum(0, dtype=torch.int32)


def _softmax_grad(rows, tok, coef, coef_h=None, entropy=None, out=None):
    """``coef * (1[v = y] - p) - coef_h * p * (log p + H)`` (mirrors the kernel) from the rows'
    ``RowSoftmax`` and ``TokenIndex``, into ``out`` or else over the rows' exponentials or log-probs;
    ``coef`` (and ``coef_h``, ``entropy``) are shaped like the rows without their last dimension."""
    # Like the kernels, an id outside [0, V) (only with validate=False) matches no column.
    ok, index = tok
    if coef_h is not None:
        log_p = rows.log_probs()
        p = rows.probs_(out)
        h_term = coef_h[..., None] * torch.where(p > 0, p * (log_p + entropy[..., None]), 0.0)
        g = p.neg_().scatter_add_(-1, index, ok.to(p.dtype)[..., None])
        return g.mul_(coef[..., None]).sub_(h_term)
    # -coef * p in one product (p = e / total when the exponentials are kept), then the token's
    # entry (1 - p_y) * coef, so that 1 - p_y is exact and a zero p_y never meets an infinite coef.
    if rows.e is None:
        src = rows.probs_(out)
        p_y, scale = src.gather(-1, index).squeeze(-1), coef.neg()
    else:
        src = rows.e
        p_y, scale = src.gather(-1, index).squeeze(-1) / rows.total, coef.neg().div_(rows.total)
    g = torch.mul(src, scale[..., None], out=src if out is None else out)
    return g.scatter_(-1, index, ((ok.to(p_y.dtype) - p_y) * coef)[..., None])


def logprobs_fwd(rows: Rows, tokens, temperature, want_entropy):
    n, device = rows.n, rows.tensor.device
    lp = common.empty((n,), dtype=torch.float32, device=device)
    lse = common.empty((n,), dtype=torch.float32, device=device)
    ent = common.empty((n if want_entropy else 0,), dtype=torch.float32, device=device)
    flags = common.empty((n,), dtype=torch.int32, device=device)
    for sl, (chunk,) in _row_chunks(rows, rows.tensor):
        y = tokens[sl]
        active = y != reference.IGNORE_INDEX
        tok = _token_index(y, chunk)
        _, lse[sl], lp[sl], e, nonfinite = _stats(chunk, tok, temperature, active, want_entropy)
        if want_entropy:
            ent[sl] = e
        flags[sl] = error_flags(tok, active.view(tok.ok.shape), nonfinite)
    return lp, lse, ent, flags


def partial_stats(rows: Rows, tokens, vocab_start, temperature, want_entropy):
    """``(stats, flags)`` of one vocabulary shard, as ``logprobs.partial_stats`` returns them, from
    ``_stats`` (the reference is the row's maximum here, its first block's there: the frames differ,
    not the values they give)."""
    n, device = rows.n, rows.tensor.device
    stats = common.empty((4, n), dtype=torch.float32, device=device)
    flags = common.empty((n,), dtype=torch.int32, device=device)
    for sl, (chunk,) in _row_chunks(rows, rows.tensor):
        y = tokens[sl]
        active = y != reference.IGNORE_INDEX
        local = y - vocab_start
        in_shard = active & (local >= 0) & (local < rows.vocab)
        chunk = _flat(chunk)
        soft, lse, lp, entropy, _ = _stats(chunk, _token_index(torch.where(in_shard, local, -1), chunk),
                                              temperature, active, want_entropy)
        total = soft.total.reshape(-1)
        stats[0, sl] = torch.where(active, soft.ref, 0.0)
        stats[1, sl] = torch.where(active, soft.log_total.reshape(-1) * LOG2E, float("-inf"))
        # A shard without a finite logit gives its tokens a log-prob of -inf, never -inf - -inf.
        stats[2, sl] = torch.where(in_shard & (total != 0), lp * LOG2E, float("-inf"))
        stats[3, sl] = torch.where(active & (total > 0), entropy * LOG2E, 0.0) if want_entropy else 0.0
        # A shard may hold no finite logit (padding): only NaN and +inf are errors here.
        flags[sl] = (active & (torch.isnan(lse) | (lse == float("inf")))).int() * int(Flag.NONFINITE_STUDENT)
    return stats, flags


def logprobs_bwd(rows: Rows, tokens, lse, coef, coef_h, entropy, temperature, grad):
    for sl, (chunk, g_chunk) in _row_chunks(rows, rows.tensor, grad):
        # The chunk is read in place (a [b, T, V] view of strided rows too). Without the entropy
        # term a float32 gradient's rows hold the log-probs, then the probabilities, then the
        # gradient: no temporary rows.
        lse_rows = lse[sl].view(chunk.shape[:-1])[..., None]
        if coef_h is not None or g_chunk.dtype != torch.float32:
            log_p = _scaled(chunk, temperature) - lse_rows
        elif temperature == 1:
            log_p = torch.sub(chunk, lse_rows, out=g_chunk)  # the float32 log-sums promote half rows
        else:
            log_p = g_chunk.copy_(chunk).div_(temperature).sub_(lse_rows)
        _grad_chunk(RowSoftmax(log_p), _token_index(tokens[sl], chunk), g_chunk, sl, tokens, coef, coef_h, entropy,
                    temperature)
    return grad


def _grad_chunk(rows, tok, g_chunk, sl, tokens, coef, coef_h, entropy, temperature):
    """Writes ``(coef * (1[v = y] - p) - coef_h * p * (log p + H)) / tau`` for the rows ``sl`` from their
    ``RowSoftmax`` and ``TokenIndex`` into ``g_chunk``; rows whose coefficients are zero, or that are
    masked, get 0."""
    inv = 1.0 / temperature
    shape = tok.ok.shape
    y, c = tokens[sl].view(shape), coef[sl].view(shape)
    active = (y != reference.IGNORE_INDEX) & (c != 0)
    c_h = h = None
    if coef_h is not None:
        c_h, h = coef_h[sl].view(shape) * inv, entropy[sl].view(shape)
        active |= (y != reference.IGNORE_INDEX) & (c_h != 0)
    # A float32 gradient is formed in place (a view of strided rows too); others are rounded once.
    in_place = g_chunk.dtype == torch.float32
    g = _softmax_grad(rows, tok, c * inv, c_h, h, out=g_chunk if in_place else None)
    # Rows with zero coefficients come out 0 where their sum is finite and positive; the others
    # (NaN or no finite logit, or any row of stored log-probs) are cleared.
    clear_rows(g, ~active if rows.total is None else ~active & ~(rows.total > 0))
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
    # A float32 gradient's rows are the scratch of each chunk's exponentials (the teacher's, then
    # the student's, kept for the gradient when there is one chunk), unless they are the student's
    # logits themselves (in place), which are read again over several chunks or after the teacher's.
    scratch = grad is not None and grad.dtype == torch.float32
    in_place = scratch and grad.data_ptr() == s_rows.tensor.data_ptr()
    kept = None
    for sl, views in chunks:
        tok, on = _token_index(inputs.tokens[sl], views[0]), active[sl]
        if t_rows is not None:
            _, _, out["lp_t"][sl], _, nonfinite_t = _stats(views[1], tok, temperature, on,
                                                              scratch=views[-1] if scratch and not in_place else None)
        else:
            out["lp_t"][sl] = torch.where(on, inputs.lp_t[sl], 0.0)
        student_scratch = views[-1] if scratch and (len(chunks) == 1 or not in_place) else None
        rows, out["lse"][sl], out["lp_s"][sl], entropy, nonfinite_s = _stats(
            views[0], tok, temperature, on, want_entropy=bool(params.want_entropy), scratch=student_scratch)
        kept = (rows, tok) if len(chunks) == 1 else None
        out["entropy"][sl] = entropy if entropy is not None else 0.0
        flags[sl] = error_flags(tok, on.view(tok.ok.shape), nonfinite_s, None if t_rows is None else nonfinite_t)

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
            _grad_chunk(*kept, views[-1], sl, inputs.tokens, coef, coef_h, out["entropy"], temperature)
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
    zero = flags.new_zeros((), dtype=torch.float32)
    for key, name in (("loss", "loss"), ("d_lp", "d_loss"), ("w", "weight"), ("ratio", "ratio"),
                      ("is_weight", "is_weight"), ("kl", "kl")):
        torch.where(active, terms[name], zero, out=out[key])
    flags &= int(ERRORS)
    # The bits are distinct powers of two: their sum over the terms is their OR.
    hits = torch.stack([terms[name] for name, _ in FLAG_TERMS]).logical_and_(active)
    flags |= (hits * _bits(tuple(bit for _, bit in FLAG_TERMS), flags.device)[:, None]).sum(0, dtype=torch.int32)


@functools.cache
def _bits(flags, device):
    """The int32 values of a tuple of ``Flag`` bits on ``device``, made once."""
    return torch.tensor([int(bit) for bit in flags], dtype=torch.int32, device=device)
