"""The fused linear form: hidden states and the lm_head weight (and bias); the logits are made a chunk
of token rows at a time in float32 and never kept. Design notes and memory figures:
``docs/linear-form.md``.

Per chunk the loss's launchers run on float32 tiles of logits (half a chunk at a time where a
gradient buffer shares the memory, see ``_tiles``), write the chunk's logit gradient ``dz`` into the
chunk's own buffer, and the chunk's gradients are added right away: ``dH[chunk] = dz @ W``,
``dW += dz^T @ h``, ``db += sum(dz)``. Rows with zero weight are skipped, and rows without a
logit gradient take no part in dH and dW (``rows.py``). Eager only.

That is the chunk schedule, the default. The slab schedule (``slab.py``, ``slab_opsd.py``), opt-in
through ``SCHEDULE`` or ``LinearForm(schedule="slab")``, runs the policy loss, the OPSD losses and
the per-token backward over vocabulary slabs instead; the log-probs' forward keeps the chunk
schedule.
"""

from __future__ import annotations

import torch

from ..flags import Flag
from ..launch import common
from ..launch.logprobs import logprobs_bwd, logprobs_fwd
from ..launch.terms import needs_sequence_pass, sequence_terms
from ..reference import IGNORE_INDEX
from . import rows as skip
from . import slab as slabs
from . import slab_opsd
from .chunks import Grads as _Grads
from .chunks import dw_in_fp32, logits_into, rows_of, token_chunks
from .kept import Kept

# Bytes a float32 accumulator of a half-precision weight's dW may take (4·V·H), by device type: within
# it dW is summed over the chunks in float32 and rounded once, else in the weight's dtype, one rounding
# per chunk (docs/linear-form.md: precision of dW). 0 keeps the measured default everywhere. Both
# schedules read them here, at each call (``LinearForm.dw_fp32_for``).
DW_FP32_BYTES = {"cuda": 0}
DW_FP32_BYTES_OTHER = 0

# Bytes for a chunk's buffers, by device type: a student tile and a gradient row per chunk row, and
# for losses that pair the teacher's rows with the student's, a teacher tile too (docs/linear-form.md).
CHUNK_BYTES = {"cuda": 160 << 20}
CHUNK_BYTES_OTHER = 16 << 20
PAIRED_CHUNK_BYTES = {"cuda": 240 << 20}
PAIRED_CHUNK_BYTES_OTHER = 24 << 20
# The schedule: "chunk" (the measured one) or "slab" (slab.py), for every call; None takes
# DEFAULT_SCHEDULE by device type, "chunk" everywhere until a GPU run shows the slab schedule faster
# (bench/gpu_check.sh, LINEAR_CHECK=1). A LinearForm's own ``schedule`` comes first.
SCHEDULE = None
DEFAULT_SCHEDULE = {"cuda": "chunk"}
DEFAULT_SCHEDULE_OTHER = "chunk"
SCHEDULES = ("chunk", "slab")


def check_schedule(schedule):
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be None or one of {SCHEDULES}, got {schedule!r}")
    return schedule


def schedule_for(device: torch.device, schedule=None) -> str:
    """The schedule of a call on ``device``: ``schedule``, else ``SCHEDULE``, else the device's default."""
    chosen = check_schedule(schedule if schedule is not None else SCHEDULE)
    return chosen if chosen is not None else DEFAULT_SCHEDULE.get(device.type, DEFAULT_SCHEDULE_OTHER)


