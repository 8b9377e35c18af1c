"""``opsd_linear_loss`` and ``grpo_opsd_linear_loss`` against the float64 reference applied to the
materialised logits ``hidden @ weight.T + bias`` of both models: loss, metrics and the gradients of
the hidden states, the weight and the bias; equality with ``opsd_loss`` / ``grpo_opsd_loss`` on
materialised logits; bad input."""

from __future__ import annotations

import pytest
import torch
from harness import assert_sum_close, compare
from test_linear import _gpu_inputs, logits64, make_linear_case
from tolerances import FP32, GRAD, MATMUL_FP32, PAIR_GRAD, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.forms.linear import default_chunk_size
from rlsd_kernels.launch.tuning import RowConfig, force_row_config

BLOCK = 16  # forced under test so that small vocabularies hit the block edges
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("sampled_token", 0.5)]
DIV_IDS = [f"{d}-{b}" if d == "jsd" else d for d, b in DIVERGENCES]
# The keywords of opsd_linear_loss; a case's policy options go to the GRPO+OPSD loss only.
OPSD_KEYS = ("mask", "divergence", "beta", "temperature", "token_clip", "loss_agg", "normalizer", "cu_seqlens",
             "teacher_logprobs", "return_metrics", "validate", "chunk_size")


def _double(kwargs):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}


def _kwargs(case, grpo, extra):
    kwargs = {**case.kwargs, **extra}
    return kwargs if grpo else {k: v for k, v in kwargs.items() if k in OPSD_KEYS}


def call(case, grpo, hidden=None, weight=None, bias=None, **extra):
    """The op on the case's inputs; ``hidden``, ``weight``, ``bias`` replace the case's (e.g. by leaves)."""
    hidden = case.hidden if hidden is None else hidden
    weight = case.weight if weight is None else weight
    kwargs = dict(_kwargs(case, grpo, extra), bias=case.bias if bias is None else bias)
    with force_row_config(RowConfig(BLOCK, 1)):
        if grpo:
            return rlsd_kernels.grpo_opsd_linear_loss(hidden, weight, case.tokens, case.advantages,
                                                      teacher_hidden=case.teacher, **kwargs)
        return rlsd_kernels.opsd_linear_loss(hidden, weight, case.tokens, teacher_hidden=case.teacher, **kwargs)


def reference_loss(case, grpo, h, w, b, **extra):
    """``reference.opsd_loss`` / ``grpo_opsd_loss`` in float64 of ``h @ w.T + b`` (teacher detached)."""
    kwargs = {k: v for k, v in _double(_kwargs(case, grpo, extra)).items() if k not in ("chunk_size", "validate")}
    teacher = None if case.teacher is None else logits64(case.teacher.double(), w, b).detach()
    if grpo:
        return reference.grpo_opsd_loss(logits64(h, w, b), teacher, case.tokens, case.advantages.double(), **kwargs)
    return reference.opsd_loss(logits64(h, w, b), teacher, case.tokens, **kwargs)


def check(case, dtype, *, grpo=False, loss_agg="token-mean", **extra):
    """Loss, metrics and every gradient against the float64 reference, with a random upstream."""
    h64, w64, b64 = case.leaves64()
    leaves = dict(zip(("hidden", "weight", "bias"), (None if x is None else x.detach().requires_grad_()
                                                      for x in (case.hidden, case.weight, case.bias)), strict=True))

    def terms():
        with torch.no_grad():
            return reference_loss(case, grpo, *case.leaves64(), loss_agg="none", **extra)

    options = {**case.kwargs, **extra}
    return compare(lambda: call(case, grpo, *leaves.values(), loss_agg=loss_agg, return_metrics=True, **extra),
                   lambda: reference_loss(case, grpo, h64, w64, b64, loss_agg=loss_agg, return_metrics=True, **extra),
                   leaves, dict(hidden=h64, weight=w64, bias=b64), dtype, terms=terms, loss_agg=loss_agg,
                   aggregation=dict(normalizer=options.get("normalizer"), cu_seqlens=options.get("cu_seqlens")))


def _id(axis):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in axis.items()) or "base"


