"""Inputs for the loss tests: logits as views into NaN-filled buffers (canaries), and the reference.

The interpreter does not catch out-of-bounds access, so every logits tensor is a view into a larger
buffer whose unviewed elements are NaN: a kernel that reads past a row makes the result NaN, and one
that writes past it changes a canary that ``check_canaries`` looks at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rlsd_kernels import reference


@dataclass
class LogitsBuffer:
    buffer: torch.Tensor  # the NaN-padded storage
    view: torch.Tensor  # what the op gets
    inside: torch.Tensor  # bool, True where the view's elements live in the buffer
    canary: float = float("nan")  # the value of every element outside the view

    def fill_canaries(self, value):
        """Finite canaries: a kernel that reads one gets a finite wrong result (no NaN that would send
        the row to an exact pass), so over-reads show in the comparison with the reference."""
        self.buffer.data[~self.inside] = value
        self.canary = value
        return self

    def check_canaries(self, what):
        outside = self.buffer.detach()[~self.inside].float()
        kept = torch.isnan(outside) if math.isnan(self.canary) else outside == self.canary
        assert kept.all(), f"{what}: an element outside the logits view was written"


def logits_buffer(token_shape, vocab, dtype, device, *, layout="view", scale=2.0, generator=None):
    """Random logits ``[*token_shape, V]``; ``layout`` is ``view`` (a ``x[:, :-1]``-style slice of a
    taller, wider buffer), ``contiguous``, or ``packed`` (``[N, V]`` slice of a wider buffer)."""
    pad = 3
    if len(token_shape) == 2:
        b, t = token_shape
        extra_rows = 2 if layout == "view" else 0
        width = vocab + (2 * pad if layout == "view" else 0)
        buf = torch.full((b, t + extra_rows, width), float("nan"), dtype=torch.float32, device=device)
        col0 = pad if layout == "view" else 0
        idx = (slice(None), slice(0, t), slice(col0, col0 + vocab))
    else:
        (n,) = token_shape
        buf = torch.full((n + 2, vocab + 2 * pad), float("nan"), dtype=torch.float32, device=device)
        idx = (slice(1, n + 1), slice(pad, pad + vocab))
    values = torch.randn(buf[idx].shape, generator=generator, device=device) * scale
    buf[idx] = values
    buf = buf.to(dtype)
    inside = torch.zeros(buf.shape, dtype=torch.bool, device=device)
    inside[idx] = True
    return LogitsBuffer(buf, buf[idx], inside)


@dataclass
class Case:
    """One set of inputs for ``rlsd_loss`` and the keyword arguments to call it with."""

    student: LogitsBuffer
    teacher: LogitsBuffer | None
    tokens: torch.Tensor
    advantages: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    def call(self, fn, student_logits, **extra):
        teacher = None if self.teacher is None else self.teacher.view
        return fn(student_logits, teacher, self.tokens, self.advantages, **{**self.kwargs, **extra})

    def reference(self, **extra):
        """Loss (and metrics) from ``reference.rlsd_loss`` in float64, and the student gradient function."""
        student = self.student.view.detach().double().requires_grad_()
        teacher = None if self.teacher is None else self.teacher.view.double()
        kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in {**self.kwargs, **extra}.items()}
        kwargs.pop("inplace_backward", None)
        kwargs.pop("validate", None)
        out = reference.rlsd_loss(student, teacher, self.tokens, self.advantages.double(), **kwargs)
        return student, out


def make_case(
    device,
    *,
    dtype=torch.float32,
    batch=3,
    seqlen=5,
    vocab=37,
    layout="view",
    adv_shape="B",
    mask="partial",
    teacher="logits",
    ratio="near",
    lam=1.0,
    temperature=1.0,
    **kwargs,
):
    """A random case; each keyword picks one axis of the test matrix.

    ``ratio``: ``None`` (on-policy), ``"near"`` (old log-probs within a few percent), or a number
    forcing ``rho`` to it for every token.
    """
    g = torch.Generator(device=device).manual_seed(1234)
    packed = layout == "packed"
    token_shape = (batch * seqlen,) if packed else (batch, seqlen)
    student = logits_buffer(token_shape, vocab, dtype, device, layout=layout, generator=g)
    tokens = torch.randint(0, vocab, token_shape, generator=g, device=device)
    n_seq = batch
    adv = {
        "B": lambda: torch.randn(n_seq, generator=g, device=device),
        "B1": lambda: torch.randn(n_seq, 1, generator=g, device=device),
        "BT": lambda: torch.randn(token_shape, generator=g, device=device),
    }[adv_shape if not packed else "BT"]()
    m = None
    if mask == "partial":
        m = torch.rand(token_shape, generator=g, device=device) > 0.3
    elif mask == "seq":
        # A fully masked sequence next to full ones; ids there are out of range on purpose.
        m = torch.ones(token_shape, dtype=torch.bool, device=device)
        if packed:
            m[:seqlen] = False
            tokens[:seqlen] = vocab + 5
        else:
            m[0] = False
            tokens[0] = vocab + 5
    elif mask == "float":
        m = torch.rand(token_shape, generator=g, device=device)
    lp_s = reference.token_logprobs(student.view.detach().double(), torch.where(tokens < vocab, tokens, 0),
                                    temperature=temperature).float()
    t_buf, extra = None, {}
    if teacher == "logits":
        t_buf = logits_buffer(token_shape, vocab, dtype, device, layout=layout, generator=g)
    else:
        extra["teacher_logprobs"] = lp_s + torch.randn(token_shape, generator=g, device=device) * 0.3
    if ratio == "near":
        extra["old_logprobs"] = lp_s + torch.randn(token_shape, generator=g, device=device) * 0.05
    elif ratio is not None:
        extra["old_logprobs"] = lp_s - math.log(ratio)
    if m is not None:
        extra["mask"] = m
    extra.update(lam=lam, temperature=temperature, **kwargs)
    return Case(student, t_buf, tokens, adv, extra)
