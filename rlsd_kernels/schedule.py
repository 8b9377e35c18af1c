"""The credit-mixing schedule of the official RLSD run."""

from __future__ import annotations

from .scalars import real_number


def lam_schedule(step: int, *, start: float = 0.5, end: float = 0.0, decay_steps: int = 60, warmup_steps: int = 0):
    """``lam`` for a training step: the official run starts at 0.5 and decays linearly to 0 over 60
    steps, after which it is plain DAPO-clip GRPO.

    With ``warmup_steps`` the value first rises linearly from 0 to ``start`` (reaching it at step
    ``warmup_steps``), then decays over the next ``decay_steps``. Steps count from 0.
    """
    step, start, end = real_number("step", step), real_number("start", start), real_number("end", end)
    decay_steps, warmup_steps = real_number("decay_steps", decay_steps), real_number("warmup_steps", warmup_steps)
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
