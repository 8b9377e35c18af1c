"""Logits whose vocabulary stride is not 1 (a permuted or transposed tensor), as the student or the
teacher of every loss from logits, on both backends: the call warns that it copies them and gives
the loss and the gradient of the same call on contiguous logits. (A teacher once reached the
kernels as the original tensor with the strides of its copy: a silently wrong loss.)"""

import pytest
import torch

import rlsd_kernels

B, T, V = 3, 5, 37


def _strided(x, layout):
    """``x`` ``[B, T, V]`` in a layout whose vocabulary stride is not 1 (same values)."""
    if layout == "vocab_first":  # strides (1, B, B * T)
        y = x.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    else:  # "vocab_middle": strides (V * T, 1, T)
        y = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert y.stride(-1) != 1 and torch.equal(y, x)
    return y


def _loss(name, student, teacher, tokens, adv):
    if name == "rlsd_loss":
        return rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, lam=1.0, eps_w=0.5)
    if name == "opsd_loss":
        return rlsd_kernels.opsd_loss(student, teacher, tokens, divergence="jsd")
    if name == "grpo_opsd_loss":
        return rlsd_kernels.grpo_opsd_loss(student, teacher, tokens, adv, divergence="reverse_kl")
    lp = rlsd_kernels.token_logprobs(student, tokens)
    return (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum()


CASES = [(name, which) for name in ("rlsd_loss", "opsd_loss", "grpo_opsd_loss") for which in ("student", "teacher")]


@pytest.mark.parametrize("layout", ["vocab_first", "vocab_middle"])
@pytest.mark.parametrize(("name", "which"), CASES + [("token_logprobs", "student")])
def test_non_unit_vocabulary_stride_matches_contiguous(backend, device, name, which, layout):
    student = torch.randn(B, T, V, device=device) * 2
    teacher = torch.randn(B, T, V, device=device) * 2
    tokens = torch.randint(0, V, (B, T), device=device)
    adv = torch.randn(B, device=device)

    s_plain = student.clone().requires_grad_()
    expected = _loss(name, s_plain, teacher, tokens, adv)
    expected.backward()

    s_in = _strided(student, layout) if which == "student" else student.clone()
    s_in.requires_grad_()
    t_in = _strided(teacher, layout) if which == "teacher" else teacher
    with pytest.warns(UserWarning, match="vocabulary stride"):
        loss = _loss(name, s_in, t_in, tokens, adv)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_in.grad, s_plain.grad, rtol=1e-5, atol=1e-6)
