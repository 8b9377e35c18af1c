"""A function that calls the ops compiles with ``fullgraph=True`` and gives the eager results."""

import pytest
import torch
from cases import make_case
from tolerances import FP32, assert_close

import rlsd_kernels
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