@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
def test_each_divergence(divergence, beta, device, backend):
    """Each divergence alone, then with the policy term and per-token losses (whose backward
    recomputes the chunks' logits: both models' for the full-vocabulary divergences), then with a
    cap between the two middle divergences (about half the tokens clipped)."""
    case = make_linear_case(device, mask="seq", chunk_size=3, temperature=0.7)
    check(case, torch.float32, divergence=divergence, beta=beta)
    check(case, torch.float32, grpo=True, divergence=divergence, beta=beta, alpha=0.7, loss_agg="none")
    h64, w64, b64 = case.leaves64()
    z, zt = logits64(h64, w64, b64).detach(), logits64(case.teacher.double(), w64, b64).detach()
    on = case.kwargs["mask"]
    if divergence == "sampled_token":
        tokens = case.tokens.clamp(max=z.shape[-1] - 1)
        d = reference.token_logprobs(z, tokens, temperature=0.7) - reference.token_logprobs(zt, tokens,
                                                                                          temperature=0.7)
    else:
        d = reference.opsd_token_divergence(z, zt, divergence=divergence, beta=beta, temperature=0.7)
    ordered = d[on].sort().values
    clip = float(ordered[len(ordered) // 2 - 1: len(ordered) // 2 + 1].mean())
    _, metrics = check(case, torch.float32, divergence=divergence, beta=beta, token_clip=clip, loss_agg="none")
    expected = float((d[on] > clip).double().mean())
    assert 0 < expected < 1 and abs(float(metrics["token_clip_frac"]) - expected) < 1e-6


# N = 10 tokens (2 x 5): chunks of 5 and 2 divide N, 3, 4 and 7 do not; the views chunk per sequence.
# Each axis meets two divergences, each divergence four axes.
AXES = [
    dict(),
    dict(dtype=torch.float16, chunk_size=4),
    dict(dtype=torch.bfloat16, chunk_size=3),
    dict(layout="view", chunk_size=2),
    dict(layout="packed", chunk_size=5),
    dict(layout="packed", chunk_size=7, mask="float"),
    dict(chunk_size=None, vocab=BLOCK + 1, bias=False),
    dict(vocab=3 * BLOCK + 5, hidden_size=16, mask="none", chunk_size=1),
    dict(mask="seq", temperature=0.7),
    dict(dtype=torch.bfloat16, layout="view", mask="seq", temperature=0.7, vocab=2 * BLOCK + 3, chunk_size=3),
]


@pytest.mark.parametrize("axis", AXES, ids=[_id(a) for a in AXES])
def test_opsd_matches_reference(axis, device, backend):
    i = AXES.index(axis)
    axis = {"chunk_size": 8, **axis}
    case = make_linear_case(device, **axis)
    for divergence, beta in (DIVERGENCES[i % 5], DIVERGENCES[(2 * i + 1) % 5]):
        check(case, axis.get("dtype", torch.float32), divergence=divergence, beta=beta)


GRPO_AXES = [
    dict(lam=0.5, chunk_size=3, divergence="jsd"),
    dict(dtype=torch.bfloat16, layout="view", mask="seq", chunk_size=4, temperature=0.7, divergence="reverse_kl"),
    dict(layout="packed", mask="float", chunk_size=5, ratio=None, dual_clip=None, divergence="sampled_token"),
]


@pytest.mark.parametrize("axis", GRPO_AXES, ids=[_id(a) for a in GRPO_AXES])
def test_grpo_opsd_matches_reference(axis, device, backend):
    axis = dict(axis)
    divergence = axis.pop("divergence")
    check(make_linear_case(device, **axis), axis.get("dtype", torch.float32), grpo=True, divergence=divergence,
          alpha=0.7)


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
def test_aggregations(loss_agg, device, backend):
    """Each mode on packed tokens with sequence boundaries, chunks of 4 across them, alone or with
    the policy term; the divergences take turns."""
    case = make_linear_case(device, layout="packed", mask="seq", chunk_size=4)
    extra = {"cu_seqlens": torch.tensor([0, 5, 7, 10], device=device)}
    i = reference.LOSS_AGG_MODES.index(loss_agg)
    divergence, beta = DIVERGENCES[i % len(DIVERGENCES)]
    check(case, torch.float32, grpo=i % 2 == 1, loss_agg=loss_agg, divergence=divergence, beta=beta, **extra)


# Options that change the passes over the chunks: a sequence-level ratio or an on-policy
# sequence-level importance weight (every log-prob first), and the entropy term (its own gradient).
OPTIONS = [
    dict(ratio_level="sequence", divergence="jsd", loss_agg="none"),
    dict(rollout=True, tis_level="sequence", ratio=None, divergence="sampled_token"),
    dict(entropy_coef=0.05, divergence="reverse_kl", loss_agg="none"),
    dict(surrogate="cispo", ratio_level="sequence", rollout=True, tis_level="sequence", ref=True, kl_coef=0.05,
         entropy_coef=0.02, credit_mask=True, credit_base="old", dtype=torch.bfloat16, divergence="forward_kl"),
]


@pytest.mark.parametrize("option", OPTIONS, ids=[_id(o) for o in OPTIONS])
def test_grpo_policy_options(option, device, backend):
    """Chunks of 3 rows cut across the sequences of 5 tokens."""
    option = dict(option)
    loss_options = {k: option.pop(k) for k in ("divergence", "loss_agg") if k in option}
    case = make_linear_case(device, chunk_size=3, mask="seq", **option)
    _, metrics = check(case, option.get("dtype", torch.float32), grpo=True, alpha=1.3, **loss_options)
    assert ("kl_mean" in metrics) == ("ref_logprobs" in case.kwargs)
    assert ("is_weight_mean" in metrics) == ("rollout_logprobs" in case.kwargs)


@pytest.mark.parametrize("grpo", [False, True])
def test_sampled_token_with_teacher_logprobs(grpo, device, backend):
    case = make_linear_case(device, teacher="logprobs", dtype=torch.bfloat16, mask="seq", chunk_size=4)
    for loss_agg in ("token-mean", "none"):
        check(case, torch.bfloat16, grpo=grpo, divergence="sampled_token", loss_agg=loss_agg)


@pytest.mark.parametrize("student_view", [True, False])
def test_student_and_teacher_layouts_differ(student_view, device, backend):
    """One of the two hidden states views as [N, H], the other (a ``x[:, :-1]`` slice) does not: the
    teacher's rows of each student chunk, within a sequence or across two."""
    case = make_linear_case(device, layout="view" if student_view else "contiguous", ratio=None, chunk_size=3)
    if not student_view:
        b, t, size = case.teacher.shape
        base = torch.full((b, t + 1, size), float("nan"), dtype=case.teacher.dtype, device=device)
        base[:, :-1] = case.teacher
        case.teacher = base[:, :-1]
    assert case.teacher.is_contiguous() == student_view and case.hidden.is_contiguous() != student_view
    check(case, torch.float32, divergence="jsd")
    check(case, torch.float32, grpo=True, divergence="forward_kl", loss_agg="none")




@pytest.mark.parametrize("grpo", [False, True])
def test_equals_opsd_loss_on_materialised_logits(grpo, device, backend):
    """The fused linear loss is ``opsd_loss`` / ``grpo_opsd_loss`` on ``hidden @ weight.T + bias``,
    per token and in sum, with the same metrics and gradients."""
    case = make_linear_case(device, layout="packed", chunk_size=6)
    hidden, weight, bias = (x.detach().requires_grad_() for x in (case.hidden, case.weight, case.bias))
    kwargs = {k: v for k, v in _kwargs(case, grpo, dict(divergence="jsd", beta=0.3)).items() if k != "chunk_size"}
    upstream = torch.randn(case.tokens.shape, device=device)
    for loss_agg in ("token-mean", "none"):
        teacher_logits = case.teacher @ weight.detach().T + bias.detach()
        with force_row_config(RowConfig(BLOCK, 1)):
            if grpo:
                expected, expected_metrics = rlsd_kernels.grpo_opsd_loss(
                    hidden @ weight.T + bias, teacher_logits, case.tokens, case.advantages, loss_agg=loss_agg,
                    return_metrics=True, **kwargs)
            else:
                expected, expected_metrics = rlsd_kernels.opsd_loss(
                    hidden @ weight.T + bias, teacher_logits, case.tokens, loss_agg=loss_agg, return_metrics=True,
                    **kwargs)
        expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight, bias))
        loss, metrics = call(case, grpo, hidden, weight, bias, loss_agg=loss_agg, return_metrics=True, divergence="jsd",
                             beta=0.3)
        grads = torch.autograd.grad((loss * upstream).sum(), (hidden, weight, bias))
        if loss.dim():
            assert_close(loss, expected, what="per-token loss", **FP32)
        else:
            terms = call(case, grpo, loss_agg="none", divergence="jsd", beta=0.3).detach()
            assert_sum_close(loss, expected, terms, loss_agg)
        assert set(metrics) == set(expected_metrics)
        for key, value in expected_metrics.items():
            assert_close(metrics[key], value, what=f"metrics[{key}]", **FP32)
        for name, g, e in zip(("dhidden", "dweight", "dbias"), grads, expected_grads, strict=True):
            assert_close(g, e, what=f"{loss_agg} {name}", **PAIR_GRAD)


