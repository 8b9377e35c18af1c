"""The custom ops of the logits form, so that ``torch.compile(fullgraph=True)`` treats each launch as
one opaque node. A call's named inputs and options cross the op boundary as lists of tensors, floats
and ints, packed and unpacked by field name (``pack``/``unpack``): no position is written by hand.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..call.losses import DistillLoss, PolicyLoss
from ..call.options import DistillOptions, PolicyOptions
from ..launch import common
from ..launch.logprobs import logprobs_bwd, logprobs_fwd
from ..launch.rlsd import scale_grad_
from ..launch.terms import TokenInputs

STAT_NAMES = ("lse", "lse_t", "k", "d_div", "d_lp", "entropy")


def custom_op(name: str, *, mutates_args):
    """``torch.library.custom_op`` that also keeps the plain function, for ``call_op`` in eager mode."""

    def register(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op.eager = fn
        return op

    return register


def call_op(op, *args):
    """The registered op under torch.compile (opaque to tracing); the plain function otherwise,
    skipping the dispatcher's per-call cost (the op bodies are where autograd cannot see)."""
    return op(*args) if torch.compiler.is_compiling() else op.eager(*args)


INPUT_NAMES = tuple(f.name for f in dataclasses.fields(TokenInputs))


def _pack_fields(obj, floats, ints):
    for name, default, meta in obj.SPECS:
        value = getattr(obj, name)
        if meta.get("choices") is not None:
            ints.append(meta["choices"].index(value))
        elif type(default) in (bool, int):
            ints.append(int(value))
        else:
            floats.append(math.nan if value is None else float(value))


def _unpack_fields(cls, floats, ints):
    values = {}
    for name, default, meta in cls.SPECS:
        if meta.get("choices") is not None:
            values[name] = meta["choices"][ints.pop(0)]
        elif type(default) in (bool, int):
            values[name] = type(default)(ints.pop(0))
        else:
            v = floats.pop(0)
            values[name] = None if math.isnan(v) else v
    return cls(**values)


# Eager calls repeat the same options: their packed numbers, and the loss rebuilt from those numbers
# (with its checks), are kept by value. Bounded: a key that stops matching only costs a rebuild.
_PACKED: dict = {}
_UNPACKED: dict = {}
_CACHE_SIZE = 256
_PLAIN = frozenset((int, float, bool))


def _remember(cache, key, value):
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def _pack_options(loss):
    floats, ints = [], [int(loss.distill is not None)]
    _pack_fields(loss.options, floats, ints)
    if loss.distill is not None:
        _pack_fields(loss.distill, floats, ints)
    return floats, ints


def pack(loss, inputs: TokenInputs):
    """``(tensors, floats, ints)``: the loss's options and the call's per-token inputs, by field."""
    tensors = [getattr(inputs, name) for name in INPUT_NAMES]
    if torch.compiler.is_compiling():
        return (tensors, *_pack_options(loss))
    key = (loss.options, loss.distill)
    packed = _PACKED.get(key)
    if packed is None:
        floats, ints = _pack_options(loss)
        packed = _remember(_PACKED, key, (tuple(floats), tuple(ints)))
    return tensors, list(packed[0]), list(packed[1])


def _unpack_loss(floats, ints):
    floats, ints = list(floats), list(ints)
    has_distill = bool(ints.pop(0))
    options = _unpack_fields(PolicyOptions, floats, ints)
    return DistillLoss(options, _unpack_fields(DistillOptions, floats, ints)) if has_distill else PolicyLoss(options)


def unpack(tensors, floats, ints):
    """The loss and the ``TokenInputs`` that ``pack`` took apart."""
    inputs = TokenInputs(**dict(zip(INPUT_NAMES, tensors, strict=True)))
    key = (tuple(floats), tuple(ints))
    if not _PLAIN.issuperset(map(type, key[0] + key[1])):
        # A size traced as a symbol (torch.compile with dynamic shapes: ``num_seqs``) cannot key the cache.
        return _unpack_loss(floats, ints), inputs
    loss = _UNPACKED.get(key)
    if loss is None:
        loss = _remember(_UNPACKED, key, _unpack_loss(floats, ints))
    return loss, inputs


