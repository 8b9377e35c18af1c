"""Checking and flattening the per-token arguments of one loss call into named ``TokenInputs``.

Every loss entry point (logits, hidden states, sharded or not; RLSD, GRPO+OPSD, OPSD) calls
``prepare``, so a per-token keyword means the same thing, with the same checks, in all of them.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple

import torch

from ..launch.common import check_tensor
from ..launch.terms import TokenInputs, sequence_log_is
from ..reference import IGNORE_INDEX, LOSS_AGG_MODES, sequence_ids
from .aggregate import token_weights
from .options import PolicyOptions


class Call(NamedTuple):
    """One prepared loss call: named per-token inputs, the options, the float mask and the layout."""

    inputs: TokenInputs
    options: PolicyOptions
    mask: torch.Tensor  # [N] float32, 0 at masked tokens
    token_shape: tuple
    loss_agg: str


def per_token(x, name, token_shape, *, kinds, dtype, device, broadcast_rows=False):
    """A per-token tensor as a contiguous ``[N]`` vector (N-sized copies only, never ``[N, V]``).

    With ``broadcast_rows`` a ``[B]`` or ``[B, 1]`` tensor is broadcast over a ``[B, T]`` layout.
    """
    check_tensor(x, name, kinds=kinds, device=device)
    shape = tuple(x.shape)
    if shape != tuple(token_shape):
        rows_ok = broadcast_rows and len(token_shape) == 2 and shape in ((token_shape[0],), (token_shape[0], 1))
        if not rows_ok:
            allowed = [tuple(token_shape)]
            if broadcast_rows and len(token_shape) == 2:
                allowed += [(token_shape[0],), (token_shape[0], 1)]
            raise ValueError(f"{name} has shape {shape}, expected one of {allowed}")
    # The copies are taken outside the graph: detach only what autograd tracks.
    x = x.detach() if x.requires_grad else x
    if x.dtype != dtype:
        x = x.to(dtype)  # before a broadcast: B values, not B * T
    if shape != tuple(token_shape):
        x = x.reshape(token_shape[0], 1).expand(token_shape)
    x = x.reshape(-1)
    return x if x.is_contiguous() else x.contiguous()


def check_tokens(tokens, token_shape, device, name="tokens"):
    check_tensor(tokens, name, kinds=("int",), device=device)
    if tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {tokens.dtype}")
    if tuple(tokens.shape) != tuple(token_shape):
        raise ValueError(f"{name} has shape {tuple(tokens.shape)}, expected {tuple(token_shape)}")


def check_loss_agg(loss_agg):
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")


def check_normalizer(loss_agg, normalizer, validate):
    """The normalizer as given, or None. A number must be positive and finite; so must a one-element
    tensor, checked on the device: with ``validate`` by one sync (which the call makes anyway), else
    (and under torch.compile, which cannot read it while tracing) a bad value becomes NaN, so that
    the loss is NaN and never a silently finite wrong value."""
    check_loss_agg(loss_agg)
    if normalizer is None:
        return None
    if loss_agg == "none":
        raise ValueError("normalizer has no meaning with loss_agg='none'")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise ValueError(f"normalizer must hold one real value, got shape {tuple(normalizer.shape)} and dtype "
                             f"{normalizer.dtype}")
        value = normalizer.detach().float()
        ok = (value > 0) & torch.isfinite(value)
        if validate and not torch.compiler.is_compiling():
            if not bool(ok.all()):
                raise ValueError(f"normalizer must be positive and finite, got {float(value.reshape(()))}")
            return value
        return torch.where(ok, value, float("nan"))
    if isinstance(normalizer, bool) or not (isinstance(normalizer, numbers.Real) and 0 < normalizer < float("inf")):
        raise ValueError(f"normalizer must be a positive finite number or a one-element tensor, got {normalizer!r}")
    return float(normalizer)


def check_cu_seqlens(cu_seqlens, token_shape, validate):
    """``[S + 1]`` boundaries ``0 = c_0 <= c_1 <= ... <= c_S = N``. Their values are checked where that
    costs no device sync (a CPU tensor) or a sync is made anyway (``validate``); otherwise they must
    be well formed (also under torch.compile, which cannot read them while tracing)."""
    check_tensor(cu_seqlens, "cu_seqlens", kinds=("int",), dims=(1,))
    if len(token_shape) != 1:
        raise ValueError("cu_seqlens is for packed [N, ...] inputs")
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must hold at least one boundary (0)")
    if torch.compiler.is_compiling() or not (validate or cu_seqlens.device.type == "cpu"):
        return
    n, bounds = token_shape[0], cu_seqlens.cpu()
    if int(bounds[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(bounds[0])}")
    if bool((bounds[1:] < bounds[:-1]).any()):
        raise ValueError(f"cu_seqlens must not decrease, got {bounds.tolist()}")
    if int(bounds[-1]) != n:
        raise ValueError(f"cu_seqlens ends at {int(bounds[-1])}, but there are {n} tokens")


def prepare(token_shape, device, tokens, advantages, options: PolicyOptions, *, loss_agg, teacher_logprobs=None,
            old_logprobs=None, mask=None, credit_mask=None, rollout_logprobs=None, ref_logprobs=None,
            is_weights=None, normalizer=None, cu_seqlens=None, validate=True) -> Call:
    """Checks every per-token argument against ``token_shape`` (``(B, T)`` or packed ``(N,)``) and
    returns the call's ``TokenInputs`` with each token's share of the aggregated loss."""
    token_shape = tuple(token_shape)
    check_tokens(tokens, token_shape, device)
    normalizer = check_normalizer(loss_agg, normalizer, validate)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, token_shape, validate)
    if options.kl_coef != 0 and ref_logprobs is None:
        raise ValueError("kl_coef is not 0 but ref_logprobs is None: the KL term needs the reference policy's "
                         "log-probs")

    f32 = dict(dtype=torch.float32, device=device)

    def flat(x, name):
        return None if x is None else per_token(x, name, token_shape, kinds=("float",), **f32)

    flat_tokens = tokens.reshape(-1).contiguous()
    adv = per_token(advantages, "advantages", token_shape, kinds=("float",), broadcast_rows=True, **f32)
    m = (flat_tokens != IGNORE_INDEX).float()
    if mask is not None:
        m = m * per_token(mask, "mask", token_shape, kinds=("bool", "float", "int"), **f32)
    credit = None
    if credit_mask is not None or options.credit_negative_only:
        credit = torch.ones_like(m)
        if credit_mask is not None:
            credit = per_token(credit_mask, "credit_mask", token_shape, kinds=("bool", "int", "float"), **f32)
        credit = credit * (adv < 0) if options.credit_negative_only else credit
    binary = mask is None or mask.dtype == torch.bool  # m holds 0 and 1 only
    inputs = TokenInputs(
        tokens=flat_tokens, adv=adv, weight=token_weights(m, token_shape, loss_agg, normalizer, cu_seqlens, binary),
        lp_t=flat(teacher_logprobs, "teacher_logprobs"), lp_old=flat(old_logprobs, "old_logprobs"), credit=credit,
        rollout=flat(rollout_logprobs, "rollout_logprobs"), ref=flat(ref_logprobs, "ref_logprobs"),
    )
    if is_weights is not None:
        if rollout_logprobs is not None:
            raise ValueError("give rollout_logprobs (truncated importance sampling computed here) or is_weights "
                             "(precomputed weights), not both")
        weights = per_token(is_weights, "is_weights", token_shape, kinds=("float",), broadcast_rows=True, **f32)
        # Under torch.compile, which cannot read them while tracing, a negative or NaN weight is not
        # refused: its log is NaN, and so is the loss.
        if validate and not torch.compiler.is_compiling() and bool(((weights < 0) | weights.isnan()).any()):
            raise ValueError("is_weights must be non-negative importance weights (found a negative or NaN one)")
        # Each token's policy term is multiplied by its weight: a log-weight in the importance
        # weight's place (the kernels take it as a per-token input), uncapped.
        inputs = inputs.replace(log_is=torch.log(weights))
        options = dataclasses.replace(options, precomputed_is=True)
    num_seqs = 0
    if options.ratio_level == "sequence" or (rollout_logprobs is not None and options.tis_level == "sequence"):
        seq_ids, num_seqs, _ = sequence_ids(token_shape, cu_seqlens, device)
        inputs = inputs.replace(seq_ids=seq_ids)
    if int(num_seqs) != options.num_seqs:
        options = dataclasses.replace(options, num_seqs=int(num_seqs))
    if rollout_logprobs is not None and options.tis_level == "sequence" and old_logprobs is not None:
        # Known before any kernel runs: the kernels take it as a per-token input.
        inputs = inputs.replace(log_is=sequence_log_is(inputs.lp_old, inputs, num_seqs))
    return Call(inputs, options, m, token_shape, loss_agg)