@pytest.mark.parametrize("grpo", [False, True])
def test_tied_weights(grpo, device, backend):
    """The weight is also the input embedding: autograd adds both gradients into ``weight.grad``."""
    case = make_linear_case(device, layout="packed", bias=False, chunk_size=4)
    ids = torch.randint(0, case.weight.shape[0], case.tokens.shape, device=device)

    def run(weight, loss_fn):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, weight) + case.hidden)
        return loss_fn(hidden, weight)

    w64 = case.weight.detach().double().requires_grad_()
    ref = run(w64, lambda h, w: reference_loss(case, grpo, h, w, None, divergence="reverse_kl"))
    ref.backward()
    weight = case.weight.detach().requires_grad_()
    loss = run(weight, lambda h, w: call(case, grpo, h, w, divergence="reverse_kl"))
    loss.backward()
    assert_close(loss, ref, what="loss", **FP32)
    assert_grad_close(weight.grad, w64.grad, torch.float32, what="dweight (head and embedding)")


@pytest.mark.parametrize("grpo", [False, True])
def test_fully_masked_and_empty_batches(grpo, device, backend):
    case = make_linear_case(device, mask="none")
    case.kwargs["mask"] = torch.zeros_like(case.tokens, dtype=torch.bool)
    hidden, weight, bias = (x.detach().requires_grad_() for x in (case.hidden, case.weight, case.bias))
    loss, metrics = call(case, grpo, hidden, weight, bias, return_metrics=True)
    loss.backward()
    assert float(loss.detach()) == 0.0
    for x in (hidden, weight, bias):
        assert torch.equal(x.grad, torch.zeros_like(x.grad))
    assert float(metrics["num_tokens"]) == 0 and all(torch.isfinite(v) for v in metrics.values())

    hidden = torch.randn(0, 8, device=device, requires_grad=True)
    weight = torch.randn(11, 8, device=device, requires_grad=True)
    tokens = torch.zeros(0, dtype=torch.long, device=device)
    if grpo:
        loss = rlsd_kernels.grpo_opsd_linear_loss(hidden, weight, tokens, torch.zeros(0, device=device),
                                                  teacher_hidden=hidden.detach(), loss_agg="none")
        assert loss.shape == (0,)
        loss = loss.sum()
    else:
        loss = rlsd_kernels.opsd_linear_loss(hidden, weight, teacher_hidden=hidden.detach())
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_no_grad_frozen_weight_and_backward_twice(device, backend):
    """Only the gradients asked for are computed; the loss is the same whatever is asked for."""
    case = make_linear_case(device, ratio=None)
    with torch.no_grad():
        a = call(case, False)
    hidden = case.hidden.detach().requires_grad_()
    b = call(case, False, hidden)
    b.backward(retain_graph=True)
    assert not a.requires_grad and b.requires_grad
    assert case.weight.grad is None and case.bias.grad is None
    assert_close(a, b, what="loss", **FP32)
    h64, w64, b64 = case.leaves64()
    reference_loss(case, False, h64, w64.detach(), b64.detach()).backward()
    assert_grad_close(hidden.grad, h64.grad, torch.float32, what="dhidden")
    with pytest.raises(RuntimeError, match="twice"):
        b.backward()


