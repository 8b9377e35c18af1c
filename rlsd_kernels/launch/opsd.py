"""Launchers of the OPSD kernels: the fused forward (statistics, divergence, policy epilogue and,
optionally, the student-logit gradient), the row gradient, and the shard statistics of the
vocabulary-parallel form.
"""

from __future__ import annotations

import math

import torch

from ..kernels.opsd import _opsd_bwd_kernel, _opsd_fwd_kernel
from ..kernels.opsd_shard import _jsd_sums_kernel, _opsd_stats_kernel
from . import common, torch_opsd
from .common import rows_of, use_triton
from .logprobs import bwd_launcher, fused_or_split, trial_destination
from .rlsd import rlsd_token_epilogue
from .terms import OUTPUTS, kernel_flags, kernel_scalars, needs_sequence_pass, optional, sequence_terms
from .torch_opsd import JSD, OPSD_OUTPUTS, SAMPLED, grad_coefficients, output_names, stats_rows
from .tuning import TRIAL_ROWS, RowConfig, pick_row_config

LOG2E = 1.4426950408889634
# The OPSD row kernels carry three or four per-lane sums and both rows' next blocks: with 32 logits a
# thread (8192-wide blocks of 8 warps, 4096 of 4) they spill on sm_90 (up to ~190 bytes,
# bench/kernel_resources.py), with 16 at most 24. The tuner times the candidates it has for 4-byte
# logits, whose blocks stop at 4096, and a choice with more than 16 logits a thread gets more warps.
MAX_BLOCK = 4096
MAX_PER_THREAD = 16


