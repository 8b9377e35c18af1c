"""What every RLSD loss entry point shares: checking and flattening the per-token arguments and the
hyperparameters, the aggregation weights, the sequence-level terms, and the metrics from the
kernels' per-token outputs.

``rlsd_loss`` (logits) and ``rlsd_linear_loss`` (hidden states) both call ``prepare_loss_inputs``,
so a keyword means the same thing, with the same checks, in both.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._agg import token_weights
from ._utils import check_tensor, per_token
from .flags import Flag
from .reference import (
    CREDIT_BASES,
    IGNORE_INDEX,
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    RATIO_LEVELS,
    SURROGATES,
    _log_diff,
    rlsd_metrics,
    sequence_ids,
    sequence_sums,
)

# The per-token float32 outputs of the RLSD launchers.
OUTPUTS = ("loss", "lp_s", "lp_t", "lse", "d_lp", "w", "ratio", "is_weight", "kl", "entropy")
# The per-token inputs, in the order the custom ops take them (``pack``).
INPUTS = ("tokens", "adv", "lp_t", "lp_old", "weight", "credit", "rollout", "log_is", "ref", "seq_ids", "seq_ratio")
FLOAT_PARAMS = ("eps_w_low", "eps_w_high", "lam", "clip_low", "clip_high", "dual_clip", "tis_cap", "kl_coef",
                "entropy_coef", "temperature")
CHOICES = {"surrogate": SURROGATES, "ratio_level": RATIO_LEVELS, "credit_base": CREDIT_BASES,
           "tis_level": RATIO_LEVELS, "kl_estimator": KL_ESTIMATORS}
INT_PARAMS = ("want_entropy", "num_seqs")


class LossInputs(NamedTuple):
    """Flat ``[N]`` per-token tensors for the launchers, the scalar hyperparameters, the float mask."""

    inputs: dict  # INPUTS: tokens, adv, weight (aggregation share per token), and optional ones (or None)
    params: dict  # FLOAT_PARAMS, CHOICES and INT_PARAMS
    mask: torch.Tensor
    token_shape: tuple


def check_temperature(temperature):
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def _check_range(name, value, ok, what):
    if not (isinstance(value, (int, float)) and ok(value)):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_hyperparameters(eps_w, lam, clip_low, clip_high, dual_clip, temperature, loss_agg, normalizer, **more):
    """Ranges of the scalars and names of the choices, each error naming its argument."""
    check_temperature(temperature)
    finite = lambda v: abs(v) < float("inf")  # noqa: E731
    _check_range("eps_w", eps_w, lambda v: 0 <= v < 1, "in [0, 1)")
    _check_range("lam", lam, lambda v: 0 <= v <= 1, "in [0, 1]")
    _check_range("clip_low", clip_low, lambda v: 0 <= v < 1, "in [0, 1)")
    _check_range("clip_high", clip_high, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
    if dual_clip is not None:
        _check_range("dual_clip", dual_clip, lambda v: 1 < v < float("inf"), "None or a finite number > 1")
    if more.get("eps_w_low") is not None:
        _check_range("eps_w_low", more["eps_w_low"], lambda v: 0 <= v < 1, "None or in [0, 1)")
    if more.get("eps_w_high") is not None:
        _check_range("eps_w_high", more["eps_w_high"], lambda v: 0 <= v < float("inf"), "None or finite, >= 0")
    _check_range("tis_cap", more.get("tis_cap", 2.0), lambda v: 0 < v < float("inf"), "a positive finite number")
    _check_range("kl_coef", more.get("kl_coef", 0.0), finite, "a finite number")
    _check_range("entropy_coef", more.get("entropy_coef", 0.0), finite, "a finite number")
    for name, allowed in CHOICES.items():
        if name in more and more[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {more[name]!r}")
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
    clip_high, dual_clip, temperature, loss_agg, normalizer, cu_seqlens, validate, eps_w_low=None, eps_w_high=None,
    surrogate="ppo", ratio_level="token", credit_base="current", credit_mask=None, credit_negative_only=False,
    rollout_logprobs=None, tis_level="token", tis_cap=2.0, ref_logprobs=None, kl_coef=0.0, kl_estimator="k3",
    entropy_coef=0.0, want_entropy=False,
) -> LossInputs:
    """Checks every per-token argument against ``token_shape`` (``(B, T)`` or packed ``(N,)``)."""
    token_shape = tuple(token_shape)
    check_tensor(tokens, "tokens", kinds=("int",), device=device)
    if tuple(tokens.shape) != token_shape:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}, expected {token_shape}")
    check_hyperparameters(
        eps_w, lam, clip_low, clip_high, dual_clip, temperature, loss_agg, normalizer, eps_w_low=eps_w_low,
        eps_w_high=eps_w_high, tis_cap=tis_cap, kl_coef=kl_coef, entropy_coef=entropy_coef, surrogate=surrogate,
        ratio_level=ratio_level, credit_base=credit_base, tis_level=tis_level, kl_estimator=kl_estimator,
    )
    if cu_seqlens is not None:
        check_tensor(cu_seqlens, "cu_seqlens", kinds=("int",), dims=(1,))
        if len(token_shape) != 1:
            raise ValueError("cu_seqlens is for packed [N, ...] inputs")
        n = token_shape[0]
        if validate and int(cu_seqlens[-1]) != n:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])}, but there are {n} tokens")

    f32 = dict(dtype=torch.float32, device=device)
    flat = lambda x, name: per_token(x, name, token_shape, kinds=("float",), **f32)  # noqa: E731
    flat_tokens = tokens.reshape(-1).contiguous()
    inputs = dict.fromkeys(INPUTS)
    inputs["tokens"] = flat_tokens
    inputs["adv"] = per_token(advantages, "advantages", token_shape, kinds=("float",), broadcast_rows=True, **f32)
    for key, value, name in (("lp_t", teacher_logprobs, "teacher_logprobs"), ("lp_old", old_logprobs, "old_logprobs"),
                             ("rollout", rollout_logprobs, "rollout_logprobs"), ("ref", ref_logprobs, "ref_logprobs")):
        if value is not None:
            inputs[key] = flat(value, name)
    m = (flat_tokens != IGNORE_INDEX).float()
    if mask is not None:
        m = m * per_token(mask, "mask", token_shape, kinds=("bool", "float", "int"), **f32)
    inputs["weight"] = token_weights(m, token_shape, loss_agg, normalizer, cu_seqlens)
    if credit_mask is not None or credit_negative_only:
        credit = torch.ones_like(m)
        if credit_mask is not None:
            credit = per_token(credit_mask, "credit_mask", token_shape, kinds=("bool", "int", "float"), **f32)
        inputs["credit"] = credit * (inputs["adv"] < 0) if credit_negative_only else credit

    num_seqs = 0
    if ratio_level == "sequence" or (rollout_logprobs is not None and tis_level == "sequence"):
        inputs["seq_ids"], num_seqs, _ = sequence_ids(token_shape, cu_seqlens, device)
    if rollout_logprobs is not None and tis_level == "sequence" and old_logprobs is not None:
        # Known before any kernel runs: the kernels take it as a per-token input.
        inputs["log_is"] = sequence_log_is(inputs["lp_old"], inputs, num_seqs)
    params = dict(
        eps_w_low=float(eps_w if eps_w_low is None else eps_w_low),
        eps_w_high=float(eps_w if eps_w_high is None else eps_w_high), lam=float(lam), clip_low=float(clip_low),
        clip_high=float(clip_high), dual_clip=None if dual_clip is None else float(dual_clip),
        tis_cap=float(tis_cap), kl_coef=float(kl_coef), entropy_coef=float(entropy_coef),
        temperature=float(temperature), surrogate=surrogate, ratio_level=ratio_level, credit_base=credit_base,
        tis_level=tis_level, kl_estimator=kl_estimator, want_entropy=int(bool(want_entropy or entropy_coef != 0)),
        num_seqs=int(num_seqs),
    )
    return LossInputs(inputs, params, m, token_shape)


def sequence_log_is(lp_old, inputs, num_seqs):
    """Per token, the sum over its sequence's unmasked tokens of ``lp_old - lp_rollout``."""
    valid = inputs["weight"] != 0
    x = torch.where(valid, _log_diff(lp_old, inputs["rollout"]), 0.0)
    return sequence_sums(x, inputs["seq_ids"], num_seqs)


