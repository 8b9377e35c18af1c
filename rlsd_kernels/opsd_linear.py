"""The OPSD losses (``opsd_loss``, ``grpo_opsd_loss``) from hidden states and the lm_head weight, in
token chunks, never materialising the ``[N, V]`` logits.

The divergences run over the whole vocabulary, so a row needs the student's and the teacher's full
logits at the same time. Per chunk of C token rows, half a chunk at a time, both models' logits come
from matmuls with float32 output (``linear._logits_into``) into two float32 tiles, the OPSD launchers
of ``opsd.py`` compute the rows' statistics, loss and logit gradient ``dz`` (into the chunk's own
``dz`` buffer, never over the logits it is computed from), and the chunk's gradients are added right
away as in ``linear.py``: ``dH[chunk] = dz @ W``, ``dW += dz^T @ h``, ``db += sum(dz)``. For a scalar
loss the backward only scales them by the incoming gradient; ``loss_agg="none"`` recomputes each
chunk's logits in its backward (the student's, and the teacher's for the full-vocabulary
divergences). Options of the policy term that need a whole sequence before any token's loss
(``_prepare.needs_sequence_pass``) take a pass of student log-probs first, one more matmul.

Memory. A chunk's buffers: the student's and the teacher's float32 logits of half a chunk (4·V
bytes a chunk row for the two) and the chunk's ``dz`` in the weight's dtype: 6·V bytes a row in
bf16/fp16, 8·V in float32. At N = 8192, H = 4096, V = 151,936 in bf16 with the default C = 256:
the returned dW (2·V·H bytes, 1.245 GB) and dH (2·N·H, 67 MB), the chunk buffers (2 × 77.8 MB of
float32 tiles and 77.8 MB of ``dz``: 233.4 MB) and per-token vectors (under 1 MB): about 1.55 GB,
where the materialised bf16 logits alone would take 2.49 GB per model and as much for their
gradient. At N = 32,768, dH is 268 MB: about 1.75 GB, or 1.63 GB with ``chunk_size=128``. Without
a gradient (``torch.no_grad``, and the forward of ``loss_agg="none"``) the buffers are the two tiles,
4·V bytes a row; a sequence pass takes a whole chunk's float32 student tile (4·V bytes a row) before
the others exist.

Chunk size. Per chunk the matmuls stream W (2·V·H bytes) seven times (two half-chunk tiles per
model, dH, dW read and written) for 8·C·V·H FLOPs. With linear.py's H200 figures (695 TFLOP/s,
4.2 TB/s) a chunk of 256 rows takes about 2.2 ms where its FLOPs alone take 1.8 ms (the 128-row
logits matmuls are bound by reading W), 128 rows about 2.1 ms for half the rows, and 512 rows reach
the compute bound. The default gives the chunk buffers ``CHUNK_BYTES`` (240 MiB on a GPU: the RLSD
loss's 160 MiB times 1.5 for the teacher's tile): 256 rows at V = 151,936 in bf16 as for the RLSD
loss, 192 in float32, in multiples of 64 rows. In the same memory, quarter-chunk tiles or one
whole-chunk tile per model would read W more often per row.

dW accumulates in the weight's dtype, one rounding per chunk, with the precision measured in
``linear.py``'s docstring. The row kernels see float32 logits: their tuning keys and kernel
variants are those of ``opsd_loss`` on float32 logits.
"""

from __future__ import annotations

import torch

from ._opsd_cpu import SAMPLED, grad_coefficients, output_names
from ._opsd_launch import divergence_code, opsd_bwd, opsd_fwd
from ._prepare import needs_sequence_pass, prepare_loss_inputs, sequence_terms
from .linear import (
    _check_linear,
    _chunks,
    _empty_loss,
    _Grads,
    _logits_into,
    _raise_on_errors,
    _sliced,
    _student_tiles,
    _tiles,
    logprobs_fwd_chunked,
)
from .opsd import _check_opsd_options, _metrics, _per_token_loss
from .reference import IGNORE_INDEX
from .rlsd import scale_grad_

