"""A function that calls the ops compiles with ``fullgraph=True`` and gives the eager results."""

import pytest
import torch
from cases import make_case
from tolerances import FP32, assert_close

import rlsd_kernels
from rlsd_kernels.launch import common as _utils
from rlsd_kernels.launch.tuning import RowConfig, force_row_config


@pytest.mark.parametrize("loss_agg", ["token-mean", "none"])
def test_rlsd_loss_compiles_fullgraph(loss_agg, device, backend):
    case = make_case(device, mask="seq")
    torch._dynamo.reset()

    def step(student, teacher, tokens, advantages, old, mask):
        loss, metrics = rlsd_kernels.rlsd_loss(
            student, teacher, tokens, advantages, old_logprobs=old, mask=mask, loss_agg=loss_agg,
            return_metrics=True,
        )
        return (loss * 2.0).sum(), metrics["credit_weight_mean"]

    args = (case.teacher.view, case.tokens, case.advantages, case.kwargs["old_logprobs"], case.kwargs["mask"])
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        student = case.student.view.detach().clone().requires_grad_()
        with force_row_config(RowConfig(16, 1)):
            loss, weight = fn(student, *args)
            loss.backward()
        results.append((loss, weight, student.grad))
    for name, eager, compiled in zip(("loss", "credit weight", "grad"), *results, strict=True):
        assert_close(compiled, eager, what=name, **FP32)


def test_token_logprobs_compiles_fullgraph(device, backend):
    logits = torch.randn(4, 6, 33, device=device)
    tokens = torch.randint(0, 33, (4, 6), device=device)
    torch._dynamo.reset()

    def fn(x):
        lp, ent = rlsd_kernels.token_logprobs(x, tokens, temperature=0.8, return_entropy=True)
        return (lp * 3.0 + ent).sum()

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        x = logits.clone().requires_grad_()
        with force_row_config(RowConfig(16, 1)):
            out = f(x)
            out.backward()
        results.append((out, x.grad))
    for name, eager, compiled in zip(("value", "grad"), *results, strict=True):
        assert_close(compiled, eager, what=name, **FP32)


def _policy_step(student, teacher, tokens, advantages, lam, temperature, normalizer=None):
    agg = "token-mean" if normalizer is None else "seq-mean-token-sum"
    return rlsd_kernels.rlsd_loss(student, teacher, tokens, advantages, lam=lam, temperature=temperature,
                                  normalizer=normalizer, loss_agg=agg)


def _policy_inputs(device):
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 5, 19, generator=g).to(device), torch.randn(2, 5, 19, generator=g).to(device)
    return student, teacher, torch.randint(0, 19, (2, 5), generator=g).to(device), torch.tensor([1.0, -1.0]).to(device)


@pytest.mark.parametrize("dynamic", [None, True])
def test_hyperparameters_that_change_between_calls_compile(dynamic, device):
    """A ``lam`` from ``lam_schedule`` changes every step: its second value (a symbolic float for
    torch.compile) once failed in ``math.isnan``, and ``dynamic=True`` failed on the first call."""
    student, teacher, tokens, adv = _policy_inputs(device)
    torch._dynamo.reset()
    compiled = torch.compile(_policy_step, fullgraph=True, dynamic=dynamic)
    for lam, temperature in ((0.5, 1.0), (0.25, 0.9), (0.0, 0.8)):
        results = []
        for fn in (_policy_step, compiled):
            x = student.clone().requires_grad_()
            loss = fn(x, teacher, tokens, adv, lam, temperature)
            loss.backward()
            results.append((loss, x.grad))
        for name, eager, got in zip(("loss", "grad"), *results, strict=True):
            assert_close(got, eager, what=f"{name} at lam={lam}", **FP32)


def test_tensor_hyperparameters_under_fullgraph_name_themselves(device):
    """A one-element tensor ``lam`` works in eager mode; under ``fullgraph=True`` it once failed with a
    data-dependent guard error that named nothing."""
    student, teacher, tokens, adv = _policy_inputs(device)
    lam = torch.tensor(0.5)
    eager = _policy_step(student, teacher, tokens, adv, lam, 1.0)
    assert_close(eager, _policy_step(student, teacher, tokens, adv, 0.5, 1.0), what="tensor lam, eager", **FP32)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="lam is a tensor: under torch.compile pass a Python number"):
        torch.compile(_policy_step, fullgraph=True)(student, teacher, tokens, adv, lam, 1.0)