NAMES = {"tokens": "tokens", "student": "student_logits", "teacher": "teacher_logits"}


def _forward(loss, inputs, student, teacher, grad, validate):
    out, flags = loss.forward(student, teacher, inputs, grad)
    if validate:
        common.raise_on_error_flags(flags, inputs.tokens, student.shape[-1], NAMES)
    return common.pack_outputs(out, loss.outputs), flags


def grad_shape(student, pad_before, pad_after):
    if not (pad_before or pad_after):
        return student.shape
    b, t, v = student.shape
    return (b, pad_before + t + pad_after, v)


def _forward_grad(loss, inputs, student, teacher, write_grad, validate, pad_before, pad_after):
    """``(packed outputs, flags, gradient or None)``; with pads, the gradient of the logits' base."""
    grad = dest = None
    if write_grad:
        grad = common.empty(grad_shape(student, pad_before, pad_after), dtype=student.dtype, device=student.device)
        dest = grad
        if pad_before or pad_after:
            dest = grad[:, pad_before:pad_before + student.shape[1]]
            grad[:, :pad_before].zero_()
            grad[:, pad_before + student.shape[1]:].zero_()
    return (*_forward(loss, inputs, student, teacher, dest, validate), grad)


def loss_forward(loss, inputs, student, teacher, write_grad, validate, pads=(0, 0), inplace=False):
    """``(packed outputs, flags, gradient or None)`` of ``loss`` on the logits (``common.pack_outputs``),
    the gradient written in place when ``inplace``. Under torch.compile through the custom ops below;
    in eager mode their code runs directly, without packing the options."""
    if torch.compiler.is_compiling():
        args = (student, teacher, *pack(loss, inputs))
        if write_grad and inplace:
            return (*loss_fwd_inplace_op(*args, validate), student)
        packed, flags, grad = loss_fwd_op(*args, write_grad, validate, *pads)
        return packed, flags, grad if write_grad else None
    if write_grad and inplace:
        return (*_forward(loss, inputs, student, teacher, student, validate), student)
    return _forward_grad(loss, inputs, student, teacher, write_grad, validate, *pads)


def _fake_outputs(student, tensors, floats, ints):
    loss, _ = unpack(tensors, floats, ints)
    n = tensors[0].numel()
    return [student.new_empty((len(loss.outputs), n), dtype=torch.float32), student.new_empty((n,), dtype=torch.int32)]


@custom_op("rlsd_kernels::loss_fwd", mutates_args=())
def loss_fwd_op(
    student: torch.Tensor, teacher: torch.Tensor | None, tensors: list[torch.Tensor | None], floats: list[float],
    ints: list[int], write_grad: bool, validate: bool, pad_before: int, pad_after: int,
) -> list[torch.Tensor]:
    """The per-token outputs packed (``common.pack_outputs``), the flags, and the gradient (empty
    unless ``write_grad``). With ``pad_before`` / ``pad_after`` the gradient is for ``base``, of which
    the logits are ``base[:, pad_before:-pad_after]``, with zero rows there (see ``logits.slice_of_base``)."""
    loss, inputs = unpack(tensors, floats, ints)
    packed, flags, grad = _forward_grad(loss, inputs, student, teacher, write_grad, validate, pad_before, pad_after)
    return [packed, flags, grad if grad is not None else student.new_empty(0)]


@loss_fwd_op.register_fake
def _(student, teacher, tensors, floats, ints, write_grad, validate, pad_before, pad_after):
    shape = grad_shape(student, pad_before, pad_after) if write_grad else (0,)
    return [*_fake_outputs(student, tensors, floats, ints), student.new_empty(shape)]


@custom_op("rlsd_kernels::loss_fwd_", mutates_args=("student",))
def loss_fwd_inplace_op(
    student: torch.Tensor, teacher: torch.Tensor | None, tensors: list[torch.Tensor | None], floats: list[float],
    ints: list[int], validate: bool,
) -> list[torch.Tensor]:
    return list(_forward(*unpack(tensors, floats, ints), student, teacher, student, validate))


