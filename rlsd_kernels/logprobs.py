"""Per-token log-probabilities (and entropies) of sampled tokens, without a log-softmax tensor.

Also home of the general row backward, ``dz = (c * (1[v = y] - p) - c_H * p * (log p + H)) / tau``,
which the RLSD loss reuses when its upstream gradient is per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _cpu, _utils
from ._jit import (
    FLAG_BAD_TOKEN,
    FLAG_NONFINITE_STUDENT,
    IGNORE_INDEX,
    LN2,
    LOG2E,
    entropy_finish,
    entropy_terms,
    finish_sum,
    is_finite,
    row_centre,
    row_lse_exact,
    row_reference,
    softmax_grad_block,
    token_logprob,
)
from ._prepare import check_temperature
from ._tuning import TRIAL_ROWS, pick_row_config
from ._utils import as_rows, call_op, check_tensor, custom_op, raise_on_error_flags, use_triton


@triton.jit
def _logprobs_fwd_kernel(
    X, stride_xb, stride_xt,
    tokens, lp_out, lse_out, entropy_out, flags_out,
    n_rows, seqlen, V, vocab_start, scale2,
    ENTROPY: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row: the log-prob of the token (and the entropy). With ``PARTIAL`` the row is one shard of
    the vocabulary, starting at id ``vocab_start``, and the outputs are the shard's statistics in
    base 2: ``lse_out`` its logsumexp, ``lp_out`` the token's scaled logit (-inf outside the shard),
    ``entropy_out`` the entropy of the shard's own softmax."""
    offs = tl.arange(0, BLOCK_V)
    n_blocks = tl.cdiv(V, BLOCK_V)
    # int64 rows: offsets into [N, V] pass 2**31 at real sizes.
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        b = row // seqlen
        x_row = X + b * stride_xb + (row - b * seqlen) * stride_xt
        y = tl.load(tokens + row).to(tl.int64)
        active = y != IGNORE_INDEX
        y = y - vocab_start
        y_ok = (y >= 0) & (y < V)
        read_end = tl.where(active, V, 0)
        # Per-lane sums against the first block's max, the next block loaded before this one is used.
        x_next = tl.load(x_row + offs, mask=offs < read_end, other=float("-inf"))
        ref = row_reference(x_next.to(tl.float32))
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_V], dtype=tl.float32)
        for i in tl.range(0, tl.where(active, n_blocks, 0)):
            x = x_next.to(tl.float32)
            z = (x - ref) * scale2
            cols = (i + 1) * BLOCK_V + offs
            x_next = tl.load(x_row + cols, mask=cols < read_end, other=float("-inf"))
            if ENTROPY:
                e, ez = entropy_terms(z, x * scale2)
                acc += e
                acc_t += ez
            else:
                acc += tl.exp2(z)
        lse2, s, ok = finish_sum(ref * scale2, acc)
        t = tl.sum(acc_t, axis=0)
        exact = active & ~ok
        if exact:
            lse2, s, t = row_lse_exact(x_row, V, scale2, BLOCK_V, ENTROPY)
        r, c = row_centre(ref, s, lse2, exact)
        zy = tl.load(x_row + tl.where(y_ok, y, 0), mask=active & y_ok, other=float("-inf")).to(tl.float32)
        if PARTIAL:
            tl.store(lp_out + row, tl.where(active, zy * scale2, float("-inf")))
            tl.store(lse_out + row, tl.where(active, lse2, float("-inf")))
            if ENTROPY:
                tl.store(entropy_out + row, tl.where(active & (s > 0.0), lse2 - t / s, 0.0))
            # A shard may hold no finite logit (padding): only NaN and +inf are errors here.
            tl.store(flags_out + row, tl.where(active & ((lse2 != lse2) | (lse2 == float("inf"))),
                                               FLAG_NONFINITE_STUDENT, 0))
        else:
            lp = token_logprob(zy, r, c, scale2)
            tl.store(lp_out + row, tl.where(active, lp, 0.0))
            tl.store(lse_out + row, tl.where(active, lse2 * LN2, 0.0))
            if ENTROPY:
                tl.store(entropy_out + row, tl.where(active, entropy_finish(lse2, s, t), 0.0))
            flags = tl.where(active & ~y_ok, FLAG_BAD_TOKEN, 0)
            flags |= tl.where(active & ~is_finite(lse2), FLAG_NONFINITE_STUDENT, 0)
            tl.store(flags_out + row, flags)