def test_default_chunk_size():
    """256 rows at the Qwen vocabulary in bf16 on a GPU (240 MiB of chunk buffers), never below 64."""
    cuda = torch.device("cuda")
    assert default_chunk_size(151936, cuda, torch.bfloat16, paired=True) == 256
    assert default_chunk_size(151936, cuda, torch.float32, paired=True) == 192
    assert default_chunk_size(32000, cuda, torch.bfloat16, paired=True) == 1280
    assert default_chunk_size(10**9, cuda, torch.bfloat16, paired=True) == 64
    assert 6 * 151936 * 256 <= (240 << 20) < 6 * 151936 * 320


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda c: dict(hidden=c.hidden[..., :-1]), ValueError, "hidden size mismatch: student_hidden"),
        (lambda c: dict(weight=c.weight[:, :-1]), ValueError, "hidden size mismatch"),
        (lambda c: dict(hidden=c.hidden.double()), TypeError, "student_hidden"),
        (lambda c: dict(weight=c.weight.half()), TypeError, "weight"),
        (lambda c: dict(teacher_hidden=c.teacher[:, :-1]), ValueError, "teacher_hidden"),
        (lambda c: dict(teacher_hidden=c.teacher[..., :-1]), ValueError, "teacher_hidden"),
        (lambda c: dict(teacher_hidden=None), ValueError, "teacher_hidden"),
        (lambda c: dict(teacher_logprobs=torch.zeros(c.tokens.shape)), ValueError, "teacher_logprobs"),
        (lambda c: dict(teacher_hidden=None, teacher_logprobs=torch.zeros(c.tokens.shape), divergence="sampled_token",
                        tokens=None), ValueError, "tokens"),
        (lambda c: dict(bias=c.bias[:-1]), ValueError, "bias"),
        (lambda c: dict(chunk_size=0), ValueError, "chunk_size"),
        (lambda c: dict(tokens=c.tokens[:, :-1]), ValueError, "tokens"),
        (lambda c: dict(divergence="kl"), ValueError, "divergence"),
        (lambda c: dict(beta=1.5), ValueError, "beta"),
        (lambda c: dict(loss_agg="mean"), ValueError, "loss_agg"),
        (lambda c: dict(temperature=0.0), ValueError, "temperature"),
    ],
)
def test_argument_errors_name_the_argument(change, error, name, device):
    case = make_linear_case(device, mask="none", ratio=None)
    args = dict(hidden=case.hidden, weight=case.weight, teacher_hidden=case.teacher, tokens=case.tokens)
    kwargs = {"bias": case.bias, **case.kwargs}
    for key, value in change(case).items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(error, match=name):
        rlsd_kernels.opsd_linear_loss(args["hidden"], args["weight"], args["tokens"],
                                      teacher_hidden=args["teacher_hidden"], **kwargs)
    if "teacher_logprobs" not in kwargs and args["tokens"] is not None:
        with pytest.raises(error, match=name):
            rlsd_kernels.grpo_opsd_linear_loss(args["hidden"], args["weight"], args["tokens"], case.advantages,
                                               teacher_hidden=args["teacher_hidden"], **kwargs)