# Bytes for a chunk's buffers, by device type (see the module docstring).
CHUNK_BYTES = {"cuda": 240 << 20}
CHUNK_BYTES_OTHER = 24 << 20
# The per-token statistics the per-token backward needs, after the token ids and weights.
STATS = ("lse", "lse_t", "k", "d_div")
GRPO_STATS = STATS + ("d_lp", "entropy")


def default_chunk_size(vocab: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows per chunk: half a row of float32 logits per model and a gradient row in ``dtype``, in budget."""
    rows = CHUNK_BYTES.get(device.type, CHUNK_BYTES_OTHER) // (vocab * (4 + dtype.itemsize))
    return max(64, rows // 64 * 64)


def _rows_of(x, sl):
    """Rows ``sl`` (a flat token slice) of ``[B, T, H]`` or ``[N, H]`` hidden states ``x``: a view where
    ``x`` views as ``[N, H]`` or the slice lies in one sequence, else a copy of the slice's rows (the
    student's chunks cross sequences where the teacher's layout cannot)."""
    try:
        return x.view(-1, x.shape[-1])[sl]
    except RuntimeError:
        t = x.shape[1]
        i, s = divmod(sl.start, t)
        if sl.stop <= (i + 1) * t:
            return x[i, s : s + sl.stop - sl.start]
        idx = torch.arange(sl.start, sl.stop, device=x.device)
        return x[idx // t, idx % t]


def _chunk_passes(hidden, teacher, weight, bias, chunk, grad_dtype):
    """Per chunk ``(sl, h, dz, tiles)``: the flat token slice, the student's rows ``[c, H]``, the chunk's
    logit gradient buffer ``[c, V]`` in ``grad_dtype`` (or None), and an iterator of half-chunk tiles
    ``(rows of the chunk, student logits, teacher logits or None)`` in float32. The buffers are
    shared: each chunk's tiles are to be used before the next chunk."""
    rows, chunks = _chunks(hidden, chunk)
    vocab, device = weight.shape[0], hidden.device
    half = -(-rows // 2)
    if grad_dtype is None:
        work, grad = _tiles(half, vocab, None, device)[0], None
    else:
        work, grad = _tiles(rows, vocab, grad_dtype, device)  # [half, V] float32, [rows, V]
    t_work = None if teacher is None else _tiles(half, vocab, None, device)[0]

    def tiles(h, t):
        for rs, zs in _student_tiles(work, h, weight, bias):
            zt = None if t is None else _logits_into(t_work[: rs.stop - rs.start], t[rs], weight, bias)
            yield rs, zs, zt

    for sl, h in chunks:
        t = None if teacher is None else _rows_of(teacher, sl)
        yield sl, h, None if grad is None else grad[: h.shape[0]], tiles(h, t)


def loss_fwd(hidden, teacher, weight, bias, inputs, params, opsd, chunk, needs):
    """Chunked OPSD forward: ``(outputs, flags, grads)`` with the per-token outputs of ``opsd_fwd``
    over all rows and, where ``needs`` (dH, dW, db) asks, the gradients of ``sum(weight * loss)``."""
    live = inputs["weight"] != 0
    if opsd["grpo"] and needs_sequence_pass(inputs, params):
        # Only the tokens that count are scored: masked rows (with any id) cost nothing.
        scored = inputs["tokens"].masked_fill(~live, IGNORE_INDEX)
        lp_s = logprobs_fwd_chunked(hidden, weight, bias, scored, params["temperature"], False, chunk)[0]
        # Each chunk's launcher then finds the sequence terms present instead of computing them from
        # its own tokens alone.
        inputs = sequence_terms(lp_s, inputs, params)
    track = any(needs)
    grads = _Grads(hidden, weight, bias, needs) if track else None
    outs, flags = [], []
    for sl, h, dz, tiles in _chunk_passes(hidden, teacher, weight, bias, chunk, weight.dtype if track else None):
        per_token = _sliced(inputs, sl)
        for rs, zs, zt in tiles:
            out, f = opsd_fwd(zs, zt, _sliced(per_token, rs), params, opsd, None if dz is None else dz[rs])
            outs.append(out)
            flags.append(f)
        if track:
            grads.add(sl, dz, h, live[sl])
    out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return out, torch.cat(flags), grads.result() if track else (None, None, None)


def rows_bwd(hidden, teacher, weight, bias, tokens, stats, coefs, temperature, opsd, chunk, needs):
    """``(dH, dW, db)`` from the per-token ``stats`` of the forward and the coefficients ``(c_lp, c_h,
    c_d)`` of ``grad_coefficients``: recomputes each chunk's logits (the teacher's only for the
    full-vocabulary divergences), then adds the chunk's share as the forward does."""
    grads = _Grads(hidden, weight, bias, needs)
    # The rows the launchers write a gradient for; they write zeros elsewhere.
    live = torch.zeros_like(tokens, dtype=torch.bool)
    for c in coefs:
        if c is not None:
            live |= c != 0
    teacher = None if opsd["div"] == SAMPLED else teacher
    for sl, h, dz, tiles in _chunk_passes(hidden, teacher, weight, bias, chunk, weight.dtype):
        for rs, zs, zt in tiles:
            rows = slice(sl.start + rs.start, sl.start + rs.stop)
            opsd_bwd(zs, zt, tokens[rows], _sliced(stats, rows), [None if c is None else c[rows] for c in coefs],
                     temperature, opsd, out=dz[rs])
        grads.add(sl, dz, h, live[sl])
    return grads.result()


class OPSDLinearLossFunction(torch.autograd.Function):
    """Scalar OPSD (or GRPO+OPSD) loss over hidden states; dH, dW and db come from the forward,
    scaled in the backward. Returns the loss, the per-token outputs (a dict) and the flags."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, inputs, params, opsd, chunk, track, validate):
        needs = tuple(track and n for n in ctx.needs_input_grad[:3])
        out, flags, ctx.grads = loss_fwd(hidden, teacher, weight, bias, inputs, params, opsd, chunk, needs)
        if validate:
            _raise_on_errors(flags, inputs["tokens"], weight.shape[0])
        ctx.used = False
        ctx.mark_non_differentiable(flags)
        return (inputs["weight"] * _per_token_loss(out, opsd)).sum(), out, flags

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.used:
            raise RuntimeError("opsd_linear_loss: the gradients were computed in the forward pass and are "
                               "already used; backward through it twice is not supported")
        # Dropping ctx's references lets autograd take dW as the weight's .grad without a copy.
        grads, ctx.grads, ctx.used = ctx.grads, None, True
        scale = grad_loss.float().reshape(1)
        for g in grads:
            if g is not None:
                scale_grad_(g.view(-1, g.shape[-1]), scale)
        return (*grads,) + (None,) * 7


class OPSDLinearTokenLossFunction(torch.autograd.Function):
    """Per-token OPSD (or GRPO+OPSD) losses (``loss_agg="none"``); the backward recomputes each
    chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, inputs, params, opsd, chunk, validate):
        out, flags, _ = loss_fwd(hidden, teacher, weight, bias, inputs, params, opsd, chunk, (False,) * 3)
        if validate:
            _raise_on_errors(flags, inputs["tokens"], weight.shape[0])
        names = GRPO_STATS if opsd["grpo"] else STATS
        ctx.save_for_backward(hidden, weight, bias, teacher, inputs["tokens"], inputs["weight"],
                              *(out[k] for k in names))
        ctx.params, ctx.opsd, ctx.chunk = params, opsd, chunk
        ctx.mark_non_differentiable(flags)
        return inputs["weight"] * _per_token_loss(out, opsd), out, flags

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        hidden, weight, bias, teacher, tokens, token_weight, *saved = ctx.saved_tensors
        opsd, params = ctx.opsd, ctx.params
        stats = dict(zip(GRPO_STATS if opsd["grpo"] else STATS, saved, strict=True))
        # Each token's share of the loss scaled by its upstream gradient.
        coefs = grad_coefficients(stats, grad_loss.float().reshape(-1) * token_weight, params["entropy_coef"], opsd)
        grads = rows_bwd(hidden, teacher, weight, bias, tokens, stats, coefs, params["temperature"], opsd, ctx.chunk,
                         ctx.needs_input_grad[:3])
        return (*grads,) + (None,) * 6


