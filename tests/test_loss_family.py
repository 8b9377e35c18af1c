"""The rest of the loss family on ``rlsd_loss``: CISPO, sequence-level ratios, rollout importance
sampling, KL to a reference, the entropy bonus and the credit options, each against the float64
reference (forward, metrics and the student gradient), through both backends."""

import numpy as np
import pytest
import torch
from cases import make_case
from test_rlsd import BLOCK, check_against_reference
from tolerances import FP32, assert_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.launch.tuning import RowConfig, force_choice, force_row_config


def _with_logprobs(case, device, *, rollout=False, ref=False, credit_mask=False, is_weights=False, spread=0.3):
    """Adds per-token rollout / reference log-probs near the student's, a random credit mask, and
    precomputed importance weights in [0, 3] with exact zeros."""
    g = torch.Generator(device=device).manual_seed(7)
    lp_s = reference.token_logprobs(case.student.view.double(), case.tokens.clamp(0, case.student.view.shape[-1] - 1))
    noise = lambda: spread * torch.randn(case.tokens.shape, generator=g, device=device)  # noqa: E731
    if rollout:
        # Wide enough that the importance weight of some tokens reaches the default cap of 2.
        case.kwargs["rollout_logprobs"] = (lp_s + 3 * noise()).float()
    if ref:
        case.kwargs["ref_logprobs"] = (lp_s + noise()).float()
    if credit_mask:
        case.kwargs["credit_mask"] = torch.rand(case.tokens.shape, generator=g, device=device) > 0.4
    if is_weights:
        w = 3 * torch.rand(case.tokens.shape, generator=g, device=device)
        case.kwargs["is_weights"] = torch.where(w < 0.3, 0.0, w)
    return case


OPTIONS = [
    dict(surrogate="cispo"),
    dict(surrogate="cispo", ratio="spread"),
    dict(ratio_level="sequence"),
    dict(ratio_level="sequence", ratio=None),
    dict(eps_w_low=0.1, eps_w_high=0.4),
    dict(credit_base="old"),
    dict(credit_mask=True),
    dict(credit_negative_only=True),
    dict(rollout=True),
    dict(rollout=True, tis_level="sequence", tis_cap=5.0),
    dict(rollout=True, tis_level="sequence", ratio=None),
    dict(ref=True, kl_coef=0.1, kl_estimator="k1"),
    dict(ref=True, kl_coef=0.1, kl_estimator="k2"),
    dict(ref=True, kl_coef=0.1, kl_estimator="k3"),
    dict(entropy_coef=0.05),
    dict(is_weights=True),
    dict(is_weights=True, ref=True, kl_coef=0.1, entropy_coef=0.05, ratio_level="sequence"),
    dict(surrogate="sapo", ratio="spread"),
    # Sequence-level ratios with token-level importance weights: the PyTorch path once took them at
    # the sequence level.
    dict(ratio_level="sequence", rollout=True),
    dict(surrogate="sapo", sapo_tau_pos=2.0, sapo_tau_neg=0.5, ratio_level="sequence", rollout=True),
    dict(surrogate="cispo", ratio_level="sequence", rollout=True, tis_level="sequence", ref=True, kl_coef=0.05,
         entropy_coef=0.02, credit_mask=True, credit_base="old", dtype=torch.bfloat16),
]


def _case(device, option, **overrides):
    option = dict(option)
    flags = {k: option.pop(k) for k in ("rollout", "ref", "credit_mask", "is_weights")
             if isinstance(option.get(k), bool)}
    ratio = option.pop("ratio", "near")
    dtype = option.pop("dtype", torch.float32)
    case = make_case(device, ratio=None if ratio in (None, "spread") else ratio, dtype=dtype, **overrides)
    if ratio == "spread":
        # Ratios far outside the clip range both ways: CISPO keeps their gradient, PPO drops it.
        lp = reference.token_logprobs(case.student.view.double(), case.tokens.clamp(0, 36)).float()
        case.kwargs["old_logprobs"] = lp + torch.linspace(-1.0, 1.0, lp.numel(), device=device).view(lp.shape)
    _with_logprobs(case, device, **flags)
    case.kwargs.update(option)
    return case, dtype