@pytest.mark.parametrize("which", ["student_hidden", "teacher_hidden"])
def test_non_finite_hidden_states_are_reported(which, device, backend):
    case = make_linear_case(device, mask="none", ratio=None)
    x = case.hidden.clone() if which == "student_hidden" else case.teacher.clone()
    x[1, 1, 5] = float("nan")
    replace = {"hidden": x} if which == "student_hidden" else {}
    if which == "teacher_hidden":
        case.teacher = x
    with pytest.raises(ValueError, match=f"logits of {which} @ weight.T: 1 unmasked rows hold NaN"):
        call(case, False, **replace)
    mask = torch.ones_like(case.tokens, dtype=torch.bool)
    mask[1, 1] = False
    # A masked row does not count, and gives no NaN to any gradient.
    hidden, weight, bias = (y.detach().requires_grad_() for y in (replace.get("hidden", case.hidden), case.weight,
                                                                     case.bias))
    loss = call(case, True, hidden, weight, bias, mask=mask)
    loss.backward()
    assert torch.isfinite(loss)
    for g in (hidden.grad, weight.grad, bias.grad):
        assert torch.isfinite(g).all()
    assert (hidden.grad[1, 1] == 0).all()




def _gpu_reference(hidden, teacher, weight, tokens, adv, mask, vocab_rows, grpo, kwargs, chunk=256):
    """Float64 per-token losses, and dH and the dW rows ``vocab_rows`` of their token-mean, chunk by
    chunk (the token-mean is a sum over tokens)."""
    w64 = weight.double()
    normalizer = mask.sum().double()
    op = reference.grpo_opsd_loss if grpo else reference.opsd_loss
    per_token = torch.empty(hidden.shape[0], dtype=torch.float64, device="cuda")
    d_hidden, d_weight = torch.empty_like(hidden, dtype=torch.float64), 0.0
    for s in range(0, hidden.shape[0], chunk):
        sl = slice(s, s + chunk)
        z = (hidden[sl].double() @ w64.T).requires_grad_()
        args = (tokens[sl], adv[sl].double()) if grpo else (tokens[sl],)
        part = op(z, teacher[sl].double() @ w64.T, *args, mask=mask[sl], loss_agg="none", **kwargs)
        (part.sum() / normalizer).backward()
        per_token[sl] = part.detach()
        d_hidden[sl] = z.grad @ w64
        d_weight = d_weight + z.grad[:, vocab_rows].T @ hidden[sl].double()
    return per_token, d_hidden, d_weight


