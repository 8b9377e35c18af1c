"""``rlsd_loss`` against the float64 reference: loss, metrics and the student-logit gradient."""

import math

import pytest
import torch
from cases import make_case
from harness import check_logits_canaries, compare
from tolerances import FP32, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.call.inputs import prepare
from rlsd_kernels.call.options import PolicyOptions
from rlsd_kernels.launch.logprobs import logprobs_fwd
from rlsd_kernels.launch.rlsd import rlsd_fwd
from rlsd_kernels.launch.tuning import RowConfig, force_choice, force_row_config

BLOCK = 16  # forced under test so that small vocabularies hit the block edges


def check_against_reference(case, dtype, *, loss_agg="token-mean", inplace=False, upstream=None, **extra):
    student = case.student.view.requires_grad_()
    reference_student = {}

    def run_reference():
        reference_student["student"], out = case.reference(loss_agg=loss_agg, return_metrics=True, **extra)
        return out

    def run():
        return case.call(rlsd_kernels.rlsd_loss, student, loss_agg=loss_agg, inplace_backward=inplace,
                         return_metrics=True, **extra)

    result = compare(run, run_reference, {"student": student}, reference_student, dtype, upstream=upstream)
    check_logits_canaries(case, inplace)
    return result


AXES = [
    dict(),
    dict(dtype=torch.float16),
    dict(dtype=torch.bfloat16),
    dict(vocab=BLOCK - 1),
    dict(vocab=BLOCK),
    dict(vocab=BLOCK + 1),
    dict(vocab=3 * BLOCK + 5),
    dict(mask="none"),
    dict(mask="seq"),
    dict(mask="float"),
    dict(layout="contiguous"),
    dict(layout="packed"),
    dict(adv_shape="B1"),
    dict(adv_shape="BT"),
    dict(teacher="logprobs"),
    dict(ratio=None),
    dict(lam=0.0),
    dict(lam=0.5),
    dict(temperature=0.7),
    dict(dual_clip=None),
    dict(eps_w=0.5, clip_low=0.1, clip_high=0.4, dual_clip=2.0),
    dict(dtype=torch.bfloat16, layout="packed", teacher="logprobs", mask="seq", temperature=0.7, lam=0.5),
]


def _id(axis):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in axis.items()) or "base"


@pytest.mark.parametrize("axis", AXES, ids=[_id(a) for a in AXES])
def test_matches_reference(axis, device, backend):
    dtype = axis.get("dtype", torch.float32)
    with force_row_config(RowConfig(BLOCK, 1)):
        check_against_reference(make_case(device, **axis), dtype)


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layout", ["view", "packed"])
def test_aggregations(loss_agg, inplace, layout, device, backend):
    case = make_case(device, layout=layout, mask="seq")
    extra = {}
    if layout == "packed":
        extra["cu_seqlens"] = torch.tensor([0, 5, 7, 15], device=device)
    with force_row_config(RowConfig(BLOCK, 1)):
        check_against_reference(case, torch.float32, loss_agg=loss_agg, inplace=inplace, **extra)


@pytest.mark.parametrize("normalizer", [64, 7.5, "tensor"])
def test_normalizer(normalizer, device, backend):
    value = torch.tensor(11.0, device=device) if normalizer == "tensor" else normalizer
    with force_row_config(RowConfig(BLOCK, 1)):
        check_against_reference(make_case(device), torch.float32, normalizer=value)


@pytest.mark.parametrize("ratio", [0.5, 1.05, 1.5, 4.0])
@pytest.mark.parametrize("adv_sign", [1.0, -1.0, 0.0])
@pytest.mark.parametrize("delta", [-1.0, 0.05, 1.0])
def test_clip_regimes(ratio, adv_sign, delta, device, backend):
    """Ratio below, inside and above the PPO range (and past the dual clip), A > 0, < 0, = 0, and
    teacher log-probs that clip the credit weight low, not at all, or high, all forced per token."""
    case = make_case(device, batch=2, seqlen=3, ratio=ratio, teacher="logprobs", mask="none")
    case.advantages = adv_sign * (0.5 + torch.rand(2, device=device))
    lp_s = reference.token_logprobs(case.student.view.double(), case.tokens).float()
    case.kwargs["teacher_logprobs"] = lp_s + delta
    with force_row_config(RowConfig(BLOCK, 1)):
        _, metrics = check_against_reference(case, torch.float32)
    x = adv_sign * delta
    assert float(metrics["credit_clip_low_frac"]) == float(adv_sign != 0 and x < math.log(0.8))
    assert float(metrics["credit_clip_high_frac"]) == float(adv_sign != 0 and x > math.log(1.2))
    assert float(metrics["ppo_clip_high_frac"]) == float(adv_sign > 0 and ratio > 1.28)
    assert float(metrics["ppo_clip_low_frac"]) == float(adv_sign < 0 and ratio < 0.8)
    assert float(metrics["dual_clip_frac"]) == float(adv_sign < 0 and ratio > 3.0)
    assert abs(float(metrics["ratio_mean"]) - ratio) < 1e-4


