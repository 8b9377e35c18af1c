"""The losses and log-probs from hidden states and the lm_head weight (the fused linear form):
the logits are made a chunk of tokens at a time and never kept."""

from __future__ import annotations

from .compose import check_linear, check_teacher, describe, linear_form, run_logprobs, run_loss
from .losses import distill_tokens


def rlsd_linear_loss(
    student_hidden,
    weight,
    tokens,
    advantages,
    *,
    teacher_hidden=None,
    teacher_logprobs=None,
    bias=None,
    old_logprobs=None,
    mask=None,
    eps_w=0.2,
    lam=1.0,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=3.0,
    temperature=1.0,
    loss_agg="token-mean",
    normalizer=None,
    return_metrics=False,
    surrogate="ppo",
    sapo_tau_pos=1.0,
    sapo_tau_neg=1.05,
    ratio_level="token",
    eps_w_low=None,
    eps_w_high=None,
    credit_base="current",
    credit_mask=None,
    credit_negative_only=False,
    rollout_logprobs=None,
    is_weights=None,
    tis_level="token",
    tis_cap=2.0,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy_coef=0.0,
    cu_seqlens=None,
    validate=True,
    chunk_size=None,
    process_group=None,
):
    """``rlsd_loss`` on the logits ``student_hidden @ weight.T + bias``, without materialising them.

    Same loss, options, checks and results as :func:`rlsd_kernels.rlsd_loss` (see it for the
    formula and every option not listed here); the gradients go to ``student_hidden``, ``weight``
    and ``bias``. The logits of a chunk
    of ``chunk_size`` token rows are computed in float32 and their gradient added to dH, dW and db
    right away, so the memory is that of dW, dH and the chunk (``docs/linear-form.md``: about 1.47 GB at
    N = 8192, H = 4096, V = 151,936 in bf16). ``weight`` may be a parameter gathered by ZeRO-3 or
    FSDP, or tied to the input embedding: its gradient is returned through autograd, which adds it
    to the embedding's; the weight is never copied.

    Args:
        student_hidden: ``[B, T, H]`` (views such as ``hidden[:, :-1]`` are read in place) or packed
            ``[N, H]``; float32, float16 or bfloat16.
        weight: ``[V, H]``, the lm_head (or tied embedding) weight, in the dtype of the hidden states.
        tokens, advantages: as for ``rlsd_loss``.
        teacher_hidden: the teacher's hidden states, shaped like ``student_hidden``, scored with the
            same ``weight`` and ``bias`` (no gradient); or ``None`` with ``teacher_logprobs``.
        bias: optional ``[V]`` lm_head bias.
        chunk_size: token rows per chunk (default: ``default_chunk_size``, 256 at V = 151,936 on a
            GPU in bf16). The chunk buffers take about ``4 * V`` bytes a row (``6 * V`` for float32
            weights); fewer rows save memory and cost bandwidth.
        validate: as for ``rlsd_loss``; rows of NaN or ``+inf`` logits are reported for
            ``student_hidden @ weight.T`` or ``teacher_hidden @ weight.T``.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded: ``weight``
            (and ``bias``) are this rank's contiguous rows of the lm_head, in group rank order, as
            Megatron's ``ColumnParallelLinear`` holds them. One all-gather per forward, none in the
            backward. The weight and bias get this rank's rows' gradients; the hidden states get
            this rank's partial dH, whose sum over ranks is the gradient (Megatron's layer adds it
            in its input's backward). See ``docs/vocab-parallel.md``.

    Returns:
        The loss (a scalar, or per-token ``[B, T]`` / ``[N]`` for ``none``), or ``(loss, metrics)``.
    """
    check_linear(student_hidden, weight, bias, teacher_hidden, chunk_size)
    no_teacher = check_teacher(teacher_hidden, teacher_logprobs, None, "teacher_hidden", lam)
    loss, call = describe(locals(), student_hidden.shape[:-1], student_hidden.device, tokens, advantages,
                          want_entropy=return_metrics, no_teacher=no_teacher)
    form, tensors = linear_form(student_hidden, weight, bias, teacher_hidden, chunk_size=chunk_size,
                                process_group=process_group, paired=loss.pairs_teacher, loss=True)
    return run_loss(form, tensors, loss, call, return_metrics=return_metrics, validate=validate)