def default_chunk_size(vocab: int, device: torch.device, dtype: torch.dtype, paired: bool = False) -> int:
    """Rows per chunk: half a row of float32 logits per model and a gradient row in ``dtype``, in budget."""
    if paired:
        rows = PAIRED_CHUNK_BYTES.get(device.type, PAIRED_CHUNK_BYTES_OTHER) // (vocab * (4 + dtype.itemsize))
    else:
        rows = CHUNK_BYTES.get(device.type, CHUNK_BYTES_OTHER) // (vocab * (2 + dtype.itemsize))
    return max(64, rows // 64 * 64)


def _tiles(rows, vocab, grad_dtype, device):
    """``(work, grad)``: the buffers of a pass over chunks of ``rows`` rows, in one allocation. With
    ``grad_dtype``, ``work`` is ``[rows / 2, V]`` float32 (the student's logits, half a chunk at a
    time) and ``grad`` the chunk's dz ``[rows, V]`` after it; else ``work`` is ``[rows, V]``.
    Rows are padded to 16 elements so that each starts aligned."""
    padded = -(-vocab // 16) * 16
    work_rows = rows if grad_dtype is None else -(-rows // 2)
    work_bytes = 4 * work_rows * padded
    grad_bytes = 0 if grad_dtype is None else grad_dtype.itemsize * rows * padded
    buf = common.empty(((work_bytes + grad_bytes) // 4,), dtype=torch.float32, device=device).view(torch.uint8)

    def view(start, n, dtype):
        rows_view = buf[start : start + n * padded * dtype.itemsize].view(dtype).view(n, padded)
        # The padding columns are never written; some CPU half-precision matmuls read them (a
        # [:, :V] view's rows are padded), so they hold zeros rather than whatever memory held.
        rows_view[:, vocab:].zero_()
        return rows_view[:, :vocab]

    return view(0, work_rows, torch.float32), None if grad_dtype is None else view(work_bytes, rows, grad_dtype)


class LinearForm:
    """``tensors`` is ``(hidden, weight, bias)``; the teacher's hidden states (or None), the chunk size,
    ``dw_fp32`` (``dw_in_fp32``: True/False, or None for the memory budget), ``schedule`` ("chunk",
    "slab", or None for ``schedule_for``) and ``slab_size`` (columns per slab, None for
    ``slab.slab_size``) are attributes."""

    eager_only = True

    def __init__(self, chunk, teacher=None, student_name="student_hidden", teacher_name="teacher_hidden",
                 dw_fp32=None, schedule=None, slab_size=None):
        self.chunk, self.teacher, self.dw_fp32 = chunk, teacher, dw_fp32
        self.schedule, self.slab_size = check_schedule(schedule), slab_size
        self.names = {"tokens": "tokens", "student": f"logits of {student_name} @ weight.T",
                      "teacher": f"logits of {teacher_name} @ weight.T"}
        self.kept_teacher = Kept(teacher, teacher_name)

    def vocab(self, tensors):
        return tensors[1].shape[0]

    def dw_fp32_for(self, weight):
        """Whether dW of ``weight`` accumulates in float32: ``dw_fp32``, else the budget ``DW_FP32_BYTES``."""
        return dw_in_fp32(weight, self.dw_fp32, DW_FP32_BYTES.get(weight.device.type, DW_FP32_BYTES_OTHER))

    def clear_outside(self, grad):
        """Nothing to clear: gradients are written for the form's own tensors."""

    def grad_tokens(self, tokens):
        """The ids the backward takes (a sharded form maps them to its columns)."""
        return tokens

    def passes(self, tensors, which="student", grad_dtype=None, plan=None):
        """Per chunk ``(sl, h, dz, tiles, grads)``: its tokens (a flat token slice, or with a ``plan``
        (``rows.py``) a tensor of token ids), the student's rows ``[c, H]`` (the teacher's with
        ``which="teacher"``), the chunk's gradient buffer ``[c, V]`` in ``grad_dtype`` (or None), an
        iterator of tiles ``(rows of the chunk, logits, teacher logits or None)`` in float32, with the
        teacher's rows paired when ``which="pair"``, and how many of its first rows have a gradient.
        The buffers are shared: use each chunk's tiles before the next chunk."""
        hidden, weight, bias = tensors
        source = self.teacher if which == "teacher" else hidden
        if plan is None:
            rows, chunks = token_chunks(source, self.chunk)
        else:
            m = plan.order.numel()
            rows = min(self.chunk, m)
            chunks = ((plan.order[s : s + self.chunk], skip.gather(source, plan.order[s : s + self.chunk]))
                      for s in range(0, m, self.chunk))
        vocab, device = weight.shape[0], hidden.device
        paired = which == "pair"
        half = -(-rows // 2)
        if paired and grad_dtype is None:
            work, grad = _tiles(half, vocab, None, device)[0], None
        else:
            work, grad = _tiles(rows, vocab, grad_dtype, device)
        t_work = _tiles(half, vocab, None, device)[0] if paired else None

        def tiles(h, t):
            for a in range(0, h.shape[0], work.shape[0]):
                rs = slice(a, min(a + work.shape[0], h.shape[0]))
                zs = logits_into(work[: rs.stop - a], h[rs], weight, bias)
                zt = None if t is None else logits_into(t_work[: rs.stop - a], t[rs], weight, bias)
                yield rs, zs, zt

        done = 0
        for sl, h in chunks:
            c = h.shape[0]
            if plan is None:
                t, grads = (rows_of(self.teacher, sl) if paired else None), c
            else:
                t, grads = (skip.gather(self.teacher, sl) if paired else None), min(c, max(0, plan.grads - done))
            done += c
            yield sl, h, None if grad is None else grad[:c], tiles(h, t), grads

    def map_tiles(self, tensors, fn, which="student", plan=None):
        """``fn(logits, teacher logits or None, tokens)`` over every tile (``tokens`` a flat token slice,
        or with a ``plan`` a tensor of token ids), its per-token outputs (tensors ``[..., n]`` or dicts
        of them) concatenated along the tokens; those of the rows a plan skips are zero."""
        parts = []
        for sl, _, _, tiles, _ in self.passes(tensors, which, plan=plan):
            parts += [fn(zs, zt, skip.sub(sl, rs)) for rs, zs, zt in tiles]
        if plan is not None:
            return skip.scatter(parts, plan)
        if isinstance(parts[0], dict):
            return {k: torch.cat([p[k] for p in parts], dim=-1) for k in parts[0]}
        return torch.cat(parts, dim=-1)

    def accumulate(self, tensors, fn, which, needs, live):
        """``(dH, dW, db)`` where ``needs`` asks, from ``fn(logits, teacher logits, tokens, dest)``
        writing each tile's logit gradient into ``dest``; ``live`` marks the rows with one (the others
        are skipped)."""
        hidden, weight, bias = tensors
        plan = skip.plan(live)
        grads = _Grads(hidden, weight, bias, needs, plan, self.dw_fp32_for(weight))
        for sl, h, dz, tiles, n_grad in self.passes(tensors, which, weight.dtype, plan):
            for rs, zs, zt in tiles:
                fn(zs, zt, skip.sub(sl, rs), dz[rs])
            grads.add(sl, dz, h, live[sl] if plan is None else None, n_grad)
        return grads.result()

    def _pre_passes(self, loss, tensors, inputs):
        """``(inputs, teacher flags)``: the inputs a tile cannot compute alone, each a pass of log-probs
        over the chunks first: the teacher's log-probs (unless its rows are paired; with the error
        bits of its rows) and the sequence-level terms."""
        temperature = loss.options.temperature
        scored = inputs.tokens.masked_fill(inputs.weight == 0, IGNORE_INDEX)
        pre_teacher = self.teacher is not None and not loss.pairs_teacher
        plan = skip.plan(inputs.weight != 0) if pre_teacher or needs_sequence_pass(inputs, loss.options) else None

        def lp(z, _, sl):
            lp, _, _, flags = logprobs_fwd(z, scored[sl], temperature, False)
            return {"lp": lp, "flags": flags}

        t_flags = None
        if pre_teacher:
            teacher = self.map_tiles(tensors, lp, "teacher", plan)
            inputs = inputs.replace(lp_t=teacher["lp"])
            # The teacher's non-finite rows carry its own bit; its bad ids are the student's, flagged there.
            t_flags = ((teacher["flags"] & int(Flag.NONFINITE_STUDENT)) != 0).int() * int(Flag.NONFINITE_TEACHER)
        if needs_sequence_pass(inputs, loss.options):
            inputs = sequence_terms(self.map_tiles(tensors, lp, plan=plan)["lp"], inputs, loss.options)
        return inputs, t_flags

    def which(self, loss):
        return "pair" if self.teacher is not None and loss.pairs_teacher else "student"

    def on_slabs(self, tensors, loss=None):
        """Whether this call runs on the slab schedule: the policy and OPSD losses and the log-probs'
        backward (``loss`` None) there."""
        return schedule_for(tensors[1].device, self.schedule) == "slab"

    def loss_forward(self, loss, tensors, inputs, needs, validate):
        if self.on_slabs(tensors, loss):
            forward = slabs.policy_forward if loss.distill is None else slab_opsd.distill_forward
            return forward(self, loss, tensors, inputs, needs, validate)
        inputs, t_flags = self._pre_passes(loss, tensors, inputs)
        outs, flags = [], []
        track = any(needs)
        hidden, weight, bias = tensors
        live = inputs.weight != 0
        free = skip.gradient_free(loss, inputs) if track else None
        plan = skip.plan(live, None if free is None else ~free)
        grads = _Grads(hidden, weight, bias, needs, plan, self.dw_fp32_for(weight)) if track else None
        for sl, h, dz, tiles, n_grad in self.passes(tensors, self.which(loss), weight.dtype if track else None, plan):
            for rs, zs, zt in tiles:
                dest = None if dz is None or rs.start >= n_grad else dz[rs]
                out, f = loss.forward(zs, zt, inputs.sliced(skip.sub(sl, rs)), dest)
                outs.append(out)
                flags.append(f)
            if track:
                grads.add(sl, dz, h, live[sl] if plan is None else None, n_grad)
        if plan is None:
            out, flags = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}, torch.cat(flags)
        else:
            out, flags = skip.scatter(outs, plan), skip.scatter(flags, plan)
        if t_flags is not None:
            flags |= t_flags
        if validate:
            common.raise_on_error_flags(flags, inputs.tokens, self.vocab(tensors), self.names)
        return out, flags, grads.result() if track else (None, None, None)

    def loss_backward(self, loss, tensors, tokens, stats, scale, needs):
        if self.which(loss) == "pair":
            self.kept_teacher.check()
        live = skip.gradient_rows(loss, tokens, stats, scale)
        if self.on_slabs(tensors, loss):
            return slabs.accumulate(self, tensors, tokens, lambda z, zt, ids, rows, dest: loss.backward(
                z, zt, ids, {k: v[rows] for k, v in stats.items()}, scale[rows], out=dest), needs, live,
                self.which(loss) == "pair")

        def fn(zs, zt, rows, dest):
            loss.backward(zs, zt, tokens[rows], {k: v[rows] for k, v in stats.items()}, scale[rows], out=dest)

        return self.accumulate(tensors, fn, self.which(loss), needs, live)

    def logprobs_forward(self, tensors, tokens, temperature, entropy, validate):
        parts = self.map_tiles(tensors, lambda z, _, sl: dict(zip(
            ("lp", "lse", "ent", "flags"), logprobs_fwd(z, tokens[sl], temperature, entropy), strict=True)),
            plan=skip.plan(tokens != IGNORE_INDEX))
        if validate:
            common.raise_on_error_flags(parts["flags"], tokens, self.vocab(tensors), self.names)
        return parts["lp"], parts["lse"], parts["ent"]

    def logprobs_backward(self, tensors, tokens, lse, coef, coef_h, entropy, temperature, needs):
        live = coef != 0
        if coef_h is not None:
            live |= coef_h != 0
        live &= tokens != IGNORE_INDEX
        if self.on_slabs(tensors):
            return slabs.accumulate(self, tensors, tokens, lambda z, _, ids, rows, dest: logprobs_bwd(
                z, ids, lse[rows], coef[rows], None if coef_h is None else coef_h[rows],
                None if entropy is None else entropy[rows], temperature, out=dest), needs, live)

        def fn(z, _, sl, dest):
            logprobs_bwd(z, tokens[sl], lse[sl], coef[sl], None if coef_h is None else coef_h[sl],
                         None if entropy is None else entropy[sl], temperature, out=dest)

        return self.accumulate(tensors, fn, "student", needs, live)
