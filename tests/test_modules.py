"""The nn.Module wrappers hold options and give exactly what the functional API gives."""

import inspect

import pytest
import torch
from tolerances import EXACT

import rlsd_kernels
from rlsd_kernels.modules import RLSDLinearLoss, RLSDLoss


def _inputs(b=3, t=5, h=8, v=13):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    tokens = torch.randint(0, v, (b, t), generator=g)
    tokens[0, -1] = -100
    return {
        "hidden": hidden, "weight": weight, "tokens": tokens,
        "advantages": torch.randn(b, generator=g),
        "teacher_logprobs": -torch.rand(b, t, generator=g) * 3,
        "old_logprobs": -torch.rand(b, t, generator=g) * 3,
        "mask": torch.rand(b, t, generator=g) > 0.2,
    }


OPTIONS = {"lam": 0.6, "eps_w": 0.1, "dual_clip": None, "loss_agg": "seq-mean-token-mean", "temperature": 0.7}


def test_logits_module_matches_functional():
    x = _inputs()
    per_call = {k: x[k] for k in ("teacher_logprobs", "old_logprobs", "mask")}
    results = []
    for call in ("module", "functional"):
        z = (x["hidden"] @ x["weight"].T).requires_grad_()
        if call == "module":
            loss = RLSDLoss(**OPTIONS)(z, None, x["tokens"], x["advantages"], **per_call)
        else:
            loss = rlsd_kernels.rlsd_loss(z, None, x["tokens"], x["advantages"], **OPTIONS, **per_call)
        loss.backward()
        results.append((loss.detach(), z.grad))
    torch.testing.assert_close(results[0][0], results[1][0], **EXACT)
    torch.testing.assert_close(results[0][1], results[1][1], **EXACT)


def test_linear_module_matches_functional_and_takes_overrides():
    x = _inputs()
    per_call = {k: x[k] for k in ("teacher_logprobs", "old_logprobs", "mask")}
    module = RLSDLinearLoss(**OPTIONS)
    results = []
    for call in ("module", "functional"):
        h = x["hidden"].clone().requires_grad_()
        w = x["weight"].clone().requires_grad_()
        if call == "module":
            loss, metrics = module(h, w, x["tokens"], x["advantages"], return_metrics=True, loss_agg="sum",
                                   **per_call)
        else:
            loss, metrics = rlsd_kernels.rlsd_linear_loss(h, w, x["tokens"], x["advantages"],
                                                          **{**OPTIONS, "loss_agg": "sum"}, return_metrics=True,
                                                          **per_call)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad, metrics["credit_weight_mean"]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **EXACT)
    assert module.options["loss_agg"] == "seq-mean-token-mean"


def test_lam_setter_changes_the_loss():
    x = _inputs()
    z = x["hidden"] @ x["weight"].T
    module = RLSDLoss(lam=0.0)
    per_call = {"teacher_logprobs": x["teacher_logprobs"], "old_logprobs": x["old_logprobs"]}
    grpo = module(z, None, x["tokens"], x["advantages"], **per_call)
    module.lam = 1.0
    assert module.lam == 1.0
    rlsd = module(z, None, x["tokens"], x["advantages"], **per_call)
    expected = rlsd_kernels.rlsd_loss(z, None, x["tokens"], x["advantages"], lam=1.0, **per_call)
    assert not torch.allclose(grpo, rlsd)
    torch.testing.assert_close(rlsd, expected, **EXACT)
    assert "lam=1.0" in repr(module)
    assert list(module.state_dict()) == []


def test_unknown_and_per_call_options_are_rejected():
    with pytest.raises(TypeError, match="lamda"):
        RLSDLoss(lamda=0.5)
    with pytest.raises(TypeError, match="mask"):
        RLSDLoss(mask=torch.ones(2, 2))
    with pytest.raises(TypeError, match="teacher_hidden"):
        RLSDLinearLoss(teacher_hidden=torch.ones(2, 2))