def opsd_linear_loss(
    student_hidden,
    weight,
    tokens=None,
    *,
    teacher_hidden=None,
    bias=None,
    mask=None,
    divergence="jsd",
    beta=0.5,
    temperature=1.0,
    token_clip=None,
    loss_agg="token-mean",
    normalizer=None,
    cu_seqlens=None,
    teacher_logprobs=None,
    return_metrics=False,
    validate=True,
    chunk_size=None,
    process_group=None,
):
    """``opsd_loss`` on the logits ``hidden @ weight.T + bias`` of the student and of the teacher,
    without materialising them.

    Same loss, options, checks and results as :func:`rlsd_kernels.opsd_loss` (see it for the
    divergences and every option not listed here); the gradients go to ``student_hidden``,
    ``weight`` and ``bias``. Per chunk of ``chunk_size`` token rows both models' logits are computed
    in float32 and the chunk's gradient added to dH, dW and db right away, so the memory is that of
    dW, dH and the chunk (``docs/linear-form.md``: about 1.55 GB at N = 8192, H = 4096, V = 151,936 in
    bf16). ``weight`` may be tied to the input embedding or gathered by ZeRO-3 / FSDP, as for
    :func:`rlsd_kernels.rlsd_linear_loss`; it is never copied.

    Args:
        student_hidden: ``[B, T, H]`` (views such as ``hidden[:, :-1]`` are read in place) or packed
            ``[N, H]``; float32, float16 or bfloat16.
        weight: ``[V, H]``, the lm_head (or tied embedding) weight, in the dtype of the hidden states.
        teacher_hidden: the teacher's hidden states, shaped like ``student_hidden``, scored with the
            same ``weight`` and ``bias`` (no gradient); or ``None`` with ``teacher_logprobs`` for
            ``divergence="sampled_token"``.
        tokens: as for ``opsd_loss``: the sampled ids (needed by ``sampled_token``), ``-100`` masked.
        bias: optional ``[V]`` lm_head bias.
        chunk_size: token rows per chunk (default: ``default_chunk_size``, 256 at V = 151,936 on a GPU
            in bf16). The chunk buffers take ``6 * V`` bytes a row (``8 * V`` for float32 weights);
            fewer rows save memory and cost bandwidth.
        validate: as for ``opsd_loss``; rows of NaN or ``+inf`` logits are reported for
            ``student_hidden @ weight.T`` or ``teacher_hidden @ weight.T``.
        process_group: vocabulary-sharded ``weight`` (and ``bias``) rows, as for
            :func:`rlsd_kernels.rlsd_linear_loss`.

    Returns:
        The loss (a scalar, or per-token ``[B, T]`` / ``[N]`` for ``none``), or ``(loss, metrics)``.
    """
    check_linear(student_hidden, weight, bias, teacher_hidden, chunk_size)
    token_shape, device = tuple(student_hidden.shape[:-1]), student_hidden.device
    distill = dict(divergence=divergence, beta=beta, token_clip=token_clip)
    keywords = dict(temperature=temperature, lam=0.0, dual_clip=None, mask=mask, normalizer=normalizer,
                    cu_seqlens=cu_seqlens, teacher_logprobs=teacher_logprobs, loss_agg=loss_agg, validate=validate)
    tokens, advantages = distill_tokens(tokens, divergence, token_shape, device)
    loss, call = describe(keywords, token_shape, device, tokens, advantages, distill=distill)
    check_teacher(teacher_hidden, teacher_logprobs, loss, "teacher_hidden")
    form, tensors = linear_form(student_hidden, weight, bias, teacher_hidden, chunk_size=chunk_size,
                                process_group=process_group, paired=loss.pairs_teacher, loss=True)
    return run_loss(form, tensors, loss, call, return_metrics=return_metrics, validate=validate)


