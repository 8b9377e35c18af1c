"""The PyTorch path behind the OPSD launchers for tensors the Triton kernels do not take (CPU).

Same contract and outputs as ``opsd.opsd_fwd`` / ``opsd.opsd_bwd`` (and the shard statistics of
``opsd.partial_stats`` / ``opsd.jsd_sums``), computed chunk by chunk over tokens
(``torch_rows._row_chunks``), with the policy term of the combined loss from ``torch_rows.rlsd_fwd``.
"""

from __future__ import annotations

import math

import torch

from .. import reference
from . import common, torch_rows
from .terms import OUTPUTS

FORWARD_KL, REVERSE_KL, JSD, SAMPLED = range(4)
_LN2 = math.log(2.0)
_LOG2E = torch_rows.LOG2E
_exp = torch_rows._exp
OPSD_OUTPUTS = ("lse_t", "div", "opsd", "k", "d_div")


def output_names(grpo):
    """The per-token float32 outputs of the OPSD launchers (the RLSD ones too with the policy term)."""
    return (OUTPUTS if grpo else ("lp_s", "lp_t", "lse")) + OPSD_OUTPUTS


def _mixture(a, b, beta):
    return torch.logaddexp(b + math.log(beta), a + math.log1p(-beta))


def _weighted(x, p):
    """``(p * x, sum(p * x))`` (the products over ``x``, in place, and their row sums), 0 where ``p``
    is 0: never ``0 * inf`` at a -inf log-prob. The plain products first: only rows whose sum is NaN
    (such a product, or a NaN of the input's own) are formed again with those entries cleared, so
    that no full pass compares or masks all entries."""
    d = x.mul_(p).sum(-1)
    nan = torch.isnan(d)
    if bool(nan.any()):
        rows = x[nan].masked_fill_(p[nan] == 0, 0.0)
        x[nan], d[nan] = rows, rows.sum(-1)
    return x, d


def divergence(a, b, code, beta, s=None, t=None, out=None):
    """``(D, k)`` per row of the student's and teacher's log-probs ``[..., V]`` (see
    ``reference.opsd_token_divergence``): ``k`` is the constant of the gradient, ``KL(S || T)``
    (reverse) or ``KL(S || M)`` (JSD), else 0. ``s`` and ``t``: their probabilities, where known;
    ``out``: float32 rows shaped like ``a`` for a KL's products, instead of new ones."""
    s = _exp(a) if s is None and code != FORWARD_KL else s
    t = _exp(b) if t is None and code != REVERSE_KL else t
    if code == FORWARD_KL:
        d = _weighted(torch.sub(b, a, out=out), t)[1]
        return d, torch.zeros_like(d)
    if code == REVERSE_KL:
        d = _weighted(torch.sub(a, b, out=out), s)[1]
        return d, d
    teacher_sum, k = _jsd_sums(a, b, beta, s, t)
    return beta * teacher_sum + (1 - beta) * k, k


def _jsd_sums(a, b, beta, s, t):
    """``(sum T (log T - log M), sum S (log S - log M))`` per row: the JSD's two KLs to the mixture."""
    log_m = _mixture(a, b, beta)
    k = _weighted(a - log_m, s)[1]
    return _weighted(torch.sub(b, log_m, out=log_m), t)[1], k


def divergence_grad(a, b, k, code, beta, s=None, t=None, out=None):
    """``tau * dD/dz_S`` for a chunk of log-probs (mirrors ``kernels/common.py: divergence_grad_block``),
    into ``out`` (float32 rows shaped like ``a``) or a new tensor; ``s`` and ``t``: the student's and
    teacher's probabilities, where known."""
    s = _exp(a) if s is None else s
    k = k[..., None]
    if code == FORWARD_KL:
        return torch.sub(s, _exp(b) if t is None else t, out=out)
    if code == REVERSE_KL:
        diff = torch.sub(a, b, out=out).sub_(k)
        # An infinite KL (T = 0 where S > 0): the gradient's limit is +inf at those entries, not inf - inf.
        infinite = k == math.inf
        if bool(infinite.any()):
            diff.masked_fill_((b == -math.inf) & infinite, math.inf)
        return _weighted(diff, s)[0]
    log_m = _mixture(a, b, beta)
    return _weighted(torch.sub(a, log_m, out=out).sub_(k), s)[0].mul_(1 - beta)


