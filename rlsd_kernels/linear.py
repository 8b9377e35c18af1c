"""The RLSD loss and token log-probs from hidden states and the lm_head weight, in token chunks, never
materialising the ``[N, V]`` logits.

Per chunk of C token rows the logits come from a matmul with float32 output (the difference of two
nearly equal log-probs is sensitive to bf16 rounding of the logits), the row kernels of
``rlsd.py`` / ``logprobs.py`` compute the statistics, loss and logit gradient ``dz`` of the chunk,
and the chunk's gradients are added right away: ``dH[chunk] = dz @ W``, ``dW += dz^T @ h``,
``db += sum(dz)``. For a scalar loss the backward only scales them by the incoming gradient;
``loss_agg="none"`` and the log-probs recompute each chunk's logits in their backward. The teacher's
log-probs come first, in a pass of their own; so do the student's when an option needs a whole
sequence before any token's loss (``_prepare.needs_sequence_pass``), at the cost of one more matmul.

Memory. A chunk's buffers share one allocation: a float32 tile for the student's logits of half a
chunk and the chunk's ``dz`` in the weight's dtype (bf16/fp16: 4·V bytes a row); a pass without
gradient (the teacher's) computes a whole chunk's float32 logits in the same space. Half-chunk
student tiles let the gradient matmuls run over C rows for the memory of C/2 float32 rows; ``dz``
goes to its own region, not over the logits it is computed from, so nothing depends on the order in
which a kernel walks a row. At N = 8192, H = 4096, V = 151,936 in bf16 with the default
C = 256: the returned dW (2·V·H bytes, 1.245 GB) and dH (2·N·H, 67 MB), the chunk buffers (155.6 MB)
and per-token vectors (under 1 MB): about 1.47 GB. At N = 32,768, dH is 268 MB: 1.67 GB, or
1.59 GB with ``chunk_size=128``.

Chunk size. Each chunk streams W (2·V·H bytes) six times (teacher logits, two student half-tiles,
dH, dW read and written) against 8·C·V·H FLOPs, so the matmuls are compute-bound for
C ≳ 1.5 × (FLOP/s ÷ bytes/s): about 250 rows on an H200 (695 TFLOP/s, 4.2 TB/s), 370 on an H100.
The default gives the chunk buffers ``CHUNK_BYTES`` (160 MiB on a GPU): 256 rows at V = 151,936,
in multiples of 64 rows; smaller chunks save memory and cost bandwidth.

Precision of dW. A float32 accumulator would take 4·V·H bytes (2.49 GB, more than the whole memory
target), so dW accumulates in the weight's dtype: each chunk adds its product with one matmul whose
products and sums are float32 inside, then rounds the running sum once, as accumulating bf16
gradients over micro-batches does. The error grows slowly with the number of chunks: measured
against float64 on CPU (N = 8192, H = 256, V = 4096, bf16; Frobenius norm), dW is off by 0.24% in one
chunk (bf16 rounding of the exact dW alone: 0.17%), 0.39% in 8, 0.67% in 32 (the default at
N = 8192) and 1.0% in 128. Float32 weights accumulate in float32; dH is one matmul per row and db
accumulates in float32. With float16 weights ``dz`` is float16, and entries below 6e-8 (tiny
probabilities times small token weights) flush to zero, as in the float16 logit gradient of
``rlsd_loss``.

On CUDA the float32-output matmul needs torch >= 2.8 (``torch.mm(..., out_dtype=torch.float32)``).
"""

from __future__ import annotations

import torch

from . import _utils
from ._prepare import (
    OUTPUTS,
    check_temperature,
    needs_sequence_pass,
    output_metrics,
    prepare_loss_inputs,
    sequence_terms,
)
from ._utils import check_tensor, raise_on_error_flags
from .flags import Flag
from .logprobs import logprobs_bwd, logprobs_fwd
from .reference import IGNORE_INDEX
from .rlsd import _backward_coefficients, rlsd_fwd, scale_grad_

# Bytes for a chunk's buffers, by device type (see the module docstring).
CHUNK_BYTES = {"cuda": 160 << 20}
CHUNK_BYTES_OTHER = 16 << 20


