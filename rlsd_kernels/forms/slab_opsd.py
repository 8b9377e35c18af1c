"""The OPSD losses (``opsd_linear_loss``, ``grpo_opsd_linear_loss``) on the slab schedule of the fused
linear form (``slab.py``; design notes and the count of weight streams in ``docs/linear-form.md``:
the slab schedule).

What the vocabulary-sharded form does for them (``sharded.py: _distill_forward``), with a chunk's
slabs in place of the ranks and no collective. Per chunk and slab, one matmul of the stacked student
and teacher rows and the pair's statistics in the slab's own frame (``launch/opsd.py:
partial_stats``; the sampled-token surrogate takes the policy loss's, ``Slabs.stats``); the slabs
combine as shards do (``collectives.combine``, and ``combine_kl`` by the chain rule over the slabs);
the JSD takes a second sweep over the slabs with the whole rows' frames (``launch/opsd.py:
jsd_sums``); then the per-token terms and, for GRPO+OPSD, the RLSD epilogue. The gradient is
written slab by slab from the whole rows' statistics by the loss's own row backward on the slab's
columns (``DistillLoss.backward``, as a vocabulary shard writes its columns), one more sweep of both
models' rows; the sampled-token surrogate without an entropy term needs ``p`` only, and writes the
slab softmaxes during the statistics sweep and rescales them as the policy loss does. Then dH, dW
and db (``chunks.Grads``).
"""

from __future__ import annotations

import torch

from ..launch import common
from ..launch.opsd import jsd_sums
from ..launch.opsd import partial_stats as pair_stats
from ..launch.rlsd import rlsd_token_epilogue
from ..launch.terms import needs_sequence_pass, sequence_terms
from ..launch.torch_opsd import SAMPLED, grad_coefficients, stats_rows
from ..reference import IGNORE_INDEX
from . import rows as skip
from . import slab
from .chunks import Grads
from .collectives import distill_outputs


def _slab_stats(slabs, h, t, scored, distill, need_lp, entropy, write):
    """``(student, teacher, kl)`` of a chunk: each slab's statistics ``[S, k, c]`` per model in
    ``combine``'s order (the teacher's None without its hidden states) and, for the forward and
    reverse KL, each slab's own KL ``[S, c]``; one matmul per slab for both models' rows. With
    ``write`` (the sampled token only) the student's slab softmaxes go there (``Slabs.stats``)."""
    code, tau = distill.div, slabs.temperature
    if code == SAMPLED:
        # The sampled token needs the token log-probs only: the policy loss's statistics.
        student, teacher = slabs.stats(h, t, scored, 2 + need_lp + entropy, write)
        return student, teacher, None
    names = stats_rows(code, need_lp, entropy)
    of_s, of_t = ([i for i, name in enumerate(names) if name.endswith(m)] for m in ("_s", "_t"))
    c, stacked = h.shape[0], torch.cat([h, t])
    parts = []
    for a, b in slabs.bounds:
        z = slabs.logits(stacked, a, b)
        parts.append(pair_stats(z[:c], z[c:], scored, a, tau, code, need_lp, entropy))
    stats = torch.stack(parts)
    kl = stats[:, names.index("d")] if "d" in names else None
    return stats[:, of_s], stats[:, of_t], kl


def _jsd_sums(slabs, h, t, scored, frame_s, frame_t, beta):
    """``[2, c]``: the JSD's two sums of the chunk's rows over every slab (``jsd_sums``, a second
    sweep: ``log M`` needs both whole rows' frames)."""
    c, stacked = h.shape[0], torch.cat([h, t])
    sums = None
    for a, b in slabs.bounds:
        z = slabs.logits(stacked, a, b)
        part = jsd_sums(z[:c], z[c:], scored, (frame_s.ref, frame_s.c), (frame_t.ref, frame_t.c), slabs.temperature,
                        beta)
        sums = part if sums is None else sums.add_(part)
    return sums


