"""One consistent public API: every entry point lists exactly the keywords of the option tables, with
their defaults (differences on purpose are declared in ``options.DEFAULT_OVERRIDES``)."""

import inspect

import pytest
import torch

import rlsd_kernels
from rlsd_kernels.call.options import DEFAULT_OVERRIDES, DistillOptions, PolicyOptions

POLICY = PolicyOptions.keywords()
DISTILL = DistillOptions.keywords()
POLICY_TENSORS = {"old_logprobs": None, "credit_mask": None, "rollout_logprobs": None, "ref_logprobs": None,
                  "is_weights": None}
COMMON = {"teacher_logprobs": None, "mask": None, "loss_agg": "token-mean", "normalizer": None, "cu_seqlens": None,
          "return_metrics": False, "validate": True, "process_group": None}
LOGITS = {"inplace_backward": False}
LINEAR = {"teacher_hidden": None, "bias": None, "chunk_size": None}
OPSD = {**{k: v for k, v in DISTILL.items() if k != "alpha"}, "temperature": 1.0}

EXPECTED = {
    "rlsd_loss": {**POLICY, **POLICY_TENSORS, **COMMON, **LOGITS},
    "grpo_opsd_loss": {**POLICY, **DISTILL, **POLICY_TENSORS, **COMMON, **LOGITS},
    "opsd_loss": {**OPSD, **COMMON, **LOGITS},
    "rlsd_linear_loss": {**POLICY, **POLICY_TENSORS, **COMMON, **LINEAR},
    "grpo_opsd_linear_loss": {**POLICY, **DISTILL, **POLICY_TENSORS, **COMMON, **LINEAR},
    "opsd_linear_loss": {**OPSD, **COMMON, **LINEAR},
}
POSITIONAL = {
    "rlsd_loss": ["student_logits", "teacher_logits", "tokens", "advantages"],
    "grpo_opsd_loss": ["student_logits", "teacher_logits", "tokens", "advantages"],
    "opsd_loss": ["student_logits", "teacher_logits", "tokens"],
    "rlsd_linear_loss": ["student_hidden", "weight", "tokens", "advantages"],
    "grpo_opsd_linear_loss": ["student_hidden", "weight", "tokens", "advantages"],
    "opsd_linear_loss": ["student_hidden", "weight", "tokens"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entry_point_lists_exactly_the_option_keywords(name):
    params = inspect.signature(getattr(rlsd_kernels, name)).parameters.values()
    keywords = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    expected = {**EXPECTED[name], **DEFAULT_OVERRIDES.get(name, {})}
    assert positional == POSITIONAL[name]
    assert set(keywords) == set(expected), (set(keywords) ^ set(expected))
    assert keywords == expected


def test_every_policy_keyword_has_a_doc_and_a_check():
    for options in (PolicyOptions, DistillOptions):
        for name, _, meta in options.SPECS:
            if meta.get("doc") is None:
                continue
            assert meta["doc"], name
            assert meta.get("choices") is not None or meta.get("ok") is not None, name


@pytest.mark.parametrize("value", [0.5, 1, __import__("numpy").float32(0.5), torch.tensor(0.5), torch.tensor([0.5])])
def test_real_numbers_of_any_type_are_accepted(value):
    assert PolicyOptions(lam=value).lam == float(value)


@pytest.mark.parametrize("value, error", [("0.5", TypeError), (True, TypeError), (float("nan"), ValueError),
                                          (float("inf"), ValueError), (torch.zeros(2), TypeError)])
def test_non_numbers_and_non_finite_values_are_refused(value, error):
    with pytest.raises(error, match="lam"):
        PolicyOptions(lam=value)


def test_linear_forms_refuse_torch_compile():
    hidden, weight = torch.randn(2, 3, 8), torch.randn(11, 8)
    tokens, adv = torch.randint(0, 11, (2, 3)), torch.randn(2)

    def step(h):
        return rlsd_kernels.rlsd_linear_loss(h, weight, tokens, adv, teacher_logprobs=torch.zeros(2, 3))

    torch._dynamo.reset()
    with pytest.raises(Exception, match="not supported under torch.compile"):
        torch.compile(step, fullgraph=True)(hidden)


def test_process_group_refuses_torch_compile():
    logits = torch.randn(2, 3, 11)
    tokens, adv = torch.randint(0, 11, (2, 3)), torch.randn(2)
    group = object()  # refused before any collective: no group needs to exist

    def step(x):
        return rlsd_kernels.rlsd_loss(x, logits, tokens, adv, process_group=group)

    torch._dynamo.reset()
    with pytest.raises(Exception, match="process_group is not supported under torch.compile"):
        torch.compile(step, fullgraph=True)(logits.clone())
