"""Launchers of the policy-loss kernels: the fused row forward (statistics, epilogue and, optionally,
the student-logit gradient), the token epilogue over known log-probs, and the gradient scale.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton

from ..kernels.rlsd import _rlsd_fwd_kernel, _rlsd_token_kernel, _scale_kernel
from . import common, rlsd_seg, torch_rows, tuning
from .common import rows_of, unit_stride, use_triton
from .logprobs import bwd_launcher, fused_or_split, logprobs_bwd, trial_destination
from .terms import OUTPUTS, kernel_flags, kernel_scalars, needs_sequence_pass, optional, sequence_terms
from .tuning import TRIAL_ROWS, pick_row_config

TOKEN_BLOCK = 1024
# The segmented strategy (``rlsd_seg.py``: rows split into vocabulary segments over a cooperative grid,
# three passes over the logits) for every call that writes a gradient without a sequence pass, instead
# of timing "fused" against "split". Opt-in until a GPU run shows it faster (bench/gpu_check.sh,
# SEGMENTED_CHECK=1); ``tuning.force_choice("segmented")`` takes it inside a block.
SEGMENTED = os.environ.get("RLSD_KERNELS_SEGMENTED", "0") == "1"


class _Plan(NamedTuple):
    """What one launch of the fused forward takes besides the call's tensors, once derived."""

    strides: tuple  # the student's and the teacher's (batch, token) strides
    dest_strides: tuple  # the gradient's, or (0, 0)
    tail: tuple  # seqlen, vocabulary, the temperature's factors and the epilogue's scalars
    config: tuning.RowConfig
    meta: dict


# Plans of the one-launch paths (no gradient, or the fused strategy), kept by everything that
# decides them: repeated calls skip the derivation and the tuner's lookups (RLSD_KERNELS_AUTOTUNE is
# read when a plan is made). Bounded: a key that stops matching only costs a rebuild.
_PLANS: dict = {}
_PLAN_LIMIT = 256


def _presence(inputs):
    return tuple(getattr(inputs, k) is None for k in ("lp_t", "lp_old", "credit", "rollout", "log_is", "ref",
                                                    "seq_ids", "seq_ratio"))


def _plan_key(student, teacher, inputs, params, grad):
    t = None if teacher is None else (teacher.shape, teacher.stride(), teacher.dtype)
    g = None if grad is None else (grad is student, grad.dtype, grad.shape, grad.stride())
    return (student.shape, student.stride(), student.dtype, student.device, t, g, params, _presence(inputs),
            tuning.state(), SEGMENTED)


def _per_token(inputs, packed, n, flags):
    adv = inputs.adv
    return (inputs.tokens, adv, optional(inputs.lp_t, adv), optional(inputs.lp_old, adv), inputs.weight,
            optional(inputs.credit, adv), optional(inputs.seq_ratio, adv), optional(inputs.rollout, adv),
            optional(inputs.log_is, adv), optional(inputs.ref, adv), packed, n, flags)


def _head(student, teacher, strides):
    return (student, *strides[:2], teacher if teacher is not None else student, *strides[2:])


def _launch(config, n_rows, head, dest, dest_strides, per_token, tail, meta):
    """One launch of the fused forward over ``n_rows`` rows; ``dest`` None writes no gradient."""
    student = head[0]
    _rlsd_fwd_kernel[config.grid(n_rows, student.device)](
        *head, dest if dest is not None else student, *dest_strides, *per_token, n_rows, *tail,
        WRITE_GRAD=dest is not None, BLOCK_V=config.block_v, num_warps=config.num_warps, **meta,
    )


def _run_plan(plan, student, teacher, inputs, grad, n):
    out, flags = common.outputs(OUTPUTS, n, student.device)
    _launch(plan.config, n, _head(student, teacher, plan.strides), grad, plan.dest_strides,
            _per_token(inputs, out.packed, n, flags), plan.tail, plan.meta)
    return out, flags