def _chunk_terms(slabs, loss, h, t, scored, inputs, live, vocab, write):
    """``(out, flags, frame)`` of a chunk: the per-token outputs of the OPSD launchers (``output_names``),
    its error bits and the student's whole rows' ``Frame``."""
    options, distill = loss.options, loss.distill
    code, grpo = distill.div, distill.grpo
    need_lp = grpo or code == SAMPLED
    entropy = grpo and bool(options.want_entropy)
    student, teacher, kl_r = _slab_stats(slabs, h, t, scored, distill, need_lp, entropy, write)
    out, flags, frame_s = distill_outputs(student, teacher, kl_r, live, inputs, vocab, options, distill,
                                          lambda fs, ft: _jsd_sums(slabs, h, t, scored, fs, ft, distill.beta))
    if grpo:
        out.update({k: common.empty(live.shape, dtype=torch.float32, device=live.device)
                    for k in slab.EPILOGUE_OUTPUTS})
        rlsd_token_epilogue(out, flags, inputs, options)
    return out, flags, frame_s


def distill_forward(form, loss, tensors, inputs, needs, validate):
    """``LinearForm.loss_forward`` of the OPSD losses (``loss.distill``) on the slab schedule."""
    hidden, weight, bias = tensors
    options, distill, vocab = loss.options, loss.distill, weight.shape[0]
    code, tau = distill.div, options.temperature
    track = any(needs)
    live = inputs.weight != 0
    scored = inputs.tokens.masked_fill(~live, IGNORE_INDEX)
    if distill.grpo and needs_sequence_pass(inputs, options):
        inputs = sequence_terms(slab._student_logprobs(form, tensors, scored, live, tau), inputs, options)
    # The OPSD terms have a gradient at any advantage: only the masked rows are skipped.
    plan = skip.plan(live)
    grads = Grads(hidden, weight, bias, needs, plan, form.dw_fp32_for(weight)) if track else None
    with_teacher = form.teacher is not None
    # The sampled token without an entropy term needs p only: the slab softmaxes, rescaled.
    probs = code == SAMPLED and not (distill.grpo and options.entropy_coef != 0)
    rows, parts = slab.chunks(form, hidden, plan, with_teacher)
    slabs = slab.Slabs(form, tensors, rows, rows * (2 if with_teacher else 1), tau, weight.dtype if track else None)
    outs, flags = [], []
    for sl, h, t, n_grad in parts:
        dz = slabs.dz[: h.shape[0]] if track else None
        write = dz[:n_grad] if track and probs else None
        chunk_inputs = inputs.sliced(sl)
        out, f, frame = _chunk_terms(slabs, loss, h, t, scored[sl], chunk_inputs, live[sl], vocab, write)
        outs.append(out)
        flags.append(f)
        if not track or n_grad == 0:
            continue
        scale = chunk_inputs.weight[:n_grad]
        saved = {key: out[key][:n_grad] for key in loss.saved}
        tokens = chunk_inputs.tokens[:n_grad]
        if probs:
            c_lp = grad_coefficients(saved, scale, options.entropy_coef, distill)[0]
            slab._rescale(dz[:n_grad], out["lp_s"][:n_grad], slab.frame_rows(frame, n_grad), tokens, c_lp, tau,
                          slabs.cols)
        else:
            t_rows = None if code == SAMPLED or t is None else t[:n_grad]
            slabs.gradient(h[:n_grad], tokens, lambda z, zt, ids, dest, saved=saved, scale=scale:
                           loss.backward(z, zt, ids, saved, scale, out=dest), dz[:n_grad], t_rows)
        grads.add(sl, dz, h, live[sl] if plan is None else None, n_grad)
    out, flags = slab._join(outs, plan), slab._join(flags, plan)
    if validate:
        common.raise_on_error_flags(flags, inputs.tokens, vocab, form.names)
    return out, flags, grads.result() if track else (None, None, None)