def token_terms(div, lp_s, code, token_clip):
    """``(opsd, d_div, clipped)``: the per-token OPSD loss, its derivative by ``D`` (full vocabulary)
    or by ``lp_S`` (sampled token), and where ``token_clip`` bound."""
    clip = math.inf if token_clip is None else token_clip
    clipped = div > clip
    if code == SAMPLED:
        # D = 0 (both log-probs -inf: a token neither model can sample) adds 0, not 0 * -inf.
        return torch.where(div == 0, 0.0, div.clamp(max=clip) * lp_s), torch.where(clipped, 0.0, div), clipped
    return div.clamp(max=clip), torch.where(clipped, 0.0, 1.0), clipped


def opsd_fwd(s_rows, t_rows, inputs, params, opsd, grad):
    """Per-token outputs as the Triton launcher returns them; writes ``weight * dl/dz`` into ``grad``."""
    n, device = s_rows.n, s_rows.tensor.device
    code, grpo, temperature = opsd.div, opsd.grpo, params.temperature
    if grpo:
        out, flags = torch_rows.rlsd_fwd(s_rows, t_rows, inputs, params, None)
    else:
        out = {k: common.empty((n,), dtype=torch.float32, device=device) for k in ("lp_s", "lp_t", "lse")}
        flags = common.empty((n,), dtype=torch.int32, device=device)
    for key in OPSD_OUTPUTS:
        out[key] = common.empty((n,), dtype=torch.float32, device=device)
    active = inputs.weight != 0
    need_lp = code == SAMPLED or grpo
    tensors = [s_rows.tensor] + ([t_rows.tensor] if t_rows is not None else [])
    chunks = list(torch_rows._row_chunks(s_rows, *tensors, *([grad] if grad is not None else [])))
    # A float32 gradient's rows are scratch until the gradient is written: for the teacher's
    # exponentials where the gradient does not read them (all but the forward KL's), and for a KL's
    # products where they do not hold those. Not where they are the student's logits (in place)
    # read again over several chunks.
    scratch = grad is not None and grad.dtype == torch.float32 and (
        len(chunks) == 1 or grad.data_ptr() != s_rows.tensor.data_ptr())
    kept = None
    for sl, views in chunks:
        rows = views[-1] if scratch else None
        on = active[sl]
        y = inputs.tokens[sl] if need_lp else torch.zeros_like(on, dtype=torch.long)
        b = None
        # The chunk's rows ([C, V], or a [b, T, V] view) are read in place; per-row results are flat.
        tok = torch_rows._token_index(y, views[0])
        rows_s, lse_s, lp_s, _, nonfinite_s = torch_rows._stats(views[0], tok, temperature, on, log_probs=True)
        a = rows_s.log_probs_()
        # The probabilities from the kept exponentials (spent), for the divergences that read them.
        s = t = None
        if code != SAMPLED:
            s = rows_s.probs_()
        nonfinite_t = torch.zeros_like(on)
        lse_t = lse_s
        if t_rows is not None:
            rows_t, lse_t, lp_t, _, nonfinite_t = torch_rows._stats(
                views[1], tok, temperature, on, log_probs=code != SAMPLED,
                scratch=rows if code != FORWARD_KL else None)
            if code != SAMPLED:
                b = rows_t.log_probs_()
                t = rows_t.probs_() if code != REVERSE_KL else None
        else:
            lp_t = torch.where(on, inputs.lp_t[sl], 0.0)
        if code == SAMPLED:
            div, k = reference._log_diff(lp_s, lp_t), torch.zeros_like(lp_s)
        else:
            products = rows if code in (FORWARD_KL, REVERSE_KL) else None
            div, k = (x.reshape(-1) for x in divergence(a, b, code, opsd.beta, s, t, out=products))
        if not grpo:
            out["lse"][sl], out["lp_s"][sl], out["lp_t"][sl] = lse_s, lp_s, lp_t
            # Without log-probs the ids are all 0 here, never a bad token.
            flags[sl] = torch_rows.error_flags(tok, on.view(tok.ok.shape), nonfinite_s, nonfinite_t)
        out["lse_t"][sl] = torch.where(on, lse_t, 0.0)
        out["div"][sl] = torch.where(on, div, 0.0)
        out["k"][sl] = torch.where(on, k, 0.0)
        kept = (a, b, s, t) if len(chunks) == 1 else None
    opsd_value, d_div, _ = token_terms(out["div"], out["lp_s"], code, opsd.token_clip)
    out["opsd"] = torch.where(active, opsd_value, 0.0)
    out["d_div"] = torch.where(active, d_div, 0.0)
    if grad is not None:
        c_lp, c_h, c_d = grad_coefficients(out, inputs.weight, params.entropy_coef, opsd)
        opsd_grad(s_rows, t_rows, inputs.tokens, out, c_lp, c_h, c_d, params.temperature, opsd, grad, kept)
    return out, flags


