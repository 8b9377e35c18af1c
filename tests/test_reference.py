"""Closed-form checks of the reference itself: it is the specification, so it is checked by hand."""

import math

import pytest
import torch

from rlsd_kernels import reference
from rlsd_kernels.call.aggregate import token_weights

F64 = torch.float64


def terms(lp_s, lp_t, adv, lp_old=None, **kw):
    lp_s = torch.tensor([lp_s], dtype=F64, requires_grad=True)
    old = None if lp_old is None else torch.tensor([lp_old], dtype=F64)
    out = reference.rlsd_token_terms(lp_s, torch.tensor([lp_t], dtype=F64), torch.tensor([adv], dtype=F64),
                                     lp_old=old, **kw)
    (grad,) = torch.autograd.grad(out["loss"].sum(), lp_s)
    assert out["d_loss"].item() == grad.item(), "closed-form derivative differs from autograd"
    return {k: v.item() for k, v in out.items()}, grad.item()


def test_two_token_vocabulary():
    logits = torch.tensor([[1.5, -0.5]], dtype=F64)
    lp, ent = reference.token_logprobs(logits, torch.tensor([0]), return_entropy=True)
    p = 1 / (1 + math.exp(-2.0))
    assert lp.item() == pytest.approx(math.log(p))
    assert ent.item() == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)))


def test_uniform_logits_and_temperature():
    logits = torch.full((2, 50), 3.0, dtype=F64)
    lp, ent = reference.token_logprobs(logits, torch.tensor([4, 49]), temperature=0.3, return_entropy=True)
    assert torch.allclose(lp, torch.full_like(lp, -math.log(50)))
    assert torch.allclose(ent, torch.full_like(ent, math.log(50)))