def needs_sequence_pass(inputs, params):
    """Whether sequence-level terms are still missing from ``inputs``: they wait for every token's
    log-prob (sequence-level ratios, and sequence-level importance weights of on-policy tokens,
    whose old log-probs are the current ones). ``sequence_terms`` adds them."""
    missing_ratio = params["ratio_level"] == "sequence" and inputs["seq_ratio"] is None
    missing_is = inputs["rollout"] is not None and params["tis_level"] == "sequence" and inputs["log_is"] is None
    return missing_ratio or missing_is


def sequence_terms(lp_s, inputs, params):
    """Adds the sequence-level per-token inputs once ``lp_s`` is known: ``seq_ratio`` (the mean over
    the sequence's unmasked tokens of ``lp_s - lp_old``) and, on-policy, ``log_is``."""
    inputs = dict(inputs)
    valid = inputs["weight"] != 0
    seq_ids, num_seqs = inputs["seq_ids"], params["num_seqs"]
    lp_old = lp_s if inputs["lp_old"] is None else inputs["lp_old"]
    if params["ratio_level"] == "sequence":
        sums = sequence_sums(torch.where(valid, _log_diff(lp_s, lp_old), 0.0), seq_ids, num_seqs)
        counts = sequence_sums(valid.float(), seq_ids, num_seqs)
        inputs["seq_ratio"] = sums / torch.where(counts != 0, counts, 1.0)
    if inputs["log_is"] is None and inputs["seq_ids"] is not None and inputs["rollout"] is not None:
        inputs["log_is"] = sequence_log_is(lp_old, inputs, num_seqs)
    return inputs


