"""``token_logprobs`` against the float64 reference, forward and both gradients."""

import pytest
import torch
from cases import logits_buffer
from tolerances import FP32, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.launch.tuning import RowConfig, force_row_config

BLOCK = 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [BLOCK - 1, BLOCK, BLOCK + 1, 45])
@pytest.mark.parametrize("entropy", [False, True])
def test_matches_reference(dtype, vocab, entropy, device, backend):
    check(device, dtype=dtype, vocab=vocab, entropy=entropy)


@pytest.mark.parametrize("layout", ["view", "contiguous", "packed"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_layouts_and_temperature(layout, temperature, device, backend):
    check(device, layout=layout, temperature=temperature, entropy=True)


def test_ignored_and_padded(device, backend):
    """-100 ids give lp = H = 0 and no gradient; -inf logits (padded vocabulary) stay finite."""
    check(device, vocab=40, entropy=True, ignore=True, pad_from=33)


def test_wide_logit_range(device, backend):
    """A logit far above the first block's, and a first block of -inf: the exact pass takes over."""
    check(device, vocab=45, entropy=True, spike=True)


def test_persistent_grid(device, backend):
    with force_row_config(RowConfig(BLOCK, 1, programs_per_sm=3)):
        check(device, entropy=True, forced=False, layout="packed")


def check(device, *, dtype=torch.float32, vocab=37, entropy=False, layout="view", temperature=1.0,
          ignore=False, pad_from=None, forced=True, spike=False):
    token_shape = (9,) if layout == "packed" else (3, 4)
    buf = logits_buffer(token_shape, vocab, dtype, device, layout=layout)
    if pad_from is not None:
        buf.view.data[..., pad_from:] = float("-inf")
    if spike:
        buf.view.data[0, 1, 40] = 300.0
        buf.view.data[1, :, :BLOCK] = float("-inf")
    tokens = torch.randint(BLOCK if spike else 0, pad_from or vocab, token_shape, device=device)
    if ignore:
        tokens.view(-1)[::3] = -100
    ref_logits = buf.view.detach().double().requires_grad_()
    ref = reference.token_logprobs(ref_logits, tokens, temperature=temperature, return_entropy=entropy)
    ref = ref if entropy else (ref,)
    upstream = [torch.randn_like(r) for r in ref]
    sum(((r * u).sum() for r, u in zip(ref, upstream, strict=True))).backward()

    logits = buf.view.requires_grad_()
    ctx = force_row_config(RowConfig(BLOCK, 1)) if forced else _null()
    with ctx:
        out = rlsd_kernels.token_logprobs(logits, tokens, temperature=temperature, return_entropy=entropy)
        out = out if entropy else (out,)
        sum(((o * u.float()).sum() for o, u in zip(out, upstream, strict=True))).backward()
    for name, o, r in zip(("lp", "entropy"), out, ref, strict=False):
        assert o.dtype == torch.float32 and o.shape == tokens.shape
        assert_close(o, r, what=name, **FP32)
    assert (out[0] <= 0).all()
    assert_grad_close(logits.grad, ref_logits.grad, dtype)
    if ignore:
        assert (out[0][tokens == -100] == 0).all()
        assert (logits.grad[tokens == -100] == 0).all()
    buf.check_canaries("logits")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_partial_statistics_of_vocabulary_shards_combine(device, backend):
    """Shards' statistics (reference, log-sum, the token's log-prob where it lives, the shard's
    entropy) combine into the full row's log-prob, logsumexp and entropy; a shard of padding alone is
    no error."""
    from rlsd_kernels.forms.collectives import combine
    from rlsd_kernels.launch.logprobs import partial_stats

    vocab = 41
    logits = torch.randn(2, 5, vocab + 7, device=device) * 2
    logits[..., vocab:] = float("-inf")
    tokens = torch.randint(0, vocab, (2, 5), device=device)
    tokens[1, 1] = -100
    shards = []
    with force_row_config(RowConfig(BLOCK, 1)):
        for start, stop in ((0, 13), (13, 30), (30, vocab), (vocab, vocab + 7)):
            stats, flags = partial_stats(logits[..., start:stop], tokens, start, 0.7, True)
            assert not flags.any()
            shards.append(stats)
    on = tokens.reshape(-1) != -100
    lp, lse, _, entropy, _ = combine(torch.stack(shards), on, 0.7)  # [shards, 4, N]
    ref_lp, ref_entropy = reference.token_logprobs(logits.double(), tokens, temperature=0.7, return_entropy=True)
    ref_lse = torch.logsumexp(logits.double() / 0.7, -1).reshape(-1)
    assert_close(lp[on], ref_lp.reshape(-1)[on], what="lp", **FP32)
    assert_close(lse[on], ref_lse[on], what="lse", **FP32)
    assert_close(entropy[on], ref_entropy.reshape(-1)[on], what="entropy", **FP32)
