"""The vocabulary-sharded form: wraps the logits form or the linear form of this rank's shard and adds
only the collectives (``collectives.py``; design notes in ``docs/vocab-parallel.md``). The forward
gathers every rank's shard statistics once, combines them and runs the loss's own per-token
epilogue; every gradient is this rank's columns' (or its partial dH), with no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..launch import common
from ..launch.logprobs import partial_stats
from ..launch.opsd import jsd_sums
from ..launch.opsd import partial_stats as pair_stats
from ..launch.rlsd import rlsd_token_epilogue
from ..launch.terms import needs_sequence_pass, sequence_terms
from ..launch.torch_opsd import FORWARD_KL, REVERSE_KL, SAMPLED, stats_rows
from ..reference import IGNORE_INDEX
from .collectives import combine, distill_outputs, error_flags, gather_stats, local_tokens

EPILOGUE_OUTPUTS = ("loss", "d_lp", "w", "ratio", "is_weight", "kl")


class ShardedForm:
    """``inner`` (a logits or linear form over this rank's shard) over the ranks of ``group``."""

    eager_only = True

    def __init__(self, inner, group):
        # Under torch.compile the form is refused next (eager only), naming the compile.
        if not torch.compiler.is_compiling() and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
            raise TypeError(f"process_group must be a torch.distributed process group (or None), got "
                            f"{type(group).__name__}")
        self.inner, self.group = inner, group
        self.names = inner.names

    def vocab(self, tensors):
        return self.inner.vocab(tensors)

    def clear_outside(self, grad):
        """Nothing to clear: gradients are written for the form's own tensors."""

    def grad_tokens(self, tokens):
        """This rank's local ids of the last forward's tokens (``collectives.local_tokens``)."""
        return self.tokens

    def _stats(self, tensors, fn, which="student"):
        return self.inner.map_tiles(tensors, fn, which)

    def _policy_forward(self, loss, tensors, inputs, validate):
        options, live, tokens = loss.options, inputs.weight != 0, inputs.tokens
        # Only the tokens that count are scored: masked rows (with any id) cost nothing.
        scored = tokens.masked_fill(~live, IGNORE_INDEX)
        entropy = bool(options.want_entropy)
        k = 4 if entropy else 3
        teacher = getattr(self.inner, "teacher", None)

        def local(start):
            def stats(z, _, sl):
                return partial_stats(z, scored[sl], start, options.temperature, entropy)[0][:k]

            parts = [self._stats(tensors, stats)]
            if teacher is not None:
                parts.append(self._stats(tensors, lambda z, _, sl: partial_stats(
                    z, scored[sl], start, options.temperature, False)[0][:3], "teacher"))
            return torch.cat(parts)

        stats, layout = gather_stats(local, self.vocab(tensors), tokens.device, self.group, validate)
        out = {key: common.empty(tokens.shape, dtype=torch.float32, device=tokens.device) for key in EPILOGUE_OUTPUTS}
        out["lp_s"], out["lse"], lse_s_all, ent, _ = combine(stats[:, :k], live, options.temperature)
        out["entropy"] = ent if entropy else torch.zeros_like(out["lse"])
        lse_t_all = None
        if teacher is not None:
            out["lp_t"], _, lse_t_all, _, _ = combine(stats[:, k:], live, options.temperature)
        else:
            out["lp_t"] = torch.where(live, inputs.lp_t, 0.0)
        flags = error_flags(tokens, live, layout.total, lse_s_all, lse_t_all)
        return out, flags, scored, layout

    def _distill_forward(self, loss, tensors, inputs, validate):
        options, distill, live, tokens = loss.options, loss.distill, inputs.weight != 0, inputs.tokens
        scored = tokens.masked_fill(~live, IGNORE_INDEX)
        code, grpo, temperature = distill.div, distill.grpo, options.temperature
        need_lp = grpo or code == SAMPLED
        entropy = grpo and bool(options.want_entropy)
        teacher = getattr(self.inner, "teacher", None)
        names = stats_rows(code, need_lp, entropy, teacher is not None)
        k_s = 2 + need_lp + entropy
        # The rows of each model in ``stats`` ([W, k, N]), in combine's order.
        of_s, of_t = ([i for i, name in enumerate(names) if name.endswith(m)] for m in ("_s", "_t"))

        def local(start):
            if code != SAMPLED:
                return self._stats(tensors, lambda zs, zt, sl: pair_stats(
                    zs, zt, scored[sl], start, temperature, code, need_lp, entropy), "pair")
            # The sampled token needs the token log-probs only: the policy loss's statistics.
            parts = [self._stats(tensors, lambda z, _, sl: partial_stats(
                z, scored[sl], start, temperature, entropy)[0][:k_s])]
            if teacher is not None:
                parts.append(self._stats(tensors, lambda z, _, sl: partial_stats(
                    z, scored[sl], start, temperature, False)[0][:3], "teacher"))
            return torch.cat(parts)

        stats, layout = gather_stats(local, self.vocab(tensors), tokens.device, self.group, validate)

        def jsd(frame_s, frame_t):
            # The second collective: a sum of every shard's two sums per token.
            sums = self._stats(tensors, lambda zs, zt, sl: jsd_sums(
                zs, zt, scored[sl], (frame_s.ref[sl], frame_s.c[sl]), (frame_t.ref[sl], frame_t.c[sl]), temperature,
                distill.beta), "pair")
            dist.all_reduce(sums, group=self.group)
            return sums

        kl_r = stats[:, names.index("d")] if code in (FORWARD_KL, REVERSE_KL) else None
        out, flags, _ = distill_outputs(stats[:, of_s], stats[:, of_t] if teacher is not None else None, kl_r, live,
                                        inputs, layout.total, options, distill, jsd)
        if grpo:
            out.update({key: common.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
                        for key in EPILOGUE_OUTPUTS})
        return out, flags, scored, layout

    def loss_forward(self, loss, tensors, inputs, needs, validate):
        forward = self._policy_forward if loss.distill is None else self._distill_forward
        out, flags, scored, layout = forward(loss, tensors, inputs, validate)
        if validate:
            common.raise_on_error_flags(flags, inputs.tokens, layout.total, self.names)
        if loss.distill is None or loss.distill.grpo:
            if needs_sequence_pass(inputs, loss.options):
                inputs = sequence_terms(out["lp_s"], inputs, loss.options)
            rlsd_token_epilogue(out, flags, inputs, loss.options)
        self.tokens = local_tokens(scored, layout)
        grads = (None,) * len(tensors)
        if any(needs):
            stats = {k: out[k] for k in loss.saved}
            grads = self.loss_backward(loss, tensors, self.tokens, stats, inputs.weight, needs)
        return out, flags, grads

    def loss_backward(self, loss, tensors, tokens, stats, scale, needs):
        return self.inner.loss_backward(loss, tensors, tokens, stats, scale, needs)

    def logprobs_forward(self, tensors, tokens, temperature, entropy, validate):
        active = tokens != IGNORE_INDEX
        k = 4 if entropy else 3
        stats, layout = gather_stats(
            lambda start: self._stats(tensors, lambda z, _, sl: partial_stats(
                z, tokens[sl], start, temperature, entropy)[0][:k]),
            self.vocab(tensors), tokens.device, self.group, validate)
        lp, lse, lse_all, ent, _ = combine(stats, active, temperature)
        if validate:
            common.raise_on_error_flags(error_flags(tokens, active, layout.total, lse_all), tokens, layout.total,
                                        self.names)
        self.tokens = local_tokens(tokens, layout)
        return lp, lse, ent if entropy else lp.new_empty(0)

    def logprobs_backward(self, tensors, tokens, lse, coef, coef_h, entropy, temperature, needs):
        return self.inner.logprobs_backward(tensors, tokens, lse, coef, coef_h, entropy, temperature, needs)
