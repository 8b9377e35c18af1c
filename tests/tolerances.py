"""The one tolerance table: kernel outputs against the float64 reference on the same inputs.

Per-token values (log-probs, losses, weights) are computed in float32 whatever the logits dtype, so
they share float32 tolerances. Gradients are written in the logits' dtype: their tolerance is that
dtype's rounding (the interpreter rounds float32 to bfloat16 toward zero, up to one ulp more).
"""

import torch

FP32 = dict(rtol=2e-5, atol=2e-6)
GRAD = {
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def assert_close(actual, expected, *, rtol, atol, what=""):
    """Elementwise closeness, with ``atol`` relative to the largest expected magnitude."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in the result"
    scale = expected.abs().max().clamp(min=1e-30) if expected.numel() else torch.tensor(1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * float(scale), msg=lambda m: f"{what}: {m}")


def assert_grad_close(actual, expected, dtype, what="grad"):
    assert_close(actual, expected, what=what, **GRAD[dtype])