def grpo_opsd_linear_loss(
    student_hidden,
    weight,
    tokens,
    advantages,
    *,
    teacher_hidden=None,
    bias=None,
    alpha=1.0,
    divergence="jsd",
    beta=0.5,
    token_clip=None,
    teacher_logprobs=None,
    old_logprobs=None,
    mask=None,
    eps_w=0.2,
    lam=0.0,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=3.0,
    temperature=1.0,
    loss_agg="token-mean",
    normalizer=None,
    return_metrics=False,
    surrogate="ppo",
    sapo_tau_pos=1.0,
    sapo_tau_neg=1.05,
    ratio_level="token",
    eps_w_low=None,
    eps_w_high=None,
    credit_base="current",
    credit_mask=None,
    credit_negative_only=False,
    rollout_logprobs=None,
    is_weights=None,
    tis_level="token",
    tis_cap=2.0,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy_coef=0.0,
    cu_seqlens=None,
    validate=True,
    chunk_size=None,
    process_group=None,
):
    """``grpo_opsd_loss`` on the logits ``hidden @ weight.T + bias``, without materialising them:
    ``L = L_PG + alpha * L_OPSD`` with every keyword of :func:`rlsd_kernels.grpo_opsd_loss`, the
    hidden states, weight, bias, ``chunk_size`` and memory of :func:`opsd_linear_loss`.

    ``teacher_hidden`` is the teacher's hidden states (shaped like ``student_hidden``, no gradient),
    or ``None`` with ``teacher_logprobs`` for ``divergence="sampled_token"``. Options that need a
    whole sequence first (``ratio_level="sequence"``, on-policy sequence-level importance weights)
    cost one more pass of student logits. ``process_group``: vocabulary-sharded ``weight`` (and
    ``bias``) rows, as for :func:`rlsd_kernels.rlsd_linear_loss`.
    """
    check_linear(student_hidden, weight, bias, teacher_hidden, chunk_size)
    distill = dict(divergence=divergence, beta=beta, token_clip=token_clip, alpha=alpha)
    loss, call = describe(locals(), student_hidden.shape[:-1], student_hidden.device, tokens, advantages,
                          distill=distill, grpo=True, want_entropy=return_metrics)
    check_teacher(teacher_hidden, teacher_logprobs, loss, "teacher_hidden")
    form, tensors = linear_form(student_hidden, weight, bias, teacher_hidden, chunk_size=chunk_size,
                                process_group=process_group, paired=loss.pairs_teacher, loss=True)
    return run_loss(form, tensors, loss, call, return_metrics=return_metrics, validate=validate)


def token_logprobs_linear(hidden, weight, tokens, *, bias=None, temperature=1.0, return_entropy=False,
                          validate=True, chunk_size=None, process_group=None):
    """``token_logprobs`` of the logits ``hidden @ weight.T + bias``, a chunk of rows at a time.

    The memory-light pass for teacher, reference and old-policy log-probs: only one float32
    ``[chunk_size, V]`` tile is alive (``4 * chunk_size * V`` bytes) besides the ``[N]`` outputs.
    Under autograd the backward recomputes each chunk's logits and returns gradients for
    ``hidden``, ``weight`` and ``bias``. Shapes and dtypes as for :func:`rlsd_linear_loss`; tokens
    ``[B, T]`` / ``[N]`` with ``-100`` for an ignored token (``lp = H = 0``, no gradient).
    ``validate``, ``chunk_size`` and ``process_group`` (``weight`` and ``bias`` as this rank's rows
    of a vocabulary-sharded lm_head) as for :func:`rlsd_linear_loss` (ids outside ``[0, V)`` raise).

    Returns:
        ``lp`` shaped like ``tokens`` in float32, or ``(lp, entropy)``.
    """
    check_linear(hidden, weight, bias, None, chunk_size, "hidden")
    form, tensors = linear_form(hidden, weight, bias, None, chunk_size=chunk_size, process_group=process_group,
                                paired=False, name="hidden")
    return run_logprobs(form, tensors, tokens, hidden.shape[:-1], temperature=temperature,
                        return_entropy=return_entropy, validate=validate)