def rlsd_fwd(student, teacher, inputs, params, grad):
    """Launcher. ``inputs`` are the call's ``TokenInputs`` and ``params`` its
    ``PolicyOptions``; ``grad`` is None (no gradient), a tensor shaped like ``student`` (any
    float dtype) to write ``weight * dl/dz`` into, or ``student`` itself (in place).
    Returns ``(outputs, flags)``: a dict of ``OUTPUTS`` ``[N]`` float32 tensors and int32 flags.

    With a gradient to write, two strategies are timed once per problem and the faster is kept:
    ``fused`` writes it from the same program right after the row's statistics (three passes over
    ``[N, V]`` when the re-read student row is still in L2), ``split`` runs the forward without it
    and then the row backward kernel (four passes, every program lighter). Options that need every
    token of a sequence first (``needs_sequence_pass``) always split, with the token epilogue kernel
    in between."""
    if not use_triton(student):
        return torch_rows.rlsd_fwd(rows_of(student), None if teacher is None else rows_of(teacher), inputs, params,
                                   grad)
    # The kernels take rows of vocabulary stride 1 (entry points copy others; see rows_of).
    teacher = unit_stride(teacher)
    plan_key = _plan_key(student, teacher, inputs, params, grad)
    plan = _PLANS.get(plan_key)
    if plan is not None:
        return _run_plan(plan, student, teacher, inputs, grad, inputs.tokens.numel())
    s_rows = rows_of(student)
    t_rows = None if teacher is None else rows_of(teacher)
    n, device = s_rows.n, student.device
    out, flags = common.outputs(OUTPUTS, n, device)
    packed = out.packed
    temperature, scalars = params.temperature, kernel_scalars(params)
    sequence_pass = needs_sequence_pass(inputs, params)
    row_flags = kernel_flags(inputs, params)
    entropy = bool(params.want_entropy)

    # Every argument but the destination and the row count, gathered once for all the launches.
    t_strides = (0, 0) if t_rows is None else (t_rows.stride_b, t_rows.stride_t)
    strides = (s_rows.stride_b, s_rows.stride_t, *t_strides)
    head = _head(student, teacher, strides)
    per_token = _per_token(inputs, packed, n, flags)
    tail = (s_rows.seqlen, s_rows.vocab, 1.4426950408889634 / temperature, 1.0 / temperature, *scalars)
    meta = dict(HAS_T_LOGITS=teacher is not None, ENTROPY=entropy, **row_flags)

    def run(config, n_rows, dest=None, dest_strides=(0, 0)):
        _launch(config, n_rows, head, dest, dest_strides, per_token, tail, meta)

    trial_rows = min(n, TRIAL_ROWS)
    key = ("rlsd_fwd", student.dtype, None if teacher is None else teacher.dtype, tuple(row_flags.values()), entropy)
    itemsize = student.element_size()
    plain = pick_row_config(key + (False,), s_rows.vocab, device, lambda c: run(c, trial_rows), itemsize)
    if grad is None and not sequence_pass:
        run(plain, n)
        _keep_plan(plan_key, device, _Plan(strides, (0, 0), tail, plain, meta))
        return out, flags
    if sequence_pass:
        run(plain, n)
        inputs = sequence_terms(out["lp_s"], inputs, params)
        rlsd_token_epilogue(out, flags, inputs, params)
        if grad is not None:
            _row_backward(student, inputs, params, out, grad)
        return out, flags

    g_rows = rows_of(grad)
    if SEGMENTED or tuning.known_choice(key + ("strategy",), device, ("segmented",), None) == "segmented":
        config = tuning.fixed_row_config(s_rows.vocab, device, rlsd_seg.CONFIG)
        rlsd_seg.launch(config, n, head, grad, (g_rows.stride_b, g_rows.stride_t), per_token, tail, meta)
        return out, flags
    trial_dest = trial_destination(grad, s_rows)
    fused = pick_row_config(key + (True,), s_rows.vocab, device, lambda c: run(c, trial_rows, *trial_dest()),
                            itemsize)

    def split(n_rows, dest, dest_strides):
        # Set up only where it runs (timed, or chosen): the fused strategy needs none of it.
        coef = torch.empty_like(inputs.weight)
        coef_h = torch.empty_like(inputs.weight) if params.entropy_coef != 0 else None
        backward = bwd_launcher(s_rows, inputs.tokens, out["lse"], coef, coef_h, out["entropy"], temperature)
        bwd_key = ("logprobs_bwd", student.dtype, grad.dtype, coef_h is not None)
        bwd_config = pick_row_config(bwd_key, s_rows.vocab, device,
                                     lambda c: backward(c, trial_rows, *trial_dest()), itemsize)
        run(plain, n_rows)
        _backward_coefficients(inputs, params, out, coef, coef_h)
        backward(bwd_config, n_rows, dest, dest_strides)

    fused_or_split(key, device, grad, n, trial_rows, trial_dest, lambda *a: run(fused, *a), split)
    if tuning.known_choice(key + ("strategy",), device, ("fused", "split"), "fused") == "fused":
        _keep_plan(plan_key, device, _Plan(strides, (g_rows.stride_b, g_rows.stride_t), tail, fused, meta))
    return out, flags


