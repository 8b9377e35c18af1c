"""Vocabulary parallelism: the ops on logits, or lm_head rows, sharded over the vocabulary across a
process group, as Megatron's ``ColumnParallelLinear`` leaves them without gathering its output (the
OPSD losses: on logits). The only module that communicates; the public functions reach it through
their ``process_group``.

Layout. Rank ``r`` of the group holds the contiguous slice ``[start_r, start_r + V_r)`` of the
vocabulary, in group rank order, with ``start_r = V_0 + ... + V_{r-1}``: the offsets are derived, and
the shard sizes may differ (V not divisible by the group size). That is Megatron's layout (rank r of
the tensor-parallel group holds ``[r * V / W, (r + 1) * V / W)`` of the padded vocabulary), so a
Megatron-style output layer's shard passes as is; its sequence-first ``[S, B, V_r]`` logits as
``logits.transpose(0, 1)`` (a strided view, read in place) with ``[B, S]`` tokens. Student and
teacher are sharded alike; tokens and every per-token argument are the same on every rank, and each
rank holds at least one column.

Forward. Each rank runs ``logprobs.partial_stats`` on its shard (the linear form a chunk of logits
at a time): per token, in base 2, the shard's logsumexp, the token's logit where the token falls in
the shard (-inf elsewhere) and, when asked, the entropy of the shard's own softmax. Every statistic
of every model goes into one float32 buffer (its last element carries the rank's ``V_r``) and one
all-gather hands every rank every rank's buffer. Each rank combines them alike (``combine``): the
logsumexp over ranks, the token's logit as the max over ranks (one rank has it), and the entropy
``sum_r s_r * H_r - sum_r s_r * log2(s_r)`` with shares ``s_r = exp2(lse_r - lse)``. The per-token
epilogue (``rlsd.rlsd_token_epilogue``, the unsharded loss's own) and the metrics then come out the
same, bit for bit, on every rank.

Backward. No communication: with the global logsumexp (and entropy) each rank's row backward
(``logprobs.logprobs_bwd``) writes the gradient of its own columns; a token of another shard gets
the local id -1 (``ELSEWHERE``), which matches none of them. For a scalar loss it runs in the
forward, as ``rlsd_fwd``'s split strategy does, and the backward scales it by the incoming
gradient. In the linear form dW and db are this rank's rows and dH is this rank's partial sum: the
full dH is the sum over ranks, which Megatron's ``ColumnParallelLinear`` adds in the backward of its
input (the all-reduce of ``copy_to_tensor_model_parallel_region``); without such a layer, all-reduce
dH yourself. The linear form runs one logits matmul more than the unsharded one (statistics first,
then the gradients: no ``dz`` is known before the global statistics).

Communication. One all-gather per forward (``all_gather_single``, or ``all_gather_into_tensor``
where torch lacks it), nothing in the backward. Per token each rank sends ``k`` float32 values: two per model
scored from logits (logsumexp, token logit) and one for the student's entropy when it is needed
(metrics or ``entropy_coef``): ``k`` = 4 or 5 for ``rlsd_loss`` with teacher logits, 2 or 3 with
teacher log-probs and for ``token_logprobs``. Every rank receives ``4 * k * W`` bytes per token (a
ring moves ``4 * k * (W - 1)`` in and out of each rank), plus 4 bytes per rank and call: 160 bytes a
token at ``k = 5, W = 8``, 1.3 MB for 8192 tokens, where gathering the bf16 logits would move
``2 * V`` bytes a token (304 KB at V = 151,936). Megatron's vocab-parallel cross entropy issues
two all-reduces for one model (three unfused), the max before the sums.

The OPSD losses send, per token, the two logsumexps and for the KLs ``KL_r``: ``k`` = 3 for the
forward and reverse KL (and the JSD with ``beta`` 0 or 1), 2 for the JSD, 4 for the sampled token
(2 with teacher log-probs); the policy term adds the two token logits, where not already there, and
the entropy when needed (``k`` = 5 or 6 for GRPO+KL, 4 or 5 for GRPO+JSD and GRPO+sampled token).
At ``W = 8`` the forward KL receives 96 bytes a token. The JSD adds one all-reduce of two float32
values a token (a ring moves about 16 bytes a token in and out of each rank): two collectives per
forward, none in the backward. Every rank gets the same sums from the all-reduce, so the JSD too is
bit for bit the same on every rank.

OPSD (``opsd_loss`` and ``grpo_opsd_loss`` with a ``process_group``). The full-vocabulary
divergences need more per token than the log-probs. With ``a``, ``b`` the student's and teacher's
log-probs: forward ``KL(T || S) = E_T[b - a]``, reverse ``KL(S || T) = E_S[a - b]``. Each rank's
statistics kernel (``_opsd_launch.partial_stats``, one sweep over both shards) gives, per token, the shard's
base-2 logsumexps of S and T and the KL between the shard's own softmaxes, ``KL_r``; ``combine_kl``
puts them together by the chain rule over the shards, ``KL = sum_r t_r * (KL_r + log2 t_r - log2
s_r)`` with shares ``t_r = exp2(lse_T_r - lse_T)`` (and ``s_r`` alike, roles swapped for the reverse
KL), the way the entropy combines. The JSD needs ``log M_v = logsumexp(log beta + b_v, log(1 - beta)
+ a_v)``, which depends on both logsumexps of the whole rows: after the all-gather each rank sums
``T (b - log M)`` and ``S (a - log M)`` over its columns (``_opsd_launch.jsd_sums``, a second sweep) and an
all-reduce (sum) of those two values per token gives the JSD and ``KL(S || M)``. The sampled-token
surrogate needs only the token log-probs, the RLSD statistics above. With the policy term its
statistics (token logits, the student's entropy) come out of the same sweep and travel in the same
all-gather. The backward needs only the whole rows' logsumexps and the divergence's constant (``KL(S
|| T)`` or ``KL(S || M)``) per token, which every rank holds: each rank's row gradient
(``_opsd_launch.opsd_bwd``, the unsharded op's own) writes its columns with no communication.

Shard sizes. The first call on a group gathers every rank's ``V_r`` once (a handshake of one int per
rank) and caches the layout. Every later buffer carries ``V_r`` again, so a change of any rank's
shard size is seen by every rank alike: with ``validate=True`` the offsets are re-derived and the
statistics gathered again (one more all-gather on that call); with ``validate=False`` (no host
sync) that call's outputs are NaN, never wrong finite values: call once with ``validate=True``
after changing the sharding.

Validation (``validate=True``) runs after the all-gather, on the combined statistics, so that every
rank raises the same ``ValueError`` (never one rank raising while the others wait in a collective):
for a token id outside ``[0, V)`` (V the whole vocabulary) at an unmasked position, and for a row
that holds NaN or +inf on any rank, or no finite logit on any.

Backends: NCCL with CUDA tensors, gloo with CPU tensors; the test suite runs gloo on CPU in real
multi-process runs (NCCL needs several GPUs). Eager mode only (not under ``torch.compile``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import _utils
from ._opsd_cpu import FORWARD_KL, JSD, REVERSE_KL, SAMPLED, grad_coefficients, stats_rows, token_terms
from ._opsd_launch import jsd_sums, opsd_bwd
from ._opsd_launch import partial_stats as opsd_partial_stats
from ._prepare import _log_diff, needs_sequence_pass, output_metrics, sequence_terms
from ._utils import raise_on_error_flags
from .flags import Flag
from .linear import _chunks, _logits_into, _tiles, rows_bwd
from .logprobs import logprobs_bwd, partial_stats
from .opsd import _per_token_loss
from .reference import IGNORE_INDEX
from .rlsd import _backward_coefficients, rlsd_token_epilogue, scale_grad_

LN2 = 0.6931471805599453
# A local id for tokens outside this rank's columns: matches none, and is not IGNORE_INDEX (which
# would skip the row, whose columns still get -coef * p).
ELSEWHERE = -1
EPILOGUE_OUTPUTS = ("loss", "d_lp", "w", "ratio", "is_weight", "kl")
# What the OPSD row gradient needs of the forward, per token (with the policy term, "d_lp" and "entropy" too).
GRAD_STATS = ("lse", "lse_t", "k", "d_div")


@dataclass
class ShardLayout:
    """Every rank's shard size in group rank order, this rank's place, and the sizes on the device
    (int32) that the gathered ones are compared with."""

    sizes: tuple
    rank: int
    on_device: torch.Tensor

    @property
    def start(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.sizes)


_layouts: dict = {}


def _all_gather(out, x, group):
    """Every rank's ``x`` (1-D) one after the other into ``out`` ``[W * len(x)]``: the one collective."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def _remember(group, sizes):
    """Caches the layout of ``group`` from the gathered shard sizes ``sizes`` (int32, ``[W]``)."""
    _layouts[group] = ShardLayout(tuple(sizes.tolist()), dist.get_rank(group), sizes.clone())
    return _layouts[group]


