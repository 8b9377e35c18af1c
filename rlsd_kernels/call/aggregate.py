"""Loss aggregation as per-token weights: ``aggregate_loss(l) == sum(weights * l)``.

The fused kernels need each token's share of the scalar loss before the backward, to write the
gradient in the forward pass; ``reference.aggregate_loss`` states the same modes as formulas and
the tests hold the two equal.
"""

from __future__ import annotations

import torch

from ..reference import LOSS_AGG_MODES, sequence_ids, sequence_sums


def _denominator(default, normalizer, like, binary=False):
    """The mode's own denominator (0, a fully masked batch, taken as 1), or the caller's normalizer
    as it is (checked by ``inputs.check_normalizer``). ``binary``: the mask holds only 0 and 1, so
    a token count is a whole number and 0 -> 1 is a clamp."""
    if normalizer is not None:
        return torch.as_tensor(normalizer, dtype=torch.float32, device=like.device).reshape(())
    if not isinstance(default, torch.Tensor):
        return torch.tensor(float(default) if default != 0 else 1.0, dtype=torch.float32, device=like.device)
    if binary:
        return default.clamp_min(1.0)
    # d + (d == 0): 1 where d is 0, d exactly elsewhere (two ops, no scalar tensor).
    return default + (default == 0)


def token_weights(mask, token_shape, loss_agg, normalizer=None, cu_seqlens=None, binary=False):
    """Per-token weights ``[N]`` (float32) for a flat float mask ``[N]`` that is 0 at masked tokens
    (``binary``: it holds only 0 and 1).

    ``token_shape`` is ``(B, T)`` (a row per sequence) or ``(N,)`` (packed; the sequence modes then
    need ``cu_seqlens``). See ``reference.aggregate_loss`` for the modes and the denominators.
    """
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
    if loss_agg == "none":
        return mask
    if loss_agg == "token-mean":
        return mask / _denominator(mask.sum(), normalizer, mask, binary)
    if loss_agg == "sum":
        return mask / _denominator(1.0, normalizer, mask)

    seq_ids, num_seqs, max_len = sequence_ids(token_shape, cu_seqlens, mask.device)
    if loss_agg == "seq-mean-token-mean":
        counts = sequence_sums(mask, seq_ids, num_seqs)
        per_token = torch.where(counts != 0, mask / torch.where(counts != 0, counts, 1.0), 0.0)
        return per_token / _denominator(num_seqs, normalizer, mask)
    if loss_agg == "seq-mean-token-sum":
        return mask / _denominator(num_seqs, normalizer, mask)
    return mask / _denominator(num_seqs * max_len, normalizer, mask)
