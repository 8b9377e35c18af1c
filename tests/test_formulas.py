"""Every formula of the RLSD loss family pinned to hand-computed closed-form values.

The expected numbers are written from the formulas of the specification with ``math`` on Python
floats, never by calling the reference: each case is three tokens (one row of student logits each,
``V = 4``) whose log-probs are taken by hand, with old, teacher, rollout and reference log-probs
placed at chosen offsets from them, so that every branch (PPO clip on both sides, the dual clip,
CISPO, the credit clips, the sequence-level ratio and importance weight, the KL estimators, the
entropy term) is taken at known values. The per-token loss and ``dL/dlp_S`` are then checked
against ``reference.rlsd_loss`` and the public ``rlsd_loss`` through both backends (the Triton
kernels and the PyTorch path), and the student-logit gradient against
``dL/dz_v = g * (1[v = y] - p_v) / tau`` (plus the entropy term).
"""

import math

import pytest
import torch
from tolerances import FLOAT64_FORMULA, FP32

import rlsd_kernels
from rlsd_kernels import reference

ROWS = [[0.3, -1.2, 2.0, 0.5], [1.0, 0.0, -0.5, 0.7], [-0.4, 0.9, 0.1, -2.0]]
TEACHER_ROWS = [[0.1, -1.0, 2.4, 0.2], [0.2, 0.3, -0.5, 1.1], [-0.4, 1.5, 0.0, -2.0]]
TOKENS = [2, 0, 1]
E = math.exp
SIG = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731


def log_softmax(row, tau=1.0):
    z = [v / tau for v in row]
    top = max(z)
    lse = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - lse for v in z]


def hand_lp(rows=ROWS, tau=1.0):
    return [log_softmax(r, tau)[y] for r, y in zip(rows, TOKENS, strict=True)]


def hand_entropy(row, tau=1.0):
    a = log_softmax(row, tau)
    return -sum(math.exp(x) * x for x in a)