@triton.jit
def _logprobs_bwd_kernel(
    X, stride_xb, stride_xt,
    dX, stride_db, stride_dt,
    tokens, lse, coef, coef_h, entropy,
    n_rows, seqlen, V, scale2, inv_temp,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_V)
    n_blocks = tl.cdiv(V, BLOCK_V)
    # int64 rows: offsets into [N, V] pass 2**31 at real sizes.
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        b = row // seqlen
        t = row - b * seqlen
        x_row = X + b * stride_xb + t * stride_xt
        d_row = dX + b * stride_db + t * stride_dt
        y = tl.load(tokens + row).to(tl.int64)
        c = tl.load(coef + row)
        # Rows without an upstream gradient (masked, ignored) are written as zeros without reading.
        active = (y != IGNORE_INDEX) & (c != 0.0)
        c_h = 0.0
        h = 0.0
        if HAS_ENTROPY:
            c_h = tl.load(coef_h + row)
            h = tl.load(entropy + row)
            active = (y != IGNORE_INDEX) & ((c != 0.0) | (c_h != 0.0))
        lse2 = tl.where(active, tl.load(lse + row) * LOG2E, 0.0)
        read_end = tl.where(active, V, 0)
        for i in tl.range(0, n_blocks):
            cols = i * BLOCK_V + offs
            z = tl.load(x_row + cols, mask=cols < read_end, other=float("-inf")).to(tl.float32) * scale2
            g = softmax_grad_block(z, lse2, cols, y, c, c_h, h, HAS_ENTROPY)
            tl.store(d_row + cols, (g * inv_temp).to(dX.dtype.element_ty), mask=cols < V)


def logprobs_fwd(logits, tokens, temperature, entropy):
    """Launcher: ``(lp, lse, entropy, flags)`` per token, flat ``[N]``; ``entropy`` is empty unless asked."""
    rows = as_rows(logits, "logits")
    tokens = tokens.reshape(-1)
    if not use_triton(logits):
        return _cpu.logprobs_fwd(rows, tokens, temperature, entropy)
    n, device = rows.n, logits.device
    lp, lse = (_utils.empty((n,), dtype=torch.float32, device=device) for _ in range(2))
    ent = _utils.empty((n if entropy else 0,), dtype=torch.float32, device=device)
    flags = _utils.empty((n,), dtype=torch.int32, device=device)
    _launch_fwd(rows, tokens, (lp, lse, ent), flags, 0, temperature, entropy, partial=False)
    return lp, lse, ent, flags


def partial_stats(logits, tokens, vocab_start, temperature, entropy):
    """Launcher for one vocabulary shard (ids ``vocab_start ..``): ``(stats, flags)`` with ``stats``
    ``[3, N]`` float32 in base 2: the shard's logsumexp, the token's scaled logit (-inf when the
    token is in another shard) and the entropy of the shard's own softmax (0 unless ``entropy``).
    With ``share_r = exp2(lse_r - lse)`` the row's entropy is ``sum share_r * H_r - sum share_r *
    log2(share_r)``: two non-negative sums, no cancellation (see ``distributed``)."""
    rows = as_rows(logits, "logits")
    tokens = tokens.reshape(-1)
    if not use_triton(logits):
        return _cpu.partial_stats(rows, tokens, vocab_start, temperature, entropy)
    n, device = rows.n, logits.device
    stats = _utils.empty((3, n), dtype=torch.float32, device=device)
    if not entropy:
        stats[2].zero_()
    flags = _utils.empty((n,), dtype=torch.int32, device=device)
    _launch_fwd(rows, tokens, (stats[1], stats[0], stats[2]), flags, vocab_start, temperature, entropy, partial=True)
    return stats, flags


