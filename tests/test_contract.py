"""The API's contract under input a demanding user gives it: GRPO without a teacher, credit metrics
over the tokens that carry credit, sequence boundaries, normalizers, overlapping storage, numbers
of any type, token dtypes, a second backward, and per-token losses with float masks."""

import numpy as np
import pytest
import torch
from tolerances import FP32, GRAD, assert_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.launch.tuning import RowConfig, force_row_config

V = 13


@pytest.fixture(autouse=True)
def small_blocks():
    with force_row_config(RowConfig(16, 1)):
        yield


def _inputs(device, b=3, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, V, generator=g).to(device)
    teacher = torch.randn(b, t, V, generator=g).to(device)
    tokens = torch.randint(0, V, (b, t), generator=g).to(device)
    adv = torch.tensor([1.0, 0.0, -0.5][:b], device=device)
    return student, teacher, tokens, adv


CREDIT_KEYS = {"credit_weight_mean", "credit_clip_low_frac", "credit_clip_high_frac", "delta_mean",
               "num_credit_tokens"}


@pytest.mark.parametrize("form", ["logits", "linear"])
def test_grpo_needs_no_teacher(form, device, backend):
    student, _, tokens, adv = _inputs(device)
    hidden, weight = torch.randn(3, 4, 6, device=device), torch.randn(V, 6, device=device)

    def run(**teacher):
        x = (student if form == "logits" else hidden).clone().requires_grad_()
        if form == "logits":
            loss, metrics = rlsd_kernels.rlsd_loss(x, teacher.pop("logits", None), tokens, adv, lam=0.0,
                                                   return_metrics=True, **teacher)
        else:
            loss, metrics = rlsd_kernels.rlsd_linear_loss(x, weight, tokens, adv, lam=0.0, return_metrics=True,
                                                          **teacher)
        loss.backward()
        return loss, metrics, x.grad

    loss, metrics, grad = run()
    dummy_loss, dummy_metrics, dummy_grad = run(teacher_logprobs=torch.zeros_like(tokens, dtype=torch.float32))
    assert_close(loss, dummy_loss, what="loss", **FP32)
    assert_close(grad, dummy_grad, what="grad", **GRAD[torch.float32])
    assert not CREDIT_KEYS & metrics.keys() and CREDIT_KEYS <= dummy_metrics.keys()
    with pytest.raises(ValueError, match="teacher"):
        rlsd_kernels.rlsd_loss(student, None, tokens, adv, lam=0.5)


def test_credit_metrics_count_only_tokens_with_an_advantage(device, backend):
    student, teacher, tokens, adv = _inputs(device)
    _, metrics = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, eps_w=0.8, return_metrics=True)
    lp_s = reference.token_logprobs(student.double(), tokens)
    lp_t = reference.token_logprobs(teacher.double(), tokens)
    sign = torch.sign(adv.double())[:, None]
    w = torch.exp((sign * (lp_t - lp_s)).clamp(np.log(0.2), np.log(1.8)))
    carrying = (adv != 0)[:, None].expand_as(w)
    assert float(metrics["num_credit_tokens"]) == carrying.sum() == 8
    assert_close(metrics["credit_weight_mean"], w[carrying].mean(), what="credit weight", **FP32)
    assert_close(metrics["delta_mean"], (lp_t - lp_s)[carrying].mean(), what="delta", **FP32)


@pytest.mark.parametrize("bounds, match", [([1, 4, 8], "start at 0"), ([0, 5, 3, 8], "not decrease"),
                                           ([0, 4, 7], "ends at 7"), ([], "at least one")])
@pytest.mark.parametrize("on", ["cpu", "device"])
def test_bad_cu_seqlens_name_the_argument(bounds, match, on, device, backend):
    student, teacher, tokens, adv = _inputs(device, b=2)
    flat = lambda x: x.reshape(8, *x.shape[2:])  # noqa: E731
    cu = torch.tensor(bounds, dtype=torch.int64, device="cpu" if on == "cpu" else device)
    with pytest.raises(ValueError, match=f"cu_seqlens.*{match}|{match}.*"):
        rlsd_kernels.rlsd_loss(flat(student), flat(teacher), flat(tokens), torch.ones(8, device=device),
                               loss_agg="seq-mean-token-mean", cu_seqlens=cu)