def _linear_loss(hidden, weight, bias, teacher_hidden, tokens, advantages, teacher_logprobs, opsd, options, *,
                 loss_agg, return_metrics, validate, chunk_size):
    """What ``opsd_linear_loss`` and ``grpo_opsd_linear_loss`` share: checks, preparation, the
    autograd call, metrics (as ``opsd._loss`` for logits)."""
    _check_linear(hidden, weight, bias, teacher_hidden, chunk_size)
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.device, weight.dtype)
    sampled = opsd["div"] == SAMPLED
    if not sampled and (teacher_hidden is None or teacher_logprobs is not None):
        raise ValueError("the full-vocabulary divergences need teacher_hidden (teacher_logprobs is for "
                         "divergence='sampled_token' only)")
    if (teacher_hidden is None) == (teacher_logprobs is None):
        raise ValueError("give exactly one of teacher_hidden and teacher_logprobs")
    token_shape, device = tuple(hidden.shape[:-1]), hidden.device
    if tokens is None:
        if sampled:
            raise ValueError("divergence='sampled_token' needs tokens (the sampled ids)")
        tokens = torch.zeros(token_shape, dtype=torch.int32, device=device)
    if advantages is None:
        advantages = torch.zeros(token_shape, dtype=torch.float32, device=device)
    inputs, params, m, token_shape = prepare_loss_inputs(
        token_shape, device, tokens, advantages, teacher_logprobs=teacher_logprobs, loss_agg=loss_agg,
        validate=validate, want_entropy=opsd["grpo"] and return_metrics, **options,
    )
    if m.numel() == 0:
        loss = _empty_loss(hidden, weight, bias)
        loss = loss.expand(token_shape) if loss_agg == "none" else loss
        if not return_metrics:
            return loss
        return loss, _metrics(dict.fromkeys(output_names(opsd["grpo"]), m), m.int(), m, inputs, params, opsd)

    teacher = None if teacher_hidden is None else teacher_hidden.detach()
    args = (hidden, weight, bias, teacher, inputs, params, opsd, chunk)
    if loss_agg == "none":
        loss, out, flags = OPSDLinearTokenLossFunction.apply(*args, validate)
        loss = loss.view(token_shape)
    else:
        loss, out, flags = OPSDLinearLossFunction.apply(*args, torch.is_grad_enabled(), validate)
    if not return_metrics:
        return loss
    return loss, _metrics(out, flags, m, inputs, params, opsd)


