"""The logits form: the student's (and teacher's) logits are given, ``[B, T, V]`` views or packed
``[N, V]``, read in place by strides. Its launches go through the custom ops of ``ops.py``, so this
form also runs under ``torch.compile(fullgraph=True)``.

For a scalar loss the gradient is written in the forward pass. When the logits are
``base[:, start:start + T]`` of a base that requires grad (``logits[:, :-1]``), the gradient is
written for the base directly, with zero rows outside the slice, instead of autograd's zero-filled
copy of a slice's backward (``slice_of_base``).
"""

from __future__ import annotations

import sys

import torch

from ..launch.common import unpack_outputs
from . import ops
from .kept import Kept


def slice_of_base(x, temporary):
    """``(base, start)`` when the gradient of ``x`` may be written for its base: ``x`` is
    ``base[:, start:start + T]`` of a contiguous ``[B, T', V]`` tensor that requires grad, its autograd
    history is that slice of the base, and nothing could observe ``x``'s own gradient (it is a
    ``temporary`` argument that no one else holds, with no hooks and no retained gradient). Else
    None, and the gradient goes to ``x`` through autograd. Eager only."""
    base = x._base
    if not temporary or base is None or torch.compiler.is_compiling() or x.dim() != 3 or base.dim() != 3:
        return None
    if not (base.requires_grad and base.is_contiguous() and x.requires_grad) or x.retains_grad or x._backward_hooks:
        return None
    fn = x.grad_fn
    if fn is None or "Slice" not in type(fn).__name__ or len(fn.next_functions) != 1:
        return None
    parent = fn.next_functions[0][0]
    if parent is None or (parent is not base.grad_fn and getattr(parent, "variable", None) is not base):
        return None
    if x.stride() != base.stride() or x.shape[0] != base.shape[0] or x.shape[2] != base.shape[2]:
        return None
    offset = x.storage_offset() - base.storage_offset()
    start = offset // base.stride(1)
    if offset % base.stride(1) or start + x.shape[1] > base.shape[1]:
        return None
    return base, start


def _count(x):
    return sys.getrefcount(x)


def is_temporary(refcount):
    """Whether an argument whose ``sys.getrefcount`` at the entry of a public function is ``refcount``
    is held by that call alone (``f(x[:, :-1])``); a named view counts one more. The count is compared
    with a fresh temporary's in the same interpreter state: a frame-evaluation hook (torch.compile
    leaves one installed) adds a reference to every call's arguments."""
    return refcount <= _count(object())


class LogitsForm:
    """``tensors`` is ``(student,)`` (or the student's ``base`` when ``start`` is set); the teacher
    logits (or None) and the in-place choice are attributes."""

    eager_only = False
    names = {"tokens": "tokens", "student": "student_logits", "teacher": "teacher_logits"}

    def __init__(self, teacher=None, *, start=None, length=None, inplace=False):
        self.teacher, self.start, self.length, self.inplace = teacher, start, length, inplace
        self.kept_teacher = Kept(teacher, "teacher_logits")

    def student(self, tensors):
        x = tensors[0]
        return x if self.start is None else x[:, self.start:self.start + self.length]

    def vocab(self, tensors):
        return tensors[0].shape[-1]

    def loss_forward(self, loss, tensors, inputs, needs, validate):
        """``(outputs, flags, grads)``: the per-token outputs of ``loss`` and, where ``needs`` asks,
        the gradient of ``sum(weight * loss)`` for ``tensors``."""
        student, base = self.student(tensors), tensors[0]
        write = bool(needs[0])
        pads = (0, 0) if self.start is None else (self.start, base.shape[1] - self.start - self.length)
        packed, flags, grad = ops.loss_forward(loss, inputs, student, self.teacher, write, validate, pads,
                                               self.inplace)
        if write and self.inplace:
            grad = base
        return unpack_outputs(packed, loss.outputs), flags, (grad,)

    def clear_outside(self, grad):
        """In place, the base's rows outside the slice still hold logits: zero them."""
        if self.inplace and self.start is not None:
            grad[:, :self.start].zero_()
            grad[:, self.start + self.length:].zero_()

    def loss_backward(self, loss, tensors, tokens, stats, scale, needs):
        """The gradient of ``sum(scale * loss)`` for ``tensors`` from the forward's ``stats``."""
        if not needs[0]:
            return (None,)
        if loss.pairs_teacher:
            self.kept_teacher.check()
        return (ops.loss_backward(loss, self.student(tensors), self.teacher, tokens, scale.contiguous(), stats,
                                  self.inplace),)

    def logprobs_forward(self, tensors, tokens, temperature, entropy, validate):
        return ops.call_op(ops.logprobs_fwd_op, tensors[0], tokens, temperature, entropy, validate)

    def logprobs_backward(self, tensors, tokens, lse, coef, coef_h, entropy, temperature, needs):
        if not needs[0]:
            return (None,)
        return (ops.call_op(ops.logprobs_bwd_op, tensors[0], tokens, lse, coef, coef_h, entropy, temperature),)

    def grad_tokens(self, tokens):
        """The ids the backward takes (a sharded form maps them to its columns)."""
        return tokens

    def map_tiles(self, tensors, fn, which="student"):
        """``fn(logits, teacher logits or None, token slice)`` on the whole rows (one tile)."""
        student = self.student(tensors)
        if which == "teacher":
            return fn(self.teacher, None, slice(None))
        return fn(student, self.teacher if which == "pair" else None, slice(None))
