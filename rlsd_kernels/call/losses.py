"""The losses as data over the launchers: what a loss computes on a tile of student (and teacher)
logits rows, its per-token loss, and the row gradient of a per-token scaled sum of it. The input
forms (``forms/``) decide where the rows come from and where their gradient goes; they call these
and never a launcher of a particular loss.
"""

from __future__ import annotations

import dataclasses

import torch

from ..launch.logprobs import logprobs_bwd
from ..launch.opsd import opsd_bwd, opsd_fwd
from ..launch.rlsd import rlsd_fwd
from ..launch.terms import OUTPUTS, TokenInputs
from ..launch.torch_opsd import SAMPLED, grad_coefficients, output_names
from .metrics import distill_metrics, policy_metrics
from .options import DistillOptions, PolicyOptions


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """The policy loss (RLSD; GRPO/DAPO with ``lam=0``)."""

    options: PolicyOptions
    # False for GRPO without a teacher (lam = 0): its credit metrics are left out.
    has_teacher: bool = True
    distill = None
    # The per-token statistics its row gradient needs.
    saved = ("lse", "d_lp", "entropy")
    # Whether a tile needs the teacher's logits rows next to the student's (else its log-probs do).
    pairs_teacher = False

    @property
    def outputs(self):
        return OUTPUTS

    def forward(self, student, teacher, inputs: TokenInputs, grad):
        """``(outputs, flags)`` of the rows; writes ``weight * dl/dz`` into ``grad`` unless None."""
        return rlsd_fwd(student, teacher, inputs, self.options, grad)

    def token_loss(self, out):
        return out["loss"]

    def backward(self, student, teacher, tokens, stats, scale, out=None):
        """The row gradient of ``sum(scale * loss)`` from the forward's per-token ``stats``."""
        coef = (scale * stats["d_lp"]).contiguous()
        coef_h = (scale * -self.options.entropy_coef).contiguous() if self.options.entropy_coef != 0 else None
        return logprobs_bwd(student, tokens, stats["lse"], coef, coef_h, stats["entropy"], self.options.temperature,
                            out=out)

    def metrics(self, out, flags, mask, inputs):
        return policy_metrics(out, flags, mask, inputs, self.options, self.has_teacher)


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """On-policy self-distillation, alone or added to the policy loss (``distill.grpo``)."""

    options: PolicyOptions
    distill: DistillOptions

    @property
    def outputs(self):
        return output_names(self.distill.grpo)

    @property
    def saved(self):
        return ("lse", "lse_t", "k", "d_div") + (("d_lp", "entropy") if self.distill.grpo else ())

    @property
    def pairs_teacher(self):
        return self.distill.div != SAMPLED

    def forward(self, student, teacher, inputs: TokenInputs, grad):
        return opsd_fwd(student, teacher, inputs, self.options, self.distill, grad)

    def token_loss(self, out):
        distill = self.distill.alpha * out["opsd"]
        return out["loss"] + distill if self.distill.grpo else distill

    def backward(self, student, teacher, tokens, stats, scale, out=None):
        stats = dict(stats)
        stats.setdefault("entropy", None)
        coefs = grad_coefficients(stats, scale, self.options.entropy_coef, self.distill)
        teacher = None if self.distill.div == SAMPLED else teacher
        return opsd_bwd(student, teacher, tokens, stats, coefs, self.options.temperature, self.distill, out=out)

    def metrics(self, out, flags, mask, inputs):
        return distill_metrics(out, flags, mask, inputs, self.options, self.distill)


def empty_outputs(loss, mask):
    """Per-token outputs of a call without tokens, for its metrics."""
    return {k: mask for k in loss.outputs}


def scaled_loss(loss, out, weight):
    """The per-token losses times each token's share of the aggregated loss."""
    return weight * loss.token_loss(out)


def zero_flags(mask):
    return torch.zeros_like(mask, dtype=torch.int32)
