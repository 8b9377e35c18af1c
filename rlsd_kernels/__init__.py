"""rlsd-kernels: fused Triton kernels for RLSD (RL with verifiable rewards through self-distillation).

Public API (keyword-only options, defaults from the official recipe; ``lam`` defaults to 1, the recipe
passes ``lam_schedule(step)``):

- :func:`rlsd_loss`: the RLSD policy loss from student and teacher logits, fused over the vocabulary.
- :func:`rlsd_linear_loss`: the same from hidden states and the lm_head weight, never materialising
  the logits.
- :func:`token_logprobs`, :func:`token_logprobs_linear`: per-token log-probs (and entropies).
- :func:`opsd_loss`, :func:`grpo_opsd_loss`: the on-policy self-distillation baselines, and
  :func:`opsd_linear_loss`, :func:`grpo_opsd_linear_loss` from hidden states.
- :func:`lam_schedule`: the official schedule of the credit mix ``lam``.
- :func:`check_deferred`: raise the errors found by earlier calls with ``validate="deferred"``.

Every loss and log-prob function takes ``process_group`` for vocabulary-parallel inputs.
``rlsd_kernels.reference`` holds the plain PyTorch specification of every op. The layers, from the
bottom: ``reference`` / ``flags`` / ``scalars`` / ``schedule``; ``kernels/``; ``launch/``; ``call/``; ``forms/``;
``autograd/``; ``api/`` (README: Layout).
"""

from . import reference
from .api.compose import check_deferred
from .api.linear import grpo_opsd_linear_loss, opsd_linear_loss, rlsd_linear_loss, token_logprobs_linear
from .api.logprobs import token_logprobs
from .api.losses import grpo_opsd_loss, opsd_loss, rlsd_loss
from .schedule import lam_schedule

__version__ = "0.2.0"

__all__ = [
    "check_deferred",
    "grpo_opsd_linear_loss",
    "grpo_opsd_loss",
    "lam_schedule",
    "opsd_linear_loss",
    "opsd_loss",
    "reference",
    "rlsd_linear_loss",
    "rlsd_loss",
    "token_logprobs",
    "token_logprobs_linear",
    "__version__",
]