def shard_layout(group, local_vocab, device) -> ShardLayout:
    """The layout of ``group``: cached, or from the handshake, one small all-gather on the first call."""
    if group not in _layouts:
        sizes = torch.empty((dist.get_world_size(group),), dtype=torch.int32, device=device)
        _all_gather(sizes, torch.tensor([local_vocab], dtype=torch.int32, device=device), group)
        _remember(group, sizes)
    return _layouts[group]


def gather_stats(local_stats, local_vocab, device, group, validate):
    """``(stats, layout)``: every rank's ``local_stats(vocab_start)`` (``[k, N]`` float32) stacked
    into ``[W, k, N]`` by one all-gather, with the layout they were computed with (see the module
    docstring for a change of shard sizes)."""
    layout = shard_layout(group, local_vocab, device)
    for _ in range(2):
        stats = local_stats(layout.start)
        k, n = stats.shape
        send = torch.empty((k * n + 1,), dtype=torch.float32, device=device)
        send[:-1].view(k, n).copy_(stats)
        send[-1:].view(torch.int32).fill_(local_vocab)
        recv = torch.empty((len(layout.sizes) * (k * n + 1),), dtype=torch.float32, device=device)
        _all_gather(recv, send, group)
        recv = recv.view(-1, k * n + 1)
        gathered = recv[:, :-1].view(-1, k, n)
        same = (recv[:, -1].view(torch.int32) == layout.on_device.to(device)).all()
        if not validate:
            return torch.where(same, gathered, float("nan")), layout
        if bool(same):
            return gathered, layout
        layout = _remember(group, recv[:, -1].view(torch.int32))
    raise RuntimeError("the vocabulary shard sizes changed between two all-gathers of one call")


