"""Compiled kernels on a CUDA device at real sizes (run by ``bench/gpu_check.sh`` on a lent GPU).

The CPU suite runs the same kernels under the interpreter at small sizes; these add what only a
GPU shows: the autotuned launch configurations, vocabularies of 152k, more than 2**31 logits
(int64 addressing) and the compiled code paths.
"""

import pytest
import torch
from tolerances import FP32, REAL_SIZE_FP32, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference

pytestmark = pytest.mark.gpu


def _inputs(n, vocab, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    student = (torch.randn(n, vocab, device="cuda", generator=g) * 2).to(dtype)
    teacher = (torch.randn(n, vocab, device="cuda", generator=g) * 2).to(dtype)
    tokens = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    adv = torch.randn(n, device="cuda", generator=g)
    mask = torch.rand(n, device="cuda", generator=g) > 0.1
    return student, teacher, tokens, adv, mask


def _reference_rows(student, teacher, tokens, adv, mask, old, rows, normalizer):
    """Reference loss contribution and gradient of a few rows, in float64 (token-mean)."""
    s = student[rows].double().requires_grad_()
    loss = reference.rlsd_loss(s, teacher[rows].double(), tokens[rows], adv[rows].double(),
                               old_logprobs=old[rows].double(), mask=mask[rows], loss_agg="sum")
    (loss / normalizer).backward()
    return loss / normalizer, s.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("inplace", [False, True])
def test_qwen_vocabulary(dtype, inplace):
    n, vocab = 2048, 151936
    student, teacher, tokens, adv, mask = _inputs(n, vocab, dtype)
    old = rlsd_kernels.token_logprobs(student, tokens) + 0.05 * torch.randn(n, device="cuda")
    rows = torch.arange(0, n, 97, device="cuda")
    normalizer = float(mask.sum())
    ref_loss, ref_grad = _reference_rows(student, teacher, tokens, adv, mask, old, rows, normalizer)
    x = student.clone().requires_grad_()
    loss = rlsd_kernels.rlsd_loss(x, teacher, tokens, adv, old_logprobs=old, mask=mask,
                                  inplace_backward=inplace, loss_agg="none")
    full = rlsd_kernels.rlsd_loss(student.clone(), teacher, tokens, adv, old_logprobs=old, mask=mask)
    assert_close(loss[rows].sum() / normalizer, ref_loss, what="per-token loss", **FP32)
    assert_close(full, loss.sum() / normalizer, what="token-mean vs none", **FP32)
    (loss.sum() / normalizer).backward()
    assert_grad_close(x.grad[rows], ref_grad, dtype)


def test_scalar_loss_in_place_with_view_and_upstream_scale():
    b, t, vocab = 4, 512, 151936
    logits = (torch.randn(b, t + 1, vocab, device="cuda") * 2).bfloat16()
    teacher = (torch.randn(b, t + 1, vocab, device="cuda") * 2).bfloat16()
    tokens = torch.randint(0, vocab, (b, t), device="cuda")
    adv = torch.randn(b, device="cuda")
    x = logits.clone().requires_grad_()
    loss = rlsd_kernels.rlsd_loss(x[:, :-1], teacher[:, :-1], tokens, adv)
    (3.0 * loss).backward()
    y = logits.clone().double().requires_grad_()
    ref = reference.rlsd_loss(y[:, :-1], teacher[:, :-1].double(), tokens, adv.double())
    (3.0 * ref).backward()
    assert_close(loss, ref, what="loss", **FP32)
    assert_grad_close(x.grad, y.grad, torch.bfloat16)


def test_more_than_2_pow_31_logits():
    n, vocab = 16384, 151936
    assert n * vocab > 2**31
    student, teacher, tokens, adv, mask = _inputs(n, vocab, torch.bfloat16, seed=1)
    old = rlsd_kernels.token_logprobs(student, tokens)
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    normalizer = float(mask.sum())
    ref_loss, ref_grad = _reference_rows(student, teacher, tokens, adv, mask, old, rows, normalizer)
    x = student.requires_grad_()
    loss = rlsd_kernels.rlsd_loss(x, teacher, tokens, adv, old_logprobs=old, mask=mask, loss_agg="none")
    (loss.sum() / normalizer).backward()
    assert_close(loss[rows].sum() / normalizer, ref_loss, what="loss", **FP32)
    assert_grad_close(x.grad[rows], ref_grad, torch.bfloat16)


def test_token_logprobs_with_entropy():
    n, vocab = 4096, 151936
    student, _, tokens, _, _ = _inputs(n, vocab, torch.bfloat16, seed=2)
    x = student.requires_grad_()
    lp, ent = rlsd_kernels.token_logprobs(x, tokens, temperature=0.7, return_entropy=True)
    rows = torch.arange(0, n, 211, device="cuda")
    y = student[rows].detach().double().requires_grad_()
    ref_lp, ref_ent = reference.token_logprobs(y, tokens[rows], temperature=0.7, return_entropy=True)
    (lp.sum() + 0.5 * ent.sum()).backward()
    (ref_lp.sum() + 0.5 * ref_ent.sum()).backward()
    assert_close(lp[rows], ref_lp, what="lp", **FP32)
    assert_close(ent[rows], ref_ent, what="entropy", **REAL_SIZE_FP32)
    assert_grad_close(x.grad[rows], y.grad, torch.bfloat16)


def test_torch_compile_on_gpu():
    student, teacher, tokens, adv, mask = _inputs(1024, 32000, torch.bfloat16, seed=3)

    def step(x):
        return rlsd_kernels.rlsd_loss(x, teacher, tokens, adv, mask=mask) * 2.0

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        x = student.clone().requires_grad_()
        out = fn(x)
        out.backward()
        results.append((out, x.grad))
    assert_close(results[1][0], results[0][0], what="loss", **FP32)
    assert_grad_close(results[1][1], results[0][1], torch.bfloat16)


def test_cuda_graph_capture_and_replay():
    """With ``validate=False`` a forward and backward is captured into a CUDA graph (no timing run,
    no host sync, no pageable copy inside) and, replayed on new inputs copied into the captured
    ones, gives the eager loss and gradient of those inputs."""
    first = _inputs(1024, 32000, torch.bfloat16, seed=5)
    second = _inputs(1024, 32000, torch.bfloat16, seed=6)
    x = first[0].clone().requires_grad_()
    static = [t.clone() for t in first[1:]]

    def step():
        teacher, tokens, adv, mask = static
        loss = rlsd_kernels.rlsd_loss(x, teacher, tokens, adv, mask=mask, validate=False)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up off the capture: compilation and the tuner's choices
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for inputs in (first, second):
        with torch.no_grad():
            x.copy_(inputs[0])
            for dst, src in zip(static, inputs[1:], strict=True):
                dst.copy_(src)
        graph.replay()
        y = inputs[0].clone().requires_grad_()
        eager = rlsd_kernels.rlsd_loss(y, inputs[1], inputs[2], inputs[3], mask=inputs[4], validate=False)
        eager.backward()
        torch.cuda.synchronize()
        assert_close(captured, eager, what="loss", **FP32)
        assert_grad_close(x.grad, y.grad, torch.bfloat16)


def test_torch_compile_reduce_overhead():
    """``torch.compile(mode="reduce-overhead")`` (CUDA graphs) of a step with ``validate=False``
    gives the eager loss and gradient, call after call on new values in the same tensors."""
    student, teacher, tokens, adv, mask = _inputs(1024, 32000, torch.bfloat16, seed=7)

    def step(x, t, a):
        return rlsd_kernels.rlsd_loss(x, t, tokens, a, mask=mask, validate=False)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for i in range(4):
        t, a = teacher + 0.1 * i, adv.roll(i)
        results = []
        for fn in (step, compiled):
            x = student.clone().requires_grad_()
            loss = fn(x, t, a)
            loss.backward()
            results.append((loss.detach().clone(), x.grad))
        assert_close(results[1][0], results[0][0], what="loss", **FP32)
        assert_grad_close(results[1][1], results[0][1], torch.bfloat16)


def test_bad_tokens_raise_on_gpu():
    student, teacher, tokens, adv, _ = _inputs(64, 1000, torch.bfloat16, seed=4)
    tokens[7] = 1000
    with pytest.raises(ValueError, match="tokens"):
        rlsd_kernels.rlsd_loss(student, teacher, tokens, adv)