def kernel_scalars(params):
    """The runtime float arguments of the RLSD kernels, in their order."""
    return (
        math.log1p(-params["eps_w_low"]), math.log1p(params["eps_w_high"]), params["lam"], params["clip_low"],
        params["clip_high"], params["dual_clip"] or 0.0, math.log(params["tis_cap"]), params["kl_coef"],
        params["entropy_coef"],
    )


def kernel_flags(inputs, params):
    """The compile-time flags of the epilogue for the inputs present (sequence-level terms join
    ``inputs`` through ``sequence_terms``)."""
    if inputs["rollout"] is None:
        is_mode = 0
    elif params["tis_level"] == "token":
        is_mode = 1
    else:
        is_mode = 0 if inputs["log_is"] is None else 2
    return dict(
        HAS_OLD=inputs["lp_old"] is not None, HAS_DUAL=params["dual_clip"] is not None,
        CISPO=params["surrogate"] == "cispo", CREDIT_OLD=params["credit_base"] == "old",
        HAS_CREDIT=inputs["credit"] is not None, SEQ_RATIO=inputs["seq_ratio"] is not None, IS_MODE=is_mode,
        KL=0 if inputs["ref"] is None else 1 + KL_ESTIMATORS.index(params["kl_estimator"]),
        ENTROPY_GRAD=params["entropy_coef"] != 0,
    )


def pack(inputs, params):
    """The inputs and params as the custom ops take them: tensors, floats, ints."""
    floats = [float("nan") if params[k] is None else params[k] for k in FLOAT_PARAMS]
    ints = [CHOICES[k].index(params[k]) for k in CHOICES] + [params[k] for k in INT_PARAMS]
    return [inputs[k] for k in INPUTS], floats, ints


def unpack(tensors, floats, ints):
    inputs = dict(zip(INPUTS, tensors, strict=True))
    params = {k: (None if math.isnan(v) else v) for k, v in zip(FLOAT_PARAMS, floats, strict=True)}
    params.update({k: CHOICES[k][i] for k, i in zip(CHOICES, ints[: len(CHOICES)], strict=True)})
    params.update(dict(zip(INT_PARAMS, ints[len(CHOICES):], strict=True)))
    return inputs, params


FLAG_TERMS = (
    ("weight_clip_low", Flag.WEIGHT_CLIP_LOW), ("weight_clip_high", Flag.WEIGHT_CLIP_HIGH),
    ("ppo_clip_low", Flag.PPO_CLIP_LOW), ("ppo_clip_high", Flag.PPO_CLIP_HIGH), ("dual_clip", Flag.DUAL_CLIP),
)


def output_metrics(outputs, flags, mask, inputs=None, params=None):
    """The metrics dict of ``reference.rlsd_metrics`` from the kernels' per-token outputs."""
    lp_s, lp_t = outputs["lp_s"], outputs["lp_t"]
    terms = {
        "weight": outputs["w"],
        "delta": _log_diff(lp_t, lp_s if not params or params["credit_base"] == "current" or inputs["lp_old"] is None
                           else inputs["lp_old"]),
        "ratio": outputs["ratio"],
        **{name: (flags & int(bit)) != 0 for name, bit in FLAG_TERMS},
    }
    if params and params["want_entropy"]:
        terms["entropy"] = outputs["entropy"]
    if inputs and inputs["ref"] is not None:
        terms["kl"] = outputs["kl"]
    if inputs and inputs["rollout"] is not None:
        terms["is_weight"] = outputs["is_weight"]
    return rlsd_metrics(terms, mask)