def _launch_fwd(rows, tokens, outputs, flags, vocab_start, temperature, entropy, partial):
    device = rows.tensor.device

    def run(config, n_rows=rows.n):
        _logprobs_fwd_kernel[config.grid(n_rows, device)](
            rows.tensor, rows.stride_b, rows.stride_t, tokens, *outputs, flags,
            n_rows, rows.seqlen, rows.vocab, vocab_start, 1.4426950408889634 / temperature,
            ENTROPY=entropy, PARTIAL=partial, BLOCK_V=config.block_v, num_warps=config.num_warps,
        )

    key = ("logprobs_fwd", rows.tensor.dtype, entropy, partial)
    trial = lambda c: run(c, min(rows.n, TRIAL_ROWS))  # noqa: E731
    run(pick_row_config(key, rows.vocab, device, trial, rows.tensor.element_size()))


def bwd_launcher(rows, tokens, lse, coef, coef_h, entropy, temperature):
    """``launch(config, n_rows, dest, dest_strides)`` of the row backward kernel over ``rows``."""
    has_entropy = coef_h is not None

    def launch(config, n_rows, dest, dest_strides):
        _logprobs_bwd_kernel[config.grid(n_rows, rows.tensor.device)](
            rows.tensor, rows.stride_b, rows.stride_t, dest, *dest_strides,
            tokens, lse, coef, coef_h if has_entropy else coef, entropy if has_entropy else coef,
            n_rows, rows.seqlen, rows.vocab, 1.4426950408889634 / temperature, 1.0 / temperature,
            HAS_ENTROPY=has_entropy, BLOCK_V=config.block_v, num_warps=config.num_warps,
        )

    return launch


def trial_destination(dest, rows):
    """Where a timing trial over the first ``TRIAL_ROWS`` rows writes, and with which strides: never
    into the logits themselves (in place), but a scratch where row r = b * seqlen + t is at r * V.
    Returns a function, so that the scratch is only allocated when a trial actually runs."""
    found = []

    def get():
        if not found:
            if dest.data_ptr() != rows.tensor.data_ptr():
                d = as_rows(dest, "grad")
                found.append((dest, (d.stride_b, d.stride_t)))
            else:
                scratch = torch.empty((min(rows.n, TRIAL_ROWS), rows.vocab), dtype=dest.dtype, device=dest.device)
                found.append((scratch, (rows.seqlen * rows.vocab, rows.vocab)))
        return found[0]

    return get


def logprobs_bwd(logits, tokens, lse, coef, coef_h, entropy, temperature, out=None):
    """Launcher of the general row backward. Writes ``dlogits`` into ``out`` (shaped like ``logits``,
    any float dtype, possibly ``logits`` itself: each block is read before its gradient is written)
    or a new tensor in the logits' dtype, and returns it."""
    rows = as_rows(logits, "logits")
    tokens = tokens.reshape(-1)
    grad = out if out is not None else _utils.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if not use_triton(logits):
        return _cpu.logprobs_bwd(rows, tokens, lse, coef, coef_h, entropy, temperature, grad)
    launch = bwd_launcher(rows, tokens, lse, coef, coef_h, entropy, temperature)
    g_rows = as_rows(grad, "grad")
    key = ("logprobs_bwd", logits.dtype, grad.dtype, coef_h is not None)
    trial_dest = trial_destination(grad, rows)
    trial = lambda c: launch(c, min(rows.n, TRIAL_ROWS), *trial_dest())  # noqa: E731
    config = pick_row_config(key, rows.vocab, logits.device, trial, logits.element_size())
    launch(config, rows.n, grad, (g_rows.stride_b, g_rows.stride_t))
    return grad