@pytest.mark.gpu
@pytest.mark.parametrize("grpo, divergence", [(False, "jsd"), (True, "sampled_token")])
def test_qwen_size_against_reference(grpo, divergence, monkeypatch):
    """N = 2048, H = 4096, V = 151,936 in bf16 (8 chunks of the default 256 rows): the token-mean loss
    and sampled rows of dH and dW, and the per-token losses (whose backward recomputes the chunks:
    both models' logits for the JSD, the student's for the sampled token) against float64."""
    # One launch configuration per kernel: test_opsd times and checks the tuner's candidates, and
    # this file's float32-logits variants would otherwise compile every candidate.
    monkeypatch.setenv("RLSD_KERNELS_AUTOTUNE", "0")
    n, hidden_size, vocab = 2048, 4096, 151936
    hidden, teacher, weight, tokens, adv, mask = _gpu_inputs(n, hidden_size, vocab, seed=3)
    kwargs = dict(divergence=divergence, temperature=0.9, **(dict(alpha=0.5, lam=0.5) if grpo else {}))
    vocab_rows = torch.cat([tokens[:64], torch.arange(0, vocab, 4099, device="cuda")])
    ref_per_token, ref_dh, ref_dw = _gpu_reference(hidden, teacher, weight, tokens, adv, mask, vocab_rows, grpo,
                                                   kwargs)
    op = rlsd_kernels.grpo_opsd_linear_loss if grpo else rlsd_kernels.opsd_linear_loss
    args = (tokens, adv) if grpo else (tokens,)
    kwargs = dict(kwargs, mask=mask, teacher_hidden=teacher)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = op(h, w, *args, **kwargs)
    (2.5 * loss).backward()
    # Terms of both signs may cancel: the error of their mean is bounded by that of each term
    # (MATMUL_FP32's rtol) times the mean of their sizes.
    count = mask.sum().double()
    ref_loss, size = ref_per_token.sum() / count, ref_per_token.abs().sum() / count
    assert abs(float(loss.detach()) - float(ref_loss)) <= MATMUL_FP32["rtol"] * float(size), (loss, ref_loss)
    rows = torch.arange(0, n, 37, device="cuda")
    assert_grad_close(h.grad[rows], 2.5 * ref_dh[rows], torch.bfloat16, what="dhidden")
    assert_grad_close(w.grad[vocab_rows], 2.5 * ref_dw, torch.bfloat16, what="dweight")
    # dW accumulates in bf16 across 8 chunks: its overall error stays near bf16 rounding.
    err = (w.grad[vocab_rows].double() - 2.5 * ref_dw).norm() / ref_dw.norm() / 2.5
    assert err < GRAD[torch.bfloat16]["rtol"], f"relative error of dW {float(err):.2e}"

    x = hidden.clone().requires_grad_()
    per_token = op(x, weight, *args, loss_agg="none", chunk_size=200, **kwargs)
    (per_token.sum() / count.float()).backward()
    assert_close(per_token[rows], ref_per_token[rows], what="per-token loss", **MATMUL_FP32)
    assert_grad_close(x.grad[rows], ref_dh[rows], torch.bfloat16, what="dhidden (none)")


@pytest.mark.gpu
def test_peak_memory(monkeypatch):
    """Extra memory of forward + backward at N = 2048: the returned dW and dH, the chunk buffers
    (6 * V bytes a row), nothing of [N, V]."""
    monkeypatch.setenv("RLSD_KERNELS_AUTOTUNE", "0")
    n, hidden_size, vocab = 2048, 4096, 151936
    hidden, teacher, weight, tokens, adv, mask = _gpu_inputs(n, hidden_size, vocab, seed=4)
    hidden.requires_grad_()
    weight.requires_grad_()

    def step():
        loss = rlsd_kernels.grpo_opsd_linear_loss(hidden, weight, tokens, adv, teacher_hidden=teacher, mask=mask)
        return torch.autograd.grad(loss, (hidden, weight))

    step()  # compiles the row kernels and creates the matmul workspaces
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert all(torch.isfinite(g).all() for g in grads)
    chunk = default_chunk_size(vocab, hidden.device, weight.dtype)
    returned = 2 * vocab * hidden_size + 2 * n * hidden_size
    assert extra <= returned + 6 * chunk * vocab + (32 << 20), f"peak extra {extra / 1e9:.3f} GB"
