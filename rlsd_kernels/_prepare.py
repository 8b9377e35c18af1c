"""What every RLSD loss entry point shares: checking and flattening the per-token arguments and the
hyperparameters, the aggregation weights, and the metrics from the kernels' per-token outputs.

``rlsd_loss`` (logits) and ``rlsd_linear_loss`` (hidden states) both call ``prepare_loss_inputs``,
so a keyword means the same thing, with the same checks, in both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._agg import token_weights
from ._utils import check_tensor, per_token
from .flags import Flag
from .reference import IGNORE_INDEX, LOSS_AGG_MODES, rlsd_metrics

# The per-token float32 outputs of the RLSD launchers, in order.
OUTPUTS = ("loss", "lp_s", "lp_t", "lse", "d_lp", "w", "ratio")


class LossInputs(NamedTuple):
    """Flat ``[N]`` per-token tensors for the launchers, the scalar hyperparameters, the float mask."""

    inputs: dict  # tokens, adv, lp_t (or None), lp_old (or None), weight (aggregation share per token)
    params: dict  # eps_w, lam, clip_low, clip_high, dual_clip, temperature
    mask: torch.Tensor
    token_shape: tuple


def check_temperature(temperature):
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def check_hyperparameters(eps_w, lam, clip_low, clip_high, dual_clip, temperature, loss_agg, normalizer):
    check_temperature(temperature)
    checks = (
        ("eps_w", eps_w, 0 <= eps_w < 1, "in [0, 1)"),
        ("lam", lam, 0 <= lam <= 1, "in [0, 1]"),
        ("clip_low", clip_low, 0 <= clip_low < 1, "in [0, 1)"),
        ("clip_high", clip_high, 0 <= clip_high < float("inf"), "a finite number >= 0"),
    )
    for name, value, ok, what in checks:
        if not ok:
            raise ValueError(f"{name} must be {what}, got {value!r}")
    if dual_clip is not None and not 1 < dual_clip < float("inf"):
        raise ValueError(f"dual_clip must be None or a finite number > 1, got {dual_clip!r}")
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
    if normalizer is not None:
        if loss_agg == "none":
            raise ValueError("normalizer has no meaning with loss_agg='none'")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"normalizer must hold one value, got shape {tuple(normalizer.shape)}")
        elif not (isinstance(normalizer, (int, float)) and 0 < normalizer < float("inf")):
            raise ValueError(f"normalizer must be a positive number or a one-element tensor, got {normalizer!r}")


def prepare_loss_inputs(
    token_shape, device, tokens, advantages, *, teacher_logprobs, old_logprobs, mask, eps_w, lam, clip_low,
    clip_high, dual_clip, temperature, loss_agg, normalizer, cu_seqlens, validate,
) -> LossInputs:
    """Checks every per-token argument against ``token_shape`` (``(B, T)`` or packed ``(N,)``)."""
    token_shape = tuple(token_shape)
    check_tensor(tokens, "tokens", kinds=("int",), device=device)
    if tuple(tokens.shape) != token_shape:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}, expected {token_shape}")
    check_hyperparameters(eps_w, lam, clip_low, clip_high, dual_clip, temperature, loss_agg, normalizer)
    if cu_seqlens is not None:
        check_tensor(cu_seqlens, "cu_seqlens", kinds=("int",), dims=(1,))
        if len(token_shape) != 1:
            raise ValueError("cu_seqlens is for packed [N, ...] inputs")
        n = token_shape[0]
        if validate and int(cu_seqlens[-1]) != n:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])}, but there are {n} tokens")

    f32 = dict(dtype=torch.float32, device=device)
    flat_tokens = tokens.reshape(-1).contiguous()
    inputs = {
        "tokens": flat_tokens,
        "adv": per_token(advantages, "advantages", token_shape, kinds=("float",), broadcast_rows=True, **f32),
        "lp_t": None,
        "lp_old": None,
    }
    if teacher_logprobs is not None:
        inputs["lp_t"] = per_token(teacher_logprobs, "teacher_logprobs", token_shape, kinds=("float",), **f32)
    if old_logprobs is not None:
        inputs["lp_old"] = per_token(old_logprobs, "old_logprobs", token_shape, kinds=("float",), **f32)
    m = (flat_tokens != IGNORE_INDEX).float()
    if mask is not None:
        m = m * per_token(mask, "mask", token_shape, kinds=("bool", "float", "int"), **f32)
    inputs["weight"] = token_weights(m, token_shape, loss_agg, normalizer, cu_seqlens)
    params = dict(
        eps_w=float(eps_w), lam=float(lam), clip_low=float(clip_low), clip_high=float(clip_high),
        dual_clip=None if dual_clip is None else float(dual_clip), temperature=float(temperature),
    )
    return LossInputs(inputs, params, m, token_shape)


def loss_metrics(lp_s, lp_t, w, ratio, flags, mask):
    """The metrics dict of ``reference.rlsd_metrics`` from the kernels' per-token outputs."""
    terms = {
        "weight": w,
        "delta": torch.where((lp_t == float("-inf")) & (lp_s == float("-inf")), 0.0, lp_t - lp_s),
        "ratio": ratio,
        **{name: (flags & int(bit)) != 0 for name, bit in (
            ("weight_clip_low", Flag.WEIGHT_CLIP_LOW), ("weight_clip_high", Flag.WEIGHT_CLIP_HIGH),
            ("ppo_clip_low", Flag.PPO_CLIP_LOW), ("ppo_clip_high", Flag.PPO_CLIP_HIGH),
            ("dual_clip", Flag.DUAL_CLIP),
        )},
    }
    return rlsd_metrics(terms, mask)