def _id(option):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in option.items())


@pytest.mark.parametrize("option", OPTIONS, ids=[_id(o) for o in OPTIONS])
def test_option_matches_reference(option, device, backend):
    case, dtype = _case(device, option)
    with force_row_config(RowConfig(BLOCK, 1)):
        _, metrics = check_against_reference(case, dtype)
    assert ("kl_mean" in metrics) == ("ref_logprobs" in case.kwargs)
    assert ("is_weight_mean" in metrics) == ("rollout_logprobs" in case.kwargs or "is_weights" in case.kwargs)
    assert "entropy_mean" in metrics


@pytest.mark.parametrize("option", [OPTIONS[2], OPTIONS[10], OPTIONS[14], OPTIONS[-1]], ids=_id)
@pytest.mark.parametrize("loss_agg, inplace", [("none", False), ("token-mean", True), ("seq-mean-token-mean", False)])
def test_options_with_aggregations_and_in_place(option, loss_agg, inplace, device, backend):
    case, dtype = _case(device, option, mask="seq")
    with force_row_config(RowConfig(BLOCK, 1)):
        check_against_reference(case, dtype, loss_agg=loss_agg, inplace=inplace)


@pytest.mark.parametrize("option", [OPTIONS[0], OPTIONS[8], OPTIONS[14]], ids=_id)
def test_options_through_the_split_strategy(option, device, backend):
    case, dtype = _case(device, option)
    with force_row_config(RowConfig(BLOCK, 1)), force_choice("split"):
        check_against_reference(case, dtype)


def test_sequence_options_on_packed_tokens(device, backend):
    case, dtype = _case(device, dict(ratio_level="sequence", rollout=True, tis_level="sequence"),
                        layout="packed", mask="seq")
    case.kwargs["cu_seqlens"] = torch.tensor([0, 4, 5, 11, 15], device=device)
    with force_row_config(RowConfig(BLOCK, 1)):
        check_against_reference(case, dtype, loss_agg="seq-mean-token-mean")
    del case.kwargs["cu_seqlens"]
    with pytest.raises(ValueError, match="cu_seqlens"):
        case.call(rlsd_kernels.rlsd_loss, case.student.view)


def test_gspo_with_one_token_per_sequence_is_token_level_ppo(device, backend):
    case = make_case(device, batch=6, seqlen=1, mask="none", adv_shape="BT")
    with force_row_config(RowConfig(BLOCK, 1)):
        token = case.call(rlsd_kernels.rlsd_loss, case.student.view, ratio_level="token")
        sequence = case.call(rlsd_kernels.rlsd_loss, case.student.view, ratio_level="sequence")
    assert_close(sequence, token, what="GSPO vs PPO", **FP32)


def test_cispo_keeps_the_gradient_of_clipped_tokens(device, backend):
    case, _ = _case(device, dict(ratio="spread"), mask="none")
    student = case.student.view.requires_grad_()
    with force_row_config(RowConfig(BLOCK, 1)):
        loss, metrics = case.call(rlsd_kernels.rlsd_loss, student, surrogate="cispo", loss_agg="none",
                                  return_metrics=True)
    assert float(metrics["ppo_clip_low_frac"]) > 0 and float(metrics["ppo_clip_high_frac"]) > 0
    loss.sum().backward()
    per_row = student.grad.abs().sum(-1)
    assert (per_row > 0).all(), "every token, clipped or not, has a gradient under CISPO"


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_at_zero_divergence(estimator):
    lp = torch.tensor([-1.0, -2.5, -0.1], dtype=torch.float64, requires_grad=True)
    terms = reference.rlsd_token_terms(lp, lp.detach(), torch.zeros(3, dtype=torch.float64), lp_ref=lp.detach(),
                                       kl_coef=1.0, kl_estimator=estimator)
    assert torch.equal(terms["kl"], torch.zeros(3, dtype=torch.float64))
    (grad,) = torch.autograd.grad(terms["loss"].sum(), lp)
    expected = 1.0 if estimator == "k1" else 0.0
    assert torch.allclose(grad, torch.full_like(grad, expected)) and torch.allclose(terms["d_loss"], grad)


