"""The OPSD divergences, ``token_clip`` and every aggregation mode pinned to hand-computed values.

As in ``test_formulas.py``, the expected numbers come from the specification's formulas on Python
floats (``math``), the full-vocabulary gradients from central differences of those hand formulas;
they are checked against the reference and the public ops through both backends.
"""

import math

import pytest
import torch
from test_formulas import ROWS, TEACHER_ROWS, TOKENS, hand_lp, log_softmax
from tolerances import FLOAT64_DIFFERENCES, FP32

import rlsd_kernels
from rlsd_kernels import reference

TAU = 0.8


def hand_divergence(s_row, t_row, divergence, beta, tau=TAU):
    if divergence == "jsd" and beta in (0.0, 1.0):
        # The specification's endpoints (TRL's generalised JSD): the two KLs, not the mixture's 0.
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    a, b = log_softmax(s_row, tau), log_softmax(t_row, tau)
    s, t = [math.exp(x) for x in a], [math.exp(x) for x in b]
    if divergence == "forward_kl":
        return sum(ti * (bi - ai) for ti, ai, bi in zip(t, a, b, strict=True))
    if divergence == "reverse_kl":
        return sum(si * (ai - bi) for si, ai, bi in zip(s, a, b, strict=True))
    log_m = [math.log(beta * ti + (1 - beta) * si) for si, ti in zip(s, t, strict=True)]
    return (beta * sum(ti * (bi - mi) for ti, bi, mi in zip(t, b, log_m, strict=True))
            + (1 - beta) * sum(si * (ai - mi) for si, ai, mi in zip(s, a, log_m, strict=True)))


def hand_grad(s_row, t_row, divergence, beta, h=1e-5):
    """Central differences of the hand divergence by each student logit."""
    out = []
    for v in range(len(s_row)):
        up, down = list(s_row), list(s_row)
        up[v] += h
        down[v] -= h
        out.append((hand_divergence(up, t_row, divergence, beta) - hand_divergence(down, t_row, divergence, beta))
                   / (2 * h))
    return out


def expected(divergence, beta, token_clip):
    """Per-token loss and the student-logit gradient of its sum, by hand."""
    losses, grads = [], []
    lp_s, lp_t = hand_lp(tau=TAU), hand_lp(TEACHER_ROWS, TAU)
    for i, (s_row, t_row, y) in enumerate(zip(ROWS, TEACHER_ROWS, TOKENS, strict=True)):
        if divergence == "sampled_token":
            d = lp_s[i] - lp_t[i]
            clipped = token_clip is not None and d > token_clip
            losses.append((token_clip if clipped else d) * lp_s[i])
            p = [math.exp(x) for x in log_softmax(s_row, TAU)]
            grads.append([0.0 if clipped else d * ((v == y) - p[v]) / TAU for v in range(4)])
        else:
            d = hand_divergence(s_row, t_row, divergence, beta)
            clipped = token_clip is not None and d > token_clip
            losses.append(token_clip if clipped else d)
            grads.append([0.0] * 4 if clipped else hand_grad(s_row, t_row, divergence, beta))
    return losses, grads


DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.9),
               ("sampled_token", 0.5), ("jsd", 0.0), ("jsd", 1.0)]
IDS = [f"{d}-{b}" for d, b in DIVERGENCES]


def _clip_between(divergence, beta):
    """A token_clip strictly between the smallest and the largest hand divergence of the three."""
    if divergence == "sampled_token":
        ds = [s - t for s, t in zip(hand_lp(tau=TAU), hand_lp(TEACHER_ROWS, TAU), strict=True)]
    else:
        ds = [hand_divergence(s, t, divergence, beta) for s, t in zip(ROWS, TEACHER_ROWS, strict=True)]
    ordered = sorted(ds)
    assert ordered[1] - ordered[0] > 1e-3 and ordered[2] - ordered[1] > 1e-3
    return (ordered[0] + ordered[1]) / 2


