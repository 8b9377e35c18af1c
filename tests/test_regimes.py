"""Random cases that reach every regime at once, rows longer than a PyTorch-path chunk, and over-read
detection with finite canaries.

The teacher's logits are a perturbation of the student's (small for most tokens, so credit weights
sit inside their clip, large for some, so they clip on both sides); old log-probs put each token's
ratio below, inside and above the PPO range and past the dual clip. Every case checks the loss, the
metrics and the student gradient against the float64 reference through both backends, with the
PyTorch path's chunks shrunk so that each row spans several of them, and with logits held in
buffers whose unviewed elements are a large finite value: a kernel that reads one computes a
finite, wrong result instead of a NaN that an exact fallback pass would repair.
"""

import pytest
import torch
from cases import Case, logits_buffer
from tolerances import FP32, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference

CANARY = 30.0  # e^30 outweighs every logit of a row: reading one moves the logsumexp by ~25
RATIOS = [0.3, 0.7, 0.9, 1.0, 1.1, 1.2, 1.5, 4.0]  # below 0.8, inside, above 1.28, past the dual clip 3


def regime_case(device, *, dtype=torch.float32, batch=3, seqlen=8, vocab=24, layout="view", canary=CANARY,
                seed=5, **kwargs):
    g = torch.Generator(device=device).manual_seed(seed)
    packed = layout == "packed"
    token_shape = (batch * seqlen,) if packed else (batch, seqlen)
    student = logits_buffer(token_shape, vocab, dtype, device, layout=layout, generator=g)
    teacher = logits_buffer(token_shape, vocab, dtype, device, layout=layout, generator=g)
    # The teacher is the student, perturbed: slightly for most tokens, strongly for one in three.
    scale = torch.where(torch.rand(token_shape, generator=g, device=device) < 0.33, 1.5, 0.05)
    noise = torch.randn(student.view.shape, generator=g, device=device) * scale[..., None]
    teacher.view.data.copy_((student.view.float() + noise).to(dtype))
    if canary is not None:
        student.fill_canaries(canary)
        teacher.fill_canaries(canary)
    tokens = torch.randint(0, vocab, token_shape, generator=g, device=device)
    adv = torch.randn(token_shape, generator=g, device=device)
    lp = reference.token_logprobs(student.view.detach().double(), tokens,
                                temperature=kwargs.get("temperature", 1.0)).float()
    pick = torch.randint(0, len(RATIOS), token_shape, generator=g, device=device)
    ratio = torch.tensor(RATIOS, device=device)[pick]
    extra = dict(old_logprobs=lp - ratio.log(), mask=torch.rand(token_shape, generator=g, device=device) > 0.15)
    if packed:
        extra["cu_seqlens"] = torch.arange(0, batch * seqlen + 1, seqlen, device=device)
    noise_lp = lambda s: s * torch.randn(token_shape, generator=g, device=device)  # noqa: E731
    for key in [k for k in ("rollout_logprobs", "ref_logprobs") if kwargs.get(k) is True]:
        kwargs[key] = extra["old_logprobs"] + noise_lp(0.6) if key == "rollout_logprobs" else lp + noise_lp(0.3)
    if kwargs.get("credit_mask") is True:
        kwargs["credit_mask"] = torch.rand(token_shape, generator=g, device=device) > 0.3
    extra.update(kwargs)
    return Case(student, teacher, tokens, adv, extra)


def _scale(x):
    """``1 / max|x|`` capped at 1: ``assert_close``'s ``atol`` is relative to that magnitude."""
    return min(1.0, float(x.detach().abs().max().clamp(min=1e-30)))