def default_chunk_size(vocab: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows per chunk: half a row of float32 logits and a gradient row in ``dtype`` each, in budget."""
    rows = CHUNK_BYTES.get(device.type, CHUNK_BYTES_OTHER) // (vocab * (2 + dtype.itemsize))
    return max(64, rows // 64 * 64)


def _tiles(rows, vocab, grad_dtype, device):
    """``(work, grad)``: the buffers of a pass over chunks of ``rows`` rows, in one allocation. With
    ``grad_dtype``, ``work`` is ``[rows / 2, V]`` float32 (the student's logits, half a chunk at a
    time) and ``grad`` the chunk's dz ``[rows, V]`` after it; else ``work`` is ``[rows, V]``.
    Rows are padded to 16 elements so that each starts aligned."""
    padded = -(-vocab // 16) * 16
    work_rows = rows if grad_dtype is None else -(-rows // 2)
    work_bytes = 4 * work_rows * padded
    grad_bytes = 0 if grad_dtype is None else grad_dtype.itemsize * rows * padded
    buf = _utils.empty(((work_bytes + grad_bytes) // 4,), dtype=torch.float32, device=device).view(torch.uint8)

    def view(start, n, dtype):
        return buf[start : start + n * padded * dtype.itemsize].view(dtype).view(n, padded)[:, :vocab]

    return view(0, work_rows, torch.float32), None if grad_dtype is None else view(work_bytes, rows, grad_dtype)


def _logits_into(out, h, weight, bias):
    """``out[:] = h @ weight.T + bias`` in float32, the matmul reading ``weight`` in place."""
    if out.is_cuda:
        torch.mm(h, weight.T, out_dtype=torch.float32, out=out)
    else:
        # No float32-output matmul for half types on CPU, where the sizes are small.
        torch.mm(h.float(), weight.T.float(), out=out)
    if bias is not None:
        out.add_(bias)
    return out


def _chunks(x, size):
    """``(rows, chunks)``: the most rows a chunk has, and an iterator of ``(flat token slice, [c, H]
    rows of x)``. Chunks run across sequences when ``x`` views as ``[N, H]`` without a copy (a
    ``hidden[:, :-1]`` slice does not), else within each sequence."""
    try:
        flat = x.view(-1, x.shape[-1])
    except RuntimeError:
        b, t = x.shape[:2]
        return min(size, t), ((slice(i * t + s, i * t + min(s + size, t)), x[i, s : s + size])
                              for i in range(b) for s in range(0, t, size))
    n = flat.shape[0]
    return min(size, n), ((slice(s, min(s + size, n)), flat[s : s + size]) for s in range(0, n, size))


def _student_tiles(work, h, weight, bias):
    """Yields ``(row slice of the chunk, its float32 logits)``, a ``work`` tile at a time."""
    for a in range(0, h.shape[0], work.shape[0]):
        rs = slice(a, min(a + work.shape[0], h.shape[0]))
        yield rs, _logits_into(work[: rs.stop - a], h[rs], weight, bias)


def _sliced(per_token, sl):
    return {k: v if v is None else v[sl] for k, v in per_token.items()}


class _Grads:
    """dH, dW and db, added chunk by chunk from the chunk's logit gradient ``dz``."""

    def __init__(self, hidden, weight, bias, needs):
        need_h, self.need_w, need_b = needs
        self.weight, self.bias = weight, bias
        self.h = _utils.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        self.w = None
        self.b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None

    def add(self, sl, dz, h, live):
        """Adds a chunk: ``dz`` [c, V], its hidden states ``h`` [c, H], ``live`` [c] its rows with a gradient."""
        if self.h is not None:
            torch.mm(dz, self.weight, out=self.h.view(-1, self.h.shape[-1])[sl])  # [c, H]
        if self.need_w:
            # Rows without a gradient have dz = 0, but 0 * NaN is NaN: padding may hold anything.
            h = torch.where(live[:, None], h, 0)
            # One rounding of the running sum per chunk (module docstring); the first chunk writes it.
            self.w = dz.T @ h if self.w is None else self.w.addmm_(dz.T, h)  # [V, H]
        if self.b is not None:
            self.b += dz.sum(0, dtype=torch.float32)

    def result(self):
        return self.h, self.w, None if self.b is None else self.b.to(self.bias.dtype)


def logprobs_fwd_chunked(hidden, weight, bias, tokens, temperature, entropy, chunk):
    """``(lp, lse, entropy, flags)`` as ``logprobs_fwd`` returns them, a chunk of logits at a time."""
    rows, chunks = _chunks(hidden, chunk)
    work, _ = _tiles(rows, weight.shape[0], None, hidden.device)
    parts = [logprobs_fwd(_logits_into(work[: h.shape[0]], h, weight, bias), tokens[sl], temperature, entropy)
             for sl, h in chunks]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def loss_fwd(hidden, teacher, weight, bias, inputs, params, chunk, needs):
    """Chunked RLSD forward: ``(outputs, flags, grads)`` with the per-token outputs of ``rlsd_fwd``
    over all rows and, where ``needs`` (dH, dW, db) asks, the gradients of ``sum(weight * loss)``."""
    temperature = params["temperature"]
    live = inputs["weight"] != 0
    # Only the tokens that count are scored: masked rows (with any id) cost nothing.
    scored = inputs["tokens"].masked_fill(~live, IGNORE_INDEX)
    t_flags = None
    if teacher is not None:
        lp_t, _, _, t_flags = logprobs_fwd_chunked(teacher, weight, bias, scored, temperature, False, chunk)
        inputs = dict(inputs, lp_t=lp_t)
    if needs_sequence_pass(inputs, params):
        lp_s = logprobs_fwd_chunked(hidden, weight, bias, scored, temperature, False, chunk)[0]
        # The sequence terms join the per-token inputs before the chunks: each chunk's launcher
        # then finds them present instead of recomputing them from its own tokens alone.
        inputs = sequence_terms(lp_s, inputs, params)

    track = any(needs)
    rows, chunks = _chunks(hidden, chunk)
    grads = _Grads(hidden, weight, bias, needs) if track else None
    work, grad = _tiles(rows, weight.shape[0], weight.dtype if track else None, hidden.device)
    outs, flags = [], []
    for sl, h in chunks:
        per_token = _sliced(inputs, sl)
        dz = grad[: h.shape[0]] if track else None
        for rs, z in _student_tiles(work, h, weight, bias):
            out, f = rlsd_fwd(z, None, _sliced(per_token, rs), params, None if dz is None else dz[rs])
            outs.append(out)
            flags.append(f)
        if track:
            grads.add(sl, dz, h, live[sl])
    out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    flags = torch.cat(flags)
    if t_flags is not None:
        # The teacher's non-finite rows carry its own bit; its bad ids are the student's, flagged there.
        flags |= ((t_flags & int(Flag.NONFINITE_STUDENT)) != 0).int() * int(Flag.NONFINITE_TEACHER)
    return out, flags, grads.result() if track else (None, None, None)


def rows_bwd(hidden, weight, bias, per_token, temperature, chunk, needs):
    """``(dH, dW, db)`` from per-token coefficients (``logprobs_bwd``'s ``tokens, lse, coef, coef_h,
    entropy``): recomputes each chunk's logits, then adds the chunk's share as the forward does."""
    rows, chunks = _chunks(hidden, chunk)
    grads = _Grads(hidden, weight, bias, needs)
    work, grad = _tiles(rows, weight.shape[0], weight.dtype, hidden.device)
    # The rows logprobs_bwd writes a gradient for; it writes zeros elsewhere.
    live = per_token["coef"] != 0
    if per_token["coef_h"] is not None:
        live |= per_token["coef_h"] != 0
    live &= per_token["tokens"] != IGNORE_INDEX
    for sl, h in chunks:
        dz = grad[: h.shape[0]]
        chunk_terms = _sliced(per_token, sl)
        for rs, z in _student_tiles(work, h, weight, bias):
            logprobs_bwd(z, temperature=temperature, out=dz[rs], **_sliced(chunk_terms, rs))
        grads.add(sl, dz, h, live[sl])
    return grads.result()


def _raise_on_errors(flags, tokens, vocab, student="student_hidden", teacher="teacher_hidden"):
    names = {"tokens": "tokens", "student": f"logits of {student} @ weight.T",
             "teacher": f"logits of {teacher} @ weight.T"}
    raise_on_error_flags(flags, tokens, vocab, names)


class RLSDLinearLossFunction(torch.autograd.Function):
    """Scalar RLSD loss over hidden states; dH, dW and db come from the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, inputs, params, chunk, track, validate):
        needs = tuple(track and n for n in ctx.needs_input_grad[:3])
        out, flags, ctx.grads = loss_fwd(hidden, teacher, weight, bias, inputs, params, chunk, needs)
        if validate:
            _raise_on_errors(flags, inputs["tokens"], weight.shape[0])
        ctx.used = False
        ctx.mark_non_differentiable(flags)
        # The per-token outputs travel as a dict: detached, whatever ``rlsd_fwd`` returns.
        return (inputs["weight"] * out["loss"]).sum(), out, flags

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.used:
            raise RuntimeError("rlsd_linear_loss: the gradients were computed in the forward pass and are "
                               "already used; backward through it twice is not supported")
        # Dropping ctx's references lets autograd take dW as the weight's .grad without a copy.
        grads, ctx.grads, ctx.used = ctx.grads, None, True
        scale = grad_loss.float().reshape(1)
        for g in grads:
            if g is not None:
                scale_grad_(g.view(-1, g.shape[-1]), scale)
        return (*grads,) + (None,) * 6


class RLSDLinearTokenLossFunction(torch.autograd.Function):
    """Per-token RLSD losses (``loss_agg="none"``); the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, inputs, params, chunk, validate):
        out, flags, _ = loss_fwd(hidden, teacher, weight, bias, inputs, params, chunk, (False,) * 3)
        if validate:
            _raise_on_errors(flags, inputs["tokens"], weight.shape[0])
        ctx.save_for_backward(hidden, weight, bias, inputs["tokens"], inputs["weight"], out["lse"], out["d_lp"],
                              out["entropy"])
        ctx.params, ctx.chunk = params, chunk
        ctx.mark_non_differentiable(flags)
        return inputs["weight"] * out["loss"], out, flags

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        hidden, weight, bias, tokens, token_weight, lse, d_lp, entropy = ctx.saved_tensors
        coef = torch.empty_like(d_lp)
        coef_h = torch.empty_like(d_lp) if ctx.params["entropy_coef"] != 0 else None
        # The row backward's coefficients, with each token's share of the loss scaled by its upstream.
        upstream = {"weight": grad_loss.float().reshape(-1) * token_weight}
        _backward_coefficients(upstream, ctx.params, {"d_lp": d_lp}, coef, coef_h)
        per_token = dict(tokens=tokens, lse=lse, coef=coef, coef_h=coef_h, entropy=entropy)
        grads = rows_bwd(hidden, weight, bias, per_token, ctx.params["temperature"], ctx.chunk,
                         ctx.needs_input_grad[:3])
        return (*grads,) + (None,) * 5


class TokenLogprobsLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, want_entropy, chunk, validate):
        lp, lse, ent, flags = logprobs_fwd_chunked(hidden, weight, bias, tokens, temperature, want_entropy, chunk)
        if validate:
            _raise_on_errors(flags, tokens, weight.shape[0], "hidden")
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, ent)
        ctx.temperature, ctx.want_entropy, ctx.chunk = temperature, want_entropy, chunk
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, bias, tokens, lse, ent = ctx.saved_tensors
        per_token = dict(tokens=tokens, lse=lse, coef=grad_lp.float().contiguous(),
                         coef_h=grad_ent.float().contiguous() if ctx.want_entropy else None,
                         entropy=ent if ctx.want_entropy else None)
        grads = rows_bwd(hidden, weight, bias, per_token, ctx.temperature, ctx.chunk, ctx.needs_input_grad[:3])
        return (*grads,) + (None,) * 5


def _check_linear(hidden, weight, bias, teacher, chunk_size, name="student_hidden"):
    """Checks the hidden states (``name``), weight, bias and chunk size; returns the chunk size."""
    check_tensor(hidden, name, kinds=("logits",), dims=(2, 3))
    check_tensor(weight, "weight", kinds=("logits",), dims=(2,), device=hidden.device)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype}, {name} has {hidden.dtype}; they must match")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden size mismatch: {name} has {hidden.shape[-1]} features, weight has shape "
                         f"{tuple(weight.shape)} ([V, H])")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    if teacher is not None:
        check_tensor(teacher, "teacher_hidden", kinds=("logits",), device=hidden.device)
        if teacher.shape != hidden.shape or teacher.dtype != hidden.dtype:
            raise ValueError(f"teacher_hidden is {tuple(teacher.shape)} {teacher.dtype}, student_hidden is "
                             f"{tuple(hidden.shape)} {hidden.dtype}; they must match")
    if bias is not None:
        check_tensor(bias, "bias", kinds=("logits",), dims=(1,), device=hidden.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, weight has {weight.shape[0]} rows")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    return chunk_size or default_chunk_size(weight.shape[0], hidden.device, weight.dtype)


def _empty_loss(hidden, weight, bias):
    """A zero that gives every differentiable input a zero gradient (no tokens)."""
    terms = [hidden.sum(dtype=torch.float32), weight.sum(dtype=torch.float32)]
    return sum(terms + ([] if bias is None else [bias.sum(dtype=torch.float32)])) * 0.0


def rlsd_linear_loss(
    student_hidden,
    weight,
    tokens,
    advantages,
    *,
    teacher_hidden=None,
    teacher_logprobs=None,
    bias=None,
    old_logprobs=None,
    mask=None,
    eps_w=0.2,
    lam=1.0,
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
    process_group=None,
):
    """``rlsd_loss`` on the logits ``student_hidden @ weight.T + bias``, without materialising them.

    Same loss, options, checks and results as :func:`rlsd_kernels.rlsd_loss` (see it for the
    formula and every option not listed here); the gradients go to ``student_hidden``, ``weight``
    and ``bias``. The logits of a chunk
    of ``chunk_size`` token rows are computed in float32 and their gradient added to dH, dW and db
    right away, so the memory is that of dW, dH and the chunk (module docstring: about 1.47 GB at
    N = 8192, H = 4096, V = 151,936 in bf16). ``weight`` may be a parameter gathered by ZeRO-3 or
    FSDP, or tied to the input embedding: its gradient is returned through autograd, which adds it
    to the embedding's; the weight is never copied.

    Args:
        student_hidden: ``[B, T, H]`` (views such as ``hidden[:, :-1]`` are read in place) or packed
            ``[N, H]``; float32, float16 or bfloat16.
        weight: ``[V, H]``, the lm_head (or tied embedding) weight, in the dtype of the hidden states.
        tokens, advantages: as for ``rlsd_loss``.
        teacher_hidden: the teacher's hidden states, shaped like ``student_hidden``, scored with the
            same ``weight`` and ``bias`` (no gradient); or ``None`` with ``teacher_logprobs``.
        bias: optional ``[V]`` lm_head bias.
        inplace_backward: accepted for the signature of ``rlsd_loss``; without effect, as the logit
            gradient of a chunk always overwrites the chunk's own buffer.
        chunk_size: token rows per chunk (default: ``default_chunk_size``, 256 at V = 151,936 on a
            GPU in bf16). The chunk buffers take about ``4 * V`` bytes a row (``6 * V`` for float32
            weights); fewer rows save memory and cost bandwidth.
        validate: as for ``rlsd_loss``; rows of NaN or ``+inf`` logits are reported for
            ``student_hidden @ weight.T`` or ``teacher_hidden @ weight.T``.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded: ``weight``
            (and ``bias``) are this rank's contiguous rows of the lm_head, in group rank order, as
            Megatron's ``ColumnParallelLinear`` holds them. One all-gather per forward, none in the
            backward. The weight and bias get this rank's rows' gradients; the hidden states get
            this rank's partial dH, whose sum over ranks is the gradient (Megatron's layer adds it
            in its input's backward). See ``rlsd_kernels.distributed``.

    Returns:
        The loss (a scalar, or per-token ``[B, T]`` / ``[N]`` for ``none``), or ``(loss, metrics)``.
    """
    chunk = _check_linear(student_hidden, weight, bias, teacher_hidden, chunk_size)
    if (teacher_hidden is None) == (teacher_logprobs is None):
        raise ValueError("give exactly one of teacher_hidden and teacher_logprobs")
    inputs, params, m, token_shape = prepare_loss_inputs(
        student_hidden.shape[:-1], student_hidden.device, tokens, advantages,
        teacher_logprobs=teacher_logprobs, old_logprobs=old_logprobs, mask=mask, eps_w=eps_w, lam=lam,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, temperature=temperature, loss_agg=loss_agg,
        normalizer=normalizer, cu_seqlens=cu_seqlens, validate=validate, eps_w_low=eps_w_low, eps_w_high=eps_w_high,
        surrogate=surrogate, ratio_level=ratio_level, credit_base=credit_base, credit_mask=credit_mask,
        credit_negative_only=credit_negative_only, rollout_logprobs=rollout_logprobs, tis_level=tis_level,
        tis_cap=tis_cap, ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, want_entropy=return_metrics,
    )
    if m.numel() == 0:
        loss = _empty_loss(student_hidden, weight, bias)
        loss = loss.expand(token_shape) if loss_agg == "none" else loss
        empty = {k: m for k in OUTPUTS}
        return (loss, output_metrics(empty, m.int(), m, inputs, params)) if return_metrics else loss

    teacher = None if teacher_hidden is None else teacher_hidden.detach()
    if process_group is not None:
        from . import distributed

        return distributed.sharded_loss(
            distributed.LinearShard(params["temperature"], chunk, teacher), (student_hidden, weight, bias),
            (inputs, params, m, token_shape), process_group, loss_agg=loss_agg, inplace=False,
            return_metrics=return_metrics, validate=validate,
        )
    args = (student_hidden, weight, bias, teacher, inputs, params, chunk)
    if loss_agg == "none":
        loss, out, flags = RLSDLinearTokenLossFunction.apply(*args, validate)
        loss = loss.view(token_shape)
    else:
        loss, out, flags = RLSDLinearLossFunction.apply(*args, torch.is_grad_enabled(), validate)
    if return_metrics:
        return loss, output_metrics(out, flags, m, inputs, params)
    return loss


def token_logprobs_linear(hidden, weight, tokens, *, bias=None, temperature=1.0, return_entropy=False,
                          validate=True, chunk_size=None, process_group=None):
    """``token_logprobs`` of the logits ``hidden @ weight.T + bias``, a chunk of rows at a time.

    The memory-light pass for teacher, reference and old-policy log-probs: only one float32
    ``[chunk_size, V]`` tile is alive (``4 * chunk_size * V`` bytes) besides the ``[N]`` outputs.
    Under autograd the backward recomputes each chunk's logits and returns gradients for
    ``hidden``, ``weight`` and ``bias``. Shapes and dtypes as for :func:`rlsd_linear_loss`; tokens
    ``[B, T]`` / ``[N]`` with ``-100`` for an ignored token (``lp = H = 0``, no gradient).
    ``validate``, ``chunk_size`` and ``process_group`` (``weight`` and ``bias`` as this rank's rows
    of a vocabulary-sharded lm_head) as for :func:`rlsd_linear_loss` (ids outside ``[0, V)`` raise).

    Returns:
        ``lp`` shaped like ``tokens`` in float32, or ``(lp, entropy)``.
    """
    chunk = _check_linear(hidden, weight, bias, None, chunk_size, "hidden")
    check_tensor(tokens, "tokens", kinds=("int",), device=hidden.device)
    if tuple(tokens.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}, expected {tuple(hidden.shape[:-1])}")
    check_temperature(temperature)
    if tokens.numel() == 0:
        lp = _empty_loss(hidden, weight, bias).expand(tokens.shape)
        return (lp, lp.clone()) if return_entropy else lp
    if process_group is not None:
        from . import distributed

        return distributed.sharded_logprobs(distributed.LinearShard(float(temperature), chunk, student="hidden"),
                                            (hidden, weight, bias), tokens, process_group,
                                            return_entropy=return_entropy, validate=validate)
    lp, ent = TokenLogprobsLinearFunction.apply(
        hidden, weight, bias, tokens.reshape(-1), float(temperature), bool(return_entropy), chunk, validate
    )
    lp = lp.view(tokens.shape)
    return (lp, ent.view(tokens.shape)) if return_entropy else lp
