"""The PyTorch path forms the teacher's and the student's exponentials, and the backward's
log-probs and probabilities, in the rows of a float32 gradient instead of new tensors
(``launch/torch_rows.py: rlsd_fwd, logprobs_bwd``). Every way those rows can be shared: with the
student's own logits (``inplace_backward``) over one chunk and several, with a teacher given as
logits or as log-probs, for float32 and bfloat16 logits (whose gradient is no scratch), with and
without the entropy term (which keeps the log-probs alive), at two temperatures. Loss and gradient
against the float64 reference; the teacher's logits stay as they were."""

import pytest
import torch
from tolerances import FP32, STORED_LSE_GRAD, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.launch import torch_rows
from rlsd_kernels.launch.common import backend

B, T, V = 3, 5, 11


def _inputs(dtype):
    torch.manual_seed(0)
    student = (torch.randn(B, T + 1, V) * 3).to(dtype)[:, :-1]
    teacher = (torch.randn(B, T + 1, V) * 3)[:, :-1]
    tokens = torch.randint(0, V, (B, T))
    tokens[1, 2] = reference.IGNORE_INDEX
    advantages = torch.tensor([1.0, -0.5, 0.0])
    return student, teacher, tokens, advantages


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("teacher_as", ["logits", "logprobs"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
@pytest.mark.parametrize("chunks", ["one", "several"])
def test_policy_loss_with_gradient_rows_as_scratch(chunks, inplace, teacher_as, dtype, entropy_coef, temperature,
                                                   monkeypatch):
    if chunks == "several":
        monkeypatch.setattr(torch_rows, "CHUNK_ELEMENTS", 2 * V)
    student, teacher, tokens, advantages = _inputs(dtype)
    kwargs = dict(entropy_coef=entropy_coef, temperature=temperature)
    if teacher_as == "logprobs":
        kwargs["teacher_logprobs"] = reference.token_logprobs(teacher, tokens, temperature=temperature)
        teacher = None
    teacher_before = None if teacher is None else teacher.clone()
    ref_student = student.detach().double().requires_grad_()
    ref_loss = reference.rlsd_loss(ref_student, None if teacher is None else teacher.double(), tokens,
                                   advantages.double(), **{k: v.double() if torch.is_tensor(v) else v
                                                           for k, v in kwargs.items()})
    ref_loss.backward()

    leaf = student.detach().requires_grad_()
    with backend("torch"):
        loss = rlsd_kernels.rlsd_loss(leaf, teacher, tokens, advantages, inplace_backward=inplace, **kwargs)
        loss.backward()
    assert_close(loss, ref_loss, what="loss", **FP32)
    assert_grad_close(leaf.grad, ref_student.grad, dtype)
    if teacher is not None:
        assert torch.equal(teacher, teacher_before), "the teacher's logits were written"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunks", ["one", "several"])
def test_logprobs_backward_with_gradient_rows_as_scratch(chunks, dtype, temperature, monkeypatch):
    if chunks == "several":
        monkeypatch.setattr(torch_rows, "CHUNK_ELEMENTS", 2 * V)
    student, _, tokens, _ = _inputs(dtype)
    upstream = torch.randn(B, T)
    ref_student = student.detach().double().requires_grad_()
    (reference.token_logprobs(ref_student, tokens, temperature=temperature) * upstream.double()).sum().backward()
    leaf = student.detach().requires_grad_()
    with backend("torch"):
        (rlsd_kernels.token_logprobs(leaf, tokens, temperature=temperature) * upstream).sum().backward()
    assert_grad_close(leaf.grad, ref_student.grad, dtype)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "sampled_token"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
@pytest.mark.parametrize("chunks", ["one", "several"])
def test_opsd_loss_with_gradient_rows_as_scratch(chunks, inplace, divergence, dtype, temperature, monkeypatch):
    """The OPSD losses' PyTorch path forms the divergence's gradient in the gradient's rows."""
    if chunks == "several":
        monkeypatch.setattr(torch_rows, "CHUNK_ELEMENTS", 2 * V)
    student, teacher, tokens, _ = _inputs(dtype)
    teacher_before = teacher.clone()
    kwargs = dict(divergence=divergence, beta=0.3, temperature=temperature)
    ref_student = student.detach().double().requires_grad_()
    reference.opsd_loss(ref_student, teacher.double(), tokens, **kwargs).backward()
    leaf = student.detach().requires_grad_()
    with backend("torch"):
        loss = rlsd_kernels.opsd_loss(leaf, teacher, tokens, inplace_backward=inplace, **kwargs)
        loss.backward()
    if chunks == "several" and dtype == torch.float32:
        assert_close(leaf.grad, ref_student.grad, what="grad", **STORED_LSE_GRAD)
    else:
        assert_grad_close(leaf.grad, ref_student.grad, dtype)
    assert torch.equal(teacher, teacher_before), "the teacher's logits were written"


@pytest.mark.parametrize("where", ["student", "teacher", "both"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
@pytest.mark.parametrize("chunks", ["one", "several"])
def test_opsd_minus_inf_entries_in_some_rows(chunks, inplace, divergence, where, monkeypatch):
    """-inf logits at a few entries of a few rows (a filtered or padded vocabulary) of ``[:, :-1]``
    views: the products ``0 * inf`` they make are cleared in those rows alone
    (``torch_opsd._weighted``), next to rows that need nothing. Loss and gradient equal the float64
    reference where it is finite; where the -inf makes the divergence infinite (the student samples
    what the teacher rules out, or the reverse for the forward KL), the loss is +inf and the
    gradient holds no NaN."""
    if chunks == "several":
        monkeypatch.setattr(torch_rows, "CHUNK_ELEMENTS", 2 * V)
    student, teacher, tokens, _ = _inputs(torch.float32)
    base_s, base_t = student._base.clone(), (torch.randn(B, T + 1, V) * 3)
    for base in {"student": (base_s,), "teacher": (base_t,), "both": (base_s, base_t)}[where]:
        base[1, 0, [2, 5]] = float("-inf")
        base[2, 3, [0, 9, 10]] = float("-inf")
    student, teacher = base_s[:, :-1], base_t[:, :-1]
    kwargs = dict(divergence=divergence, beta=0.3)
    ref_student = student.detach().double().requires_grad_()
    ref_loss = reference.opsd_loss(ref_student, teacher.double(), tokens, **kwargs)
    leaf = base_s.detach().requires_grad_()
    with backend("torch"):
        loss = rlsd_kernels.opsd_loss(leaf[:, :-1], teacher, tokens, inplace_backward=inplace, **kwargs)
        loss.backward()
    grad = leaf.grad[:, :-1]
    if torch.isfinite(ref_loss):
        ref_loss.backward()
        assert_close(loss, ref_loss, what="loss", **FP32)
        assert_grad_close(grad, ref_student.grad, torch.float32)
    else:
        assert loss == ref_loss == float("inf")
        assert not torch.isnan(grad).any(), "NaN in the gradient"
    assert torch.equal(leaf.grad[:, -1], torch.zeros(B, V))