def test_ignore_index_and_padded_vocabulary():
    logits = torch.tensor([[0.0, 1.0, float("-inf")], [2.0, 0.0, float("-inf")]], dtype=F64, requires_grad=True)
    lp, ent = reference.token_logprobs(logits, torch.tensor([1, -100]), return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert lp[1].item() == 0 and ent[1].item() == 0
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all() and logits.grad[0, 2] == 0


def test_credit_weight_direction_and_clip():
    # A > 0: a teacher more confident than the student raises the weight, up to 1 + eps_w.
    assert terms(-2.0, -1.9, 1.0)[0]["weight"] == pytest.approx(math.exp(0.1))
    assert terms(-2.0, -1.0, 1.0)[0]["weight"] == pytest.approx(1.2)
    assert terms(-2.0, -3.0, 1.0)[0]["weight"] == pytest.approx(0.8)
    # A < 0: the same teacher lowers the blame on that token.
    out, _ = terms(-2.0, -1.0, -1.0)
    assert out["weight"] == pytest.approx(0.8) and out["weight_clip_low"] and not out["weight_clip_high"]


def test_advantage_zero():
    out, grad = terms(-1.0, -0.2, 0.0, lp_old=-1.1)
    assert out["weight"] == 1.0 and out["loss"] == 0.0 and grad == 0.0
    assert not (out["weight_clip_low"] or out["weight_clip_high"] or out["ppo_clip_low"] or out["ppo_clip_high"])


def test_on_policy_gradient_is_minus_advantage_times_credit():
    out, grad = terms(-1.0, -0.9, 2.0, lam=0.5)
    credit = 0.5 + 0.5 * math.exp(0.1)
    assert out["loss"] == pytest.approx(-2.0 * credit) and grad == pytest.approx(-2.0 * credit)


def test_ratio_exactly_at_the_clip_edges():
    # clip_high chosen so that 1 + clip_high is exactly rho: the bound is inclusive, the gradient flows.
    rho = math.exp(0.25)
    out, grad = terms(-1.0, -1.0, 1.0, lp_old=-1.25, clip_high=rho - 1.0, lam=0.0)
    assert out["ratio"] == rho and not out["ppo_clip_high"] and grad == pytest.approx(-rho)
    rho = math.exp(-0.25)
    out, grad = terms(-1.25, -1.25, -1.0, lp_old=-1.0, clip_low=1.0 - rho, lam=0.0)
    assert not out["ppo_clip_low"] and grad == pytest.approx(rho)
    # Past the edges the clipped branch is constant in lp_s.
    out, grad = terms(-1.0, -1.0, 1.0, lp_old=-1.5, lam=0.0)
    assert out["ppo_clip_high"] and out["loss"] == pytest.approx(-1.28) and grad == 0.0


def test_dual_clip_bounds_negative_advantages():
    out, grad = terms(-1.0, -1.0, -1.0, lp_old=-3.0, lam=0.0)
    assert out["dual_clip"] and out["loss"] == pytest.approx(3.0) and grad == 0.0
    out, grad = terms(-1.0, -1.0, -1.0, lp_old=-3.0, lam=0.0, dual_clip=None)
    assert not out["dual_clip"] and out["loss"] == pytest.approx(math.exp(2.0)) and grad == pytest.approx(math.exp(2))


def test_ratio_clamp_and_impossible_tokens():
    out, grad = terms(-1.0, -1.0, 1.0, lp_old=-40.0, lam=0.0, clip_high=1e9)
    assert out["ratio"] == pytest.approx(math.exp(20.0)) and grad == 0.0
    out, grad = terms(float("-inf"), float("-inf"), 1.0, lp_old=float("-inf"))
    assert out["delta"] == 0.0 and out["ratio"] == 1.0 and math.isfinite(out["loss"])


@pytest.mark.parametrize("dual_clip", [3.0, None])
def test_closed_form_derivative_matches_autograd(dual_clip):
    g = torch.Generator().manual_seed(0)
    n = 4000
    lp_s = (-torch.rand(n, generator=g, dtype=F64) * 5).requires_grad_()
    lp_t = lp_s.detach() + torch.randn(n, generator=g, dtype=F64)
    old = lp_s.detach() + torch.randn(n, generator=g, dtype=F64) * torch.rand(n, generator=g, dtype=F64) * 3
    adv = torch.randn(n, generator=g, dtype=F64) * (torch.rand(n, generator=g, dtype=F64) > 0.1)
    # Impossible tokens and log-ratios past the clamp, too.
    lp_s.data[:50] = float("-inf")
    old[50:100] = lp_s.detach()[50:100] + 30.0
    out = reference.rlsd_token_terms(lp_s, lp_t, adv, lp_old=old, dual_clip=dual_clip, lam=0.7)
    (grad,) = torch.autograd.grad(out["loss"].sum(), lp_s)
    assert torch.equal(out["d_loss"], grad)
    assert (out["dual_clip"].any() if dual_clip else True) and out["ppo_clip_high"].any() and out["ppo_clip_low"].any()


LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=F64)
EXPECTED = {
    "token-mean": (1 + 2 + 5 + 6 + 7 + 8) / 6,
    "seq-mean-token-mean": (1.5 + 6.5 + 0) / 3,
    "seq-mean-token-sum": (3 + 26) / 3,
    "seq-mean-token-sum-norm": (3 + 26) / (3 * 4),
    "sum": 29.0,
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_aggregations(mode):
    assert reference.aggregate_loss(LOSS, MASK, mode).item() == pytest.approx(EXPECTED[mode])
    assert reference.aggregate_loss(LOSS, MASK, mode, normalizer=10).item() * 10 == pytest.approx(
        {"seq-mean-token-mean": 8.0}.get(mode, 29.0))
    packed = reference.aggregate_loss(LOSS[:2].reshape(-1), MASK[:2].reshape(-1), mode,
                                      cu_seqlens=torch.tensor([0, 4, 8]))
    two_rows = reference.aggregate_loss(LOSS[:2], MASK[:2], mode)
    assert packed.item() == pytest.approx(two_rows.item())
    weights = token_weights(MASK.reshape(-1).float(), LOSS.shape, mode)
    assert (weights.double() * LOSS.reshape(-1)).sum().item() == pytest.approx(EXPECTED[mode])


def test_fully_masked_aggregation_is_zero():
    for mode in EXPECTED:
        assert reference.aggregate_loss(LOSS, torch.zeros_like(MASK), mode).item() == 0.0
    assert torch.equal(reference.aggregate_loss(LOSS, MASK, "none"), LOSS * MASK)


def test_metrics_are_masked_means():
    out = {k: torch.tensor(v, dtype=F64) for k, v in {
        "weight": [1.2, 0.8, 5.0], "delta": [1.0, -1.0, 9.0], "ratio": [1.0, 1.0, 9.0],
        "weight_clip_low": [0.0, 1.0, 1.0], "weight_clip_high": [1.0, 0.0, 1.0], "ppo_clip_low": [0.0, 0.0, 1.0],
        "ppo_clip_high": [0.0, 1.0, 1.0], "dual_clip": [0.0, 0.0, 1.0]}.items()}
    out["advantage"] = torch.tensor([0.5, -1.0, 0.0], dtype=F64)
    metrics = reference.rlsd_metrics(out, torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    assert metrics["credit_weight_mean"].item() == pytest.approx(1.0)
    assert metrics["delta_mean"].item() == 0.0 and metrics["num_tokens"].item() == 2
    assert metrics["credit_clip_low_frac"].item() == 0.5 and metrics["dual_clip_frac"].item() == 0.0
    # The credit metrics count only the tokens with an advantage: with A = 0 at the second token,
    # its weight (0.8) and clip no longer count.
    out["advantage"] = torch.tensor([0.5, 0.0, 0.0], dtype=F64)
    metrics = reference.rlsd_metrics(out, torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    assert metrics["credit_weight_mean"].item() == pytest.approx(1.2) and metrics["num_credit_tokens"].item() == 1
    assert metrics["credit_clip_low_frac"].item() == 0.0 and metrics["ratio_mean"].item() == 1.0