# Each case: per-token inputs (A, rho = exp(lp_S - lp_old) or None on-policy, delta = lp_T - lp_S,
# and optional rollout / reference offsets), the options, and expected (loss, dL/dlp_S) per token as
# functions of the hand log-probs ``lp``. Defaults: eps_w = 0.2, lam = 1, clip 0.2 / 0.28, dual 3.
CASES = {
    # A > 0, rho above 1 + 0.28: clipped, no gradient. A < 0, rho below 0.8: clipped (loss uses 0.8).
    # A > 0, rho inside, credit clipped low at 0.8 (delta = -0.5 < log 0.8).
    "ppo_clipped_both_sides": dict(
        adv=[1.0, -1.0, 1.0], rho=[1.5, 0.5, 0.9], delta=[0.1, 0.1, -0.5], options={},
        expected=lambda lp: ([-1.28 * E(0.1), 0.8 * E(-0.1), -0.9 * 0.8], [0.0, 0.0, -0.8 * 0.9])),
    # The unclipped branch on each side; the dual clip binding at rho = 4 > 3 for A < 0.
    "ppo_unclipped_and_dual": dict(
        adv=[1.0, -2.0, -1.0], rho=[0.5, 1.5, 4.0], delta=[0.5, -0.05, 0.0], options={},
        expected=lambda lp: ([-0.5 * 1.2, 1.5 * 2 * E(0.05), 3.0], [-1.2 * 0.5, 2 * E(0.05) * 1.5, 0.0])),
    "no_dual_clip": dict(
        adv=[1.0, -2.0, -1.0], rho=[0.5, 1.5, 4.0], delta=[0.5, -0.05, 0.0], options=dict(dual_clip=None),
        expected=lambda lp: ([-0.5 * 1.2, 1.5 * 2 * E(0.05), 4.0], [-1.2 * 0.5, 2 * E(0.05) * 1.5, 4.0])),
    "custom_clips_and_lam": dict(
        adv=[1.0, -1.0, 2.0], rho=[1.3, 0.85, 1.1], delta=[0.3, 0.3, 0.0],
        options=dict(clip_low=0.1, clip_high=0.2, dual_clip=2.0, lam=0.25, eps_w=0.5),
        # c = 0.75 + 0.25 w; token 1: x = -0.3, w = e^-0.3, A_hat < 0, rho 0.85 < 0.9: clipped at 0.9.
        expected=lambda lp: ([-1.2 * (0.75 + 0.25 * E(0.3)), 0.9 * (0.75 + 0.25 * E(-0.3)), -1.1 * 2.0],
                             [0.0, 0.0, -2.0 * 1.1])),
    "temperature": dict(
        adv=[1.0, -1.0, 0.5], rho=[1.1, 1.2, 0.7], delta=[0.0, 0.0, 0.1], options=dict(temperature=0.7),
        # A > 0 with rho = 0.7 < 0.8 takes the unclipped (smaller) branch and keeps its gradient.
        expected=lambda lp: ([-1.1, 1.2, -0.7 * 0.5 * E(0.1)], [-1.1, 1.2, -0.5 * E(0.1) * 0.7])),
    "zero_advantage": dict(
        adv=[0.0, 0.0, 0.0], rho=[1.5, 0.5, 4.0], delta=[1.0, -1.0, 0.0], options={},
        expected=lambda lp: ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])),
    # CISPO: -sg(clip(rho)) * A_hat * lp_S, every token keeps its gradient -clip(rho) * A_hat.
    "cispo": dict(
        adv=[1.0, -1.0, 1.0], rho=[1.5, 0.5, 1.1], delta=[0.0, 0.0, 0.1], options=dict(surrogate="cispo"),
        expected=lambda lp: ([-1.28 * lp[0], 0.8 * lp[1], -1.1 * E(0.1) * lp[2]], [-1.28, 0.8, -1.1 * E(0.1)])),
    # SAPO: -(4 / k) * sigmoid(k * (rho - 1)) * A_hat with k = 2 where A > 0 and 1.05 elsewhere; its
    # derivative -4 * s * (1 - s) * rho * A_hat. Token 3: rho = 1, s = 1/2, A_hat = 0.5 * e^0.1.
    "sapo": dict(
        adv=[1.0, -1.0, 0.5], rho=[1.5, 0.5, 1.0], delta=[0.0, 0.0, 0.1],
        options=dict(surrogate="sapo", sapo_tau_pos=2.0, sapo_tau_neg=1.05),
        expected=lambda lp: ([-2 * SIG(1.0), 4 / 1.05 * SIG(-0.525), -0.5 * E(0.1)],
                             [-4 * SIG(1.0) * SIG(-1.0) * 1.5, 2 * SIG(-0.525) * SIG(0.525), -0.5 * E(0.1)])),
    # Asymmetric credit clips [0.9, 1.4]: e^0.3 passes the high side, e^-0.3 is clipped to 0.9,
    # A < 0 with delta = -0.5 gives x = 0.5, clipped to 1.4.
    "asymmetric_credit_clips": dict(
        adv=[1.0, 1.0, -1.0], rho=None, delta=[0.3, -0.3, -0.5], options=dict(eps_w_low=0.1, eps_w_high=0.4),
        expected=lambda lp: ([-E(0.3), -0.9, 1.4], [-E(0.3), -0.9, 1.4])),
    # credit_base="old": delta = lp_T - lp_old = 0.1 + log(rho).
    "credit_base_old": dict(
        adv=[1.0, 1.0, -1.0], rho=[1.1, 0.9, 1.05], delta=[0.0, 0.1, -0.1], options=dict(credit_base="old"),
        expected=lambda lp: ([-1.1 * 1.1, -0.9 * 0.9 * E(0.1), 1.05 * (1.05 * E(-0.1)) ** -1],
                             [-1.1 * 1.1, -0.9 * 0.9 * E(0.1), 1.05 / (1.05 * E(-0.1))])),
    "credit_mask": dict(
        adv=[1.0, 1.0, -1.0], rho=None, delta=[0.5, 0.5, 0.1], options=dict(credit_mask=[1, 0, 1]),
        expected=lambda lp: ([-1.2, -1.0, E(-0.1)], [-1.2, -1.0, E(-0.1)])),
    "credit_negative_only": dict(
        adv=[1.0, -1.0, -1.0], rho=None, delta=[0.5, -0.5, 0.1], options=dict(credit_negative_only=True),
        expected=lambda lp: ([-1.0, 1.2, E(-0.1)], [-1.0, 1.2, E(-0.1)])),
    # GSPO-token: one ratio per sequence, exp(mean log rho) = (1.2 * 1.1 * 0.9) ** (1/3), inside the
    # range; the gradient is each token's own, -A_hat * s.
    "sequence_ratio": dict(
        adv=[1.0, 1.0, 1.0], rho=[1.2, 1.1, 0.9], delta=[0.0, 0.0, 0.0], options=dict(ratio_level="sequence"),
        expected=lambda lp: ([-(1.188 ** (1 / 3))] * 3, [-(1.188 ** (1 / 3))] * 3)),
    "sequence_ratio_clipped": dict(
        adv=[1.0, 1.0, 1.0], rho=[2.0, 2.0, 1.5], delta=[0.0, 0.0, 0.0], options=dict(ratio_level="sequence"),
        expected=lambda lp: ([-1.28] * 3, [0.0] * 3)),
    # Truncated importance sampling, token level: min(exp(lp_old - lp_rollout), 2).
    "token_tis": dict(
        adv=[1.0, 1.0, 1.0], rho=[1.0, 1.1, 0.9], delta=[0.0, 0.0, 0.0], is_ratio=[1.5, 3.0, 0.5],
        options={}, expected=lambda lp: ([-1.5, -2.0 * 1.1, -0.5 * 0.9], [-1.5, -2.0 * 1.1, -0.5 * 0.9])),
    # Sequence level: the product of the token ratios (a sum of log-ratios), then capped.
    "sequence_tis": dict(
        adv=[1.0, 1.0, 1.0], rho=[1.0, 1.0, 1.0], delta=[0.0, 0.0, 0.0], is_ratio=[1.5, 0.5, 1.2],
        options=dict(tis_level="sequence"), expected=lambda lp: ([-0.9] * 3, [-0.9] * 3)),
    "sequence_tis_capped": dict(
        adv=[1.0, 1.0, 1.0], rho=[1.0, 1.0, 1.0], delta=[0.0, 0.0, 0.0], is_ratio=[1.5, 1.5, 1.2],
        options=dict(tis_level="sequence", tis_cap=2.5), expected=lambda lp: ([-2.5] * 3, [-2.5] * 3)),
    # KL to a reference, d = lp_ref - lp_S: k1 = -d, k2 = d^2 / 2, k3 = e^d - d - 1; A = 0.
    "k1": dict(adv=[0.0] * 3, rho=None, delta=[0.0] * 3, ref=[0.5, -0.3, 1.0],
               options=dict(kl_coef=0.1, kl_estimator="k1"),
               expected=lambda lp: ([-0.05, 0.03, -0.1], [0.1, 0.1, 0.1])),
    "k2": dict(adv=[0.0] * 3, rho=None, delta=[0.0] * 3, ref=[0.5, -0.3, 1.0],
               options=dict(kl_coef=0.1, kl_estimator="k2"),
               expected=lambda lp: ([0.1 * 0.125, 0.1 * 0.045, 0.1 * 0.5], [-0.05, 0.03, -0.1])),
    "k3": dict(adv=[0.0] * 3, rho=None, delta=[0.0] * 3, ref=[0.5, -0.3, 1.0],
               options=dict(kl_coef=0.1, kl_estimator="k3"),
               expected=lambda lp: ([0.1 * (E(d) - d - 1) for d in (0.5, -0.3, 1.0)],
                                    [0.1 * (1 - E(d)) for d in (0.5, -0.3, 1.0)])),
    "k3_with_policy_term": dict(
        adv=[1.0, -1.0, 1.0], rho=[1.1, 0.9, 1.5], delta=[0.0, 0.0, 0.0], ref=[0.2, 0.2, 0.2],
        options=dict(kl_coef=0.5, kl_estimator="k3"),
        expected=lambda lp: ([-1.1 + 0.5 * (E(0.2) - 1.2), 0.9 + 0.5 * (E(0.2) - 1.2), -1.28 + 0.5 * (E(0.2) - 1.2)],
                             [-1.1 + 0.5 * (1 - E(0.2)), 0.9 + 0.5 * (1 - E(0.2)), 0.5 * (1 - E(0.2))])),
    # Entropy bonus: loss -= 0.1 * H (its logit gradient is checked separately below).
    "entropy": dict(adv=[0.0] * 3, rho=None, delta=[0.0] * 3, options=dict(entropy_coef=0.1),
                    expected=lambda lp: ([-0.1 * hand_entropy(r) for r in ROWS], [0.0] * 3)),
}