def test_no_tokens_with_empty_boundaries_give_zero(device, backend):
    student = torch.randn(0, V, device=device, requires_grad=True)
    loss = rlsd_kernels.rlsd_loss(student, student.detach(), torch.zeros(0, dtype=torch.long, device=device),
                                  torch.zeros(0, device=device), loss_agg="seq-mean-token-mean",
                                  cu_seqlens=torch.tensor([0], device=device))
    loss.backward()
    assert float(loss) == 0.0 and student.grad.shape == (0, V)


def _empty_layouts(device):
    """Student logits without a row, in the layouts torch gives them: plain, no sequence, no token per
    sequence, and strides with a 0 (an elementwise result of an empty transposed tensor)."""
    yield torch.randn(0, V, device=device)
    yield torch.randn(0, 4, V, device=device)
    yield torch.randn(2, 0, V, device=device)
    zero_stride = torch.randn(4, 0, V, device=device).transpose(0, 1).contiguous() * 1
    assert 0 in zero_stride.stride()
    yield zero_stride


@pytest.mark.parametrize("inplace", [False, True])
def test_empty_batches_give_zero_in_every_layout(inplace, device, backend):
    """``inplace_backward=True`` once refused an empty batch with a 0 stride: "rows share storage"."""
    for layout in _empty_layouts(device):
        shape = layout.shape[:-1]
        tokens = torch.zeros(shape, dtype=torch.long, device=device)
        adv = torch.zeros(shape[0], device=device)
        for fn, extra in ((rlsd_kernels.rlsd_loss, (adv,)), (rlsd_kernels.opsd_loss, ()),
                          (rlsd_kernels.grpo_opsd_loss, (adv,))):
            student = layout.clone().requires_grad_()
            loss = fn(student, layout, tokens, *extra, inplace_backward=inplace)
            loss.backward()
            assert float(loss.detach()) == 0.0 and student.grad.shape == layout.shape, (tuple(layout.shape), inplace)


@pytest.mark.parametrize("value", [0.0, -4.0, float("inf"), float("nan")])
@pytest.mark.parametrize("form", ["number", "tensor"])
def test_bad_normalizers_raise_or_give_nan(value, form, device, backend):
    student, teacher, tokens, adv = _inputs(device)
    normalizer = value if form == "number" else torch.tensor(value, device=device)
    with pytest.raises(ValueError, match="normalizer"):
        rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, normalizer=normalizer)
    if form == "tensor":
        x = student.clone().requires_grad_()
        loss = rlsd_kernels.rlsd_loss(x, teacher, tokens, adv, normalizer=normalizer, validate=False)
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(x.grad).any()


def test_a_tensor_normalizer_divides_like_a_number(device, backend):
    student, teacher, tokens, adv = _inputs(device)
    number = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, normalizer=7)
    tensor = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, normalizer=torch.tensor([7], device=device))
    expected = reference.rlsd_loss(student.double(), teacher.double(), tokens, adv.double(), normalizer=7)
    assert_close(number, expected, what="number", **FP32)
    assert_close(tensor, expected, what="tensor", **FP32)


@pytest.mark.parametrize("op", ["rlsd_loss", "opsd_loss", "grpo_opsd_loss"])
def test_inplace_backward_refuses_rows_that_share_storage(op, device, backend):
    _, teacher, tokens, adv = _inputs(device)
    row = torch.randn(1, 1, V, device=device, requires_grad=True)
    shared = row.expand(3, 4, V)
    args = (shared, teacher, tokens) + ((adv,) if op != "opsd_loss" else ())
    with pytest.raises(ValueError, match="inplace_backward"):
        getattr(rlsd_kernels, op)(*args, inplace_backward=True)
    # Without in place, autograd adds the rows' gradients into the shared row.
    loss = getattr(rlsd_kernels, op)(*args)
    loss.backward()
    dense = row.detach().expand(3, 4, V).clone().requires_grad_()
    getattr(rlsd_kernels, op)(dense, *args[1:]).backward()
    assert_close(row.grad, dense.grad.sum((0, 1), keepdim=True), what="grad", **GRAD[torch.float32])


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor([0.5])])
@pytest.mark.parametrize("name", ["lam", "eps_w", "temperature", "clip_low"])
def test_numbers_of_any_type(name, value, device, backend):
    student, teacher, tokens, adv = _inputs(device)
    got = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, **{name: value})
    expected = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, **{name: 0.5})
    assert torch.equal(got, expected)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), np.float32("nan")])
