"""A tensor a form keeps outside autograd for its backward (the teacher's logits or hidden states),
checked as autograd checks the tensors it saves: changed in place between the forward and a backward
that reads it again, it raises instead of giving the gradient of other inputs silently."""

from __future__ import annotations

import torch


def _version(x):
    """``x``'s version counter; None for None, for inference tensors (they cannot change outside
    inference mode and keep no counter) and while compiling (traced tensors keep none)."""
    if x is None or torch.compiler.is_compiling() or x.is_inference():
        return None
    return x._version


class Kept:
    def __init__(self, tensor, name):
        self.tensor, self.name, self.version = tensor, name, _version(tensor)

    def check(self):
        if self.version is not None and _version(self.tensor) != self.version:
            raise RuntimeError(f"{self.name} has been modified by an inplace operation since the forward; the "
                               "backward of a per-token loss (loss_agg='none') reads it again: pass a copy, or "
                               "change it after the backward")
