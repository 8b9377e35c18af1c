"""The slab schedule of the fused linear form, opt-in (``linear.py: SCHEDULE``; design notes, memory
and the count of weight streams in ``docs/linear-form.md``: the slab schedule).

Per chunk of C token rows and per vocabulary slab of ``Vs`` columns, one matmul of the stacked
student and teacher rows (``[2C, H] @ W[slab]^T``, float32) gives both models' logits of the slab:
the weight streams once for both. Each slab's row statistics come from
``launch/logprobs.py: partial_stats`` in the slab's own frame, exactly as a vocabulary shard's do in
the vocabulary-parallel form, and the slabs combine as the shards do (``collectives.combine``, the
slab dimension in place of the ranks, no collective). The loss's own per-token epilogue runs on the
combined statistics (``launch/rlsd.py: rlsd_token_epilogue``, as ``sharded.py`` runs it).

The gradient of the policy loss is ``coef * (1[v = y] - p) / tau`` when ``entropy_coef`` is 0: the
student's slab softmax goes straight into the chunk's gradient buffer (``launch/slab.py:
slab_probs``) and, once the epilogue has given ``coef``, a rescale turns it into ``dz`` in place
(each slab's values times its share of the row's mass, the token's entry from its float32 log-prob:
``slab_rescale``). Any other gradient (``entropy_coef``, the per-token backward of
``loss_agg="none"``, the log-probs' backward) is written slab by slab from the whole rows'
statistics by the loss's own row backward on the slab's columns, as a vocabulary shard writes its
columns. Then ``dH[chunk] = dz @ W``, ``dW += dz^T @ h``, ``db += sum(dz)`` (``chunks.Grads``). The
OPSD losses compose these pieces in ``slab_opsd.py``.
"""

from __future__ import annotations

import math

import torch

from ..launch import common
from ..launch.logprobs import partial_stats
from ..launch.rlsd import rlsd_token_epilogue
from ..launch.slab import slab_probs, slab_rescale
from ..launch.terms import needs_sequence_pass, sequence_terms
from ..reference import IGNORE_INDEX
from . import rows as skip
from .chunks import Grads, logits_into, rows_of, token_chunks
from .collectives import ELSEWHERE, combine, error_flags

# Bytes of the float32 slab buffer (2C rows of Vs logits with a teacher, C without), by device type;
# the columns per slab follow (``slab_size``). 32 MiB keeps the buffer within an H100's or H200's L2
# cache between the matmul that writes it and the row kernels that read it.
SLAB_BYTES = {"cuda": 32 << 20}
SLAB_BYTES_OTHER = 2 << 20
# Bytes of a chunk's buffers (the slab buffer and the chunk's gradient rows), by device type: the
# chunk schedule's budget (``linear.py: CHUNK_BYTES``).
CHUNK_BYTES = {"cuda": 160 << 20}
CHUNK_BYTES_OTHER = 16 << 20
# Columns per slab forced for every call (tests, benchmarks); None: from ``SLAB_BYTES``.
SLAB_SIZE = None
ALIGN = 128
EPILOGUE_OUTPUTS = ("loss", "d_lp", "w", "ratio", "is_weight", "kl")
LOG2E = 1.4426950408889634