def _keep_plan(key, device, plan):
    """Keeps a plan whose choices are settled (nothing is settled while a CUDA graph is captured)."""
    if tuning.capturing(device):
        return
    if len(_PLANS) >= _PLAN_LIMIT:
        _PLANS.clear()
    _PLANS[key] = plan


def _backward_coefficients(inputs, params, out, coef, coef_h):
    """The row backward's coefficients: ``weight * dl/dlp`` and ``weight * dl/dH``."""
    torch.mul(inputs.weight, out["d_lp"], out=coef)
    if coef_h is not None:
        torch.mul(inputs.weight, -params.entropy_coef, out=coef_h)


def _row_backward(student, inputs, params, out, grad):
    coef = torch.empty_like(inputs.weight)
    coef_h = torch.empty_like(inputs.weight) if params.entropy_coef != 0 else None
    _backward_coefficients(inputs, params, out, coef, coef_h)
    logprobs_bwd(student, inputs.tokens, out["lse"], coef, coef_h, out["entropy"], params.temperature, out=grad)


def rlsd_token_epilogue(out, flags, inputs, params):
    """Reruns the epilogue over the tokens with everything in ``inputs`` known (sequence-level
    terms included), overwriting the loss, derivative, weight, ratio, importance weight, KL and clip
    flags in ``out`` and ``flags``; the log-probs and entropies stay. Tensors the Triton kernels
    do not take go to the PyTorch counterpart in ``torch_rows``."""
    if not use_triton(flags):
        return torch_rows.rlsd_token_epilogue(out, flags, inputs, params)
    n = flags.numel()
    adv = inputs.adv
    _rlsd_token_kernel[(triton.cdiv(n, TOKEN_BLOCK),)](
        out["lp_s"], out["lp_t"], out["entropy"], adv, optional(inputs.lp_old, adv), inputs.weight,
        *(optional(getattr(inputs, k), adv) for k in ("credit", "seq_ratio", "rollout", "log_is", "ref")),
        *(out[k] for k in ("loss", "d_lp", "w", "ratio", "is_weight", "kl")), flags,
        n, *kernel_scalars(params), **kernel_flags(inputs, params), BLOCK=TOKEN_BLOCK,
    )


def scale_grad_(grad, scale):
    """``grad *= scale`` in place, skipped on the device when ``scale`` is 1 (no host sync)."""
    if not use_triton(grad):
        if not bool(scale == 1):
            # In float32, then rounded once: a float16 2**16 (loss scaling) is inf, a bfloat16 1/3 biased.
            grad.mul_(scale.float())
        return
    rows = rows_of(grad)
    _scale_kernel[(rows.n,)](grad, rows.stride_b, rows.stride_t, scale, rows.n, rows.seqlen, rows.vocab,
                             BLOCK_V=_scale_block(rows.vocab))


@functools.cache
def _scale_block(vocab):
    return min(triton.next_power_of_2(vocab), 4096)