def _check(op, divergence, beta, token_clip, dtype, device, rtol, atol, grpo=False):
    student = torch.tensor([ROWS], dtype=dtype, device=device, requires_grad=True)
    teacher = torch.tensor([TEACHER_ROWS], dtype=dtype, device=device)
    tokens = torch.tensor([TOKENS], device=device)
    kwargs = dict(divergence=divergence, beta=beta, token_clip=token_clip, temperature=TAU, loss_agg="none")
    if grpo:
        # A = 0: the policy term is zero, value and gradient; alpha scales the divergence.
        loss = op(student, teacher, tokens, torch.zeros(1, 3, dtype=dtype, device=device), alpha=0.5, **kwargs) / 0.5
    else:
        loss = op(student, teacher, tokens, **kwargs)
    want_loss, want_grad = expected(divergence, beta, token_clip)
    torch.testing.assert_close(loss.detach().double().cpu(), torch.tensor([want_loss], dtype=torch.float64),
                               rtol=rtol, atol=atol)
    loss.sum().backward()
    torch.testing.assert_close(student.grad.double().cpu(), torch.tensor([want_grad], dtype=torch.float64),
                               rtol=rtol, atol=max(atol, 1e-7))


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=IDS)
def test_reference_divergence(divergence, beta, clip):
    token_clip = _clip_between(divergence, beta) if clip else None
    _check(reference.opsd_loss, divergence, beta, token_clip, torch.float64, "cpu", **FLOAT64_DIFFERENCES)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=IDS)
def test_kernel_divergence(divergence, beta, clip, device, backend, small_blocks):
    token_clip = _clip_between(divergence, beta) if clip else None
    _check(rlsd_kernels.opsd_loss, divergence, beta, token_clip, torch.float32, device, **FP32)


@pytest.mark.parametrize("divergence, beta", DIVERGENCES[::2] + [DIVERGENCES[5]], ids=IDS[::2] + [IDS[5]])
def test_grpo_opsd_divergence(divergence, beta, device, backend, small_blocks):
    _check(rlsd_kernels.grpo_opsd_loss, divergence, beta, _clip_between(divergence, beta), torch.float32, device,
           **FP32, grpo=True)


