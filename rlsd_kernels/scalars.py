"""Real-number arguments: one check for every hyperparameter and schedule argument, naming it."""

from __future__ import annotations

import numbers

import torch


def real_number(name, value, *, allow_none=False):
    """``value`` as a Python float: any real number (``int``, ``float``, ``numpy.float32``, a one-element
    tensor from a scheduler) is accepted; anything else raises ``TypeError`` naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor):
        if torch.compiler.is_compiling():
            raise TypeError(f"{name} is a tensor: under torch.compile pass a Python number (a hyperparameter "
                            "is a constant of the compiled graph; a tensor's value cannot be read while tracing)")
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    # Not math.isnan: under torch.compile a hyperparameter that changes between calls is a symbolic
    # float, which math.isnan cannot take and a comparison can.
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    return value