def opsd_linear_loss(
    student_hidden,
    weight,
    teacher_hidden,
    tokens=None,
    *,
    bias=None,
    mask=None,
    divergence="jsd",
    beta=0.5,
    temperature=1.0,
    token_clip=None,
    loss_agg="token-mean",
    normalizer=None,
    cu_seqlens=None,
    teacher_logprobs=None,
    inplace_backward=False,
    return_metrics=False,
    validate=True,
    chunk_size=None,
):
    """``opsd_loss`` on the logits ``hidden @ weight.T + bias`` of the student and of the teacher,
    without materialising them.

    Same loss, options, checks and results as :func:`rlsd_kernels.opsd_loss` (see it for the
    divergences and every option not listed here); the gradients go to ``student_hidden``,
    ``weight`` and ``bias``. Per chunk of ``chunk_size`` token rows both models' logits are computed
    in float32 and the chunk's gradient added to dH, dW and db right away, so the memory is that of
    dW, dH and the chunk (module docstring: about 1.55 GB at N = 8192, H = 4096, V = 151,936 in
    bf16). ``weight`` may be tied to the input embedding or gathered by ZeRO-3 / FSDP, as for
    :func:`rlsd_kernels.rlsd_linear_loss`; it is never copied.

    Args:
        student_hidden: ``[B, T, H]`` (views such as ``hidden[:, :-1]`` are read in place) or packed
            ``[N, H]``; float32, float16 or bfloat16.
        weight: ``[V, H]``, the lm_head (or tied embedding) weight, in the dtype of the hidden states.
        teacher_hidden: the teacher's hidden states, shaped like ``student_hidden``, scored with the
            same ``weight`` and ``bias`` (no gradient); or ``None`` with ``teacher_logprobs`` for
            ``divergence="sampled_token"``.
        tokens: as for ``opsd_loss``: the sampled ids (needed by ``sampled_token``), ``-100`` masked.
        bias: optional ``[V]`` lm_head bias.
        inplace_backward: accepted for the signature of ``opsd_loss``; without effect, as the logit
            gradient of a chunk always goes to the chunk's own buffer.
        chunk_size: token rows per chunk (default: ``default_chunk_size``, 256 at V = 151,936 on a GPU
            in bf16). The chunk buffers take ``6 * V`` bytes a row (``8 * V`` for float32 weights);
            fewer rows save memory and cost bandwidth.
        validate: as for ``opsd_loss``; rows of NaN or ``+inf`` logits are reported for
            ``student_hidden @ weight.T`` or ``teacher_hidden @ weight.T``.

    Returns:
        The loss (a scalar, or per-token ``[B, T]`` / ``[N]`` for ``none``), or ``(loss, metrics)``.
    """
    _check_opsd_options(divergence, beta, token_clip, 1.0)
    opsd = dict(div=divergence_code(divergence, beta), beta=float(beta), alpha=1.0,
                token_clip=None if token_clip is None else float(token_clip), grpo=False)
    options = dict(old_logprobs=None, mask=mask, eps_w=0.2, lam=0.0, clip_low=0.2, clip_high=0.28, dual_clip=None,
                   temperature=temperature, normalizer=normalizer, cu_seqlens=cu_seqlens)
    return _linear_loss(student_hidden, weight, bias, teacher_hidden, tokens, None, teacher_logprobs, opsd, options,
                        loss_agg=loss_agg, return_metrics=return_metrics, validate=validate, chunk_size=chunk_size)


