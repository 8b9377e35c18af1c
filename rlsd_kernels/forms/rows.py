"""Which token rows a pass of the fused linear form runs, and in which order (``docs/linear-form.md``:
work skipping). A row with zero weight (a masked token) is neither scored nor differentiated; a row
whose logit gradient is exactly zero (the policy loss at advantage 0 without a KL or entropy term)
is scored but takes no part in dH and dW. A pass then runs the live rows only, gathered into full
chunks with the rows that have a gradient first; everything of the other rows is zero, as the row
kernels write it for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from ..launch.torch_opsd import grad_coefficients
from ..reference import IGNORE_INDEX

# Whether passes skip the rows without work: True or False forces it (benchmarks compare the two);
# None skips on the CPU, where it was measured faster, and not on CUDA, where the measured schedule
# stays the default until a GPU run shows skipping faster (bench/gpu_check.sh, LINEAR_CHECK=1).
SKIP = None


def skipping(device) -> bool:
    return SKIP if SKIP is not None else device.type != "cuda"


class Plan(NamedTuple):
    """The rows of a pass: ``order`` [M] flat token ids (those with a gradient first), ``grads`` how many
    of them have a gradient row, ``n`` the number of tokens."""

    order: torch.Tensor
    grads: int
    n: int


def plan(run, grad=None):
    """The pass over the rows ``run`` ([N] bool), those in ``grad`` ([N] bool, or None for all of them)
    first; None for the plain chunks, where every row runs with its gradient (nothing to skip) or no row
    runs at all."""
    if not skipping(run.device):
        return None
    grad = run if grad is None else run & grad
    first = torch.nonzero(grad).squeeze(1)
    rest = torch.nonzero(run & ~grad).squeeze(1)
    n = run.numel()
    if first.numel() == n or first.numel() + rest.numel() == 0:
        # Every row, each with a gradient, or none at all: the plain chunks.
        return None
    return Plan(torch.cat([first, rest]), first.numel(), n)


def gradient_free(loss, inputs):
    """[N] bool: the rows whose logit gradient is zero whatever their logits, or None. The policy loss's
    row gradient is ``weight * d_lp * (1[v = y] - p) - weight * entropy_coef * dH/dz`` with
    ``d_lp = is * d l_pg + kl_coef * d k`` (``reference.rlsd_token_terms``), and ``d l_pg`` is a
    multiple of the advantage, the sequence-level ratio's included (its gradient is the token's own):
    zero at advantage 0 when ``kl_coef`` and ``entropy_coef`` are 0, for finite inputs. The OPSD
    terms have a gradient at any advantage."""
    options = loss.options
    if loss.distill is not None or options.kl_coef != 0 or options.entropy_coef != 0:
        return None
    return inputs.adv == 0


def gradient_rows(loss, tokens, stats, scale):
    """[N] bool: the rows with a non-zero logit gradient in the backward of ``sum(scale * loss)`` from
    the forward's per-token ``stats``: those with a non-zero coefficient of the row gradient."""
    if loss.distill is None:
        live = scale * stats["d_lp"] != 0
        if loss.options.entropy_coef != 0:
            live |= scale != 0
    else:
        c_lp, c_h, c_d = grad_coefficients({"entropy": None, **stats}, scale, loss.options.entropy_coef, loss.distill)
        live = (c_lp != 0) | (c_d != 0)
        if c_h is not None:
            live |= c_h != 0
    return live & (tokens != IGNORE_INDEX)


def gather(x, idx):
    """Rows ``idx`` (flat token ids) of ``[B, T, H]`` or ``[N, H]`` hidden states ``x``, copied."""
    try:
        return x.view(-1, x.shape[-1])[idx]
    except RuntimeError:
        t = x.shape[1]
        return x[idx // t, idx % t]


def sub(rows, rs):
    """Rows ``rs`` (a slice) of a chunk's rows ``rows``: a flat token slice or a tensor of token ids."""
    if isinstance(rows, slice):
        return slice(rows.start + rs.start, rows.start + rs.stop)
    return rows[rs]


def scatter(parts, p):
    """Per-token outputs ``parts`` (tensors ``[..., M]`` or dicts of them, concatenated) of the rows of
    plan ``p`` at their places among ``p.n`` tokens; zero elsewhere, as the row kernels write for
    rows they skip."""
    if isinstance(parts[0], Mapping):
        return {k: scatter([q[k] for q in parts], p) for k in parts[0]}
    x = torch.cat(parts, dim=-1)
    if x.shape[-1] == 0:
        return x  # an output not asked for (the log-probs' entropies)
    out = x.new_zeros(x.shape[:-1] + (p.n,))
    out[..., p.order] = x
    return out