def pick_config(key, rows, trial):
    """``pick_row_config`` for the OPSD kernels (blocks of at most ``MAX_BLOCK``); the log-prob backward
    that the sampled-token surrogate reuses keeps its own candidates (and cache entry)."""
    device, vocab = rows.tensor.device, rows.vocab
    if key[0] == "logprobs_bwd":
        return pick_row_config(key, vocab, device, trial, rows.tensor.element_size())
    config = pick_row_config(key, vocab, device, trial, 4)
    if config.block_v > MAX_BLOCK:
        config = RowConfig(MAX_BLOCK, 8)
    return config._replace(num_warps=max(config.num_warps, config.block_v // (32 * MAX_PER_THREAD)))


def opsd_fwd(student, teacher, inputs, params, opsd, grad):
    """Launcher. ``inputs`` are the call's ``TokenInputs`` and ``params`` its ``PolicyOptions``;
    ``opsd`` (``DistillOptions``) holds ``div`` (the kernels' divergence code), ``beta``, ``alpha``,
    ``token_clip`` (or None) and ``grpo`` (add the policy term). ``grad`` is None, a tensor shaped
    like ``student`` to write ``weight * dl/dz`` into, or ``student`` itself (in place). Returns
    ``(outputs, flags)``: ``output_names(grpo)`` ``[N]`` float32 tensors and int32 flags.

    As in ``rlsd.rlsd_fwd``, a gradient is written either by the same program (``fused``) or by the
    row backward kernel after the forward (``split``), whichever ran faster on a prefix of the rows;
    sequence-level policy options always split, with the RLSD token epilogue in between."""
    s_rows = rows_of(student)
    t_rows = None if teacher is None else rows_of(teacher)
    if not use_triton(student):
        return torch_opsd.opsd_fwd(s_rows, t_rows, inputs, params, opsd, grad)
    # Pointers from the tensors whose strides the rows hold (a copy where the vocabulary stride is not 1).
    student, teacher = s_rows.tensor, None if t_rows is None else t_rows.tensor
    n, device, code, grpo = s_rows.n, student.device, opsd.div, opsd.grpo
    out, flags = common.outputs(output_names(grpo), n, device)
    temperature = params.temperature
    row_flags = kernel_flags(inputs, params)
    if not grpo:
        row_flags = {k: type(v)(0) for k, v in row_flags.items()}
    entropy = grpo and bool(params.want_entropy)
    outputs = [out.get(k, out["lse"]) for k in OUTPUTS] + [out[k] for k in OPSD_OUTPUTS]
    token_clip = math.inf if opsd.token_clip is None else opsd.token_clip
    adv = inputs.adv

    def run(config, n_rows, dest=None, dest_strides=(0, 0)):
        reread = dest is not None or code == JSD
        _opsd_fwd_kernel[config.grid(n_rows, device)](
            student, s_rows.stride_b, s_rows.stride_t,
            teacher if teacher is not None else student,
            *((t_rows.stride_b, t_rows.stride_t) if t_rows is not None else (0, 0)),
            dest if dest is not None else student, *dest_strides,
            inputs.tokens, adv, *(optional(getattr(inputs, k), adv) for k in ("lp_t", "lp_old")), inputs.weight,
            *(optional(getattr(inputs, k), adv) for k in ("credit", "seq_ratio", "rollout", "log_is", "ref")),
            *outputs, flags,
            n_rows, s_rows.seqlen, s_rows.vocab, LOG2E / temperature, 1.0 / temperature, opsd.alpha,
            opsd.beta, token_clip, *kernel_scalars(params),
            DIV=code, HAS_T_LOGITS=teacher is not None, NEED_LP=grpo or code == SAMPLED, GRPO=grpo, **row_flags,
            ENTROPY=entropy, WRITE_GRAD=dest is not None, KEEP_S=reread, KEEP_T=reread and code != SAMPLED,
            BLOCK_V=config.block_v, num_warps=config.num_warps,
        )

    trial_rows = min(n, TRIAL_ROWS)
    key = ("opsd_fwd", student.dtype, None if teacher is None else teacher.dtype, code, grpo, entropy,
           tuple(row_flags.values()))
    plain = pick_config(key + (False,), s_rows, lambda c: run(c, trial_rows))
    sequence_pass = grpo and needs_sequence_pass(inputs, params)
    if grad is None and not sequence_pass:
        run(plain, n)
        return out, flags
    if sequence_pass:
        run(plain, n)
        inputs = sequence_terms(out["lp_s"], inputs, params)
        rlsd_token_epilogue(out, flags, inputs, params)
        if grad is not None:
            coefs = grad_coefficients(out, inputs.weight, params.entropy_coef, opsd)
            opsd_bwd(student, teacher, inputs.tokens, out, coefs, temperature, opsd, out=grad)
        return out, flags

    trial_dest = trial_destination(grad, s_rows)
    fused = pick_config(key + (True,), s_rows, lambda c: run(c, trial_rows, *trial_dest()))
    # Ones, so that a timing trial of the row backward reads every row.
    coefs = [torch.ones_like(inputs.weight) for _ in range(3)]
    if not (grpo and params.entropy_coef != 0):
        coefs[1] = None
    backward, bwd_key = _bwd_launcher(s_rows, t_rows, inputs.tokens, out, coefs, temperature, opsd, grad.dtype)
    bwd_config = pick_config(bwd_key, s_rows, lambda c: backward(c, trial_rows, *trial_dest()))

    def split(n_rows, dest, dest_strides):
        run(plain, n_rows)
        values = grad_coefficients(out, inputs.weight, params.entropy_coef, opsd)
        for buf, value in zip(coefs, values, strict=True):
            if buf is not None:
                buf.copy_(value)
        backward(bwd_config, n_rows, dest, dest_strides)

    fused_or_split(key, device, grad, n, trial_rows, trial_dest, lambda *a: run(fused, *a), split)
    return out, flags


def _bwd_launcher(s_rows, t_rows, tokens, stats, coefs, temperature, opsd, grad_dtype):
    """``(launch(config, n_rows, dest, dest_strides), tuning key)`` of the row gradient for the
    coefficients ``(c_lp, c_h, c_d)``; the sampled-token surrogate takes the log-prob backward."""
    c_lp, c_h, c_d = coefs
    entropy = stats["entropy"] if c_h is not None else None
    if opsd.div == SAMPLED:
        launch = bwd_launcher(s_rows, tokens, stats["lse"], c_lp, c_h, entropy, temperature)
        return launch, ("logprobs_bwd", s_rows.tensor.dtype, grad_dtype, c_h is not None)
    need_lp = opsd.grpo

    def launch(config, n_rows, dest, dest_strides):
        _opsd_bwd_kernel[config.grid(n_rows, s_rows.tensor.device)](
            s_rows.tensor, s_rows.stride_b, s_rows.stride_t, t_rows.tensor, t_rows.stride_b, t_rows.stride_t,
            dest, *dest_strides, tokens, stats["lse"], stats["lse_t"], stats["k"], c_lp,
            c_h if c_h is not None else c_lp, entropy if entropy is not None else c_lp, c_d,
            n_rows, s_rows.seqlen, s_rows.vocab, LOG2E / temperature, 1.0 / temperature, opsd.beta,
            DIV=opsd.div, NEED_LP=need_lp, ENTROPY_GRAD=c_h is not None, BLOCK_V=config.block_v,
            num_warps=config.num_warps,
        )

    key = ("opsd_bwd", s_rows.tensor.dtype, t_rows.tensor.dtype, grad_dtype, opsd.div, need_lp, c_h is not None)
    return launch, key


def opsd_bwd(student, teacher, tokens, stats, coefs, temperature, opsd, out=None):
    """Launcher of the row gradient: writes it into ``out`` (shaped like ``student``, possibly
    ``student`` itself) or a new tensor in the logits' dtype, and returns it. ``stats`` holds the
    per-row ``lse``, ``lse_t``, ``k`` (and ``entropy``) of the forward, ``coefs`` ``(c_lp, c_h, c_d)``."""
    s_rows = rows_of(student)
    t_rows = None if teacher is None else rows_of(teacher)
    grad = out if out is not None else common.empty(student.shape, dtype=student.dtype, device=student.device)
    if not use_triton(student):
        return torch_opsd.opsd_grad(s_rows, t_rows, tokens, stats, *coefs, temperature, opsd, grad)
    student, teacher = s_rows.tensor, None if t_rows is None else t_rows.tensor
    launch, key = _bwd_launcher(s_rows, t_rows, tokens, stats, coefs, temperature, opsd, grad.dtype)
    trial_dest = trial_destination(grad, s_rows)
    config = pick_config(key, s_rows, lambda c: launch(c, min(s_rows.n, TRIAL_ROWS), *trial_dest()))
    g_rows = rows_of(grad)
    launch(config, s_rows.n, grad, (g_rows.stride_b, g_rows.stride_t))
    return grad


def partial_stats(student, teacher, tokens, vocab_start, temperature, code, need_lp, entropy):
    """Launcher for one vocabulary shard (ids ``vocab_start ..``) of the full-vocabulary divergences:
    ``[k, N]`` float32 statistics under the shard's own softmaxes, rows ``stats_rows(code, need_lp,
    entropy)``: each model's reference and base-2 log-sum, its token's base-2 log-prob (-inf outside
    the shard), the student's entropy, and for the KLs the shard's own KL. Rows whose token is
    ``IGNORE_INDEX`` are not read."""
    s_rows, t_rows = rows_of(student), rows_of(teacher)
    student, teacher = s_rows.tensor, t_rows.tensor
    tokens = tokens.reshape(-1)
    if not use_triton(student):
        return torch_opsd.partial_stats(s_rows, t_rows, tokens, vocab_start, temperature, code, need_lp, entropy)
    names = stats_rows(code, need_lp, entropy)
    stats = common.empty((len(names), s_rows.n), dtype=torch.float32, device=student.device)
    rows = [stats[names.index(k)] if k in names else stats[0]
            for k in ("r_s", "c_s", "lp_s", "h_s", "r_t", "c_t", "lp_t", "d")]

    def run(config, n_rows=s_rows.n):
        _opsd_stats_kernel[config.grid(n_rows, student.device)](
            student, s_rows.stride_b, s_rows.stride_t, teacher, t_rows.stride_b, t_rows.stride_t, tokens, *rows,
            n_rows, s_rows.seqlen, s_rows.vocab, vocab_start, LOG2E / temperature,
            DIV=code, NEED_LP=need_lp, ENTROPY=entropy, BLOCK_V=config.block_v, num_warps=config.num_warps,
        )

    key = ("opsd_stats", student.dtype, teacher.dtype, code, need_lp, entropy)
    run(pick_config(key, s_rows, lambda c: run(c, min(s_rows.n, TRIAL_ROWS))))
    return stats


def jsd_sums(student, teacher, tokens, frame_s, frame_t, temperature, beta):
    """Launcher of the JSD's second sweep over one vocabulary shard: ``[2, N]`` float32, per row
    ``sum_v T_v (log2 T_v - log2 M_v)`` and ``sum_v S_v (log2 S_v - log2 M_v)`` over the shard's
    columns, with ``S`` and ``T`` the whole rows' softmaxes, each given by its frame ``(reference,
    base-2 log-sum)`` (``collectives.combine``); 0 where the token is ``IGNORE_INDEX``."""
    s_rows, t_rows = rows_of(student), rows_of(teacher)
    student, teacher = s_rows.tensor, t_rows.tensor
    tokens = tokens.reshape(-1)
    if not use_triton(student):
        return torch_opsd.jsd_sums(s_rows, t_rows, tokens, frame_s, frame_t, temperature, beta)
    sums = common.empty((2, s_rows.n), dtype=torch.float32, device=student.device)

    def run(config, n_rows=s_rows.n):
        _jsd_sums_kernel[config.grid(n_rows, student.device)](
            student, s_rows.stride_b, s_rows.stride_t, teacher, t_rows.stride_b, t_rows.stride_t, tokens, *frame_s,
            *frame_t, sums[0], sums[1], n_rows, s_rows.seqlen, s_rows.vocab, LOG2E / temperature, beta,
            BLOCK_V=config.block_v, num_warps=config.num_warps,
        )

    key = ("opsd_jsd_sums", student.dtype, teacher.dtype)
    run(pick_config(key, s_rows, lambda c: run(c, min(s_rows.n, TRIAL_ROWS))))
    return sums