def test_truncated_importance_weight_is_capped():
    lp = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    terms = reference.rlsd_token_terms(lp, lp, torch.ones(2, dtype=torch.float64), lp_old=lp,
                                       lp_rollout=torch.tensor([-3.0, -1.1], dtype=torch.float64), tis_cap=2.0)
    assert torch.allclose(terms["is_weight"], torch.tensor([2.0, torch.exp(torch.tensor(0.1)).item()],
                                                           dtype=torch.float64))


def test_bad_option_values_name_the_argument(device):
    case = make_case(device)
    for kwargs, name in ((dict(surrogate="ppo2"), "surrogate"), (dict(ratio_level="seq"), "ratio_level"),
                         (dict(kl_estimator="k4"), "kl_estimator"), (dict(tis_cap=0.0), "tis_cap"),
                         (dict(credit_base="new"), "credit_base"), (dict(eps_w_low=1.5), "eps_w_low"),
                         (dict(rollout_logprobs=torch.zeros(2, device=device)), "rollout_logprobs"),
                         (dict(credit_mask=torch.zeros(3, device=device)), "credit_mask")):
        with pytest.raises(ValueError, match=name):
            case.call(rlsd_kernels.rlsd_loss, case.student.view, **kwargs)


def test_lam_schedule():
    from rlsd_kernels.schedule import lam_schedule

    assert lam_schedule(0) == 0.5 and lam_schedule(30) == 0.25 and lam_schedule(60) == 0.0 and lam_schedule(500) == 0.0
    assert lam_schedule(0, warmup_steps=10) == 0.0 and lam_schedule(5, warmup_steps=10) == 0.25
    assert lam_schedule(10, warmup_steps=10) == 0.5 and lam_schedule(40, warmup_steps=10) == 0.25
    assert lam_schedule(3, start=1.0, end=0.4, decay_steps=6) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="step"):
        lam_schedule(-1)
    # Numbers of any real type, and one-element tensors, are numbers; NaN and non-numbers name the argument.
    assert lam_schedule(np.int64(30)) == 0.25 and lam_schedule(torch.tensor(30)) == 0.25
    for kwargs, name in ((dict(step=float("nan")), "step"), (dict(step=1, decay_steps=float("nan")), "decay_steps"),
                         (dict(step=1, warmup_steps=float("nan")), "warmup_steps"),
                         (dict(step=1, start=float("nan")), "start")):
        with pytest.raises(ValueError, match=name):
            lam_schedule(**kwargs)
    for kwargs, name in ((dict(step="3"), "step"), (dict(step=None), "step"), (dict(step=torch.tensor([1, 2])), "step"),
                         (dict(step=True), "step"), (dict(step=1, decay_steps=None), "decay_steps"),
                         (dict(step=1, start="0.5"), "start"), (dict(step=1, end=1j), "end")):
        with pytest.raises(TypeError, match=name):
            lam_schedule(**kwargs)


@pytest.mark.parametrize("name", ["sapo_tau_pos", "sapo_tau_neg"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf")])
def test_sapo_gate_temperatures_must_be_positive_and_finite(name, value):
    with pytest.raises(ValueError, match=name):
        rlsd_kernels.rlsd_loss(torch.randn(1, 2, 5), None, torch.tensor([[1, 2]]), torch.tensor([1.0]), lam=0.0,
                               surrogate="sapo", **{name: value})