def slab_size(vocab: int, rows: int, device: torch.device, size: int | None = None) -> int:
    """Columns per slab for a slab buffer of ``rows`` float32 rows: ``size`` (or ``SLAB_SIZE``) when
    given, else what fits ``SLAB_BYTES``, a multiple of 128 columns, balanced over the slabs so that
    the last is not much narrower than the others; at most ``vocab``."""
    size = SLAB_SIZE if size is None else size
    if size is None:
        cols = max(ALIGN, SLAB_BYTES.get(device.type, SLAB_BYTES_OTHER) // (4 * max(rows, 1)) // ALIGN * ALIGN)
        per_slab = math.ceil(vocab / math.ceil(vocab / cols))
        size = math.ceil(per_slab / ALIGN) * ALIGN
    return max(1, min(int(size), vocab))


def default_chunk_size(vocab: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows per chunk: a gradient row of ``vocab`` values in ``dtype`` each, in ``CHUNK_BYTES`` less the
    slab buffer; a multiple of 64, at least 64 (384 rows at V = 151,936 in bf16 on a GPU)."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES_OTHER) - SLAB_BYTES.get(device.type, SLAB_BYTES_OTHER)
    rows = max(budget, 0) // (vocab * dtype.itemsize)
    return max(64, rows // 64 * 64)


def local_ids(tokens, start, width):
    """Ids in the slab ``[start, start + width)`` as its own columns; ``ELSEWHERE`` (matching none) for
    the others, ``IGNORE_INDEX`` kept (as ``collectives.local_tokens`` maps a shard's)."""
    local = tokens - start
    inside = (local >= 0) & (local < width)
    return torch.where(tokens == IGNORE_INDEX, IGNORE_INDEX, torch.where(inside, local, ELSEWHERE))


class Slabs:
    """The slabs of one call: the weight's column ranges, the float32 slab buffer of ``m_rows`` rows and,
    with ``grad_dtype``, the chunk's gradient rows ``[rows, V]``, in one allocation."""

    def __init__(self, form, tensors, rows, m_rows, temperature, grad_dtype=None):
        _, self.weight, self.bias = tensors
        self.temperature = temperature
        vocab, device = self.weight.shape[0], self.weight.device
        cols = slab_size(vocab, m_rows, device, form.slab_size)
        self.bounds = [(a, min(a + cols, vocab)) for a in range(0, vocab, cols)]
        self.cols = cols
        pad = lambda n: -(-n // 16) * 16  # noqa: E731  (rows start 64-byte aligned)
        slab_bytes = 4 * max(m_rows, 1) * pad(cols)
        padded = pad(vocab)
        grad_bytes = 0 if grad_dtype is None else grad_dtype.itemsize * rows * padded
        buf = common.empty(((slab_bytes + grad_bytes) // 4,), dtype=torch.float32, device=device)
        self._slab = buf[: slab_bytes // 4]
        self.dz = None
        if grad_dtype is not None:
            dz = buf.view(torch.uint8)[slab_bytes:].view(grad_dtype).view(rows, padded)
            # Some CPU half-precision matmuls read the padding of a [:, :V] view's rows: zeros there.
            dz[:, vocab:].zero_()
            self.dz = dz[:, :vocab]

    def logits(self, h, start, end):
        """The float32 logits ``h @ W[start:end]^T (+ bias)`` of the rows ``h``, in the slab buffer."""
        width = -(-(end - start) // 16) * 16
        out = self._slab[: h.shape[0] * width].view(h.shape[0], width)[:, : end - start]
        bias = None if self.bias is None else self.bias[start:end]
        return logits_into(out, h, self.weight[start:end], bias)

    def stats(self, h, t, scored, k, write=None):
        """``(student, teacher)``: each slab's statistics of the rows ``h`` (``[S, k, c]``) and of the
        teacher's rows ``t`` (``[S, 3, c]``, or None), one matmul per slab for both; with ``write``
        (gradient rows ``[n, V]``) the slab softmax of the first ``n`` student rows goes there."""
        c, tau = h.shape[0], self.temperature
        stacked = h if t is None else torch.cat([h, t])
        # One statistics launch per slab for both models' rows (the teacher's entropy, if computed, unused).
        ids = scored if t is None else torch.cat([scored, scored])
        student, teacher = [], []
        for a, b in self.bounds:
            z = self.logits(stacked, a, b)
            s = partial_stats(z, ids, a, tau, k > 3)[0]
            student.append(s[:k, :c])
            teacher.append(s[:3, c:])
            if write is not None and write.shape[0]:
                n = write.shape[0]
                slab_probs(z[:n], s[0, :n], s[1, :n], tau, write[:, a:b])
        return torch.stack(student), None if t is None else torch.stack(teacher)

    def gradient(self, h, tokens, fn, dz, t=None):
        """Writes the gradient rows ``dz`` ``[n, V]`` of the rows ``h`` slab by slab:
        ``fn(logits, teacher logits, ids, dest)`` with the slab's float32 logits of ``h`` and of the
        teacher's rows ``t`` (None without them; stacked under ``h`` in the slab's one matmul), the
        rows' ids as its columns (``local_ids``) and the slab's columns of ``dz``."""
        n = h.shape[0]
        if n == 0:
            return
        stacked = h if t is None else torch.cat([h, t])
        for a, b in self.bounds:
            z = self.logits(stacked, a, b)
            fn(z[:n], None if t is None else z[n:], local_ids(tokens, a, b - a), dz[:, a:b])


def chunks(form, hidden, plan, teacher=False):
    """``(rows, iterator)``: the most rows a chunk has and, per chunk, ``(tokens, h, t, grads)``: its
    tokens (a flat slice, or the plan's ids), the student's rows, the teacher's rows (with
    ``teacher``) and how many of its first rows have a gradient (``rows.py``)."""
    size = form.chunk
    if plan is None:
        rows, parts = token_chunks(hidden, size)
        return rows, ((sl, h, rows_of(form.teacher, sl) if teacher else None, h.shape[0]) for sl, h in parts)
    m = plan.order.numel()

    def parts():
        for s in range(0, m, size):
            ids = plan.order[s : s + size]
            t = skip.gather(form.teacher, ids) if teacher else None
            yield ids, skip.gather(hidden, ids), t, min(ids.numel(), max(0, plan.grads - s))

    return min(size, m), parts()


def _join(parts, plan):
    if plan is not None:
        return skip.scatter(parts, plan)
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _student_logprobs(form, tensors, scored, live, temperature):
    """The student's log-probs of every token, a pass of its own (the sequence-level terms need them)."""
    plan = skip.plan(live)
    rows, parts = chunks(form, tensors[0], plan)
    slabs = Slabs(form, tensors, rows, rows, temperature)
    lp = [combine(slabs.stats(h, None, scored[sl], 3)[0], live[sl], temperature)[0] for sl, h, _, _ in parts]
    return _join(lp, plan)


def _epilogue(student, teacher, inputs, live, options, vocab):
    """``(out, flags, frame)`` of a chunk from its slab statistics: the policy launchers' outputs."""
    tau = options.temperature
    out = {}
    out["lp_s"], out["lse"], lse_all, entropy, frame = combine(student, live, tau)
    out["entropy"] = entropy if entropy is not None else torch.zeros_like(out["lse"])
    lse_t_all = None
    if teacher is not None:
        out["lp_t"], _, lse_t_all, _, _ = combine(teacher, live, tau)
    else:
        out["lp_t"] = torch.where(live, inputs.lp_t, 0.0)
    flags = error_flags(inputs.tokens, live, vocab, lse_all, lse_t_all)
    out.update({k: common.empty(live.shape, dtype=torch.float32, device=live.device) for k in EPILOGUE_OUTPUTS})
    rlsd_token_epilogue(out, flags, inputs, options)
    return out, flags, frame


def _rescale(dz, lp_s, frame, tokens, coef, temperature, slab_cols):
    """``dz`` (the chunk's slab softmaxes) into ``coef * (1[v = y] - p) / tau`` in place: slab ``j`` of a
    row holds ``p / s_j`` with ``s_j`` its share of the row's mass; the token's entry is
    ``coef * (1 - p_y) / tau`` from the float32 log-prob, ``-expm1(lp)``, exact where ``p_y`` is near 1."""
    c = coef / temperature
    share = torch.exp2(frame.shard - frame.c)
    factor = (c * share).contiguous()
    token_value = c * -torch.expm1(lp_s)
    return slab_rescale(dz, factor, tokens, token_value, coef, slab_cols)


def policy_forward(form, loss, tensors, inputs, needs, validate):
    """``LinearForm.loss_forward`` of the policy loss (``loss.distill`` None) on the slab schedule."""
    hidden, weight, bias = tensors
    options, tau, vocab = loss.options, loss.options.temperature, weight.shape[0]
    track = any(needs)
    live = inputs.weight != 0
    scored = inputs.tokens.masked_fill(~live, IGNORE_INDEX)
    k = 4 if options.want_entropy else 3
    if needs_sequence_pass(inputs, options):
        inputs = sequence_terms(_student_logprobs(form, tensors, scored, live, tau), inputs, options)
    free = skip.gradient_free(loss, inputs) if track else None
    plan = skip.plan(live, None if free is None else ~free)
    grads = Grads(hidden, weight, bias, needs, plan, form.dw_fp32_for(weight)) if track else None
    with_teacher = form.teacher is not None
    # Without an entropy term the gradient needs p only: the slab softmaxes, rescaled (else slab by slab).
    probs = options.entropy_coef == 0
    rows, parts = chunks(form, hidden, plan, with_teacher)
    slabs = Slabs(form, tensors, rows, rows * (2 if with_teacher else 1), tau, weight.dtype if track else None)
    outs, flags = [], []
    for sl, h, t, n_grad in parts:
        c = h.shape[0]
        dz = slabs.dz[:c] if track else None
        write = dz[:n_grad] if track and probs else None
        student, teacher = slabs.stats(h, t, scored[sl], k, write)
        chunk_inputs = inputs.sliced(sl)
        out, f, frame = _epilogue(student, teacher, chunk_inputs, live[sl], options, vocab)
        outs.append(out)
        flags.append(f)
        if not track or n_grad == 0:
            continue
        # Rows past n_grad have no gradient, whatever their terms (a NaN at advantage 0 stays out).
        scale = chunk_inputs.weight[:n_grad]
        if probs:
            coef = (scale * out["d_lp"][:n_grad]).contiguous()
            _rescale(dz[:n_grad], out["lp_s"][:n_grad], frame_rows(frame, n_grad), chunk_inputs.tokens[:n_grad], coef,
                     tau, slabs.cols)
        else:
            saved = {key: out[key][:n_grad] for key in loss.saved}
            slabs.gradient(h[:n_grad], chunk_inputs.tokens[:n_grad], lambda z, _, ids, dest, saved=saved, scale=scale:
                           loss.backward(z, None, ids, saved, scale, out=dest), dz[:n_grad])
        grads.add(sl, dz, h, live[sl] if plan is None else None, n_grad)
    out, flags = _join(outs, plan), _join(flags, plan)
    if validate:
        common.raise_on_error_flags(flags, inputs.tokens, vocab, form.names)
    return out, flags, grads.result() if track else (None, None, None)


def frame_rows(frame, n):
    """The first ``n`` rows of a ``collectives.Frame``."""
    return type(frame)(frame.ref[:n], frame.c[:n], frame.shard[:, :n])


def accumulate(form, tensors, tokens, fn, needs, live, paired=False):
    """``(dH, dW, db)`` where ``needs`` asks, each chunk's gradient written slab by slab by
    ``fn(logits, teacher logits, ids, rows, dest)`` (``rows`` the chunk's tokens; the teacher's
    logits None unless ``paired``, then stacked in the slab's one matmul); ``live`` marks the rows
    with a gradient (the others are skipped, ``rows.py``)."""
    hidden, weight, bias = tensors
    plan = skip.plan(live)
    grads = Grads(hidden, weight, bias, needs, plan, form.dw_fp32_for(weight))
    rows, parts = chunks(form, hidden, plan, paired)
    slabs = Slabs(form, tensors, rows, rows * (2 if paired else 1), 1.0, weight.dtype)
    for sl, h, t, n_grad in parts:
        dz = slabs.dz[: h.shape[0]]
        r = skip.sub(sl, slice(0, n_grad))
        slabs.gradient(h[:n_grad], tokens[r], lambda z, zt, ids, dest, r=r: fn(z, zt, ids, r, dest), dz[:n_grad],
                       None if t is None else t[:n_grad])
        grads.add(sl, dz, h, live[sl] if plan is None else None, n_grad)
    return grads.result()
