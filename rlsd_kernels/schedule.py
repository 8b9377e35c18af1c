"""The credit-mixing schedule of the official RLSD run."""

from __future__ import annotations

import math
import numbers

import torch


def _real(name, value):
    """``value`` as a float: a real number (numpy's too) or a one-element real tensor; else
    ``TypeError`` naming ``name``. NaN raises ``ValueError``: a NaN step or length gives a NaN lam."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)} and dtype "
                            f"{value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def lam_schedule(step: int, *, start: float = 0.5, end: float = 0.0, decay_steps: int = 60, warmup_steps: int = 0):
    """``lam`` for a training step: the official run starts at 0.5 and decays linearly to 0 over 60
    steps, after which it is plain DAPO-clip GRPO.

    With ``warmup_steps`` the value first rises linearly from 0 to ``start`` (reaching it at step
    ``warmup_steps``), then decays over the next ``decay_steps``. Steps count from 0.
    """
    step, start, end = _real("step", step), _real("start", start), _real("end", end)
    decay_steps, warmup_steps = _real("decay_steps", decay_steps), _real("warmup_steps", warmup_steps)
    if step < 0 or warmup_steps < 0 or decay_steps < 0:
        raise ValueError(f"step, warmup_steps and decay_steps must be >= 0, got {step}, {warmup_steps}, {decay_steps}")
    if not (0 <= start <= 1 and 0 <= end <= 1):
        raise ValueError(f"start and end must be in [0, 1], got {start} and {end}")
    if step < warmup_steps:
        return start * step / warmup_steps
    progress = step - warmup_steps
    if decay_steps == 0 or progress >= decay_steps:
        return end
    return start + (end - start) * progress / decay_steps