def combine_lse(lse_r):
    """The base-2 logsumexp of the whole rows from every shard's ``lse_r`` ``[W, N]``: -inf where
    every shard's is, NaN where any is."""
    top = lse_r.amax(0)
    # All -inf: a reference of 0 keeps -inf - ref from being NaN; a NaN top stays NaN through the sum.
    ref = torch.where(torch.isfinite(top), top, 0.0)
    return ref + torch.log2(torch.exp2(lse_r - ref).sum(0))


def combine(stats, active):
    """``(lp, lse, lse2, entropy)`` of the whole vocabulary from every rank's base-2 statistics
    ``stats`` ``[W, 1 to 3, N]`` (logsumexp, the token's logit, the shard's entropy): ``lp``,
    ``lse`` and ``entropy`` in natural units and 0 at inactive tokens, as the unsharded launchers
    give them; ``lse2`` unmasked, for the error checks; ``lp`` 0 without the second row, ``entropy``
    None without the third."""
    lse_r = stats[:, 0]
    lse2 = combine_lse(lse_r)
    lp = torch.zeros_like(lse2)
    if stats.shape[1] > 1:
        lp = torch.where(active, ((stats[:, 1].amax(0) - lse2) * LN2).clamp(max=0.0), 0.0)
    entropy = None
    if stats.shape[1] > 2:
        share = torch.exp2(lse_r - lse2)
        mixture = torch.where(share > 0, share * (stats[:, 2] - torch.log2(share)), 0.0).sum(0)
        entropy = torch.where(active, mixture * LN2, 0.0)
    return lp, torch.where(active, lse2 * LN2, 0.0), lse2, entropy