def _inputs(case, dtype, device):
    tau = case["options"].get("temperature", 1.0)
    lp = hand_lp(tau=tau)
    t = lambda xs: torch.tensor([xs], dtype=dtype, device=device)  # noqa: E731
    kwargs = {k: v for k, v in case["options"].items()}
    if "credit_mask" in kwargs:
        kwargs["credit_mask"] = t(kwargs["credit_mask"]).bool()
    old = lp if case["rho"] is None else [x - math.log(r) for x, r in zip(lp, case["rho"], strict=True)]
    if case["rho"] is not None:
        kwargs["old_logprobs"] = t(old)
    kwargs["teacher_logprobs"] = t([x + d for x, d in zip(lp, case["delta"], strict=True)])
    if "is_ratio" in case:
        kwargs["rollout_logprobs"] = t([o - math.log(s) for o, s in zip(old, case["is_ratio"], strict=True)])
    if "ref" in case:
        kwargs["ref_logprobs"] = t([x + d for x, d in zip(lp, case["ref"], strict=True)])
    logits = torch.tensor([ROWS], dtype=dtype, device=device)
    tokens = torch.tensor([TOKENS], device=device)
    return logits, tokens, t(case["adv"]), kwargs, lp, tau


def expected_logit_grad(g, tau=1.0, entropy_coef=0.0):
    """``sum_t dL/dz_t`` for per-token ``g = dL/dlp_S`` and the entropy bonus, by hand."""
    out = []
    for row, y, gt in zip(ROWS, TOKENS, g, strict=True):
        a = log_softmax(row, tau)
        h = -sum(math.exp(x) * x for x in a)
        out.append([(gt * ((v == y) - math.exp(a[v])) + entropy_coef * math.exp(a[v]) * (a[v] + h)) / tau
                    for v in range(len(row))])
    return torch.tensor([out], dtype=torch.float64)


