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

import math
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
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "sampled_token")  # opsd_loss's ``divergence``
# The options each method takes (an option another method takes would be ignored here, so it is refused).
OPTIONS = {
    "grpo": (),
    "rlsd": ("eps_w", "eps_w_high", "lam", "lam0", "decay"),
    "opsd": ("div",),
    "grpo+opsd": ("alpha", "div"),
}


def _unit_open(v):
    return 0 <= v < 1


def _unit_closed(v):
    return 0 <= v <= 1


def _non_negative(v):
    return v >= 0


# option -> (parse, accepts, what the value must be)
_PARSE = {
    "eps_w": (float, _unit_open, "a number in [0, 1)"),
    "eps_w_high": (float, _non_negative, "a finite number >= 0"),
    "lam": (float, _unit_closed, "a number in [0, 1]"),
    "lam0": (float, _unit_closed, "a number in [0, 1]"),
    "decay": (int, _non_negative, "a whole number of steps >= 0"),
    "div": (str, DIVERGENCES.__contains__, "one of " + ", ".join(DIVERGENCES)),
    "alpha": (float, _non_negative, "a finite number >= 0"),
}


def _takes(base: str) -> str:
    return ", ".join(OPTIONS[base]) or "no options"


def parse_method(spec: str) -> Method:
    """``rlsd:lam=1:eps_w=0.8`` -> ``Method``; an unknown name, an option the method does not take, a
    value out of range or an option given twice raise ``ValueError`` naming the spec and the option.
    """
    base, *options = spec.split(":")
    if base not in BASES:
        raise ValueError(f"method must start with one of {', '.join(BASES)}, got {spec!r}")
    method, seen = Method(base=base, label=spec), set()
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in OPTIONS[base]:
            raise ValueError(f"method option {option!r} in {spec!r}: {base} takes {_takes(base)} (as {base}:key=value)")
        if key in seen:
            raise ValueError(f"method {spec!r}: option {key!r} given twice")
        seen.add(key)
        parse, accepts, what = _PARSE[key]
        try:
            parsed = parse(value)
        except ValueError:
            parsed = None
        if parsed is None or (parse is float and not math.isfinite(parsed)) or not accepts(parsed):
            raise ValueError(f"method {spec!r}: option {key} must be {what}, got {value!r}")
        method = replace(method, **{key: parsed})
    if "lam" in seen and seen & {"lam0", "decay"}:
        raise ValueError(f"method {spec!r}: lam (a constant) and lam0/decay (the schedule) exclude each other")
    return method


def same_method(a: Method, b: Method) -> bool:
    """Whether two parsed specs train the same thing (``rlsd:lam=1`` and ``rlsd:lam=1.0``)."""
    return replace(a, label="") == replace(b, label="")


def method_loss(method: Method, step: int, student, teacher, tokens, advantages, rollout_logprobs=None, *,
                temperature: float = 1.0):
    """The loss and metrics for packed ``[N, V]`` student (and teacher) logits of one update.

    The logits are scored at the rollout ``temperature`` (``softmax(z / temperature)``, the
    distribution the rollouts were sampled from), so the rollout engine's log-probs (after the
    temperature, as the built-in sampler's and vLLM's) match the student's on-policy.

    ``rollout_logprobs`` (the rollout engine's log-probs, e.g. vLLM's) feed the truncated importance
    correction of the policy term. Metrics: ``credit_weight_nonzero`` is the mean credit weight over
    tokens with a non-zero advantage (``rlsd`` only; ``w = 1`` where ``A = 0``).
    """
    lam = method.lam_at(step)
    extra = {"temperature": temperature}
    if rollout_logprobs is not None:
        extra["rollout_logprobs"] = rollout_logprobs
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
        loss, metrics = rlsd_kernels.opsd_loss(student, teacher, tokens, divergence=method.div, temperature=temperature,
                                                return_metrics=True)
        return loss, metrics, lam
    loss, metrics = rlsd_kernels.grpo_opsd_loss(
        student, teacher, tokens, advantages, alpha=method.alpha, divergence=method.div, lam=0.0,
        return_metrics=True, **extra,
    )
    return loss, metrics, lam
