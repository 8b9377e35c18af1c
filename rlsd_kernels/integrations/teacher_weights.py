"""The teacher's weights under one of four policies (live, frozen, snapshot, EMA): the copies, their
refresh after optimizer steps, and the EMA's float32 accumulators."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

TEACHER_POLICIES = ("live", "frozen", "snapshot", "ema")


def fresh_copy(model, factory: Callable | None = None):
    """A new teacher module with ``model``'s weights, frozen and in eval mode.

    Built from the model's config (``type(model)._from_config``, Hugging Face models) or by
    ``factory()``, then loaded with ``model``'s state: never ``copy.deepcopy``, which would copy the
    instance-level patches a trainer puts on the model (TRL replaces ``forward`` with a bound method
    of the original, so a deep copy would run the original weights).
    """
    if factory is not None:
        copy = factory()
    elif hasattr(type(model), "_from_config") and hasattr(model, "config"):
        copy = type(model)._from_config(model.config, dtype=next(model.parameters()).dtype)
    else:
        raise ValueError("cannot build a teacher copy of this model from a config: pass factory=")
    copy.load_state_dict(model.state_dict())
    copy.to(next(model.parameters()).device)
    copy.eval()
    copy.requires_grad_(False)
    return copy


class TeacherWeights:
    """The teacher's weights under one of four policies.

    - ``live``: the policy itself (no copy; its current weights score the tokens).
    - ``frozen``: the initial weights, copied once.
    - ``snapshot``: a copy refreshed from the policy after every ``refresh_steps``-th optimizer step
      (the official recipe: 20).
    - ``ema``: a copy updated after every step as ``t = decay * t + (1 - decay) * policy``. Weights
      stored below float32 (bf16, fp16) are averaged in float32 accumulators kept next to the copy
      (4 more bytes per such weight), since an average kept in bf16 loses every update smaller than
      half its rounding step; the copy holds the accumulators rounded to its dtype. Tied weights are
      averaged once.

    Call :meth:`on_step_end` with the number of optimizer steps taken so far after each step; a call
    that repeats the previous call's step count changes nothing. ``refreshes`` lists the steps at
    which a snapshot was refreshed.
    """

    def __init__(self, model, policy: str = "snapshot", *, refresh_steps: int = 20, ema_decay: float = 0.99,
                 factory: Callable | None = None):
        if policy not in TEACHER_POLICIES:
            raise ValueError(f"teacher policy must be one of {TEACHER_POLICIES}, got {policy!r}")
        if policy == "snapshot" and (isinstance(refresh_steps, bool) or not isinstance(refresh_steps, numbers.Integral)
                                     or refresh_steps < 1):
            raise ValueError(f"refresh_steps must be an integer >= 1, got {refresh_steps!r}")
        if policy == "ema" and (isinstance(ema_decay, bool) or not isinstance(ema_decay, numbers.Real)
                                or not 0 <= ema_decay <= 1):
            raise ValueError(f"ema_decay must be a number in [0, 1], got {ema_decay!r}")
        self.policy, self.refresh_steps, self.ema_decay = policy, refresh_steps, ema_decay
        self.source = model
        self.copy = None if policy == "live" else fresh_copy(model, factory)
        self.refreshes: list[int] = []
        self._last_step = None
        self._accumulators = _float32_accumulators(self.copy) if policy == "ema" else {}

    @property
    def model(self):
        """The module that scores the teacher's tokens."""
        return self.source if self.copy is None else self.copy

    @torch.no_grad()
    def on_step_end(self, global_step: int):
        if global_step == self._last_step:
            return
        self._last_step = global_step
        if self.policy == "snapshot" and global_step > 0 and global_step % self.refresh_steps == 0:
            self.copy.load_state_dict(self.source.state_dict())
            self.refreshes.append(global_step)
        elif self.policy == "ema":
            self._ema_update()

    def _ema_update(self):
        policy_state = self.source.state_dict()
        for name, value in _unique_state(self.copy).items():
            src = policy_state[name]
            if not value.is_floating_point():
                value.copy_(src)
                continue
            average = self._accumulators.get(name, value)
            # The policy may have moved to another device or dtype since the copy was made.
            average.lerp_(src.to(device=average.device, dtype=average.dtype), 1.0 - self.ema_decay)
            if average is not value:
                value.copy_(average)


def _unique_state(module) -> dict:
    """``module``'s state by name, each tensor once: a tied weight appears under several names and
    must be updated once."""
    seen, out = set(), {}
    for name, value in module.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            out[name] = value.data if isinstance(value, torch.nn.Parameter) else value
    return out


def _float32_accumulators(module) -> dict:
    """Float32 copies of ``module``'s floating tensors stored below float32, by name."""
    return {name: value.float() for name, value in _unique_state(module).items()
            if value.is_floating_point() and value.element_size() < 4}
