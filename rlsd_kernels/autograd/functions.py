"""The autograd Functions: a scalar loss, per-token losses, and log-probs. None of them knows which
loss or which input form it runs: ``form`` (``forms/``) computes, ``loss`` (``call/losses.py``) says
what. The differentiable inputs are the form's ``tensors`` (the logits, or hidden states, weight and
bias); the per-token outputs and flags come back detached. Every backward is first-order only and
refuses ``create_graph=True`` (``first_order``).
"""

from __future__ import annotations

import torch

from ..forms import ops
from ..launch.common import pack_outputs

# The arguments before the form's tensors: (form, loss, inputs, track, validate).
HEAD = 5


def _outputs(ctx, loss, out, flags):
    """The per-token outputs packed into one tensor (``launch.common.pack_outputs``), and the flags."""
    packed = pack_outputs(out, loss.outputs)
    ctx.mark_non_differentiable(packed, flags)
    return packed, flags


def first_order():
    """Raises under ``create_graph=True`` (grad mode on in a backward): the gradients are formed by the
    kernels, outside autograd, so a graph of them would be empty and a second-order term (a gradient
    penalty) silently missing. ``once_differentiable`` would not tell: it marks a gradient only when
    an incoming gradient requires grad, which ``autograd.grad(loss, x, create_graph=True)``'s does not."""
    if torch.is_grad_enabled():
        raise RuntimeError("rlsd_kernels' losses and log-probs are differentiable once: a gradient with "
                           "create_graph=True (second-order terms, a gradient penalty) is not supported")


def _scale(grad, scale):
    """``grad *= scale`` in place (a device op, no host sync)."""
    ops.call_op(ops.scale_op, grad if grad.dim() > 1 else grad.view(1, -1), scale)


class ScalarLossFunction(torch.autograd.Function):
    """``sum(weight * loss)`` with its gradients written in the forward pass; the backward only
    scales them by the incoming gradient (so a second backward through it is refused)."""

    @staticmethod
    def forward(ctx, form, loss, inputs, track, validate, *tensors):
        ctx.set_materialize_grads(False)
        needs = tuple(bool(track and n) for n in ctx.needs_input_grad[HEAD:])
        out, flags, grads = form.loss_forward(loss, tensors, inputs, needs, validate)
        ctx.form, ctx.used = form, False
        # Detached references only: autograd then takes a gradient as .grad without a copy.
        ctx.grads = tuple(None if g is None else g.detach() for g in grads)
        value = torch.dot(inputs.weight, loss.token_loss(out))
        return value, *_outputs(ctx, loss, out, flags)

    @staticmethod
    def backward(ctx, grad_value, *unused):
        first_order()
        if ctx.used:
            raise RuntimeError("the gradients of this loss were computed in its forward pass and are already "
                               "used: backward through it twice is not supported (recompute the loss)")
        grads, ctx.grads, ctx.used = ctx.grads, None, True
        if grad_value is None:
            return (None,) * (HEAD + len(grads))
        # The incoming gradient of the scalar (one element, read on the device).
        scale = grad_value if grad_value.dtype == torch.float32 else grad_value.float()
        for g in grads:
            if g is not None:
                ctx.form.clear_outside(g)
                _scale(g, scale)
        return (None,) * HEAD + grads


class TokenLossFunction(torch.autograd.Function):
    """``weight * loss`` per token (``loss_agg="none"``); the backward reruns the row gradient of the
    form with the forward's per-token statistics and each token's upstream gradient."""

    @staticmethod
    def forward(ctx, form, loss, inputs, track, validate, *tensors):
        ctx.set_materialize_grads(False)
        out, flags, _ = form.loss_forward(loss, tensors, inputs, (False,) * len(tensors), validate)
        ctx.form, ctx.loss, ctx.count = form, loss, len(tensors)
        ctx.save_for_backward(*tensors, form.grad_tokens(inputs.tokens), inputs.weight,
                              *(out[k] for k in loss.saved))
        return inputs.weight * loss.token_loss(out), *_outputs(ctx, loss, out, flags)

    @staticmethod
    def backward(ctx, grad_value, *unused):
        first_order()
        saved = ctx.saved_tensors
        tensors, (tokens, weight, *stats) = saved[: ctx.count], saved[ctx.count:]
        if grad_value is None:
            return (None,) * (HEAD + ctx.count)
        scale = grad_value.float().reshape(-1) * weight
        stats = dict(zip(ctx.loss.saved, stats, strict=True))
        grads = ctx.form.loss_backward(ctx.loss, tensors, tokens, stats, scale, ctx.needs_input_grad[HEAD:])
        return (None,) * HEAD + tuple(grads)


class LogprobsFunction(torch.autograd.Function):
    """Token log-probs and entropies; the backward runs the form's row backward."""

    @staticmethod
    def forward(ctx, form, tokens, temperature, want_entropy, validate, *tensors):
        ctx.set_materialize_grads(False)
        lp, lse, ent = form.logprobs_forward(tensors, tokens, temperature, want_entropy, validate)
        ctx.form, ctx.temperature, ctx.want_entropy, ctx.count = form, temperature, want_entropy, len(tensors)
        ctx.save_for_backward(*tensors, form.grad_tokens(tokens), lse, ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        first_order()
        saved = ctx.saved_tensors
        tensors, (tokens, lse, ent) = saved[: ctx.count], saved[ctx.count:]
        if grad_lp is None and grad_ent is None:
            return (None,) * (HEAD + ctx.count)
        coef = grad_lp.float().contiguous() if grad_lp is not None else torch.zeros_like(lse)
        with_entropy = ctx.want_entropy and grad_ent is not None
        coef_h = grad_ent.float().contiguous() if with_entropy else None
        grads = ctx.form.logprobs_backward(tensors, tokens, lse, coef, coef_h, ent if with_entropy else None,
                                           ctx.temperature, ctx.needs_input_grad[HEAD:])
        return (None,) * HEAD + tuple(grads)