def test_non_finite_hyperparameters_are_refused(value, device):
    student, teacher, tokens, adv = _inputs(device)
    for name in ("lam", "temperature", "eps_w"):
        with pytest.raises(ValueError, match=name):
            rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, **{name: value})


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int8])
def test_token_dtypes_other_than_int32_and_int64_are_refused(dtype, device):
    student, teacher, tokens, adv = _inputs(device)
    with pytest.raises(TypeError, match="tokens must be int32 or int64"):
        rlsd_kernels.rlsd_loss(student, teacher, tokens.to(dtype), adv)
    with pytest.raises(TypeError, match="tokens must be int32 or int64"):
        rlsd_kernels.token_logprobs(student, tokens.to(dtype))


@pytest.mark.parametrize("form", ["logits", "linear"])
def test_a_second_backward_raises(form, device, backend):
    student, teacher, tokens, adv = _inputs(device)
    if form == "logits":
        x = student.clone().requires_grad_()
        loss = rlsd_kernels.rlsd_loss(x, teacher, tokens, adv)
    else:
        x = torch.randn(3, 4, 6, device=device, requires_grad=True)
        loss = rlsd_kernels.rlsd_linear_loss(x, torch.randn(V, 6, device=device), tokens, adv,
                                             teacher_logprobs=torch.zeros(3, 4, device=device))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through it twice is not supported"):
        loss.backward()


def _first_order_calls(device):
    """``name -> (differentiable input, fn(x) -> a tensor to differentiate)`` for every public
    function and both kinds of autograd Function (a scalar loss, per-token losses)."""
    student, teacher, tokens, adv = _inputs(device)
    h, w = torch.randn(3, 4, 6, device=device), torch.randn(V, 6, device=device)
    th = torch.randn(3, 4, 6, device=device)
    return {
        "rlsd_loss": (student, lambda x: rlsd_kernels.rlsd_loss(x, teacher, tokens, adv)),
        "rlsd_loss none": (student, lambda x: rlsd_kernels.rlsd_loss(x, teacher, tokens, adv, loss_agg="none")),
        "opsd_loss": (student, lambda x: rlsd_kernels.opsd_loss(x, teacher, tokens)),
        "grpo_opsd_loss": (student, lambda x: rlsd_kernels.grpo_opsd_loss(x, teacher, tokens, adv)),
        "token_logprobs": (student, lambda x: rlsd_kernels.token_logprobs(x, tokens, return_entropy=True)[0]),
        "rlsd_linear_loss": (h, lambda x: rlsd_kernels.rlsd_linear_loss(x, w, tokens, adv, teacher_hidden=th)),
        "opsd_linear_loss none": (h, lambda x: rlsd_kernels.opsd_linear_loss(x, w, tokens, teacher_hidden=th,
                                                                             loss_agg="none")),
        "grpo_opsd_linear_loss": (h, lambda x: rlsd_kernels.grpo_opsd_linear_loss(x, w, tokens, adv,
                                                                                  teacher_hidden=th)),
        "token_logprobs_linear": (h, lambda x: rlsd_kernels.token_logprobs_linear(x, w, tokens)),
    }


def test_second_order_gradients_raise(device, backend):
    """A gradient taken with ``create_graph=True`` once came back without a graph: a gradient
    penalty's own gradient was silently dropped (off by 2.78 against the reference), or the
    log-probs' backward crashed inside. Now it raises, naming the option; the plain gradient holds."""
    for name, (x0, fn) in _first_order_calls(device).items():
        x = x0.clone().requires_grad_()
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_per_token_losses_carry_the_float_mask(device, backend):
    student, teacher, tokens, adv = _inputs(device)
    mask = torch.rand(3, 4, device=device)
    weighted = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, mask=mask, loss_agg="none")
    plain = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, loss_agg="none")
    assert_close(weighted, mask * plain, what="m * l", **FP32)