def _check(fn, case, dtype, device, rtol, atol):
    logits, tokens, adv, kwargs, lp, tau = _inputs(case, dtype, device)
    logits.requires_grad_()
    loss = fn(logits, None, tokens, adv, loss_agg="none", **kwargs)
    want_loss, want_g = case["expected"](lp)
    torch.testing.assert_close(loss.detach().double().cpu(), torch.tensor([want_loss], dtype=torch.float64),
                               rtol=rtol, atol=atol)
    loss.sum().backward()
    want_grad = expected_logit_grad(want_g, tau, case["options"].get("entropy_coef", 0.0))
    torch.testing.assert_close(logits.grad.double().cpu(), want_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_formula(name):
    _check(reference.rlsd_loss, CASES[name], torch.float64, "cpu", **FLOAT64_FORMULA)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_formula(name, device, backend, small_blocks):
    _check(rlsd_kernels.rlsd_loss, CASES[name], torch.float32, device, **FP32)


def test_reference_token_terms_closed_form_derivative():
    """``d_loss`` of the reference (what the kernels compute) equals the hand ``dL/dlp_S`` too."""
    for name, case in CASES.items():
        if "ratio_level" in case["options"] or "tis_level" in case["options"]:
            continue
        _, _, adv, kwargs, lp, _ = _inputs(case, torch.float64, "cpu")
        terms = reference.rlsd_token_terms(
            torch.tensor([lp], dtype=torch.float64, requires_grad=True), kwargs["teacher_logprobs"], adv,
            lp_old=kwargs.get("old_logprobs"), lp_rollout=kwargs.get("rollout_logprobs"),
            lp_ref=kwargs.get("ref_logprobs"),
            credit_on=None if "credit_mask" not in kwargs else kwargs["credit_mask"],
            **{k: v for k, v in case["options"].items()
               if k not in ("temperature", "credit_mask", "credit_negative_only", "entropy_coef")})
        if case["options"].get("credit_negative_only"):
            continue
        want = torch.tensor([case["expected"](lp)[1]], dtype=torch.float64)
        torch.testing.assert_close(terms["d_loss"], want, **FLOAT64_FORMULA, msg=name)


def test_teacher_logits_give_the_teacher_logprob(device, backend, small_blocks):
    """Credit from teacher logits at temperature 0.8: delta = lp_T - lp_S from the two rows, by hand."""
    tau = 0.8
    lp_s, lp_t = hand_lp(tau=tau), hand_lp(TEACHER_ROWS, tau)
    adv = [1.0, -1.0, 1.0]
    weights = [min(max(E(a * (t - s)), 0.8), 1.2) for a, s, t in zip(adv, lp_s, lp_t, strict=True)]
    student = torch.tensor([ROWS], device=device, requires_grad=True)
    teacher = torch.tensor([TEACHER_ROWS], device=device)
    loss = rlsd_kernels.rlsd_loss(student, teacher, torch.tensor([TOKENS], device=device),
                                  torch.tensor([adv], device=device), temperature=tau, loss_agg="none")
    want = [-a * w for a, w in zip(adv, weights, strict=True)]
    torch.testing.assert_close(loss.detach().double().cpu(), torch.tensor([want], dtype=torch.float64),
                               **FP32)
    assert not all(w == 1.0 for w in weights) and any(w in (0.8, 1.2) for w in weights)
    loss.sum().backward()
    torch.testing.assert_close(student.grad.double().cpu(), expected_logit_grad(want, tau), **FP32)
