"""``nn.Module`` wrappers that hold the RLSD hyperparameters and call the functional API."""

from __future__ import annotations

import inspect

from torch import nn

# The public API (the package is initialised before this module is imported) and the checks of its
# keywords.
from . import rlsd_linear_loss, rlsd_loss
from .api.compose import check_options

_PER_CALL = {"teacher_logprobs", "teacher_hidden", "bias", "old_logprobs", "mask", "normalizer", "credit_mask",
             "rollout_logprobs", "ref_logprobs", "is_weights", "cu_seqlens", "process_group"}


def _option_names(fn):
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


class _Wrapper(nn.Module):
    _fn = None

    def __init__(self, **options):
        super().__init__()
        names = _option_names(type(self)._fn)
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown options {unknown}; "
                            f"known: {sorted(names - _PER_CALL)}")
        tensors = sorted(set(options) & _PER_CALL)
        if tensors:
            raise TypeError(f"{tensors} are per-call inputs: pass them to forward()")
        # A bad value fails here, where it is set, not at the first training step.
        check_options(options)
        self.options = dict(options)

    @property
    def lam(self):
        return self.options.get("lam", 1.0)

    @lam.setter
    def lam(self, value):
        """Set ``lam`` for the next calls (e.g. ``loss.lam = rlsd_kernels.lam_schedule(step)``)."""
        check_options({"lam": value})
        self.options["lam"] = value

    def _call(self, *args, **per_call):
        return type(self)._fn(*args, **{**self.options, **per_call})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))


class RLSDLoss(_Wrapper):
    """:func:`rlsd_kernels.rlsd_loss` with fixed options. Options left out keep the functional's
    defaults (the official recipe); per-call tensors (``teacher_logprobs``, ``old_logprobs``,
    ``mask``, ``rollout_logprobs``, ``ref_logprobs``, ...) and per-call overrides go to ``forward``::

        loss_fn = RLSDLoss(loss_agg="seq-mean-token-mean", dual_clip=None)
        loss_fn.lam = rlsd_kernels.lam_schedule(step)
        loss = loss_fn(student_logits, teacher_logits, tokens, advantages, old_logprobs=old, mask=mask)

    A ``logits[:, :-1]`` view passed through the module gets its gradient through autograd (a
    zero-filled ``[B, T+1, V]`` buffer behind the view): the module's frame holds the view, so the
    functional cannot tell that no one else observes its gradient. ``rlsd_loss(logits[:, :-1], ...)``
    writes the base's gradient directly.
    """

    _fn = staticmethod(rlsd_loss)

    def forward(self, student_logits, teacher_logits, tokens, advantages, **per_call):
        return self._call(student_logits, teacher_logits, tokens, advantages, **per_call)


class RLSDLinearLoss(_Wrapper):
    """:func:`rlsd_kernels.rlsd_linear_loss` with fixed options: the loss from hidden states and the
    lm_head weight, never forming the ``[N, V]`` logits. ``teacher_hidden`` or ``teacher_logprobs``
    (and ``bias``) are per call."""

    _fn = staticmethod(rlsd_linear_loss)

    def forward(self, student_hidden, weight, tokens, advantages, **per_call):
        return self._call(student_hidden, weight, tokens, advantages, **per_call)