def combine_kl(lse_p_r, lse_q_r, kl_r, lse_p, lse_q):
    """``KL(P || Q)`` of the whole rows in nats, from every shard's base-2 logsumexps of P and Q
    (``[W, N]``), its own ``KL(P_r || Q_r)`` between the shard's softmaxes (base 2) and the whole
    rows' logsumexps ``lse_p``, ``lse_q``, by the chain rule over the shards: with the shares
    ``p_r = exp2(lse_p_r - lse_p)`` and ``q_r`` alike, ``KL = sum_r p_r * (KL_r + log2 p_r - log2
    q_r)``. A shard without P mass adds nothing; one with P mass and no Q mass makes the KL +inf;
    NaN stays NaN."""
    log_p, log_q = lse_p_r - lse_p, lse_q_r - lse_q
    share = torch.exp2(log_p)
    kl_r = torch.where(lse_q_r == float("-inf"), 0.0, kl_r)
    return LN2 * torch.where(share == 0, 0.0, share * (kl_r + log_p - log_q)).sum(0)


def _error_flags(tokens, active, vocab, lse2_s, lse2_t=None):
    flags = (active & ((tokens < 0) | (tokens >= vocab))).int() * int(Flag.BAD_TOKEN)
    flags |= (active & ~torch.isfinite(lse2_s)).int() * int(Flag.NONFINITE_STUDENT)
    if lse2_t is not None:
        flags |= (active & ~torch.isfinite(lse2_t)).int() * int(Flag.NONFINITE_TEACHER)
    return flags


def _local_tokens(tokens, layout):
    """Ids in this rank's columns; ``ELSEWHERE`` for the others, ``IGNORE_INDEX`` kept."""
    local = tokens - layout.start
    mine = (local >= 0) & (local < layout.sizes[layout.rank])
    return torch.where(tokens == IGNORE_INDEX, IGNORE_INDEX, torch.where(mine, local, ELSEWHERE))


class LogitsShard:
    """The logits form: ``tensors`` is ``(student,)``, this rank's ``[..., V_r]`` logits."""

    def __init__(self, temperature, teacher=None, names=None):
        self.temperature, self.teacher = temperature, teacher
        self.names = names or {"tokens": "tokens", "student": "student_logits", "teacher": "teacher_logits"}

    def vocab(self, tensors):
        return tensors[0].shape[-1]

    def stats(self, tensors, teacher, tokens, start, entropy):
        return partial_stats(self.teacher if teacher else tensors[0], tokens, start, self.temperature, entropy)[0]

    def grads(self, tensors, per_token, needs, inplace=False):
        if not needs[0]:
            return (None,)
        out = tensors[0] if inplace else None
        return (logprobs_bwd(tensors[0], temperature=self.temperature, out=out, **per_token),)


