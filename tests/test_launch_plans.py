"""The fused forward's launch plans (``launch.rlsd._PLANS``): a repeated call takes the arguments it
derived once (strides, scalars, flags, the tuned configuration and strategy) from a plan. Every
variant below is run again with the plans that all the variants built, and must equal the same call
made with no plans at all; each must be served by the plan it built itself (a key that missed
something that decides the launch would serve it another variant's)."""

import contextlib

import pytest
import torch

import rlsd_kernels
from rlsd_kernels.launch import common, rlsd, tuning

B, T, V = 2, 5, 40


class _NoPlans(dict):
    """Finds and keeps nothing."""

    def get(self, key, default=None):
        return default

    def __setitem__(self, key, value):
        pass


def _data(seed, device, dtype=torch.float32, packed=False):
    g = torch.Generator().manual_seed(seed)
    shape = (B * T,) if packed else (B, T)
    student = torch.randn((*shape, V), generator=g).to(device, dtype)
    teacher = torch.randn((*shape, V), generator=g).to(device, dtype)
    tokens = torch.randint(0, V, shape, generator=g).to(device)
    tokens.view(-1)[3] = -100
    adv = torch.randn((B * T,) if packed else (B,), generator=g).to(device)
    old = -torch.rand(shape, generator=g).to(device)
    return student, teacher, tokens, adv, old


def _views(student, teacher):
    """``[B, T, V]`` views of ``[B, T + 1, V]`` tensors: other strides than the contiguous case."""
    wide_s = torch.cat([student, student[:, :1]], dim=1)
    wide_t = torch.cat([teacher, teacher[:, :1]], dim=1)
    return wide_s[:, :-1], wide_t[:, :-1]


def _call(variant, seed, device):
    """``(loss, gradient, metrics)`` of one call of ``variant``."""
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    student, teacher, tokens, adv, old = _data(seed, device, dtype, packed=variant == "packed")
    if variant in ("view", "student_view"):
        student, view_t = _views(student, teacher)
        teacher = view_t if variant == "view" else teacher
    kwargs = {}
    if variant == "teacher_logprobs":
        teacher, kwargs["teacher_logprobs"] = None, torch.log_softmax(teacher.float(), -1).gather(
            -1, tokens.clamp_min(0)[..., None])[..., 0]
    if variant == "grpo":
        teacher, kwargs["lam"] = None, 0.0
    if variant in ("old", "view"):
        kwargs["old_logprobs"] = old
    if variant == "options":
        kwargs.update(lam=0.5, eps_w=0.1, temperature=0.7, dual_clip=None, surrogate="cispo")
    if variant == "entropy":
        kwargs.update(entropy_coef=0.01)
    if variant == "none":
        kwargs["loss_agg"] = "none"
    student = student.detach().requires_grad_(variant != "no_grad")
    if variant == "inplace":
        kwargs["inplace_backward"] = True
    forced = tuning.force_row_config(tuning.RowConfig(16, 1)) if variant == "forced" else contextlib.nullcontext()
    with forced:
        loss, metrics = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, return_metrics=True, **kwargs)
        if student.requires_grad:
            (loss.sum() if loss.dim() else loss).backward()
    grad = None if student.grad is None else student.grad.clone()
    return loss.detach(), grad, {k: v for k, v in metrics.items()}


VARIANTS = ["plain", "bf16", "packed", "view", "student_view", "teacher_logprobs", "grpo", "old", "options",
            "entropy", "none", "no_grad", "inplace", "forced"]

# Variants whose launch is the same as another's: no gradient in the forward, the same options.
SAME_LAUNCH = {"no_grad": "none"}


def _equal(a, b):
    if a is None or b is None:
        return a is b
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a.float().nan_to_num(7.0), b.float().nan_to_num(7.0))
    return a == b


def test_planned_calls_equal_unplanned_ones(device, monkeypatch):
    runs = []
    real_run = rlsd._run_plan

    def counted(plan, *args):
        runs.append(plan)
        return real_run(plan, *args)

    monkeypatch.setattr(rlsd, "_run_plan", counted)
    monkeypatch.setattr(rlsd, "_PLANS", {})
    with common.backend("triton"):
        built = {}
        for variant in VARIANTS:
            before = set(rlsd._PLANS)
            _call(variant, 0, device)  # builds its plan
            new = [rlsd._PLANS[k] for k in rlsd._PLANS if k not in before]
            assert new or variant in SAME_LAUNCH, f"{variant}: built no plan (another variant's key matched)"
            built[variant] = new[0] if new else built[SAME_LAUNCH[variant]]
        for variant in VARIANTS:
            served = len(runs)
            planned = _call(variant, 1, device)
            assert len(runs) == served + 1, f"{variant}: not served by a plan"
            assert runs[-1] is built[variant], f"{variant}: served another variant's plan"
            with monkeypatch.context() as m:
                m.setattr(rlsd, "_PLANS", _NoPlans())
                fresh = _call(variant, 1, device)
            for name, a, b in zip(("loss", "grad", "metrics"), planned, fresh, strict=True):
                if name == "metrics":
                    assert a.keys() == b.keys()
                    for k in a:
                        assert _equal(a[k], b[k]), f"{variant}: metric {k} differs with a plan"
                else:
                    assert _equal(a, b), f"{variant}: {name} differs with a plan"
    assert len({id(p) for p in built.values()}) == len(VARIANTS) - len(SAME_LAUNCH)


def test_plans_are_not_kept_while_a_cuda_graph_is_captured(monkeypatch, device):
    monkeypatch.setattr(rlsd, "_PLANS", {})
    monkeypatch.setattr(tuning, "capturing", lambda device: True)
    with common.backend("triton"):
        _call("plain", 0, device)
    assert rlsd._PLANS == {}


@pytest.mark.parametrize("choice", ["split", "fused"])
def test_only_the_fused_strategy_is_planned(monkeypatch, device, choice):
    monkeypatch.setattr(rlsd, "_PLANS", {})
    with common.backend("triton"), tuning.force_choice(choice):
        _call("plain", 0, device)
    assert len(rlsd._PLANS) == (choice == "fused")