@pytest.mark.parametrize("module", [RLSDLoss, RLSDLinearLoss])
def test_every_per_token_input_is_per_call(module):
    """A per-token tensor fixed at construction would apply to every later batch: ``is_weights`` once
    was, and a call without it then used the first batch's."""
    from rlsd_kernels.api.compose import PER_TOKEN_KEYWORDS

    taken = [k for k in PER_TOKEN_KEYWORDS if k in inspect.signature(module._fn).parameters]
    assert "is_weights" in taken and "teacher_logprobs" in taken
    for name in taken:
        with pytest.raises(TypeError, match=f"'{name}'.* are per-call inputs"):
            module(**{name: torch.ones(2)})


def _bad_values():
    """``(keyword, bad value)`` for every option a module holds: each policy option from its table (a
    name outside its choices, or NaN for a number), and the loss's other keywords."""
    from rlsd_kernels.call.options import PolicyOptions

    for name, _, meta in PolicyOptions.SPECS:
        if meta.get("doc") is not None:
            yield name, "bogus" if meta.get("choices") is not None else float("nan")
    yield from [("loss_agg", "bogus"), ("validate", "yes"), ("validate", None), ("return_metrics", "no"),
                ("inplace_backward", "false"), ("chunk_size", 0), ("chunk_size", 2.5)]


@pytest.mark.parametrize("module", [RLSDLoss, RLSDLinearLoss])
def test_bad_options_fail_at_construction(module):
    """A bad option fails where it is set, naming it, not at the first training step; the same value
    given per call is refused by the functional's own check."""
    x = _inputs()
    names = {p.name for p in inspect.signature(module._fn).parameters.values()}
    cases = [(k, v) for k, v in _bad_values() if k in names]
    assert len(cases) >= 20
    first = x["hidden"] if module is RLSDLinearLoss else x["hidden"] @ x["weight"].T
    second = x["weight"] if module is RLSDLinearLoss else None
    for name, value in cases:
        with pytest.raises(ValueError, match=name):
            module(**{name: value})
        with pytest.raises(ValueError, match=name):
            module()(first, second, x["tokens"], x["advantages"], teacher_logprobs=x["teacher_logprobs"],
                     **{name: value})


def test_lam_setter_checks_the_value():
    module = RLSDLoss(lam=0.5)
    for value in (1.5, -0.1, float("nan"), "1", None):
        with pytest.raises((ValueError, TypeError), match="lam"):
            module.lam = value
        assert module.lam == 0.5
    module.lam = 0
    assert module.lam == 0


def test_docs_loss_examples():
    from docs_snippets import blocks

    x = _inputs()
    logits = x["hidden"] @ x["weight"].T
    namespace = {"logits": logits, "tokens": x["tokens"], "advantages": x["advantages"],
                 "teacher_lp": x["teacher_logprobs"], "old_lp": x["old_logprobs"], "mask": x["mask"], "step": 7}
    functional, module = blocks("Use from any trainer")[1:]
    exec(compile(functional, "README.md", "exec"), namespace)
    expected = rlsd_kernels.rlsd_loss(logits, None, x["tokens"], x["advantages"],
                                      teacher_logprobs=x["teacher_logprobs"], old_logprobs=x["old_logprobs"],
                                      mask=x["mask"], lam=rlsd_kernels.lam_schedule(7))
    torch.testing.assert_close(namespace["loss"], expected, **EXACT)
    exec(compile(module, "README.md", "exec"), namespace)
    torch.testing.assert_close(namespace["loss"], expected, **EXACT)
    assert namespace["loss_fn"].lam == rlsd_kernels.lam_schedule(7)


def test_importing_the_package_pulls_in_no_trainer():
    import subprocess
    import sys

    code = ("import sys, rlsd_kernels, rlsd_kernels.integrations, rlsd_kernels.modules; "
            "print(sorted(m for m in ('trl', 'verl', 'transformers', 'vllm', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
