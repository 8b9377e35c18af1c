"""The named per-token inputs of one loss call, and what the launchers of both backends derive from
them: the kernels' runtime scalars and compile-time flags, and the sequence-level terms.

``options`` below is any object with the fields of ``call.options.PolicyOptions`` (the launchers
read it by name and never import it).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..flags import Flag
from ..reference import KL_ESTIMATORS, _log_diff, sequence_sums

# The per-token float32 outputs of the policy-loss launchers.
OUTPUTS = ("loss", "lp_s", "lp_t", "lse", "d_lp", "w", "ratio", "is_weight", "kl", "entropy")
FLAG_TERMS = (
    ("weight_clip_low", Flag.WEIGHT_CLIP_LOW), ("weight_clip_high", Flag.WEIGHT_CLIP_HIGH),
    ("ppo_clip_low", Flag.PPO_CLIP_LOW), ("ppo_clip_high", Flag.PPO_CLIP_HIGH), ("dual_clip", Flag.DUAL_CLIP),
)


@dataclasses.dataclass(frozen=True)
class TokenInputs:
    """Flat ``[N]`` per-token tensors of one call; the optional ones are None when not given."""

    tokens: torch.Tensor  # int ids, IGNORE_INDEX at masked tokens
    adv: torch.Tensor  # float32 advantages
    weight: torch.Tensor  # float32 share of each token in the aggregated loss (0 at masked tokens)
    lp_t: torch.Tensor | None = None  # precomputed teacher log-probs
    lp_old: torch.Tensor | None = None  # behaviour-policy log-probs
    credit: torch.Tensor | None = None  # 1 where the credit weight applies
    rollout: torch.Tensor | None = None  # rollout engine's log-probs (truncated importance sampling)
    log_is: torch.Tensor | None = None  # sequence-level log importance ratio, per token
    ref: torch.Tensor | None = None  # reference-policy log-probs (KL term)
    seq_ids: torch.Tensor | None = None  # sequence index of each token
    seq_ratio: torch.Tensor | None = None  # sequence-level log-ratio, per token

    def replace(self, **changes) -> TokenInputs:
        return dataclasses.replace(self, **changes)

    def sliced(self, sl) -> TokenInputs:
        """The inputs of the tokens ``sl`` (a slice of the flat token order)."""
        return TokenInputs(**{f.name: None if (x := getattr(self, f.name)) is None else x[sl]
                              for f in dataclasses.fields(self)})


def optional(x, fallback):
    """A pointer for a kernel argument that its compile-time flag leaves unread."""
    return x if x is not None else fallback


def kernel_scalars(options):
    """The runtime float arguments of the policy epilogue, in the kernels' order."""
    return (
        math.log1p(-options.eps_w_low), math.log1p(options.eps_w_high), options.lam, options.clip_low,
        options.clip_high, options.dual_clip or 0.0, math.log(options.tis_cap), options.kl_coef,
        options.entropy_coef, options.sapo_tau_pos, options.sapo_tau_neg,
    )


def kernel_flags(inputs: TokenInputs, options):
    """The compile-time flags of the epilogue for the inputs present (sequence-level terms join
    ``inputs`` through ``sequence_terms``)."""
    if inputs.rollout is None:
        # Precomputed importance weights arrive as per-token log-weights.
        is_mode = 0 if inputs.log_is is None else 2
    elif options.tis_level == "token":
        is_mode = 1
    else:
        is_mode = 0 if inputs.log_is is None else 2
    return dict(
        HAS_OLD=inputs.lp_old is not None, HAS_DUAL=options.dual_clip is not None,
        CISPO=options.surrogate == "cispo", SAPO=options.surrogate == "sapo", CREDIT_OLD=options.credit_base == "old",
        HAS_CREDIT=inputs.credit is not None, SEQ_RATIO=inputs.seq_ratio is not None, IS_MODE=is_mode,
        KL=0 if inputs.ref is None else 1 + KL_ESTIMATORS.index(options.kl_estimator),
        ENTROPY_GRAD=options.entropy_coef != 0,
    )


def sequence_log_is(lp_old, inputs: TokenInputs, num_seqs):
    """Per token, the sum over its sequence's unmasked tokens of ``lp_old - lp_rollout``."""
    valid = inputs.weight != 0
    x = torch.where(valid, _log_diff(lp_old, inputs.rollout), 0.0)
    return sequence_sums(x, inputs.seq_ids, num_seqs)


def needs_sequence_pass(inputs: TokenInputs, options):
    """Whether sequence-level terms are still missing from ``inputs``: they wait for every token's
    log-prob (sequence-level ratios, and sequence-level importance weights of on-policy tokens,
    whose old log-probs are the current ones). ``sequence_terms`` adds them."""
    missing_ratio = options.ratio_level == "sequence" and inputs.seq_ratio is None
    missing_is = inputs.rollout is not None and options.tis_level == "sequence" and inputs.log_is is None
    return missing_ratio or missing_is


def sequence_terms(lp_s, inputs: TokenInputs, options) -> TokenInputs:
    """``inputs`` with the sequence-level per-token terms once ``lp_s`` is known: ``seq_ratio`` (the
    mean over the sequence's unmasked tokens of ``lp_s - lp_old``) and, on-policy, ``log_is``."""
    valid = inputs.weight != 0
    lp_old = lp_s if inputs.lp_old is None else inputs.lp_old
    changes = {}
    if options.ratio_level == "sequence":
        sums = sequence_sums(torch.where(valid, _log_diff(lp_s, lp_old), 0.0), inputs.seq_ids, options.num_seqs)
        counts = sequence_sums(valid.float(), inputs.seq_ids, options.num_seqs)
        changes["seq_ratio"] = sums / torch.where(counts != 0, counts, 1.0)
    if (inputs.log_is is None and inputs.seq_ids is not None and inputs.rollout is not None
            and options.tis_level == "sequence"):
        changes["log_is"] = sequence_log_is(lp_old, inputs, options.num_seqs)
    return inputs.replace(**changes)