class LinearShard:
    """The fused linear form: ``tensors`` is ``(hidden, weight, bias)`` with this rank's ``[V_r, H]``
    weight rows (and ``[V_r]`` bias); logits a chunk of ``chunk`` token rows at a time."""

    def __init__(self, temperature, chunk, teacher=None, student="student_hidden", teacher_name="teacher_hidden"):
        self.temperature, self.chunk, self.teacher = temperature, chunk, teacher
        self.names = {"tokens": "tokens", "student": f"logits of {student} @ weight.T",
                      "teacher": f"logits of {teacher_name} @ weight.T"}

    def vocab(self, tensors):
        return tensors[1].shape[0]

    def stats(self, tensors, teacher, tokens, start, entropy):
        _, weight, bias = tensors
        rows, chunks = _chunks(self.teacher if teacher else tensors[0], self.chunk)
        work, _ = _tiles(rows, weight.shape[0], None, weight.device)
        return torch.cat([
            partial_stats(_logits_into(work[: h.shape[0]], h, weight, bias), tokens[sl], start, self.temperature,
                          entropy)[0]
            for sl, h in chunks
        ], dim=1)

    def grads(self, tensors, per_token, needs, inplace=False):
        return rows_bwd(*tensors, per_token, self.temperature, self.chunk, needs)


def _row_terms(tokens, out, weight, params):
    """``logprobs_bwd``'s per-token arguments for the gradient of ``sum(weight * loss)``."""
    coef = torch.empty_like(weight)
    coef_h = torch.empty_like(weight) if params["entropy_coef"] != 0 else None
    _backward_coefficients({"weight": weight}, params, out, coef, coef_h)
    return dict(tokens=tokens, lse=out["lse"], coef=coef, coef_h=coef_h, entropy=out["entropy"])


def loss_forward(source, tensors, inputs, params, group, validate):
    """``(outputs, flags, local tokens)``: the per-token ``OUTPUTS`` and flags of the RLSD loss over
    the whole vocabulary, the same on every rank, and the ids in this rank's columns."""
    live = inputs["weight"] != 0
    tokens = inputs["tokens"]
    # Only the tokens that count are scored: masked rows (with any id) cost nothing.
    scored = tokens.masked_fill(~live, IGNORE_INDEX)
    entropy = bool(params["want_entropy"])
    k = 3 if entropy else 2

    def local(start):
        parts = [source.stats(tensors, False, scored, start, entropy)[:k]]
        if source.teacher is not None:
            parts.append(source.stats(tensors, True, scored, start, False)[:2])
        return torch.cat(parts)

    stats, layout = gather_stats(local, source.vocab(tensors), tokens.device, group, validate)
    # What the epilogue writes; the rest comes from the combined statistics.
    out = {key: _utils.empty(tokens.shape, dtype=torch.float32, device=tokens.device) for key in EPILOGUE_OUTPUTS}
    out["lp_s"], out["lse"], lse2_s, ent = combine(stats[:, :k], live)
    out["entropy"] = ent if entropy else torch.zeros_like(out["lse"])
    lse2_t = None
    if source.teacher is not None:
        out["lp_t"], _, lse2_t, _ = combine(stats[:, k:], live)
    else:
        out["lp_t"] = torch.where(live, inputs["lp_t"], 0.0)
    flags = _error_flags(tokens, live, layout.total, lse2_s, lse2_t)
    if validate:
        raise_on_error_flags(flags, tokens, layout.total, source.names)
    if needs_sequence_pass(inputs, params):
        inputs = sequence_terms(out["lp_s"], inputs, params)
    rlsd_token_epilogue(out, flags, inputs, params)
    return out, flags, _local_tokens(scored, layout)


