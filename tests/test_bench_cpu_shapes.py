"""CPU benchmark cases at the shapes of a small training loop: many short sequences, a small vocabulary.

The PyTorch path once walked one sequence at a time (128 sequences x 33 tokens x V = 32: 100 ms for
``rlsd_loss`` forward + backward against 2.6 ms for the naive loss); these cases time it next to
the naive PyTorch loss at that shape, and ``token_logprobs`` and ``opsd_loss`` alone, and check each
against the float64 reference.
"""

import sys
from pathlib import Path

import pytest
import torch
from tolerances import FP32, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gate as G  # noqa: E402
import providers as P  # noqa: E402

CPU = torch.device("cpu")
SEQS, SEQLEN, VOCAB = 128, 33, 32


@pytest.mark.parametrize("name", ["rlsd_kernels", "rlsd_kernels_rows", "naive_eager"])
def test_benchmark_many_short_sequences_cpu(benchmark, name):
    inp = P.make_logits_inputs(SEQS, SEQLEN, VOCAB, torch.float32, CPU)
    run = next(p for p in P.providers("logits") if p.name == name).make(inp, True)
    benchmark.group = f"RLSD loss from logits, forward + backward, CPU, {SEQS} x {SEQLEN} tokens, V={VOCAB}"
    loss, (grad,) = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    ref_loss, (ref_grad,) = G.reference_result(inp, "rlsd", True)
    assert_close(loss, ref_loss, what="loss", **FP32)
    # The rows provider's gradient is of the [B, T, V] rows it reads, the others' of [B, T + 1, V].
    assert_grad_close(grad, ref_grad if grad.shape == ref_grad.shape else ref_grad[:, :-1], torch.float32)


def test_benchmark_token_logprobs_many_short_sequences_cpu(benchmark):
    logits = torch.randn(SEQS, SEQLEN, VOCAB) * 2
    tokens = torch.randint(0, VOCAB, (SEQS, SEQLEN))
    benchmark.group = f"token_logprobs, CPU, {SEQS} x {SEQLEN} tokens, V={VOCAB}"
    lp = benchmark.pedantic(rlsd_kernels.token_logprobs, (logits, tokens), rounds=5, warmup_rounds=1)
    assert_close(lp, reference.token_logprobs(logits.double(), tokens), what="lp", **FP32)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_benchmark_opsd_many_short_sequences_cpu(benchmark, divergence):
    """``opsd_loss`` forward + backward on ``logits[:, :-1]`` views at the same shape."""
    base = (torch.randn(SEQS, SEQLEN + 1, VOCAB) * 2).requires_grad_()
    teacher = torch.randn(SEQS, SEQLEN + 1, VOCAB) * 2
    tokens = torch.randint(0, VOCAB, (SEQS, SEQLEN))

    def run():
        base.grad = None
        loss = rlsd_kernels.opsd_loss(base[:, :-1], teacher[:, :-1], tokens, divergence=divergence)
        loss.backward()
        return loss, base.grad

    benchmark.group = f"opsd_loss ({divergence}), forward + backward, CPU, {SEQS} x {SEQLEN} tokens, V={VOCAB}"
    loss, grad = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    ref_base = base.detach().double().requires_grad_()
    ref_loss = reference.opsd_loss(ref_base[:, :-1], teacher[:, :-1].double(), tokens, divergence=divergence)
    ref_loss.backward()
    assert_close(loss, ref_loss, what="loss", **FP32)
    assert_grad_close(grad, ref_base.grad, torch.float32)
