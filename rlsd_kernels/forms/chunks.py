"""What both schedules of the fused linear form share (``linear.py``, ``slab.py``): the float32
logits matmul, the token chunks, and dH, dW and db added chunk by chunk from a chunk's logit
gradient, with the precision of dW (``docs/linear-form.md``)."""

from __future__ import annotations

import torch

from ..launch import common
from . import rows as skip


def dw_in_fp32(weight, choice, budget):
    """Whether dW of ``weight`` accumulates in float32: ``choice`` (True/False) or, for None, whether
    its 4·V·H bytes fit ``budget`` (``linear.py: DW_FP32_BYTES``, read by ``LinearForm.dw_fp32_for``)."""
    if weight.dtype == torch.float32:
        return False  # it does anyway
    if choice is not None:
        return bool(choice)
    return 0 < 4 * weight.numel() <= budget


def logits_into(out, h, weight, bias):
    """``out[:] = h @ weight.T + bias`` in float32, the matmul reading ``weight`` in place."""
    if out.is_cuda:
        torch.mm(h, weight.T, out_dtype=torch.float32, out=out)
    else:
        # No float32-output matmul for half types on CPU, where the sizes are small.
        torch.mm(h.float(), weight.T.float(), out=out)
    if bias is not None:
        out.add_(bias)
    return out


def token_chunks(x, size):
    """``(rows, chunks)``: the most rows a chunk has, and an iterator of ``(flat token slice, [c, H]
    rows of x)``. Chunks run across sequences when ``x`` views as ``[N, H]`` without a copy (a
    ``hidden[:, :-1]`` slice does not), else within each sequence."""
    try:
        flat = x.view(-1, x.shape[-1])
    except RuntimeError:
        b, t = x.shape[:2]
        return min(size, t), ((slice(i * t + s, i * t + min(s + size, t)), x[i, s : s + size])
                              for i in range(b) for s in range(0, t, size))
    n = flat.shape[0]
    return min(size, n), ((slice(s, min(s + size, n)), flat[s : s + size]) for s in range(0, n, size))


def rows_of(x, sl):
    """Rows ``sl`` (a flat token slice) of ``[B, T, H]`` or ``[N, H]`` hidden states ``x``: a view where
    ``x`` views as ``[N, H]`` or the slice lies in one sequence, else a copy of the slice's rows (the
    student's chunks cross sequences where the teacher's layout cannot)."""
    try:
        return x.view(-1, x.shape[-1])[sl]
    except RuntimeError:
        t = x.shape[1]
        i, s = divmod(sl.start, t)
        if sl.stop <= (i + 1) * t:
            return x[i, s : s + sl.stop - sl.start]
        idx = torch.arange(sl.start, sl.stop, device=x.device)
        return x[idx // t, idx % t]


class Grads:
    """dH, dW and db, added chunk by chunk from the chunk's logit gradient ``dz``."""

    def __init__(self, hidden, weight, bias, needs, plan=None, fp32=False):
        need_h, self.need_w, need_b = needs
        self.weight, self.bias, self.fp32 = weight, bias, fp32
        # With a plan the skipped rows get no dz: their dH rows are the zeros written here.
        self.planned = plan is not None
        alloc = common.empty if plan is None else torch.zeros
        self.h = alloc(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        self.w = None
        self.b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None

    def add(self, sl, dz, h, live, grads):
        """Adds a chunk: ``dz`` [c, V], its hidden states ``h`` [c, H], ``live`` [c] its rows with a gradient
        (None: all of them), ``grads`` how many of its first rows the sum takes (the rest have none)."""
        if grads == 0:
            return
        dz, h, sl = dz[:grads], h[:grads], skip.sub(sl, slice(0, grads))
        if self.h is not None:
            dh = self.h.view(-1, self.h.shape[-1])
            if isinstance(sl, slice):
                torch.mm(dz, self.weight, out=dh[sl])  # [c, H]
            else:
                dh.index_copy_(0, sl, dz @ self.weight)
        if self.need_w:
            if live is not None:
                # Rows without a gradient have dz = 0, but 0 * NaN is NaN: padding may hold anything.
                h = torch.where(live[:, None], h, 0)
            if self.fp32:
                # Products and sums in float32; one rounding to the weight's dtype at the end.
                if self.w is None:
                    self.w = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
                if self.w.is_cuda:
                    torch.addmm(self.w, dz.T, h, out_dtype=torch.float32, out=self.w)
                else:
                    self.w.addmm_(dz.T.float(), h.float())
            else:
                # One rounding of the running sum per chunk (docs/linear-form.md); the first chunk writes it.
                self.w = dz.T @ h if self.w is None else self.w.addmm_(dz.T, h)  # [V, H]
        if self.b is not None:
            self.b += dz.sum(0, dtype=torch.float32)

    def result(self):
        if self.need_w and self.w is None and self.planned:
            self.w = torch.zeros_like(self.weight)  # every row skipped
        w = self.w.to(self.weight.dtype) if self.fp32 and self.w is not None else self.w
        return self.h, w, None if self.b is None else self.b.to(self.bias.dtype)