def check(case, dtype, fn=rlsd_kernels.rlsd_loss, ref_fn=reference.rlsd_loss, loss_agg="token-mean", inplace=False):
    """Loss, metrics and student gradient against the float64 reference; the canaries stay put."""
    ref_student = case.student.view.detach().double().requires_grad_()
    doubled = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
               for k, v in case.kwargs.items()}
    ref_loss, ref_metrics = ref_fn(ref_student, case.teacher.view.double(), case.tokens, case.advantages.double(),
                                   loss_agg=loss_agg, return_metrics=True, **doubled)
    upstream = (torch.randn(ref_loss.shape, dtype=torch.float64) if ref_loss.dim() else torch.tensor(1.3)).to(
        ref_loss.device)
    (ref_loss * upstream).sum().backward()
    student = case.student.view.requires_grad_()
    loss, metrics = case.call(fn, student, loss_agg=loss_agg, return_metrics=True, inplace_backward=inplace)
    # Random advantages of both signs make the means small next to the per-token terms (of order 1):
    # float32 rounding of those terms is the absolute tolerance.
    assert_close(loss, ref_loss, what="loss", rtol=FP32["rtol"], atol=FP32["atol"] / _scale(ref_loss))
    for key, value in ref_metrics.items():
        assert_close(metrics[key], value, what=f"metrics[{key}]", rtol=FP32["rtol"], atol=FP32["atol"] / _scale(value))
    (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    assert_grad_close(student.grad, ref_student.grad, dtype)
    if not inplace:
        case.student.check_canaries("student logits")
    case.teacher.check_canaries("teacher logits")
    return metrics


def assert_every_regime(metrics):
    for key in ("ppo_clip_low_frac", "ppo_clip_high_frac", "dual_clip_frac", "credit_clip_low_frac",
                "credit_clip_high_frac"):
        assert 0 < float(metrics[key]) < 1, f"{key} = {float(metrics[key])}: the case misses a regime"


OPTIONS = [
    dict(),
    dict(lam=0.5, temperature=0.7, eps_w_low=0.1, eps_w_high=0.3),
    dict(surrogate="cispo"),
    dict(ratio_level="sequence"),
    dict(rollout_logprobs=True, tis_cap=1.5),
    dict(rollout_logprobs=True, tis_level="sequence", tis_cap=3.0),
    dict(credit_base="old", credit_mask=True),
    dict(credit_negative_only=True, ref_logprobs=True, kl_coef=0.2, kl_estimator="k2"),
    dict(ref_logprobs=True, kl_coef=0.2, kl_estimator="k3", entropy_coef=0.03),
    dict(ref_logprobs=True, kl_coef=0.2, kl_estimator="k1", dual_clip=None),
]


def _id(option):
    return "-".join(f"{k}={v}" for k, v in option.items()) or "ppo"


@pytest.mark.parametrize("option", OPTIONS, ids=[_id(o) for o in OPTIONS])
def test_every_regime_in_one_case(option, device, backend, small_blocks, small_chunks):
    case = regime_case(device, **option)
    metrics = check(case, torch.float32)
    if not {"ratio_level", "surrogate", "dual_clip", "credit_negative_only"} & set(option):
        assert_every_regime(metrics)


@pytest.mark.parametrize("layout, dtype", [("contiguous", torch.float32), ("packed", torch.bfloat16),
                                           ("view", torch.float16)])
@pytest.mark.parametrize("loss_agg, inplace", [("seq-mean-token-mean", False), ("none", False),
                                               ("token-mean", True)])
def test_layouts_dtypes_aggregations(layout, dtype, loss_agg, inplace, device, backend, small_blocks,
                                     small_chunks):
    canary = None if layout == "contiguous" else CANARY
    case = regime_case(device, dtype=dtype, layout=layout, canary=canary, ratio_level="sequence",
                       rollout_logprobs=True, tis_level="sequence", entropy_coef=0.02)
    check(case, dtype, loss_agg=loss_agg, inplace=inplace)


def test_regime_case_is_what_it_says(device):
    """The generator's claims: correlated teacher, ratios on both sides of both bounds."""
    case = regime_case(device)
    lp_s = reference.token_logprobs(case.student.view.double(), case.tokens)
    lp_t = reference.token_logprobs(case.teacher.view.double(), case.tokens)
    delta = (lp_t - lp_s).abs()
    assert (delta < 0.1).float().mean() > 0.4 and (delta > 0.3).float().mean() > 0.1
    ratio = (lp_s - case.kwargs["old_logprobs"].double()).exp()
    for lo, hi in ((0, 0.8), (0.8, 1.28), (1.28, 3.0), (3.0, 100)):
        assert ((ratio > lo) & (ratio < hi)).any()
    outside = case.student.buffer[~case.student.inside]
    assert outside.numel() > 0 and (outside == CANARY).all()


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3),
                                              ("sampled_token", 0.5)])
@pytest.mark.parametrize("grpo", [False, True])
def test_opsd_with_finite_canaries_and_long_rows(divergence, beta, grpo, device, backend, small_blocks,
                                                 small_chunks):
    case = regime_case(device, temperature=0.8, lam=0.5 if grpo else 0.0)
    if grpo:
        fn = lambda *a, **k: rlsd_kernels.grpo_opsd_loss(*a, divergence=divergence, beta=beta, alpha=0.7,  # noqa: E731
                                                         token_clip=1.0, **k)
        ref_fn = lambda *a, **k: reference.grpo_opsd_loss(*a, divergence=divergence, beta=beta, alpha=0.7,  # noqa: E731
                                                          token_clip=1.0, **k)
        check(case, torch.float32, fn=fn, ref_fn=ref_fn)
        return
    kwargs = {k: case.kwargs[k] for k in ("mask", "temperature")}
    case = Case(case.student, case.teacher, case.tokens, case.advantages, kwargs)
    fn = lambda s, t, y, a, **k: rlsd_kernels.opsd_loss(s, t, y, divergence=divergence, beta=beta, **k)  # noqa: E731
    ref_fn = lambda s, t, y, a, **k: reference.opsd_loss(s, t, y, divergence=divergence, beta=beta, **k)  # noqa: E731
    check(case, torch.float32, fn=fn, ref_fn=ref_fn)


def test_token_logprobs_with_finite_canaries_and_long_rows(device, backend, small_blocks, small_chunks):
    case = regime_case(device, vocab=37)
    student = case.student.view.requires_grad_()
    lp, entropy = rlsd_kernels.token_logprobs(student, case.tokens, temperature=0.9, return_entropy=True)
    ref_student = case.student.view.detach().double().requires_grad_()
    ref_lp, ref_entropy = reference.token_logprobs(ref_student, case.tokens, temperature=0.9, return_entropy=True)
    assert_close(lp, ref_lp, what="lp", **FP32)
    assert_close(entropy, ref_entropy, what="entropy", **FP32)
    w = torch.randn(lp.shape, dtype=torch.float64).to(ref_lp.device)
    (ref_lp * w + ref_entropy * w.flip(-1)).sum().backward()
    (lp * w.float() + entropy * w.flip(-1).float()).sum().backward()
    assert_grad_close(student.grad, ref_student.grad, torch.float32)
    case.student.check_canaries("logits")