@custom_op("rlsd_kernels::token_logprobs_fwd", mutates_args=())
def _fwd_op(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, entropy: bool, validate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lp, lse, ent, flags = logprobs_fwd(logits, tokens, temperature, entropy)
    if validate:
        raise_on_error_flags(flags, tokens.reshape(-1), logits.shape[-1], {"tokens": "tokens", "student": "logits"})
    return lp, lse, ent


@_fwd_op.register_fake
def _(logits, tokens, temperature, entropy, validate):
    n = tokens.numel()
    new = lambda k: logits.new_empty((k,), dtype=torch.float32)
    return new(n), new(n), new(n if entropy else 0)


@custom_op("rlsd_kernels::token_logprobs_bwd", mutates_args=())
def _bwd_op(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    coef_h: torch.Tensor | None,
    entropy: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    return logprobs_bwd(logits, tokens, lse, coef, coef_h, entropy, temperature)


@_bwd_op.register_fake
def _(logits, tokens, lse, coef, coef_h, entropy, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@custom_op("rlsd_kernels::token_logprobs_bwd_", mutates_args=("logits",))
def _bwd_inplace_op(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    coef_h: torch.Tensor | None,
    entropy: torch.Tensor | None,
    temperature: float,
) -> None:
    logprobs_bwd(logits, tokens, lse, coef, coef_h, entropy, temperature, out=logits)


@_bwd_inplace_op.register_fake
def _(logits, tokens, lse, coef, coef_h, entropy, temperature):
    return None


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, want_entropy, validate):
        lp, lse, ent = call_op(_fwd_op, logits, tokens, temperature, want_entropy, validate)
        ctx.save_for_backward(logits, tokens, lse, ent)
        ctx.temperature = temperature
        ctx.want_entropy = want_entropy
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        logits, tokens, lse, ent = ctx.saved_tensors
        coef_h = grad_ent.float().contiguous() if ctx.want_entropy else None
        grad = call_op(
            _bwd_op,
            logits, tokens, lse, grad_lp.float().contiguous(), coef_h, ent if ctx.want_entropy else None,
            ctx.temperature,
        )
        return grad, None, None, None, None


def token_logprobs(logits, tokens, *, temperature=1.0, return_entropy=False, validate=True, process_group=None):
    """Log-probability of each sampled token under ``softmax(logits / temperature)``.

    ``lp = min(z[y] / tau - logsumexp(z / tau), 0)`` and, with ``return_entropy=True``, the row
    entropy ``H = -sum_v p_v log p_v``, both differentiable, computed in one streaming pass per row
    with float32 math whatever the logits dtype; no ``[N, V]`` float32 tensor is allocated.

    Args:
        logits: ``[B, T, V]`` (strided views such as ``logits[:, :-1]`` are read in place) or packed
            ``[N, V]``; float32, float16 or bfloat16. ``-inf`` entries (padded vocabulary) are allowed.
        tokens: ``[B, T]`` / ``[N]`` integer ids; ``-100`` marks an ignored token (``lp = H = 0``,
            zero gradient).
        temperature: logits are divided by it.
        validate: raise ``ValueError`` for ids outside ``[0, V)`` and for rows with NaN or ``+inf``
            (one device-to-host sync). With ``False`` such rows give non-finite values.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded: the
            logits are this rank's contiguous slice of it, in group rank order. One all-gather per
            forward, none in the backward (see ``rlsd_kernels.distributed``).

    Returns:
        ``lp`` shaped like ``tokens`` in float32, or ``(lp, entropy)``.
    """
    rows = as_rows(logits, "logits")
    check_tensor(tokens, "tokens", kinds=("int",), device=logits.device)
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}, expected {tuple(logits.shape[:-1])}")
    check_temperature(temperature)
    if rows.n == 0:
        lp = logits.float().sum(-1) * 0.0
        return (lp, lp.clone()) if return_entropy else lp
    if process_group is not None:
        from . import distributed

        source = distributed.LogitsShard(float(temperature), names={"tokens": "tokens", "student": "logits"})
        return distributed.sharded_logprobs(source, (rows.tensor,), tokens, process_group,
                                            return_entropy=return_entropy, validate=validate)
    lp, ent = TokenLogprobsFunction.apply(rows.tensor, tokens, float(temperature), bool(return_entropy), validate)
    lp = lp.view(tokens.shape)
    return (lp, ent.view(tokens.shape)) if return_entropy else lp
