"""rlsd-kernels: fused Triton kernels for RLSD (RL with verifiable rewards through self-distillation).

Public API (keyword-only options, defaults from the official recipe):

- :func:`rlsd_loss`: the RLSD policy loss from student and teacher logits, fused over the vocabulary.
- :func:`token_logprobs`: per-token log-probs (and entropies) without a log-softmax tensor.

``rlsd_kernels.reference`` holds the plain PyTorch specification of every op.
"""

from . import reference
from .flags import Flag
from .linear import rlsd_linear_loss, token_logprobs_linear
from .logprobs import token_logprobs
from .opsd import grpo_opsd_loss, opsd_loss
from .rlsd import rlsd_loss

__version__ = "0.1.0"

__all__ = [
    "Flag", "grpo_opsd_loss", "opsd_loss", "reference", "rlsd_linear_loss", "rlsd_loss", "token_logprobs",
    "token_logprobs_linear", "__version__",
]
