"""Surface of the public API that the matrix tests do not call: int32 ids, integer and float credit
masks, per-token inputs in half and double precision, student and teacher of different dtypes,
the ``[S, B, V]`` layout, ``normalizer`` on the OPSD ops, ``validate=False`` on every op, and the
credit and clip keywords on the linear and GRPO+OPSD forms, each against the float64 reference
through both backends."""

import math

import pytest
import torch
from cases import logits_buffer
from tolerances import FP32, GRAD, assert_close

import rlsd_kernels
from rlsd_kernels import reference

B, T, V, H = 2, 5, 21, 8
RATIOS = torch.tensor([0.5, 0.9, 1.0, 1.2, 1.6, 3.5, 0.75, 1.1, 1.05, 0.95])


def _double(x):
    return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def inputs(device, *, dtype=torch.float32, teacher_dtype=None, seed=3, shape=(B, T)):
    """Student and teacher logits (views into NaN-padded buffers), tokens, advantages, and per-token
    log-probs around the student's: ratios on both sides of the PPO range and past the dual clip."""
    g = torch.Generator(device=device).manual_seed(seed)
    student = logits_buffer(shape, V, dtype, device, generator=g).view
    teacher = logits_buffer(shape, V, teacher_dtype or dtype, device, generator=g).view
    teacher.data.copy_(student.float() + 0.7 * torch.randn(student.shape, generator=g, device=device))
    tokens = torch.randint(0, V, shape, generator=g, device=device)
    lp = reference.token_logprobs(student.double(), tokens).float()
    ratio = RATIOS.to(device).repeat(math.ceil(lp.numel() / len(RATIOS)))[: lp.numel()].view(shape)
    per_token = dict(
        old_logprobs=lp - ratio.log(),
        rollout_logprobs=lp - ratio.log() + 0.4 * torch.randn(shape, generator=g, device=device),
        ref_logprobs=lp + 0.3 * torch.randn(shape, generator=g, device=device),
        mask=torch.rand(shape, generator=g, device=device) > 0.2,
    )
    adv = torch.randn(shape[0], generator=g, device=device)
    return student, teacher, tokens, adv, per_token


def compare(op, ref_op, student, rest, kwargs, *, ref_kwargs=None, grad_dtype=None, what=""):
    """``op(student, *rest, **kwargs)`` against ``ref_op`` in float64: loss and student gradient."""
    ref_student = student.detach().double().requires_grad_()
    ref_kwargs = {k: _double(v) for k, v in (kwargs if ref_kwargs is None else ref_kwargs).items()
                  if k not in ("validate", "inplace_backward")}
    ref_loss = ref_op(ref_student, *[_double(x) for x in rest], **ref_kwargs)
    up = (torch.randn(ref_loss.shape, dtype=torch.float64) if ref_loss.dim()
          else torch.tensor(1.0, dtype=torch.float64)).to(ref_loss.device)
    (ref_loss * up).sum().backward()
    leaf = student.detach().clone().requires_grad_()
    loss = op(leaf, *rest, **kwargs)
    scale = min(1.0, float(ref_loss.detach().abs().max().clamp(min=1e-30)))
    assert_close(loss, ref_loss, what=f"{what} loss", rtol=FP32["rtol"], atol=FP32["atol"] / scale)
    (loss * up.to(loss.device, loss.dtype)).sum().backward()
    assert leaf.grad.dtype == student.dtype
    assert_close(leaf.grad, ref_student.grad, what=f"{what} grad", **GRAD[grad_dtype or student.dtype])
    return loss.detach(), leaf.grad


POLICY = dict(lam=0.7, eps_w_low=0.1, eps_w_high=0.4, clip_low=0.1, clip_high=0.2, dual_clip=2.0)


def test_int32_ids(device, backend, small_blocks):
    student, teacher, tokens, adv, pt = inputs(device)
    kw = dict(old_logprobs=pt["old_logprobs"], mask=pt["mask"], **POLICY)
    for op, ref_op, rest, kwargs in (
        (rlsd_kernels.rlsd_loss, reference.rlsd_loss, (teacher, tokens, adv), kw),
        (rlsd_kernels.grpo_opsd_loss, reference.grpo_opsd_loss, (teacher, tokens, adv), dict(kw, divergence="jsd")),
        (rlsd_kernels.opsd_loss, reference.opsd_loss, (teacher, tokens), dict(divergence="sampled_token")),
    ):
        as64 = compare(op, ref_op, student, rest, kwargs, what=op.__name__)
        rest32 = tuple(x.int() if x is tokens else x for x in rest)
        as32 = compare(op, ref_op, student, rest32, kwargs, what=f"{op.__name__} int32")
        assert torch.equal(as64[0], as32[0]) and torch.equal(as64[1], as32[1])
    lp64 = rlsd_kernels.token_logprobs(student, tokens)
    assert torch.equal(rlsd_kernels.token_logprobs(student, tokens.int()), lp64)