class ShardedLossFunction(torch.autograd.Function):
    """The RLSD loss over vocabulary shards. A scalar loss has its gradients written in the forward
    and scaled in the backward; per-token losses (``per_token``) run the row backward then."""

    @staticmethod
    def forward(ctx, source, inputs, params, group, per_token, track, inplace, validate, *tensors):
        out, flags, tokens = loss_forward(source, tensors, inputs, params, group, validate)
        loss = inputs["weight"] * out["loss"]
        ctx.source, ctx.params, ctx.per_token, ctx.inplace = source, params, per_token, inplace
        if per_token:
            ctx.save_for_backward(*tensors, tokens, inputs["weight"], out["lse"], out["d_lp"], out["entropy"])
        else:
            needs = tuple(track and n for n in ctx.needs_input_grad[8:])
            grads = (None,) * len(tensors)
            if any(needs):
                grads = source.grads(tensors, _row_terms(tokens, out, inputs["weight"], params), needs, inplace)
            ctx.grads = tuple(None if g is None else g.detach() for g in grads)
            ctx.used = False
            loss = loss.sum()
        ctx.mark_non_differentiable(flags)
        # The per-token outputs travel as a dict: detached.
        return loss, out, flags

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        head = (None,) * 8
        if ctx.per_token:
            *tensors, tokens, weight, lse, d_lp, entropy = ctx.saved_tensors
            upstream = grad_loss.float().reshape(-1) * weight
            terms = _row_terms(tokens, {"lse": lse, "d_lp": d_lp, "entropy": entropy}, upstream, ctx.params)
            return head + ctx.source.grads(tensors, terms, ctx.needs_input_grad[8:], ctx.inplace)
        if ctx.used:
            raise RuntimeError("the gradients of the vocabulary-parallel loss were computed in the forward pass "
                               "and are already used; backward through it twice is not supported")
        # Dropping ctx's references lets autograd take a gradient as .grad without a copy.
        grads, ctx.grads, ctx.used = ctx.grads, None, True
        scale = grad_loss.float().reshape(1)
        for g in grads:
            if g is not None:
                scale_grad_(g if g.dim() > 1 else g.view(1, -1), scale)
        return head + grads


class ShardedLogprobsFunction(torch.autograd.Function):
    """Token log-probs (and entropies) over vocabulary shards; the backward runs the row backward."""

    @staticmethod
    def forward(ctx, source, tokens, want_entropy, group, validate, *tensors):
        active = tokens != IGNORE_INDEX
        k = 3 if want_entropy else 2
        stats, layout = gather_stats(lambda start: source.stats(tensors, False, tokens, start, want_entropy)[:k],
                                     source.vocab(tensors), tokens.device, group, validate)
        lp, lse, lse2, ent = combine(stats, active)
        if validate:
            raise_on_error_flags(_error_flags(tokens, active, layout.total, lse2), tokens, layout.total,
                                 source.names)
        ent = ent if want_entropy else lp.new_empty(0)
        ctx.save_for_backward(*tensors, _local_tokens(tokens, layout), lse, ent)
        ctx.source, ctx.want_entropy = source, want_entropy
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        *tensors, tokens, lse, ent = ctx.saved_tensors
        entropy = ctx.want_entropy
        terms = dict(tokens=tokens, lse=lse, coef=grad_lp.float().contiguous(),
                     coef_h=grad_ent.float().contiguous() if entropy else None, entropy=ent if entropy else None)
        return (None,) * 5 + ctx.source.grads(tensors, terms, ctx.needs_input_grad[5:])


