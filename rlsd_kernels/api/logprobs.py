"""Per-token log-probs (and entropies) from given logits."""

from __future__ import annotations

from ..forms.logits import LogitsForm
from ..forms.sharded import ShardedForm
from ..launch.common import as_rows
from .compose import check_eager, run_logprobs


def token_logprobs(logits, tokens, *, temperature=1.0, return_entropy=False, validate=True, process_group=None):
    """Log-probability of each sampled token under ``softmax(logits / temperature)``.

    ``lp = min(z[y] / tau - logsumexp(z / tau), 0)`` and, with ``return_entropy=True``, the row
    entropy ``H = -sum_v p_v log p_v``, both differentiable, computed in one streaming pass per row
    with float32 math whatever the logits dtype; no ``[N, V]`` float32 tensor is allocated.

    Args:
        logits: ``[B, T, V]`` (strided views such as ``logits[:, :-1]`` are read in place) or packed
            ``[N, V]``; float32, float16 or bfloat16. ``-inf`` entries (padded vocabulary) are allowed.
        tokens: ``[B, T]`` / ``[N]`` integer ids; ``-100`` marks an ignored token (``lp = H = 0``,
            zero gradient).
        temperature: logits are divided by it.
        validate: raise ``ValueError`` for ids outside ``[0, V)`` and for rows with NaN or ``+inf``
            (one device-to-host sync). With ``False`` such rows give non-finite values.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded: the
            logits are this rank's contiguous slice of it, in group rank order. One all-gather per
            forward, none in the backward (see ``docs/vocab-parallel.md``).

    Returns:
        ``lp`` shaped like ``tokens`` in float32, or ``(lp, entropy)``.
    """
    rows = as_rows(logits, "logits")
    form = LogitsForm()
    form.names = {"tokens": "tokens", "student": "logits"}
    if process_group is not None:
        form = ShardedForm(form, process_group)
        check_eager(form, "process_group")
    return run_logprobs(form, (rows.tensor,), tokens, logits.shape[:-1], temperature=temperature,
                        return_entropy=return_entropy, validate=validate)