@pytest.mark.parametrize("kind", ["int64", "int32", "uint8", "float01", "float"])
def test_credit_mask_dtypes(kind, device, backend, small_blocks):
    """Integer and float masks mean nonzero = reweighted, as a bool mask does."""
    student, teacher, tokens, adv, pt = inputs(device)
    on = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(1)).to(device) > 0.4
    credit = {"int64": on.long(), "int32": on.int(), "uint8": on.to(torch.uint8), "float01": on.float(),
              "float": on.float() * torch.rand(on.shape, device=device).clamp(min=0.1)}[kind]
    kw = dict(old_logprobs=pt["old_logprobs"], mask=pt["mask"], **POLICY)
    with_bool = compare(rlsd_kernels.rlsd_loss, reference.rlsd_loss, student, (teacher, tokens, adv),
                        dict(kw, credit_mask=on))
    with_kind = compare(rlsd_kernels.rlsd_loss, reference.rlsd_loss, student, (teacher, tokens, adv),
                        dict(kw, credit_mask=credit), ref_kwargs=dict(kw, credit_mask=on))
    assert torch.equal(with_bool[0], with_kind[0]) and torch.equal(with_bool[1], with_kind[1])
    without = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, **kw)
    assert not torch.equal(without, with_bool[0]), "the credit mask changes nothing in this case"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("teacher_logprobs", [False, True])
def test_per_token_inputs_in_other_precisions(dtype, teacher_logprobs, device, backend, small_blocks):
    student, teacher, tokens, adv, pt = inputs(device)
    kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in pt.items()}
    kw.update(kl_coef=0.1, tis_cap=1.5, **POLICY)
    if teacher_logprobs:
        lp_t = reference.token_logprobs(teacher.double(), tokens).to(dtype)
        kw["teacher_logprobs"], teacher = lp_t, None
    adv = adv.to(dtype)
    compare(rlsd_kernels.rlsd_loss, reference.rlsd_loss, student, (teacher, tokens, adv), kw)
    compare(rlsd_kernels.grpo_opsd_loss, reference.grpo_opsd_loss, student, (teacher, tokens, adv),
            dict(kw, divergence="sampled_token" if teacher_logprobs else "reverse_kl", token_clip=0.5))


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                    (torch.float16, torch.bfloat16)], ids=str)
def test_student_and_teacher_of_different_dtypes(dtypes, device, backend, small_blocks):
    student, teacher, tokens, adv, pt = inputs(device, dtype=dtypes[0], teacher_dtype=dtypes[1])
    assert student.dtype == dtypes[0] and teacher.dtype == dtypes[1]
    kw = dict(old_logprobs=pt["old_logprobs"], mask=pt["mask"], temperature=0.9)
    compare(rlsd_kernels.rlsd_loss, reference.rlsd_loss, student, (teacher, tokens, adv), kw)
    compare(rlsd_kernels.opsd_loss, reference.opsd_loss, student, (teacher, tokens),
            dict(mask=pt["mask"], divergence="jsd", beta=0.3))
    compare(rlsd_kernels.grpo_opsd_loss, reference.grpo_opsd_loss, student, (teacher, tokens, adv),
            dict(kw, divergence="forward_kl", lam=0.5))


def test_sequence_major_layout(device, backend, small_blocks):
    """Megatron's ``[S, B, V]`` logits, passed as their ``[B, S, V]`` transpose (a batch stride
    smaller than the sequence stride): sequence-level terms and aggregation follow the batch."""
    g = torch.Generator(device=device).manual_seed(9)
    s_major = torch.randn(T, B, V, generator=g, device=device) * 2
    t_major = s_major + 0.7 * torch.randn(T, B, V, generator=g, device=device)
    student, teacher = s_major.transpose(0, 1), t_major.transpose(0, 1)
    assert student.shape == (B, T, V) and student.stride(0) < student.stride(1)
    _, _, tokens, adv, pt = inputs(device)
    kw = dict(old_logprobs=pt["old_logprobs"], mask=pt["mask"], rollout_logprobs=pt["rollout_logprobs"],
              ratio_level="sequence", tis_level="sequence", loss_agg="seq-mean-token-mean", entropy_coef=0.01)
    got = compare(rlsd_kernels.rlsd_loss, reference.rlsd_loss, student, (teacher, tokens, adv), kw)
    copy = compare(rlsd_kernels.rlsd_loss, reference.rlsd_loss, student.contiguous(),
                   (teacher.contiguous(), tokens, adv), kw)
    assert_close(got[0], copy[0], what="transposed vs contiguous", **FP32)
    compare(rlsd_kernels.opsd_loss, reference.opsd_loss, student, (teacher, tokens),
            dict(mask=pt["mask"], divergence="reverse_kl", loss_agg="seq-mean-token-sum"))
    lp = rlsd_kernels.token_logprobs(student, tokens)
    assert_close(lp, reference.token_logprobs(student.double(), tokens), what="token_logprobs", **FP32)


