"""Launchers of the log-prob kernels: per-token log-probs (whole rows, or one vocabulary shard's
statistics) and the general row backward that every loss reuses.
"""

from __future__ import annotations

import torch

from ..kernels.logprobs import _logprobs_bwd_kernel, _logprobs_fwd_kernel
from . import common, torch_rows
from .common import rows_of, use_triton
from .tuning import TRIAL_ROWS, known_choice, pick_choice, pick_row_config


def logprobs_fwd(logits, tokens, temperature, entropy):
    """Launcher: ``(lp, lse, entropy, flags)`` per token, flat ``[N]``; ``entropy`` is empty unless asked."""
    rows = rows_of(logits)
    tokens = tokens.reshape(-1)
    if not use_triton(logits):
        return torch_rows.logprobs_fwd(rows, tokens, temperature, entropy)
    n, device = rows.n, logits.device
    lp, lse = (common.empty((n,), dtype=torch.float32, device=device) for _ in range(2))
    ent = common.empty((n if entropy else 0,), dtype=torch.float32, device=device)
    flags = common.empty((n,), dtype=torch.int32, device=device)
    # The kernel writes its fourth output (a shard's reference) only for a shard.
    _launch_fwd(rows, tokens, (lp, lse, ent, lse), flags, 0, temperature, entropy, partial=False)
    return lp, lse, ent, flags


def partial_stats(logits, tokens, vocab_start, temperature, entropy):
    """Launcher for one vocabulary shard (ids ``vocab_start ..``): ``(stats, flags)`` with ``stats``
    ``[4, N]`` float32 under the shard's own softmax: its reference (logits' units) and the base-2
    log of its sum there (``kernels/common.py: row_centre``), the token's base-2 log-prob (-inf when
    the token is in another shard) and the shard's entropy in base 2 (0 unless ``entropy``).
    ``forms/collectives.py: combine`` puts every shard's together, in the frame of the largest
    reference: no logsumexp of the logits' magnitude is ever subtracted."""
    rows = rows_of(logits)
    tokens = tokens.reshape(-1)
    if not use_triton(logits):
        return torch_rows.partial_stats(rows, tokens, vocab_start, temperature, entropy)
    n, device = rows.n, logits.device
    stats = common.empty((4, n), dtype=torch.float32, device=device)
    if not entropy:
        stats[3].zero_()
    flags = common.empty((n,), dtype=torch.int32, device=device)
    _launch_fwd(rows, tokens, (stats[2], stats[1], stats[3], stats[0]), flags, vocab_start, temperature, entropy,
                partial=True)
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
                d = rows_of(dest)
                found.append((dest, (d.stride_b, d.stride_t)))
            else:
                scratch = torch.empty((min(rows.n, TRIAL_ROWS), rows.vocab), dtype=dest.dtype, device=dest.device)
                found.append((scratch, (rows.seqlen * rows.vocab, rows.vocab)))
        return found[0]

    return get


def fused_or_split(key, device, grad, n_rows, trial_rows, trial_dest, fused, split):
    """Writes the gradient of ``n_rows`` rows into ``grad`` with the faster of two strategies, timed
    once per ``key`` on a prefix of the rows: ``fused(n_rows, dest, dest_strides)`` (the forward
    program writes it) or ``split(...)`` (the forward, then the row backward kernel)."""
    key = key + ("strategy",)
    choice = known_choice(key, device, ("fused", "split"), "fused")
    if choice is None:
        choice = pick_choice(key, device, {"fused": lambda: fused(trial_rows, *trial_dest()),
                                           "split": lambda: split(trial_rows, *trial_dest())}, default="fused")
    g_rows = rows_of(grad)
    (fused if choice == "fused" else split)(n_rows, grad, (g_rows.stride_b, g_rows.stride_t))


def logprobs_bwd(logits, tokens, lse, coef, coef_h, entropy, temperature, out=None):
    """Launcher of the general row backward. Writes ``dlogits`` into ``out`` (shaped like ``logits``,
    any float dtype, possibly ``logits`` itself: each block is read before its gradient is written)
    or a new tensor in the logits' dtype, and returns it."""
    rows = rows_of(logits)
    tokens = tokens.reshape(-1)
    grad = out if out is not None else common.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if not use_triton(logits):
        return torch_rows.logprobs_bwd(rows, tokens, lse, coef, coef_h, entropy, temperature, grad)
    launch = bwd_launcher(rows, tokens, lse, coef, coef_h, entropy, temperature)
    g_rows = rows_of(grad)
    key = ("logprobs_bwd", logits.dtype, grad.dtype, coef_h is not None)
    trial_dest = trial_destination(grad, rows)
    trial = lambda c: launch(c, min(rows.n, TRIAL_ROWS), *trial_dest())  # noqa: E731
    config = pick_row_config(key, rows.vocab, logits.device, trial, logits.element_size())
    launch(config, rows.n, grad, (g_rows.stride_b, g_rows.stride_t))
    return grad
