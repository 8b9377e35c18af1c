"""What ``RLSDTrainer`` logs: TRL's metric names with the meaning ``GRPOTrainer`` gives them, and the
RLSD metrics as true means over a logging window.

TRL appends one value per micro-batch and its ``log()`` averages the list. Under TRL's names
(``entropy``, ``kl``, ``clip_ratio/*``, ``cispo_clip_ratio``) the values are computed as
``GRPOTrainer._compute_loss`` computes them, from the same quantities (the student's and the old
log-probs, the advantages, the mask). The credit metrics are means over the tokens with ``A != 0``
(the library's ``num_credit_tokens``), so they are kept as running sums and counts until ``log()``:
a micro-batch without such tokens adds nothing, and the logged value is the mean over every credit
token of the window, on every rank.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import nanmax, nanmin

CREDIT_METRICS = ("credit_weight_mean", "credit_clip_low_frac", "credit_clip_high_frac", "delta_mean")


def clip_indicators(loss_type, logprobs, old_logprobs, advantages, mask, *, level, epsilon_low, epsilon_high):
    """TRL's clip indicators of one micro-batch, by metric name: bool ``[B, T]``, or ``[B, 1]`` with
    ``level="sequence"`` (one ratio per sequence). ``logprobs`` or ``old_logprobs`` ``None`` means
    on-policy (ratio 1). SAPO's gate clips nothing and TRL logs no clip metric for it."""
    if loss_type == "sapo":
        return {}
    m = mask.float()
    if logprobs is None or old_logprobs is None:
        log_ratio = torch.zeros_like(m)
    else:
        log_ratio = torch.where(m != 0, logprobs.float() - old_logprobs.float(), 0.0)
    if level == "sequence":
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_ratio)
    a = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    if loss_type == "cispo":
        return {"cispo_clip_ratio": (ratio > epsilon_high) & (a > 0)}
    low = (ratio < 1 - epsilon_low) & (a < 0)
    high = (ratio > 1 + epsilon_high) & (a > 0)
    return {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high}


def _masked_sum_and_count(x, m):
    """TRL's ``global_masked_mean`` before its all-reduce: per sequence when ``x`` is ``[B, 1]``."""
    if x.shape[1] == 1:
        return x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
    return (x * m).sum(), m.sum()


def _per_sequence(x, m):
    """TRL's ``masked_seq_mean`` (NaN for a sequence without tokens)."""
    return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)


class MetricLog:
    """Adds one micro-batch's metrics to TRL's ``_metrics[mode]`` (one all-reduce and, with clip
    indicators, one all-gather per micro-batch); :meth:`flush` puts the window's RLSD means there
    just before TRL's ``log()`` averages it."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.windows: dict[str, dict[str, list[float]]] = {}

    def add(self, logged, mode, *, lam, metrics, clip, mask, dual_clip: bool, kl: bool):
        m = mask.float()
        tokens = metrics["num_tokens"].float()
        pairs, windowed = {}, set()
        if "num_credit_tokens" in metrics:
            credit = metrics["num_credit_tokens"].float()
            for name in CREDIT_METRICS:
                pairs[f"rlsd/{name}"] = (metrics[name].float() * credit, credit)
            windowed.update(pairs)
        if dual_clip:
            pairs["rlsd/dual_clip_frac"] = (metrics["dual_clip_frac"].float() * tokens, tokens)
            windowed.add("rlsd/dual_clip_frac")
        if "entropy_mean" in metrics:
            pairs["entropy"] = (metrics["entropy_mean"].float() * tokens, tokens)
        if kl:
            pairs["kl"] = (metrics["kl_mean"].float() * tokens, tokens)
        for name, x in clip.items():
            pairs[name] = _masked_sum_and_count(x.float(), m)
        stacked = torch.stack([torch.stack([a.reshape(()), b.reshape(()).to(a.dtype)]) for a, b in pairs.values()])
        totals = self.accelerator.reduce(stacked, reduction="sum").tolist()
        window = self.windows.setdefault(mode, {})
        for name, (total, count) in zip(pairs, totals, strict=True):
            if name in windowed:
                running = window.setdefault(name, [0.0, 0.0])
                running[0] += total
                running[1] += count
            else:
                logged[name].append(total / max(count, 1.0))
        logged["rlsd/lam"].append(lam)
        if "clip_ratio/low_mean" in clip:
            per_seq = torch.stack([_per_sequence(clip["clip_ratio/low_mean"].float(), m),
                                   _per_sequence(clip["clip_ratio/high_mean"].float(), m)], dim=1)
            gathered = self.accelerator.gather(per_seq)
            logged["clip_ratio/low_min"].append(nanmin(gathered[:, 0]).item())
            logged["clip_ratio/high_max"].append(nanmax(gathered[:, 1]).item())

    def flush(self, logged, mode):
        """Replaces each windowed metric in ``logged`` by its mean over the window; a metric whose
        window counted no token (no credit token at all) is left out."""
        for name, (total, count) in self.windows.pop(mode, {}).items():
            if count > 0:
                logged[name] = [total / count]