def grad_coefficients(out, scale, entropy_coef, opsd):
    """``(c_lp, c_h, c_d)`` of the row gradient for per-token scales (the aggregation weights, times
    the upstream gradient in the per-token backward); ``c_h`` is None without the entropy term."""
    c_lp = scale * out["d_lp"] if opsd.grpo else torch.zeros_like(scale)
    c_d = scale * (opsd.alpha * out["d_div"])
    if opsd.div == SAMPLED:
        c_lp, c_d = c_lp + c_d, torch.zeros_like(c_d)
    c_h = scale * -entropy_coef if opsd.grpo and entropy_coef != 0 else None
    return c_lp.contiguous(), None if c_h is None else c_h.contiguous(), c_d.contiguous()


def opsd_grad(s_rows, t_rows, tokens, out, c_lp, c_h, c_d, temperature, opsd, grad, kept=None):
    """Writes ``(c_lp * (1[v = y] - p) - c_h * p * (log p + H) + c_d * tau * dD/dz_S) / tau`` into ``grad``.

    ``kept``: the student's and teacher's log-probs and probabilities (those the divergence read) of
    all rows when they are one chunk, from the forward (formed from centred logits); otherwise each
    row's are its logits less its stored logsumexp (a relative error of about ``|lse| * 2**-24`` in
    ``p``)."""
    code = opsd.div
    tensors = [s_rows.tensor, grad] + ([t_rows.tensor] if code != SAMPLED else [])
    for sl, views in torch_rows._row_chunks(s_rows, *tensors):
        # The chunk's rows ([C, V], or [b, T, V] views) are read and written in place.
        shape = views[0].shape[:-1]
        y = tokens[sl]
        active = (c_lp[sl] != 0) | (c_d[sl] != 0)
        if c_h is not None:
            active |= c_h[sl] != 0
        s = t = None
        if kept is not None:
            a, b, s, t = kept
        else:
            a = torch_rows._scaled(views[0], temperature) - out["lse"][sl].view(shape)[..., None]
            if code != SAMPLED:
                b = torch_rows._scaled(views[2], temperature) - out["lse_t"][sl].view(shape)[..., None]
        g = None
        if code == SAMPLED or opsd.grpo:
            g = torch_rows._softmax_grad(torch_rows.RowSoftmax(a), torch_rows._token_index(y, a),
                                         c_lp[sl].view(shape), None if c_h is None else c_h[sl].view(shape),
                                         None if c_h is None else out["entropy"][sl].view(shape))
        if code != SAMPLED:
            # Formed in the gradient's rows where it is alone and float32 (they are read no more);
            # rows without the divergence's term add nothing, whatever dd holds there.
            rows_out = views[1] if g is None and views[1].dtype == torch.float32 else None
            c = c_d[sl].view(shape)[..., None]
            dd = divergence_grad(a, b, out["k"][sl].view(shape), code, opsd.beta, s, t, out=rows_out)
            torch_rows.clear_rows(dd.mul_(c), c[..., 0] == 0)
            g = dd if g is None else g.add_(dd)
        if temperature != 1:
            g.div_(temperature)
        torch_rows.clear_rows(g, ~active.view(shape))
        if g.data_ptr() != views[1].data_ptr():
            views[1].copy_(g)
    return grad


