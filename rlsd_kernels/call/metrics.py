"""The metrics dicts of the losses, from the launchers' per-token outputs (``reference.rlsd_metrics``
and ``reference.opsd_metrics`` state them as formulas)."""

from __future__ import annotations

import torch

from ..launch.terms import FLAG_TERMS
from ..reference import _log_diff, opsd_metrics, rlsd_metrics


def policy_metrics(outputs, flags, mask, inputs, options, has_teacher=True):
    """The metrics dict of ``reference.rlsd_metrics`` from the kernels' per-token outputs."""
    lp_s, lp_t = outputs["lp_s"], outputs["lp_t"]
    base = lp_s if options.credit_base == "current" or inputs.lp_old is None else inputs.lp_old
    terms = {
        "weight": outputs["w"],
        "delta": _log_diff(lp_t, base),
        "ratio": outputs["ratio"],
        "advantage": inputs.adv,
        **{name: (flags & int(bit)) != 0 for name, bit in FLAG_TERMS},
    }
    if not has_teacher:
        for key in ("weight", "delta", "weight_clip_low", "weight_clip_high"):
            del terms[key]
    if options.want_entropy:
        terms["entropy"] = outputs["entropy"]
    if inputs.ref is not None:
        terms["kl"] = outputs["kl"]
    if inputs.rollout is not None or inputs.log_is is not None:
        terms["is_weight"] = outputs["is_weight"]
    return rlsd_metrics(terms, mask)


def distill_metrics(outputs, flags, mask, inputs, options, distill, has_teacher=True):
    """``reference.opsd_metrics``, and the policy metrics too when the policy term is in the loss."""
    clip = distill.token_clip
    clipped = outputs["div"] > clip if clip is not None else torch.zeros_like(mask, dtype=torch.bool)
    metrics = opsd_metrics(outputs["div"], clipped, mask)
    if distill.grpo:
        metrics = {**policy_metrics(outputs, flags, mask, inputs, options, has_teacher), **metrics}
    return metrics