def test_tensor_normalizers_compile_and_bad_ones_give_nan(device):
    """With ``validate=True`` a tensor normalizer was checked by a host read, which fullgraph cannot trace:
    under torch.compile a bad one gives a NaN loss instead (as with ``validate=False``)."""
    student, teacher, tokens, adv = _policy_inputs(device)
    torch._dynamo.reset()
    compiled = torch.compile(_policy_step, fullgraph=True)
    good = torch.tensor(4.0, device=device)
    assert_close(compiled(student, teacher, tokens, adv, 0.5, 1.0, good),
                 _policy_step(student, teacher, tokens, adv, 0.5, 1.0, good), what="normalizer 4", **FP32)
    assert torch.isnan(compiled(student, teacher, tokens, adv, 0.5, 1.0, torch.zeros((), device=device)))


def _family_inputs(b, t, v=33):
    g = torch.Generator().manual_seed(b * 100 + t)
    tokens = torch.randint(0, v, (b, t), generator=g)
    tokens[0, 0] = -100
    return dict(student=torch.randn(b, t, v, generator=g), teacher=torch.randn(b, t, v, generator=g), tokens=tokens,
                adv=torch.randn(b, generator=g), old=-torch.rand(b, t, generator=g),
                rollout=-torch.rand(b, t, generator=g), weights=torch.rand(b, generator=g) + 0.5)


def _packed(x, **kw):
    """The batch packed into ``[N, V]`` with ``cu_seqlens`` (one sequence per row of the batch)."""
    b, t, v = x["student"].shape
    return dict(student=x["student"].reshape(-1, v), teacher=x["teacher"].reshape(-1, v),
                tokens=x["tokens"].reshape(-1), cu_seqlens=torch.arange(0, b * t + 1, t), **kw)


# Calls whose preparation derives a number from the shapes (the sequence count) or reads a tensor's
# values on the host (is_weights, cu_seqlens): each once failed to trace.
FAMILY = {
    "ratio_level=sequence": lambda x: rlsd_kernels.rlsd_loss(
        x["student"], x["teacher"], x["tokens"], x["adv"], old_logprobs=x["old"], ratio_level="sequence"),
    "tis_level=sequence": lambda x: rlsd_kernels.rlsd_loss(
        x["student"], x["teacher"], x["tokens"], x["adv"], old_logprobs=x["old"], rollout_logprobs=x["rollout"],
        tis_level="sequence", loss_agg="seq-mean-token-sum-norm"),
    "is_weights [B]": lambda x: rlsd_kernels.rlsd_loss(
        x["student"], x["teacher"], x["tokens"], x["adv"][:, None], is_weights=x["weights"]),
    "packed cu_seqlens": lambda x: (lambda p: rlsd_kernels.rlsd_loss(
        p["student"], p["teacher"], p["tokens"], x["adv"].repeat_interleave(x["tokens"].shape[1]),
        cu_seqlens=p["cu_seqlens"], old_logprobs=x["old"].reshape(-1), ratio_level="sequence",
        loss_agg="seq-mean-token-mean"))(_packed(x)),
    "opsd packed": lambda x: (lambda p: rlsd_kernels.opsd_loss(
        p["student"], p["teacher"], p["tokens"], cu_seqlens=p["cu_seqlens"], loss_agg="seq-mean-token-mean"))(
        _packed(x)),
    "grpo_opsd sequence": lambda x: rlsd_kernels.grpo_opsd_loss(
        x["student"], x["teacher"], x["tokens"], x["adv"], old_logprobs=x["old"], ratio_level="sequence"),
}
# The traced preparation is the same on both backends: two cases cover the Triton ops.
FAMILY_CASES = [(name, "torch") for name in FAMILY] + [("ratio_level=sequence", "triton"),
                                                         ("packed cu_seqlens", "triton")]


@pytest.mark.parametrize(("name", "backend_name"), FAMILY_CASES)
def test_shape_derived_options_compile_over_changing_shapes(name, backend_name):
    """Each call compiles with ``fullgraph=True`` and matches eager mode at a first shape and at a
    second one, where torch.compile traces the sizes as symbols (``num_seqs`` once reached an op's
    cache as an unhashable symbol)."""
    fn = FAMILY[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    with _utils.backend(backend_name):
        for shape in ((2, 5), (3, 7)):
            x = _family_inputs(*shape)
            results = []
            for f in (fn, compiled):
                student = x["student"].clone().requires_grad_()
                loss = f({**x, "student": student})
                loss.backward()
                results.append((loss, student.grad))
            for what, eager, got in zip(("loss", "grad"), *results, strict=True):
                assert_close(got, eager, what=f"{what} at {shape}", **FP32)


def test_bad_is_weights_under_compile_give_nan():
    """Under torch.compile the weights cannot be read on the host: a negative one gives a NaN loss
    (its log), where eager mode raises."""
    x = _family_inputs(2, 5)
    x["weights"][1] = -1.0
    torch._dynamo.reset()
    fn = FAMILY["is_weights [B]"]
    with pytest.raises(ValueError, match="is_weights"):
        fn(x)
    assert torch.isnan(torch.compile(fn, fullgraph=True)(x))
