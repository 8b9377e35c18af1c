"""The vocabulary-parallel collectives: each rank's shard statistics put together into the whole
rows' statistics, the same on every rank. Design notes and communication volumes:
``docs/vocab-parallel.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..flags import Flag
from ..launch.torch_opsd import FORWARD_KL, JSD, REVERSE_KL, SAMPLED, token_terms
from ..reference import IGNORE_INDEX, _log_diff

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634
# A local id for tokens outside this rank's columns: matches none, and is not IGNORE_INDEX (which
# would skip the row, whose columns still get -coef * p).
ELSEWHERE = -1


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


class Frame(NamedTuple):
    """The whole rows' softmax in the frame of the largest shard reference ``ref`` (logits' units):
    ``c`` the base-2 log-sum there, and ``shard`` every shard's log-sum moved into it (``[W, N]``),
    so that ``shard - c`` is the base-2 log of each shard's share of the mass."""

    ref: torch.Tensor
    c: torch.Tensor
    shard: torch.Tensor

    def lse(self, temperature):
        """The natural logsumexp of the scaled logits: one rounding of ``ref / tau`` (exact at 1)."""
        return self.ref / temperature + self.c * LN2


def combine_frame(ref_r, c_r, scale2):
    """``Frame`` of the whole rows from every shard's ``[W, N]`` references (logits' units) and base-2
    log-sums in their own frames. Only differences of references and log-sums are formed, never a
    logsumexp of the logits' magnitude, so the log-probs that follow stay precise at any offset. The
    log-sum is -inf where no shard has mass, NaN where any is NaN."""
    has_mass = c_r > float("-inf")
    ref = torch.where(has_mass, ref_r, float("-inf")).amax(0)
    ref = torch.where(ref == float("-inf"), 0.0, ref)
    shard = (ref_r - ref) * scale2 + c_r
    top = shard.amax(0)
    # All -inf: a reference of 0 keeps -inf - top from being NaN; a NaN top stays NaN through the sum.
    top = torch.where(torch.isfinite(top), top, 0.0)
    return Frame(ref, top + torch.log2(torch.exp2(shard - top).sum(0)), shard)


def combine(stats, active, temperature):
    """``(lp, lse, lse_all, entropy, frame)`` of the whole vocabulary from every rank's statistics
    ``stats`` ``[W, 2 to 4, N]`` (reference, base-2 log-sum, the token's base-2 log-prob, the shard's
    entropy, each under the shard's own softmax): ``lp``, ``lse`` and ``entropy`` in natural units and
    0 at inactive tokens, as the unsharded launchers give them; ``lse_all`` unmasked, for the error
    checks; ``lp`` 0 without the third row, ``entropy`` None without the fourth."""
    frame = combine_frame(stats[:, 0], stats[:, 1], LOG2E / temperature)
    lse_all = frame.lse(temperature)
    lp = torch.zeros_like(lse_all)
    if stats.shape[1] > 2:
        # The token's shard gives its log-prob; every other shard's is -inf.
        lp = torch.where(active, (((stats[:, 2] + frame.shard).amax(0) - frame.c) * LN2).clamp(max=0.0), 0.0)
    entropy = None
    if stats.shape[1] > 3:
        log_share = frame.shard - frame.c
        share = torch.exp2(log_share)
        # share == 0, not share > 0: a NaN share (an invalid row) must stay NaN.
        mixture = torch.where(share == 0, 0.0, share * (stats[:, 3] - log_share)).sum(0)
        entropy = torch.where(active, mixture * LN2, 0.0)
    return lp, torch.where(active, lse_all, 0.0), lse_all, entropy, frame