@pytest.mark.parametrize("loss_agg, normalizer", [("token-mean", 7.5), ("seq-mean-token-mean", "tensor"),
                                                   ("seq-mean-token-sum", 7.5), ("seq-mean-token-sum-norm", "tensor"),
                                                   ("sum", 7.5)])
def test_normalizer_on_the_opsd_ops(loss_agg, normalizer, device, backend, small_blocks):
    student, teacher, tokens, adv, pt = inputs(device)
    normalizer = torch.tensor(13.0, device=device) if normalizer == "tensor" else normalizer
    kw = dict(mask=pt["mask"], loss_agg=loss_agg, normalizer=normalizer)
    compare(rlsd_kernels.opsd_loss, reference.opsd_loss, student, (teacher, tokens), dict(kw, divergence="jsd"))
    compare(rlsd_kernels.grpo_opsd_loss, reference.grpo_opsd_loss, student, (teacher, tokens, adv),
            dict(kw, divergence="sampled_token", old_logprobs=pt["old_logprobs"], lam=0.5))
    # The linear forms of both, against the reference on the materialised logits.
    hidden, t_hidden, weight = _linear(device)
    t_logits = _logits(t_hidden, weight)
    compare(lambda h, y, **k: rlsd_kernels.opsd_linear_loss(h, weight, teacher_hidden=t_hidden, tokens=y, **k),
            lambda h, y, **k: reference.opsd_loss(h @ weight.double().T, t_logits, y, **k),
            hidden, (tokens,), dict(kw, divergence="forward_kl"), what="opsd_linear_loss")
    compare(lambda h, y, a, **k: rlsd_kernels.grpo_opsd_linear_loss(h, weight, y, a, teacher_hidden=t_hidden, **k),
            lambda h, y, a, **k: reference.grpo_opsd_loss(h @ weight.double().T, t_logits, y, a, **k),
            hidden, (tokens, adv), dict(kw, divergence="jsd", lam=0.5), what="grpo_opsd_linear_loss")