def test_persistent_grid(device, backend):
    """Fewer programs than rows: each program walks several rows."""
    with force_row_config(RowConfig(BLOCK, 1, programs_per_sm=2)):
        check_against_reference(make_case(device, layout="packed", mask="seq"), torch.float32)
        check_against_reference(make_case(device, layout="view"), torch.float32, inplace=True)


def test_scalar_upstream_of_one(device, backend):
    """A loss that is the terminal node: the scale of the precomputed gradient is skipped."""
    with force_row_config(RowConfig(BLOCK, 1)):
        check_against_reference(make_case(device), torch.float32, upstream=torch.tensor(1.0, dtype=torch.float64))


def test_padded_vocabulary(device, backend):
    """-inf logits (a padded vocabulary) in both models give finite results equal to the reference."""
    case = make_case(device, vocab=40)
    for buf in (case.student, case.teacher):
        buf.view.data[..., 33:] = float("-inf")
    case.tokens.clamp_(max=32)
    with force_row_config(RowConfig(BLOCK, 1)):
        check_against_reference(case, torch.float32)


def test_fully_masked_batch(device, backend):
    case = make_case(device, mask="none")
    case.kwargs["mask"] = torch.zeros_like(case.tokens, dtype=torch.bool)
    student = case.student.view.requires_grad_()
    with force_row_config(RowConfig(BLOCK, 1)):
        loss, metrics = case.call(rlsd_kernels.rlsd_loss, student, return_metrics=True)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student.grad))
    assert float(metrics["num_tokens"]) == 0
    assert all(torch.isfinite(v) for v in metrics.values())


def test_ignore_index_tokens_are_masked(device, backend):
    case = make_case(device, mask="none")
    case.tokens[1, 2:] = -100
    reference_mask = case.tokens != -100
    with force_row_config(RowConfig(BLOCK, 1)):
        loss = case.call(rlsd_kernels.rlsd_loss, case.student.view)
        case.tokens = case.tokens.clamp(min=0)
        expected = case.call(rlsd_kernels.rlsd_loss, case.student.view, mask=reference_mask)
    assert_close(loss, expected, what="loss", **FP32)


def test_empty_batch(device, backend):
    student = torch.randn(0, 7, device=device, requires_grad=True)
    tokens = torch.zeros(0, dtype=torch.long, device=device)
    loss = rlsd_kernels.rlsd_loss(student, student.detach(), tokens, torch.zeros(0, device=device))
    loss.backward()
    assert float(loss) == 0.0 and student.grad.shape == (0, 7)