def stats_rows(code, need_lp, entropy, has_teacher=True):
    """The rows of one vocabulary shard's statistics (``opsd.partial_stats``), in order: the student's
    reference and base-2 log-sum, token log-prob and entropy, the teacher's reference, log-sum and
    token log-prob, and the shard's own KL (forward or reverse); each only where it is needed."""
    names = ("r_s", "c_s") + (("lp_s",) if need_lp else ()) + (("h_s",) if entropy else ())
    if has_teacher:
        names += ("r_t", "c_t") + (("lp_t",) if need_lp else ())
    return names + (("d",) if code in (FORWARD_KL, REVERSE_KL) else ())


def _frame_log_probs(z, frame, on, temperature):
    """Natural log-probs of rows of logits ``z`` under a softmax given by its frame ``(reference,
    base-2 log-sum)``; inactive rows read as if both were 0."""
    r, c = (torch.where(on, x, 0.0) for x in frame)
    return (torch_rows._flat(z).float() - r[:, None]) / temperature - (c * _LN2)[:, None]


def partial_stats(s_rows, t_rows, tokens, vocab_start, temperature, code, need_lp, entropy):
    """One vocabulary shard's statistics as ``opsd.partial_stats`` returns them: ``[k, N]`` float32."""
    s_stats, _ = torch_rows.partial_stats(s_rows, tokens, vocab_start, temperature, entropy)
    t_stats, _ = torch_rows.partial_stats(t_rows, tokens, vocab_start, temperature, False)
    found = {"r_s": s_stats[0], "c_s": s_stats[1], "lp_s": s_stats[2], "h_s": s_stats[3],
             "r_t": t_stats[0], "c_t": t_stats[1], "lp_t": t_stats[2]}
    if code in (FORWARD_KL, REVERSE_KL):
        found["d"] = common.empty((s_rows.n,), dtype=torch.float32, device=s_rows.tensor.device)
        for sl, (zs, zt) in torch_rows._row_chunks(s_rows, s_rows.tensor, t_rows.tensor):
            on = tokens[sl] != reference.IGNORE_INDEX
            a = _frame_log_probs(zs, (s_stats[0, sl], s_stats[1, sl]), on, temperature)
            b = _frame_log_probs(zt, (t_stats[0, sl], t_stats[1, sl]), on, temperature)
            d, _ = divergence(a, b, code, 0.5)
            found["d"][sl] = torch.where(on, d * _LOG2E, 0.0)
    return torch.stack([found[k] for k in stats_rows(code, need_lp, entropy)])


def jsd_sums(s_rows, t_rows, tokens, frame_s, frame_t, temperature, beta):
    """The JSD's two sums of one shard in base 2, as ``opsd.jsd_sums`` returns them: ``[2, N]``."""
    sums = common.empty((2, s_rows.n), dtype=torch.float32, device=s_rows.tensor.device)
    for sl, (zs, zt) in torch_rows._row_chunks(s_rows, s_rows.tensor, t_rows.tensor):
        on = tokens[sl] != reference.IGNORE_INDEX
        a = _frame_log_probs(zs, (frame_s[0][sl], frame_s[1][sl]), on, temperature)
        b = _frame_log_probs(zt, (frame_t[0][sl], frame_t[1][sl]), on, temperature)
        teacher_sum, student_sum = _jsd_sums(a, b, beta, _exp(a), _exp(b))
        sums[0, sl] = torch.where(on, teacher_sum * _LOG2E, 0.0)
        sums[1, sl] = torch.where(on, student_sum * _LOG2E, 0.0)
    return sums
