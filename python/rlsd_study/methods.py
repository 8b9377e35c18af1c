"""The compared methods and their losses, through the library's public API only.

A method is a name and options, written ``base`` or ``base:key=value:key=value`` on the command line:

- ``grpo``: ``rlsd_loss`` with ``lam=0`` (the teacher is not run).
- ``rlsd``: ``rlsd_loss`` with the official defaults, ``eps_w=0.2`` and ``lam`` from
  ``lam_schedule`` (0.5 decaying to 0 over 60 steps). Options: ``eps_w``, ``eps_w_high`` (the
  clip's upper side alone, ``w <= 1 + eps_w_high``: how much more a token the teacher blames
  in a failed response can weigh), ``lam`` (a constant), or ``lam0`` and ``decay`` (the
  schedule's start and decay steps).
- ``opsd``: ``opsd_loss`` with the teacher's distribution as target (``div``: ``reverse_kl``,
  ``forward_kl`` or ``jsd``); the rewards are not used.
- ``grpo+opsd``: ``grpo_opsd_loss``, GRPO plus ``alpha`` times the divergence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

import rlsd_kernels


@dataclass(frozen=True)
class Method:
    base: str
    eps_w: float = 0.2
    eps_w_high: float | None = None
    lam: float | None = None
    lam0: float = 0.5
    decay: int = 60
    div: str = "reverse_kl"
    alpha: float = 1.0
    label: str = ""

    @property
    def needs_teacher(self) -> bool:
        return self.base != "grpo"

    @property
    def uses_credit(self) -> bool:
        return self.base == "rlsd"

    def lam_at(self, step: int) -> float:
        if self.base != "rlsd":
            return 0.0
        if self.lam is not None:
            return self.lam
        return rlsd_kernels.lam_schedule(step, start=self.lam0, decay_steps=self.decay)


BASES = ("grpo", "rlsd", "opsd", "grpo+opsd")
_FLOAT_KEYS = {"eps_w", "eps_w_high", "lam", "lam0", "alpha"}
_KEYS = _FLOAT_KEYS | {"decay", "div"}


def parse_method(spec: str) -> Method:
    """``rlsd:lam=1:eps_w=0.8`` -> ``Method``; unknown names or keys raise ``ValueError``."""
    base, *options = spec.split(":")
    if base not in BASES:
        raise ValueError(f"method must start with one of {BASES}, got {spec!r}")
    method = Method(base=base, label=spec)
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in _KEYS:
            raise ValueError(f"method option must be {'|'.join(sorted(_KEYS))}=value, got {option!r} in {spec!r}")
        parsed = float(value) if key in _FLOAT_KEYS else int(value) if key == "decay" else value
        method = replace(method, **{key: parsed})
    return method


def method_loss(method: Method, step: int, student, teacher, tokens, advantages, rollout_logprobs=None):
    """The loss and metrics for packed ``[N, V]`` student (and teacher) logits of one update.

    ``rollout_logprobs`` (the rollout engine's log-probs, e.g. vLLM's) feed the truncated importance
    correction of the policy term. Metrics: ``credit_weight_nonzero`` is the mean credit weight over
    tokens with a non-zero advantage (``rlsd`` only; ``w = 1`` where ``A = 0``).
    """
    lam = method.lam_at(step)
    extra = {} if rollout_logprobs is None else {"rollout_logprobs": rollout_logprobs}
    if method.base in ("grpo", "rlsd"):
        # GRPO (lam = 0) needs no teacher: the library then leaves the credit metrics out.
        loss, metrics = rlsd_kernels.rlsd_loss(
            student, teacher, tokens, advantages, eps_w=method.eps_w, eps_w_high=method.eps_w_high, lam=lam,
            loss_agg="token-mean",
            return_metrics=True, **extra,
        )
        if method.uses_credit:
            # The library's credit metrics average over the tokens with a non-zero advantage.
            metrics["credit_weight_nonzero"] = torch.where(metrics["num_credit_tokens"] > 0,
                                                           metrics["credit_weight_mean"], float("nan"))
        return loss, metrics, lam
    if method.base == "opsd":
        loss, metrics = rlsd_kernels.opsd_loss(student, teacher, tokens, divergence=method.div, return_metrics=True)
        return loss, metrics, lam
    loss, metrics = rlsd_kernels.grpo_opsd_loss(
        student, teacher, tokens, advantages, alpha=method.alpha, divergence=method.div, lam=0.0,
        return_metrics=True, **extra,
    )
    return loss, metrics, lam