def opsd_forward(student, teacher, inputs, params, opsd, group, validate):
    """``(outputs, flags, local tokens)``: the OPSD launchers' per-token outputs (``output_names``)
    over the whole vocabulary, the same on every rank, from this rank's ``student`` and ``teacher``
    shards (``teacher`` None with precomputed teacher log-probs); ``opsd`` as for ``_opsd_launch.opsd_fwd``."""
    live = inputs["weight"] != 0
    tokens = inputs["tokens"]
    scored = tokens.masked_fill(~live, IGNORE_INDEX)
    code, grpo, temperature = opsd["div"], opsd["grpo"], params["temperature"]
    need_lp = grpo or code == SAMPLED
    entropy = grpo and bool(params["want_entropy"])
    names = stats_rows(code, need_lp, entropy, teacher is not None)
    k_s = 1 + need_lp + entropy
    # The rows of each model in ``stats`` ([W, k, N]), in combine's order.
    of_s, of_t = ([i for i, name in enumerate(names) if name.endswith(m)] for m in ("_s", "_t"))

    def local(start):
        if code != SAMPLED:
            return opsd_partial_stats(student, teacher, scored, start, temperature, code, need_lp, entropy)
        # The sampled token needs the token log-probs only: the RLSD loss's statistics.
        parts = [partial_stats(student, scored, start, temperature, entropy)[0][:k_s]]
        if teacher is not None:
            parts.append(partial_stats(teacher, scored, start, temperature, False)[0][:2])
        return torch.cat(parts)

    stats, layout = gather_stats(local, student.shape[-1], tokens.device, group, validate)
    zeros = torch.zeros_like(inputs["weight"])
    out = {"entropy": zeros, "lse_t": zeros, "k": zeros}
    out["lp_s"], out["lse"], lse2_s, ent = combine(stats[:, of_s], live)
    if entropy:
        out["entropy"] = ent
    lse2_t = None
    if teacher is not None:
        out["lp_t"], out["lse_t"], lse2_t, _ = combine(stats[:, of_t], live)
    else:
        out["lp_t"] = torch.where(live, inputs["lp_t"], 0.0)
    flags = _error_flags(tokens, live, layout.total, lse2_s, lse2_t)
    if not need_lp:
        # The full-vocabulary divergences use the ids only as a mask, as the unsharded loss does.
        flags &= ~int(Flag.BAD_TOKEN)
    if validate:
        raise_on_error_flags(flags, tokens, layout.total, {"tokens": "tokens", "student": "student_logits",
                                                           "teacher": "teacher_logits"})
    if code in (FORWARD_KL, REVERSE_KL):
        lse_s_r, lse_t_r, kl_r = (stats[:, names.index(name)] for name in ("lse_s", "lse_t", "d"))
        if code == FORWARD_KL:
            div = combine_kl(lse_t_r, lse_s_r, kl_r, lse2_t, lse2_s)
        else:
            div = out["k"] = combine_kl(lse_s_r, lse_t_r, kl_r, lse2_s, lse2_t)
    elif code == JSD:
        # log M needs both logsumexps of the whole rows: the second collective, a sum of every
        # shard's two sums per token.
        sums = jsd_sums(student, teacher, scored, out["lse"], out["lse_t"], temperature, opsd["beta"])
        dist.all_reduce(sums, group=group)
        out["k"] = LN2 * sums[1]
        div = opsd["beta"] * LN2 * sums[0] + (1.0 - opsd["beta"]) * out["k"]
    else:
        div = _log_diff(out["lp_s"], out["lp_t"])
    out["k"] = torch.where(live, out["k"], 0.0)
    out["div"] = torch.where(live, div, 0.0)
    value, d_div, _ = token_terms(out["div"], out["lp_s"], code, opsd["token_clip"])
    out["opsd"], out["d_div"] = torch.where(live, value, 0.0), torch.where(live, d_div, 0.0)
    if grpo:
        out.update({key: _utils.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
                    for key in EPILOGUE_OUTPUTS})
        if needs_sequence_pass(inputs, params):
            inputs = sequence_terms(out["lp_s"], inputs, params)
        rlsd_token_epilogue(out, flags, inputs, params)
    return out, flags, _local_tokens(scored, layout)


def _opsd_grad(student, teacher, tokens, out, scale, params, opsd, inplace):
    coefs = grad_coefficients(out, scale, params["entropy_coef"], opsd)
    return opsd_bwd(student, teacher, tokens, out, coefs, params["temperature"], opsd,
                    out=student if inplace else None)