# Aggregation: three sequences of three tokens, the last fully masked; on-policy with lp_T = lp_S,
# so each token's loss is -A and its dL/dlp_S is -A. D is sum(m) = 3 tokens, S = 3 sequences (the
# empty one included), L = 3.
AGG_ROWS = ROWS + TEACHER_ROWS + [[0.5, 0.5, 0.0, -1.0], [2.0, -2.0, 0.3, 0.1], [0.0, 0.0, 0.0, 0.0]]
AGG_TOKENS = TOKENS * 3
AGG_ADV = [[1.0, -2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
AGG_MASK = [[1, 1, 0], [1, 0, 0], [0, 0, 0]]
# Per mode, the weight of each valid token's loss (tokens (0,0), (0,1), (1,0)).
AGG_WEIGHTS = {
    "token-mean": [1 / 3, 1 / 3, 1 / 3],
    "seq-mean-token-mean": [1 / 6, 1 / 6, 1 / 3],
    "seq-mean-token-sum": [1 / 3, 1 / 3, 1 / 3],
    "seq-mean-token-sum-norm": [1 / 9, 1 / 9, 1 / 9],
    "sum": [1.0, 1.0, 1.0],
}
AGG_WEIGHTS_NORMALIZER_10 = {mode: ([1 / 20, 1 / 20, 1 / 10] if mode == "seq-mean-token-mean" else [0.1] * 3)
                             for mode in AGG_WEIGHTS}
VALID = [(0, 0), (0, 1), (1, 0)]


def _agg_expectation(loss_agg, normalizer):
    per_token = [-AGG_ADV[b][t] for b, t in VALID]
    if loss_agg == "none":
        want = [[0.0] * 3 for _ in range(3)]
        for (b, t), x in zip(VALID, per_token, strict=True):
            want[b][t] = x
        return torch.tensor(want, dtype=torch.float64), [1.0] * 3
    weights = (AGG_WEIGHTS_NORMALIZER_10 if normalizer else AGG_WEIGHTS)[loss_agg]
    return torch.tensor(sum(w * x for w, x in zip(weights, per_token, strict=True)), dtype=torch.float64), weights


def _agg_inputs(dtype, device, packed):
    lp = [log_softmax(r)[y] for r, y in zip(AGG_ROWS, AGG_TOKENS, strict=True)]
    shape = (9,) if packed else (3, 3)
    t = lambda xs, dt=dtype: torch.tensor(xs, dtype=dt, device=device).view(shape)  # noqa: E731
    logits = torch.tensor(AGG_ROWS, dtype=dtype, device=device).view(*shape, 4).requires_grad_()
    kwargs = dict(teacher_logprobs=t(lp), mask=t(AGG_MASK, torch.bool))
    if packed:
        kwargs["cu_seqlens"] = torch.tensor([0, 3, 6, 9], device=device)
    return logits, t(AGG_TOKENS, torch.long), t(AGG_ADV), kwargs


def _check_agg(op, loss_agg, normalizer, packed, dtype, device, rtol):
    logits, tokens, adv, kwargs = _agg_inputs(dtype, device, packed)
    loss = op(logits, None, tokens, adv, loss_agg=loss_agg, normalizer=normalizer, **kwargs)
    want, weights = _agg_expectation(loss_agg, normalizer)
    torch.testing.assert_close(loss.detach().double().cpu().reshape(want.shape), want, rtol=rtol, atol=rtol)
    loss.sum().backward()
    grad = torch.zeros(9, 4, dtype=torch.float64)
    for (b, t), w in zip(VALID, weights, strict=True):
        i = 3 * b + t
        p = [math.exp(x) for x in log_softmax(AGG_ROWS[i])]
        grad[i] = torch.tensor([w * -AGG_ADV[b][t] * ((v == AGG_TOKENS[i]) - p[v]) for v in range(4)],
                               dtype=torch.float64)
    torch.testing.assert_close(logits.grad.double().cpu().reshape(9, 4), grad, rtol=rtol, atol=rtol)


AGG_CASES = [(mode, None) for mode in reference.LOSS_AGG_MODES] + [(mode, 10) for mode in AGG_WEIGHTS]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("loss_agg, normalizer", AGG_CASES)
def test_reference_aggregation(loss_agg, normalizer, packed):
    _check_agg(reference.rlsd_loss, loss_agg, normalizer, packed, torch.float64, "cpu", rtol=1e-9)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("loss_agg, normalizer", AGG_CASES)
def test_kernel_aggregation(loss_agg, normalizer, packed, device, backend, small_blocks):
    _check_agg(rlsd_kernels.rlsd_loss, loss_agg, normalizer, packed, torch.float32, device, rtol=2e-5)


@pytest.mark.parametrize("loss_agg, normalizer", [(m, None) for m in AGG_WEIGHTS] + [(m, 10) for m in AGG_WEIGHTS])
def test_opsd_aggregation_and_normalizer(loss_agg, normalizer, device, backend, small_blocks):
    """The OPSD ops aggregate the same way: per-token forward KL by hand, weighted per mode."""
    logits, tokens, _, kwargs = _agg_inputs(torch.float32, device, packed=False)
    teacher = torch.tensor(AGG_ROWS[::-1], device=device).view(3, 3, 4)
    loss = rlsd_kernels.opsd_loss(logits, teacher, tokens, mask=kwargs["mask"], divergence="forward_kl",
                                  temperature=TAU, loss_agg=loss_agg, normalizer=normalizer)
    weights = (AGG_WEIGHTS_NORMALIZER_10 if normalizer else AGG_WEIGHTS)[loss_agg]
    per_token = [hand_divergence(AGG_ROWS[3 * b + t], AGG_ROWS[::-1][3 * b + t], "forward_kl", 0.5) for b, t in VALID]
    want = sum(w * d for w, d in zip(weights, per_token, strict=True))
    assert float(loss.detach()) == pytest.approx(want, rel=2e-5)