def combine_kl(p, q, kl_r):
    """``KL(P || Q)`` of the whole rows in nats, from the ``Frame`` of each and every shard's own
    ``KL(P_r || Q_r)`` between the shard's softmaxes (base 2), by the chain rule over the shards: with
    the shares ``p_r`` and ``q_r`` of each shard's mass, ``KL = sum_r p_r * (KL_r + log2 p_r - log2
    q_r)``. A shard without P mass adds nothing; one with P mass and no Q mass makes the KL +inf;
    NaN stays NaN."""
    log_p, log_q = p.shard - p.c, q.shard - q.c
    share = torch.exp2(log_p)
    kl_r = torch.where(q.shard == float("-inf"), 0.0, kl_r)
    return LN2 * torch.where(share == 0, 0.0, share * (kl_r + log_p - log_q)).sum(0)


def distill_outputs(student, teacher, kl_r, live, inputs, vocab, options, distill, jsd_sums):
    """``(out, flags, frame_s)``: the OPSD launchers' per-token outputs (the policy epilogue's left to
    the caller) from shard (or slab) statistics ``[W, k, N]`` of each model in ``combine``'s order
    (the teacher's None where it gives log-probs, ``inputs.lp_t``) and, for the forward and reverse
    KL, each shard's own KL ``kl_r`` ``[W, N]``; ``jsd_sums(frame_s, frame_t)`` gives the JSD's two
    sums over the whole rows (a second sweep: ``log M`` needs both whole rows' frames)."""
    code, tau = distill.div, options.temperature
    zeros = torch.zeros_like(inputs.weight)
    out = {"entropy": zeros, "lse_t": zeros, "k": zeros}
    out["lp_s"], out["lse"], lse_s_all, ent, frame_s = combine(student, live, tau)
    if distill.grpo and options.want_entropy:
        out["entropy"] = ent
    lse_t_all = frame_t = None
    if teacher is not None:
        out["lp_t"], out["lse_t"], lse_t_all, _, frame_t = combine(teacher, live, tau)
    else:
        out["lp_t"] = torch.where(live, inputs.lp_t, 0.0)
    flags = error_flags(inputs.tokens, live, vocab, lse_s_all, lse_t_all)
    if not (distill.grpo or code == SAMPLED):
        # The full-vocabulary divergences use the ids only as a mask, as the unsharded loss does.
        flags &= ~int(Flag.BAD_TOKEN)
    if code == FORWARD_KL:
        div = combine_kl(frame_t, frame_s, kl_r)
    elif code == REVERSE_KL:
        div = out["k"] = combine_kl(frame_s, frame_t, kl_r)
    elif code == JSD:
        sums = jsd_sums(frame_s, frame_t)
        out["k"] = LN2 * sums[1]
        div = distill.beta * LN2 * sums[0] + (1.0 - distill.beta) * out["k"]
    else:
        div = _log_diff(out["lp_s"], out["lp_t"])
    out["k"] = torch.where(live, out["k"], 0.0)
    out["div"] = torch.where(live, div, 0.0)
    value, d_div, _ = token_terms(out["div"], out["lp_s"], code, distill.token_clip)
    out["opsd"], out["d_div"] = torch.where(live, value, 0.0), torch.where(live, d_div, 0.0)
    return out, flags, frame_s


def error_flags(tokens, active, vocab, lse_s, lse_t=None):
    flags = (active & ((tokens < 0) | (tokens >= vocab))).int() * int(Flag.BAD_TOKEN)
    flags |= (active & ~torch.isfinite(lse_s)).int() * int(Flag.NONFINITE_STUDENT)
    if lse_t is not None:
        flags |= (active & ~torch.isfinite(lse_t)).int() * int(Flag.NONFINITE_TEACHER)
    return flags


def local_tokens(tokens, layout):
    """Ids in this rank's columns; ``ELSEWHERE`` for the others, ``IGNORE_INDEX`` kept."""
    local = tokens - layout.start
    mine = (local >= 0) & (local < layout.sizes[layout.rank])
    return torch.where(tokens == IGNORE_INDEX, IGNORE_INDEX, torch.where(mine, local, ELSEWHERE))