def test_invariants(device, backend):
    """lam = 0 is GRPO whatever the teacher; sign(dl/dlp) = -sign(A) where the ratio is unclipped."""
    case = make_case(device, ratio="near", mask="none", adv_shape="BT")
    with force_row_config(RowConfig(BLOCK, 1)):
        grpo = case.call(rlsd_kernels.rlsd_loss, case.student.view, lam=0.0)
        case.teacher.view.data.normal_()
        other_teacher = case.call(rlsd_kernels.rlsd_loss, case.student.view, lam=0.0)
        lp_s = reference.token_logprobs(case.student.view.double(), case.tokens)
        ratio = torch.exp(lp_s - case.kwargs["old_logprobs"].double())
        adv = case.advantages.double()
        plain = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv)
        plain = torch.where((adv < 0) & (plain > -3.0 * adv), -3.0 * adv, plain)
        assert_close(grpo, other_teacher, what="lam=0 loss, two teachers", **FP32)
        assert_close(grpo, plain.mean(), what="lam=0 loss vs GRPO", **FP32)

        flat = lambda x: x.reshape(-1).contiguous().float()  # noqa: E731
        prepared = prepare(case.tokens.shape, device, case.tokens, case.advantages, PolicyOptions(lam=1.0),
                           old_logprobs=case.kwargs["old_logprobs"], loss_agg="sum")
        out, _ = rlsd_fwd(case.student.view, case.teacher.view, prepared.inputs, prepared.options, None)
        unclipped = (flat(ratio) > 0.8) & (flat(ratio) < 1.28) & (flat(adv) != 0)
        assert unclipped.any()
        assert torch.equal(torch.sign(out["d_lp"][unclipped]), -torch.sign(flat(adv)[unclipped]))
        lp, _, _, _ = logprobs_fwd(case.student.view, case.tokens, 1.0, False)
        assert (lp <= 0).all()


def test_backward_twice_is_refused(device, backend):
    case = make_case(device)
    student = case.student.view.requires_grad_()
    with force_row_config(RowConfig(BLOCK, 1)):
        loss = case.call(rlsd_kernels.rlsd_loss, student)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_no_grad_and_detached_inputs(device, backend):
    """Without a gradient to compute, the kernel writes none and the loss is the same."""
    case = make_case(device)
    with force_row_config(RowConfig(BLOCK, 1)):
        with torch.no_grad():
            a = case.call(rlsd_kernels.rlsd_loss, case.student.view)
        b = case.call(rlsd_kernels.rlsd_loss, case.student.view.detach())
    assert not a.requires_grad and not b.requires_grad
    assert_close(a, b, what="loss", **FP32)


@pytest.mark.parametrize("pattern", ["spike", "leading_pad"])
def test_wide_logit_range(pattern, device, backend):
    """Logits far above the first block's (the per-lane sums overflow) and a row whose first block
    is all -inf: both go through the exact rescaling pass and match the reference."""
    case = make_case(device, vocab=3 * BLOCK + 5, mask="none", ratio=None)
    for buf in (case.student, case.teacher):
        if pattern == "spike":
            buf.view.data[0, 1, 2 * BLOCK + 3] = 150.0
            buf.view.data[2, 4, BLOCK + 1] = 400.0
        else:
            buf.view.data[1, :, :BLOCK] = float("-inf")
    case.tokens[1].clamp_(min=BLOCK)
    with force_row_config(RowConfig(BLOCK, 1)):
        check_against_reference(case, torch.float32)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("axis", [dict(), dict(layout="packed", dtype=torch.bfloat16, mask="seq")])
def test_split_strategy(inplace, axis, device, backend):
    """The gradient written by the forward-then-row-backward strategy the tuner may pick instead."""
    with force_row_config(RowConfig(BLOCK, 1)), force_choice("split"):
        check_against_reference(make_case(device, **axis), axis.get("dtype", torch.float32), inplace=inplace)


@pytest.mark.parametrize("inplace", [False, True])
def test_shifted_view_gradient_goes_to_its_base(inplace, device, backend):
    """``logits[:, :-1]`` of a [B, T+1, V] tensor: the gradient is written for the whole tensor, with
    zeros in the last position, and equals autograd's through the slice."""
    logits = torch.randn(3, 6, 29, device=device)
    teacher = torch.randn(3, 6, 29, device=device)
    tokens = torch.randint(0, 29, (3, 5), device=device)
    adv = torch.randn(3, device=device)
    expected_base = logits.double().requires_grad_()
    reference.rlsd_loss(expected_base[:, :-1], teacher[:, :-1].double(), tokens, adv.double()).mul(2.5).backward()
    base = logits.clone().requires_grad_()
    with force_row_config(RowConfig(BLOCK, 1)):
        loss = rlsd_kernels.rlsd_loss(base[:, :-1], teacher[:, :-1], tokens, adv, inplace_backward=inplace)
    assert loss.grad_fn is not None and "Slice" not in type(loss.grad_fn.next_functions[0][0]).__name__
    (2.5 * loss).backward()
    assert_grad_close(base.grad, expected_base.grad, torch.float32)
    assert torch.equal(base.grad[:, -1], torch.zeros_like(base.grad[:, -1]))