def _linear(device, dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(11)
    hidden = torch.randn(B, T, H, generator=g, device=device).to(dtype)
    t_hidden = (hidden.float() + 0.5 * torch.randn(B, T, H, generator=g, device=device)).to(dtype)
    weight = (torch.randn(V, H, generator=g, device=device) * 0.8).to(dtype)
    return hidden, t_hidden, weight


def _logits(h, w):
    return h.double() @ w.double().T


CREDIT = dict(POLICY, credit_base="old", credit_negative_only=True)


@pytest.mark.parametrize("form", ["rlsd_linear", "grpo_opsd", "grpo_opsd_linear"])
@pytest.mark.parametrize("credit_mask", [False, True])
def test_credit_and_clip_keywords_on_other_forms(form, credit_mask, device, backend, small_blocks):
    student, teacher, tokens, adv, pt = inputs(device)
    hidden, t_hidden, weight = _linear(device)
    kw = dict(old_logprobs=pt["old_logprobs"], mask=pt["mask"], **CREDIT)
    if credit_mask:
        kw["credit_mask"] = torch.arange(B * T, device=device).view(B, T) % 3 != 0
    if form == "grpo_opsd":
        compare(rlsd_kernels.grpo_opsd_loss, reference.grpo_opsd_loss, student, (teacher, tokens, adv),
                dict(kw, divergence="jsd", beta=0.4, alpha=0.6))
        return
    # The linear forms: old log-probs placed around the student's from the materialised logits.
    lp = reference.token_logprobs(_logits(hidden, weight), tokens).float()
    kw["old_logprobs"] = lp - RATIOS.to(device).view(B, T).log()
    t_logits = _logits(t_hidden, weight)
    if form == "rlsd_linear":
        op = lambda h, y, a, **k: rlsd_kernels.rlsd_linear_loss(h, weight, y, a, teacher_hidden=t_hidden, **k)  # noqa: E731
        ref = lambda h, y, a, **k: reference.rlsd_loss(h @ weight.double().T, t_logits, y, a, **k)  # noqa: E731
    else:
        op = lambda h, y, a, **k: rlsd_kernels.grpo_opsd_linear_loss(h, weight, y, a, teacher_hidden=t_hidden,  # noqa: E731
                                                                     divergence="reverse_kl", alpha=0.6, **k)
        ref = lambda h, y, a, **k: reference.grpo_opsd_loss(h @ weight.double().T, t_logits, y, a,  # noqa: E731
                                                            divergence="reverse_kl", alpha=0.6, **k)
    compare(op, ref, hidden, (tokens, adv), kw)
    # The keywords are live: the defaults give another loss.
    plain = op(hidden, tokens, adv, old_logprobs=kw["old_logprobs"], mask=pt["mask"])
    assert not torch.allclose(plain, op(hidden, tokens, adv, **kw))


def _all_ops(device):
    """Every public op as ``(name, call(validate) -> (loss-like tensor, gradient))``."""
    student, teacher, tokens, adv, pt = inputs(device)
    hidden, t_hidden, weight = _linear(device)
    kw = dict(old_logprobs=pt["old_logprobs"], mask=pt["mask"])

    def run(fn, leaf):
        def call(validate):
            x = leaf.detach().clone().requires_grad_()
            out = fn(x, validate)
            out = out[0] + out[1] if isinstance(out, tuple) else out
            out.sum().backward()
            return out.detach(), x.grad
        return call

    return {
        "rlsd_loss": run(lambda x, v: rlsd_kernels.rlsd_loss(x, teacher, tokens, adv, validate=v, **kw), student),
        "token_logprobs": run(lambda x, v: rlsd_kernels.token_logprobs(x, tokens, return_entropy=True, validate=v),
                              student),
        "opsd_loss": run(lambda x, v: rlsd_kernels.opsd_loss(x, teacher, tokens, validate=v, mask=pt["mask"]),
                         student),
        "grpo_opsd_loss": run(lambda x, v: rlsd_kernels.grpo_opsd_loss(x, teacher, tokens, adv, validate=v, **kw),
                              student),
        "rlsd_linear_loss": run(lambda x, v: rlsd_kernels.rlsd_linear_loss(
            x, weight, tokens, adv, teacher_hidden=t_hidden, validate=v, **kw), hidden),
        "token_logprobs_linear": run(lambda x, v: rlsd_kernels.token_logprobs_linear(
            x, weight, tokens, return_entropy=True, validate=v), hidden),
        "opsd_linear_loss": run(lambda x, v: rlsd_kernels.opsd_linear_loss(
            x, weight, teacher_hidden=t_hidden, tokens=tokens, validate=v, mask=pt["mask"]), hidden),
        "grpo_opsd_linear_loss": run(lambda x, v: rlsd_kernels.grpo_opsd_linear_loss(
            x, weight, tokens, adv, teacher_hidden=t_hidden, validate=v, **kw), hidden),
    }


OPS = ["rlsd_loss", "token_logprobs", "opsd_loss", "grpo_opsd_loss", "rlsd_linear_loss", "token_logprobs_linear",
       "opsd_linear_loss", "grpo_opsd_linear_loss"]


@pytest.mark.parametrize("name", OPS)
def test_validate_false_gives_the_same_result_on_valid_input(name, device, backend, small_blocks):
    call = _all_ops(device)[name]
    checked, unchecked = call(True), call(False)
    assert torch.isfinite(checked[0]).all() and checked[1].abs().sum() > 0
    assert torch.equal(checked[0], unchecked[0]) and torch.equal(checked[1], unchecked[1])


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_packed_with_an_empty_sequence_and_int32_boundaries(cu_dtype, device, backend, small_blocks):
    """Packed tokens whose boundaries hold a zero-length sequence (it counts in S, adds nothing),
    given as int32 or int64: sequence-level ratio and importance weight, every sequence mode."""
    student, teacher, tokens, _, pt = inputs(device, shape=(B * T,))
    cu = torch.tensor([0, 3, 3, 7, B * T], dtype=cu_dtype, device=device)
    adv = torch.randn(B * T, generator=torch.Generator().manual_seed(4)).to(device)
    base = dict(old_logprobs=pt["old_logprobs"], rollout_logprobs=pt["rollout_logprobs"], mask=pt["mask"],
                cu_seqlens=cu, ratio_level="sequence", tis_level="sequence")
    for loss_agg in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        kw = dict(base, loss_agg=loss_agg)
        compare(rlsd_kernels.rlsd_loss, reference.rlsd_loss, student, (teacher, tokens, adv), kw, what=loss_agg)
        compare(rlsd_kernels.opsd_loss, reference.opsd_loss, student, (teacher, tokens),
                dict(mask=pt["mask"], cu_seqlens=cu, loss_agg=loss_agg, divergence="jsd"), what=loss_agg)


@pytest.mark.parametrize("op", ["rlsd_loss", "grpo_opsd_loss"])
def test_kl_coef_without_ref_logprobs_is_an_error(op, device):
    student, teacher, tokens, adv, _ = inputs(device)
    with pytest.raises(ValueError, match="ref_logprobs"):
        getattr(rlsd_kernels, op)(student, teacher, tokens, adv, kl_coef=0.1)
