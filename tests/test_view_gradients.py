"""The gradient of a ``logits[:, :-1]`` view: written for the base only where nothing could tell it
apart from autograd's own result, and through autograd everywhere else (named views asked for
their gradient, hooks, ``retain_grad``, views made under ``no_grad``), for every loss from logits."""

import pytest
import torch
from tolerances import assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.launch.tuning import RowConfig, force_row_config

B, T, V = 2, 5, 19


def _inputs(device):
    g = torch.Generator(device="cpu").manual_seed(3)
    logits = torch.randn(B, T + 1, V, generator=g).to(device)
    teacher = torch.randn(B, T + 1, V, generator=g).to(device)
    tokens = torch.randint(0, V, (B, T), generator=g).to(device)
    adv = torch.tensor([0.7, -1.2], device=device)
    return logits, teacher, tokens, adv


LOSSES = {
    "rlsd_loss": (lambda s, t, y, a: rlsd_kernels.rlsd_loss(s, t, y, a),
                  lambda s, t, y, a: reference.rlsd_loss(s, t, y, a)),
    "opsd_loss": (lambda s, t, y, a: rlsd_kernels.opsd_loss(s, t, y, divergence="reverse_kl"),
                  lambda s, t, y, a: reference.opsd_loss(s, t, y, divergence="reverse_kl")),
    "grpo_opsd_loss": (lambda s, t, y, a: rlsd_kernels.grpo_opsd_loss(s, t, y, a, lam=0.5),
                       lambda s, t, y, a: reference.grpo_opsd_loss(s, t, y, a, lam=0.5)),
}


def _expected_base_grad(name, logits, teacher, tokens, adv):
    base = logits.double().requires_grad_()
    LOSSES[name][1](base[:, :-1], teacher[:, :-1].double(), tokens, adv.double()).mul(2.5).backward()
    return base.grad


@pytest.fixture(autouse=True)
def small_blocks():
    with force_row_config(RowConfig(16, 1)):
        yield


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_temporary_view_gives_the_base_its_gradient(name, device, backend):
    logits, teacher, tokens, adv = _inputs(device)
    base = logits.clone().requires_grad_()
    # Called directly: the view is a temporary argument that no one else holds.
    if name == "rlsd_loss":
        loss = rlsd_kernels.rlsd_loss(base[:, :-1], teacher[:, :-1], tokens, adv)
    elif name == "opsd_loss":
        loss = rlsd_kernels.opsd_loss(base[:, :-1], teacher[:, :-1], tokens, divergence="reverse_kl")
    else:
        loss = rlsd_kernels.grpo_opsd_loss(base[:, :-1], teacher[:, :-1], tokens, adv, lam=0.5)
    # No slice node between the loss and the base: the gradient is written for the base, no copy.
    assert any(getattr(fn, "variable", None) is base for fn, _ in loss.grad_fn.next_functions)
    loss.mul(2.5).backward()
    assert_grad_close(base.grad, _expected_base_grad(name, logits, teacher, tokens, adv), torch.float32)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_autograd_grad_of_a_named_view(name, device, backend):
    logits, teacher, tokens, adv = _inputs(device)
    base = logits.clone().requires_grad_()
    view = base[:, :-1]
    loss = LOSSES[name][0](view, teacher[:, :-1], tokens, adv).mul(2.5)
    (grad,) = torch.autograd.grad(loss, [view])
    assert_grad_close(grad, _expected_base_grad(name, logits, teacher, tokens, adv)[:, :-1], torch.float32)


@pytest.mark.parametrize("observe", ["hook", "retain_grad"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_hooks_and_retain_grad_on_the_view_see_its_gradient(name, observe, device, backend):
    logits, teacher, tokens, adv = _inputs(device)
    expected = _expected_base_grad(name, logits, teacher, tokens, adv)
    base = logits.clone().requires_grad_()
    seen = []
    view = base[:, :-1]
    if observe == "hook":
        view.register_hook(lambda g: seen.append(g.clone()))
    else:
        view.retain_grad()
    LOSSES[name][0](view, teacher[:, :-1], tokens, adv).mul(2.5).backward()
    got = seen[-1] if seen else view.grad
    assert got is not None, f"{observe}: the view's gradient was not seen"
    assert_grad_close(got, expected[:, :-1], torch.float32, what=f"{observe} grad")
    assert_grad_close(base.grad, expected, torch.float32, what=f"{observe} base grad")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_view_made_under_no_grad_gets_the_gradient_not_the_base(name, device, backend):
    logits, teacher, tokens, adv = _inputs(device)
    base = logits.clone()
    with torch.no_grad():
        view = base[:, :-1]
    view.requires_grad_()
    LOSSES[name][0](view, teacher[:, :-1], tokens, adv).mul(2.5).backward()
    assert base.grad is None
    expected = _expected_base_grad(name, logits, teacher, tokens, adv)[:, :-1]
    assert_grad_close(view.grad, expected, torch.float32)


def test_a_detached_base_never_receives_a_gradient(device, backend):
    logits, teacher, tokens, adv = _inputs(device)
    base = logits.clone().requires_grad_()
    detached = base.detach()
    view = detached[:, :-1].requires_grad_()
    rlsd_kernels.rlsd_loss(view, teacher[:, :-1], tokens, adv).backward()
    assert detached.grad is None and base.grad is None and view.grad is not None


def test_the_temporary_view_is_recognised_after_torch_compile(device):
    """torch.compile leaves a frame-evaluation hook that adds a reference to every call's arguments:
    a temporary view is still told apart from a named one."""
    torch._dynamo.reset()
    torch.compile(lambda x: x * 2)(torch.randn(3))
    logits, teacher, tokens, adv = _inputs(device)
    base = logits.clone().requires_grad_()
    loss = rlsd_kernels.rlsd_loss(base[:, :-1], teacher[:, :-1], tokens, adv)
    assert any(getattr(fn, "variable", None) is base for fn, _ in loss.grad_fn.next_functions)
    view = base[:, :-1]
    loss = rlsd_kernels.rlsd_loss(view, teacher[:, :-1], tokens, adv)
    (grad,) = torch.autograd.grad(loss, [view])
    assert grad.shape == view.shape