def grpo_opsd_linear_loss(
    student_hidden,
    weight,
    tokens,
    advantages,
    *,
    teacher_hidden,
    bias=None,
    alpha=1.0,
    divergence="jsd",
    beta=0.5,
    token_clip=None,
    teacher_logprobs=None,
    old_logprobs=None,
    mask=None,
    eps_w=0.2,
    lam=0.0,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=3.0,
    temperature=1.0,
    loss_agg="token-mean",
    normalizer=None,
    inplace_backward=False,
    return_metrics=False,
    surrogate="ppo",
    ratio_level="token",
    eps_w_low=None,
    eps_w_high=None,
    credit_base="current",
    credit_mask=None,
    credit_negative_only=False,
    rollout_logprobs=None,
    tis_level="token",
    tis_cap=2.0,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy_coef=0.0,
    cu_seqlens=None,
    validate=True,
    chunk_size=None,
):
    """``grpo_opsd_loss`` on the logits ``hidden @ weight.T + bias``, without materialising them:
    ``L = L_PG + alpha * L_OPSD`` with every keyword of :func:`rlsd_kernels.grpo_opsd_loss`, the
    hidden states, weight, bias, ``chunk_size`` and memory of :func:`opsd_linear_loss`.

    ``teacher_hidden`` is the teacher's hidden states (shaped like ``student_hidden``, no gradient),
    or ``None`` with ``teacher_logprobs`` for ``divergence="sampled_token"``. Options that need a
    whole sequence first (``ratio_level="sequence"``, on-policy sequence-level importance weights)
    cost one more pass of student logits.
    """
    _check_opsd_options(divergence, beta, token_clip, alpha)
    opsd = dict(div=divergence_code(divergence, beta), beta=float(beta), alpha=float(alpha),
                token_clip=None if token_clip is None else float(token_clip), grpo=True)
    options = dict(
        old_logprobs=old_logprobs, mask=mask, eps_w=eps_w, lam=lam, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, temperature=temperature, normalizer=normalizer, cu_seqlens=cu_seqlens,
        eps_w_low=eps_w_low, eps_w_high=eps_w_high, surrogate=surrogate, ratio_level=ratio_level,
        credit_base=credit_base, credit_mask=credit_mask, credit_negative_only=credit_negative_only,
        rollout_logprobs=rollout_logprobs, tis_level=tis_level, tis_cap=tis_cap, ref_logprobs=ref_logprobs,
        kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
    )
    return _linear_loss(student_hidden, weight, bias, teacher_hidden, tokens, advantages, teacher_logprobs, opsd,
                        options, loss_agg=loss_agg, return_metrics=return_metrics, validate=validate,
                        chunk_size=chunk_size)