class ShardedOPSDFunction(torch.autograd.Function):
    """OPSD (or GRPO+OPSD) over vocabulary shards, as ``ShardedLossFunction``: a scalar loss has its
    gradient written in the forward and scaled in the backward; per-token losses (``per_token``) run
    the row gradient then, from the saved per-token statistics of the whole rows."""

    @staticmethod
    def forward(ctx, inputs, params, opsd, group, per_token, track, inplace, validate, student, teacher):
        out, flags, tokens = opsd_forward(student, teacher, inputs, params, opsd, group, validate)
        loss = inputs["weight"] * _per_token_loss(out, opsd)
        ctx.params, ctx.opsd, ctx.per_token, ctx.inplace = params, opsd, per_token, inplace
        if per_token:
            ctx.keys = GRAD_STATS + (("d_lp", "entropy") if opsd["grpo"] else ())
            ctx.save_for_backward(student, teacher, tokens, inputs["weight"], *(out[k] for k in ctx.keys))
        else:
            grad = None
            if track and ctx.needs_input_grad[8]:
                grad = _opsd_grad(student, teacher, tokens, out, inputs["weight"], params, opsd, inplace).detach()
            ctx.grad, ctx.used = grad, False
            loss = loss.sum()
        ctx.mark_non_differentiable(flags)
        return loss, out, flags

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        head = (None,) * 8
        if ctx.per_token:
            student, teacher, tokens, weight, *saved = ctx.saved_tensors
            stats = dict(zip(ctx.keys, saved, strict=True))
            scale = grad_loss.float().reshape(-1) * weight
            return head + (_opsd_grad(student, teacher, tokens, stats, scale, ctx.params, ctx.opsd, ctx.inplace), None)
        if ctx.used:
            raise RuntimeError("the gradient of the vocabulary-parallel OPSD loss was computed in the forward pass "
                               "and is already used; backward through it twice is not supported")
        grad, ctx.grad, ctx.used = ctx.grad, None, True
        if grad is not None:
            scale_grad_(grad, grad_loss.float().reshape(1))
        return head + (grad, None)


def _check_eager():
    if torch.compiler.is_compiling():
        raise ValueError("process_group is not supported under torch.compile")


def sharded_loss(source, tensors, prepared, group, *, loss_agg, inplace, return_metrics, validate):
    """``rlsd_loss`` / ``rlsd_linear_loss`` with a ``process_group``, from their prepared arguments
    (``_prepare.LossInputs``); ``tensors`` are the differentiable inputs of ``source``."""
    _check_eager()
    inputs, params, mask, token_shape = prepared
    per_token = loss_agg == "none"
    loss, out, flags = ShardedLossFunction.apply(source, inputs, params, group, per_token, torch.is_grad_enabled(),
                                                 inplace, validate, *tensors)
    if per_token:
        loss = loss.view(token_shape)
    return (loss, output_metrics(out, flags, mask, inputs, params)) if return_metrics else loss


def sharded_logprobs(source, tensors, tokens, group, *, return_entropy, validate):
    """``token_logprobs`` / ``token_logprobs_linear`` with a ``process_group``."""
    _check_eager()
    lp, ent = ShardedLogprobsFunction.apply(source, tokens.reshape(-1), bool(return_entropy), group, validate,
                                            *tensors)
    lp = lp.view(tokens.shape)
    return (lp, ent.view(tokens.shape)) if return_entropy else lp


def sharded_opsd_loss(student, teacher, prepared, opsd, group, *, loss_agg, inplace, validate):
    """``opsd_loss`` / ``grpo_opsd_loss`` with a ``process_group``, from their prepared arguments:
    ``(loss, per-token outputs, flags)``, the outputs and flags for their metrics."""
    _check_eager()
    inputs, params, _, token_shape = prepared
    per_token = loss_agg == "none"
    loss, out, flags = ShardedOPSDFunction.apply(inputs, params, opsd, group, per_token, torch.is_grad_enabled(),
                                                 inplace, validate, student, teacher)
    return (loss.view(token_shape) if per_token else loss), out, flags