@loss_fwd_inplace_op.register_fake
def _(student, teacher, tensors, floats, ints, validate):
    return _fake_outputs(student, tensors, floats, ints)


def loss_backward(loss, student, teacher, tokens, scale, stats, inplace=False):
    """The row gradient of ``sum(scale * loss)`` from the forward's ``stats`` (by name), written into
    ``student`` when ``inplace``; through the custom ops under torch.compile."""
    if not torch.compiler.is_compiling():
        return loss.backward(student, teacher, tokens, stats, scale, out=student if inplace else None)
    _, floats, ints = pack(loss, _NO_INPUTS)
    args = (student, teacher, tokens, scale, [stats.get(k) for k in STAT_NAMES], floats, ints)
    if inplace:
        loss_bwd_inplace_op(*args)
        return student
    return loss_bwd_op(*args)


def _backward(student, teacher, tokens, scale, stats, floats, ints, out):
    loss, _ = unpack([None] * len(INPUT_NAMES), floats, ints)
    named = {k: v for k, v in zip(STAT_NAMES, stats, strict=True) if v is not None}
    return loss.backward(student, teacher, tokens, named, scale, out=out)


@custom_op("rlsd_kernels::loss_bwd", mutates_args=())
def loss_bwd_op(
    student: torch.Tensor, teacher: torch.Tensor | None, tokens: torch.Tensor, scale: torch.Tensor,
    stats: list[torch.Tensor | None], floats: list[float], ints: list[int],
) -> torch.Tensor:
    """The row gradient of ``sum(scale * loss)`` from the forward's statistics (``STAT_NAMES``)."""
    return _backward(student, teacher, tokens, scale, stats, floats, ints, None)


@loss_bwd_op.register_fake
def _(student, teacher, tokens, scale, stats, floats, ints):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


@custom_op("rlsd_kernels::loss_bwd_", mutates_args=("student",))
def loss_bwd_inplace_op(
    student: torch.Tensor, teacher: torch.Tensor | None, tokens: torch.Tensor, scale: torch.Tensor,
    stats: list[torch.Tensor | None], floats: list[float], ints: list[int],
) -> None:
    _backward(student, teacher, tokens, scale, stats, floats, ints, student)


@loss_bwd_inplace_op.register_fake
def _(student, teacher, tokens, scale, stats, floats, ints):
    return None


@custom_op("rlsd_kernels::logprobs_fwd", mutates_args=())
def logprobs_fwd_op(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, entropy: bool, validate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lp, lse, ent, flags = logprobs_fwd(logits, tokens, temperature, entropy)
    if validate:
        common.raise_on_error_flags(flags, tokens.reshape(-1), logits.shape[-1], {"tokens": "tokens",
                                                                                  "student": "logits"})
    return lp, lse, ent


@logprobs_fwd_op.register_fake
def _(logits, tokens, temperature, entropy, validate):
    n = tokens.numel()
    return tuple(logits.new_empty((k,), dtype=torch.float32) for k in (n, n, n if entropy else 0))


@custom_op("rlsd_kernels::logprobs_bwd", mutates_args=())
def logprobs_bwd_op(
    logits: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, coef_h: torch.Tensor | None,
    entropy: torch.Tensor | None, temperature: float,
) -> torch.Tensor:
    return logprobs_bwd(logits, tokens, lse, coef, coef_h, entropy, temperature)


@logprobs_bwd_op.register_fake
def _(logits, tokens, lse, coef, coef_h, entropy, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@custom_op("rlsd_kernels::scale_grad_", mutates_args=("grad",))
def scale_op(grad: torch.Tensor, scale: torch.Tensor) -> None:
    scale_grad_(grad, scale)


@scale_op.register_fake
def _(grad, scale):
    return None


class _NoInputs:
    """Stands for the per-token inputs where only the options are packed."""

    def __getattr__(self, name):
        return None


_NO_INPUTS = _NoInputs()
