"""Numerics at the edges, on both backends: -inf log-probs at A = 0, NaN inputs under a GPU's min/max
semantics, the upstream gradient scaled in float32, log-probs at large logits.

A GPU's ``min.f32`` / ``max.f32`` (what ``tl.minimum`` / ``tl.maximum`` compile to) return the
non-NaN operand; the interpreter's numpy ones propagate NaN. The ``gpu_min_max`` fixture gives the
interpreter the GPU's semantics, so that a NaN lost in a clamp shows on CPU.
"""

import itertools
import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from tolerances import FP32, GRAD, assert_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.launch.tuning import RowConfig, force_choice, force_row_config

BLOCK = 16
B, T, V = 2, 3, BLOCK + 3
INF = float("inf")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "sampled_token")


@pytest.fixture
def gpu_min_max(monkeypatch):
    """``tl.minimum`` / ``tl.maximum`` without ``propagate_nan`` as a GPU computes them: the non-NaN
    operand (IEEE minNum / maxNum, numpy's ``fmin`` / ``fmax``)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    monkeypatch.setattr(builder, "create_minnumf", lambda self, a, b: self.binary_op(a, b, np.fmin))
    monkeypatch.setattr(builder, "create_maxnumf", lambda self, a, b: self.binary_op(a, b, np.fmax))


@pytest.fixture(autouse=True)
def small_blocks(device):
    """Small blocks (block edges at small vocabularies), and every tensor made here on ``device``:
    CUDA where there is one (the compiled kernels, with the GPU's own min/max), else CPU."""
    torch.set_default_device(device)
    try:
        with force_row_config(RowConfig(BLOCK, 1)):
            yield
    finally:
        torch.set_default_device("cpu")


def _tokens():
    return torch.randint(0, V, (B, T))


def _with_inf_at(logits, tokens, where):
    """``where``: ``token`` puts -inf at each sampled token's logit, ``other`` at another entry."""
    logits = logits.clone()
    if where == "token":
        logits.scatter_(2, tokens[..., None], -INF)
    elif where == "other":
        logits.scatter_(2, ((tokens + 1) % V)[..., None], -INF)
    return logits


def _run(op, ref_op, student, teacher, args, kwargs):
    """``(loss, metrics, grad)`` of the op and of its float64 reference on the same inputs."""
    s = student.clone().requires_grad_()
    loss, metrics = op(s, teacher, *args, validate=False, return_metrics=True, **kwargs)
    loss.backward()
    ref_s = student.double().requires_grad_()
    ref_args = [a.double() if a.is_floating_point() else a for a in args]
    ref_kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
    ref_teacher = None if teacher is None else teacher.double()
    ref_loss, ref_metrics = ref_op(ref_s, ref_teacher, *ref_args, return_metrics=True, **ref_kwargs)
    ref_loss.backward()
    return (loss, metrics, s.grad), (ref_loss, ref_metrics, ref_s.grad)


def _assert_matches(ours, ref, *, grad_vs_ref=True):
    """No NaN anywhere in ours; the reference's values where they are finite (inf equals inf)."""
    (loss, metrics, grad), (ref_loss, ref_metrics, ref_grad) = ours, ref
    assert not torch.isnan(loss), "NaN loss"
    assert not torch.isnan(grad).any(), "NaN in the student gradient"
    assert_close(loss, ref_loss, what="loss", **FP32)
    for key, value in ref_metrics.items():
        if key != "delta_mean":  # an average of +inf and -inf deltas is NaN by definition
            assert_close(metrics[key], value, what=f"metrics[{key}]", **FP32)
    if grad_vs_ref:
        assert_close(grad, ref_grad, what="grad", rtol=1e-4, atol=1e-5)


# -- 1. -inf log-probs, and A = 0 ----------------------------------------------------------------------

ADVANTAGES = {"neg": [-1.0, -0.5], "zero": [0.0, 0.0], "pos": [1.0, 0.5], "mixed": [[-1.0, 0.0, 1.0], [0.0, 0.0, 2.0]]}
TEACHERS = ("finite", "logit_token", "logit_other", "logprobs")
STUDENTS = ("finite", "logit_token")
OLD = (None, "finite", "-inf")


@pytest.mark.parametrize("adv,teacher,student,old", list(itertools.product(ADVANTAGES, TEACHERS, STUDENTS, OLD)))
def test_rlsd_inf_logprobs_never_nan(adv, teacher, student, old, backend):
    """sign(0) = 0 gives w = 1 and A_hat = 0 whatever delta is: no 0 * (-inf) in the loss, the
    metrics or the gradient, at any advantage, with -inf on either side and in the old log-probs."""
    tokens = _tokens()
    student_logits = _with_inf_at(torch.randn(B, T, V) * 2, tokens, "token" if student == "logit_token" else None)
    kwargs = {"lam": 0.7}
    if teacher == "logprobs":
        teacher_logits = None
        kwargs["teacher_logprobs"] = torch.tensor([[-1.0, -INF, -2.0], [-INF, -0.5, -INF]])
    else:
        where = {"logit_token": "token", "logit_other": "other"}.get(teacher)
        teacher_logits = _with_inf_at(torch.randn(B, T, V) * 2, tokens, where)
    if old is not None:
        kwargs["old_logprobs"] = torch.full((B, T), -1.5 if old == "finite" else -INF)
    ours, ref = _run(rlsd_kernels.rlsd_loss, reference.rlsd_loss, student_logits, teacher_logits,
                     (tokens, torch.tensor(ADVANTAGES[adv])), kwargs)
    _assert_matches(ours, ref)
    assert torch.isfinite(ours[0]), "the RLSD loss is finite whatever the log-probs (ratios are clamped)"
    if adv == "zero":
        # No token carries credit: the credit metrics average over none (0), and say so.
        assert ours[1]["num_credit_tokens"] == 0 and ours[1]["credit_weight_mean"] == 0.0


# Teacher log-probs in place of logits only for the sampled-token divergence (the others read the rows).
OPSD_INF_CASES = [(d, t, s) for d in DIVERGENCES for t, s in itertools.product(TEACHERS, STUDENTS)
                  if t != "logprobs" or d == "sampled_token"]


@pytest.mark.parametrize("grpo", [False, True], ids=["opsd", "grpo_opsd"])
@pytest.mark.parametrize("token_clip", [None, 5.0])
@pytest.mark.parametrize("divergence,teacher,student", OPSD_INF_CASES)
def test_opsd_inf_logprobs_never_nan(divergence, teacher, student, token_clip, grpo, backend):
    """-inf teacher or student log-probs in the OPSD terms: no NaN in the loss or the gradient. A
    divergence the -inf makes infinite (the teacher rules out what the student samples) is an
    infinite loss; ``token_clip`` bounds it and drops the token from the gradient."""
    tokens = _tokens()
    student_logits = _with_inf_at(torch.randn(B, T, V) * 2, tokens, "token" if student == "logit_token" else None)
    kwargs = {"divergence": divergence, "token_clip": token_clip}
    if teacher == "logprobs":
        teacher_logits = None
        kwargs["teacher_logprobs"] = torch.tensor([[-1.0, -INF, -2.0], [-INF, -0.5, -INF]])
    else:
        where = {"logit_token": "token", "logit_other": "other"}.get(teacher)
        teacher_logits = _with_inf_at(torch.randn(B, T, V) * 2, tokens, where)
    if grpo:
        op, ref_op, args = rlsd_kernels.grpo_opsd_loss, reference.grpo_opsd_loss, (tokens, torch.tensor([0.0, 1.0]))
    else:
        op, ref_op, args = rlsd_kernels.opsd_loss, reference.opsd_loss, (tokens,)
    ours, ref = _run(op, ref_op, student_logits, teacher_logits, args, kwargs)
    # Autograd of an infinite loss has no finite reference to compare the gradient with.
    _assert_matches(ours, ref, grad_vs_ref=bool(torch.isfinite(ref[0])))


def test_whole_inf_teacher_row_is_an_error(backend):
    tokens = _tokens()
    teacher_logits = torch.randn(B, T, V)
    teacher_logits[1, 2] = -INF
    for call in (lambda: rlsd_kernels.rlsd_loss(torch.randn(B, T, V), teacher_logits, tokens, torch.zeros(B)),
                 lambda: rlsd_kernels.opsd_loss(torch.randn(B, T, V), teacher_logits, tokens)):
        with pytest.raises(ValueError, match="teacher_logits: 1 unmasked rows"):
            call()


# -- 4. NaN inputs with validate=False: NaN out, on a GPU's min/max too ---------------------------------

RLSD_OPTIONS = ({}, {"surrogate": "cispo", "credit_base": "old", "tis_level": "sequence"}, {"ratio_level": "sequence"})
PER_TOKEN = ("advantages", "teacher_logprobs", "old_logprobs", "rollout_logprobs", "ref_logprobs")
ROWS = ("student_row", "teacher_row")


def _nan_inputs(where, masked):
    """Inputs with one NaN at token (1, 1) (a logit row, or a per-token input); ``masked`` masks it."""
    tokens = _tokens()
    student, teacher = torch.randn(B, T, V), torch.randn(B, T, V)
    per_token = {"teacher_logprobs": -torch.rand(B, T), "old_logprobs": -torch.rand(B, T) - 1.0,
                 "rollout_logprobs": -torch.rand(B, T) - 1.0, "ref_logprobs": -torch.rand(B, T) - 1.0,
                 "advantages": torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5]])}
    if where == "student_row":
        student[1, 1, 3] = float("nan")
    elif where == "teacher_row":
        teacher[1, 1, 5] = float("nan")
    else:
        per_token[where][1, 1] = float("nan")
    mask = torch.ones(B, T)
    if masked:
        mask[1, 1] = 0.0
    return student, teacher, tokens, per_token, mask


def _call(op, student, teacher, tokens, per_token, mask, where, **options):
    adv = per_token["advantages"]
    if op == "token_logprobs":
        return rlsd_kernels.token_logprobs(student, torch.where(mask != 0, tokens, -100), validate=False).sum()
    if op == "rlsd":
        extra = {k: per_token[k] for k in ("old_logprobs", "rollout_logprobs", "ref_logprobs")}
        if where == "teacher_logprobs":
            teacher, extra["teacher_logprobs"] = None, per_token["teacher_logprobs"]
        return rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, mask=mask, kl_coef=0.1, validate=False,
                                      **extra, **options)
    teacher_kw = {}
    if where == "teacher_logprobs":
        teacher, teacher_kw = None, {"teacher_logprobs": per_token["teacher_logprobs"]}
    if op == "grpo_opsd":
        return rlsd_kernels.grpo_opsd_loss(student, teacher, tokens, adv, mask=mask, validate=False,
                                           old_logprobs=per_token["old_logprobs"], **teacher_kw, **options)
    return rlsd_kernels.opsd_loss(student, teacher, tokens, mask=mask, validate=False, **teacher_kw, **options)


NAN_CASES = (
    [("token_logprobs", "student_row", {})]
    + [("rlsd", w, o) for w in ROWS + PER_TOKEN
       for o in RLSD_OPTIONS]
    + [("opsd", w, {"divergence": d, "token_clip": c}) for d in DIVERGENCES for c in (None, 3.0)
       for w in ROWS + (("teacher_logprobs",) if d == "sampled_token" else ())]
    + [("grpo_opsd", w, {"divergence": d}) for d in ("jsd", "sampled_token")
       for w in ROWS + ("advantages", "old_logprobs")]
)


def _nan_id(case):
    op, where, options = case
    return "-".join([op, where] + [f"{k}={v}" for k, v in options.items()])


@pytest.mark.parametrize("case", NAN_CASES, ids=[_nan_id(c) for c in NAN_CASES])
def test_nan_input_gives_nan_with_gpu_min_max(case, backend, gpu_min_max):
    """validate=False: a NaN in any logit row or per-token input gives a NaN loss, never a silently
    finite one (on a GPU a clamp through min/max would drop it); masked out, it changes nothing."""
    op, where, options = case
    loss = _call(op, *_nan_inputs(where, masked=False), where, **options)
    assert torch.isnan(loss), f"{op} with a NaN in {where} gave {float(loss)}"
    loss = _call(op, *_nan_inputs(where, masked=True), where, **options)
    assert torch.isfinite(loss), f"{op} with a NaN in a masked token's {where} gave {float(loss)}"


LINEAR_NAN_CASES = [("token_logprobs_linear", "student_row"), ("rlsd_linear", "student_row"),
                    ("rlsd_linear", "teacher_row"), ("rlsd_linear", "old_logprobs"), ("opsd_linear", "student_row"),
                    ("opsd_linear", "teacher_row"), ("grpo_opsd_linear", "advantages")]


@pytest.mark.parametrize("op,where", LINEAR_NAN_CASES)
def test_nan_input_gives_nan_linear_with_gpu_min_max(op, where, backend, gpu_min_max):
    """The fused-linear forms: a NaN hidden state (a NaN logit row) or per-token input gives NaN."""
    n, hidden = B * T, 8
    h, h_t, w = torch.randn(n, hidden), torch.randn(n, hidden), torch.randn(V, hidden) / 3
    tokens, adv, old = torch.randint(0, V, (n,)), torch.linspace(-1.0, 1.0, n), -torch.rand(n) - 1.0
    {"student_row": h, "teacher_row": h_t, "old_logprobs": old, "advantages": adv}[where][4] = float("nan")
    calls = {
        "token_logprobs_linear": lambda: rlsd_kernels.token_logprobs_linear(h, w, tokens, validate=False).sum(),
        "rlsd_linear": lambda: rlsd_kernels.rlsd_linear_loss(h, w, tokens, adv, teacher_hidden=h_t, old_logprobs=old,
                                                             validate=False),
        "opsd_linear": lambda: rlsd_kernels.opsd_linear_loss(h, w, tokens, teacher_hidden=h_t, validate=False),
        "grpo_opsd_linear": lambda: rlsd_kernels.grpo_opsd_linear_loss(h, w, tokens, adv, teacher_hidden=h_t,
                                                                       validate=False),
    }
    loss = calls[op]()
    assert torch.isnan(loss), f"{op} with a NaN in {where} gave {float(loss)}"


@triton.jit
def _min_kernel(x, out):
    v = tl.load(x)
    tl.store(out, tl.minimum(v, 0.0))
    tl.store(out + 1, tl.minimum(v, 0.0, propagate_nan=tl.PropagateNan.ALL))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's stand-in for a GPU")
def test_gpu_min_max_fixture_drops_nan(gpu_min_max):
    """The fixture's premise: without ``propagate_nan`` the patched interpreter returns the non-NaN
    operand, with ``PropagateNan.ALL`` it keeps the NaN (what the kernels must use where it matters)."""
    out = torch.zeros(2)
    _min_kernel[(1,)](torch.tensor([float("nan")]), out)
    assert out[0] == 0.0 and torch.isnan(out[1])


# -- 3. The upstream gradient is applied in float32 ----------------------------------------------------

@pytest.mark.parametrize("dtype,upstream", [(torch.float16, 65536.0), (torch.bfloat16, 1.0 / 3.0)])
@pytest.mark.parametrize("op", ["rlsd", "opsd", "grpo_opsd"])
def test_upstream_gradient_scaled_in_float32(op, dtype, upstream, backend):
    """GradScaler's 2**16 overflows float16 as a factor (not as a product), and 1/3 rounded to bfloat16
    biases every gradient by +0.2 %: the scale is applied in float32, then rounded once."""
    measure_bias = backend == "torch" or torch.cuda.is_available()  # the interpreter rounds toward zero
    # Enough entries for the rounding noise to average out where the bias is measured.
    shape = (8, 16, 4 * BLOCK + 3) if measure_bias else (B, T, V)
    tokens = torch.randint(0, shape[-1], shape[:2])
    student = (torch.randn(shape) * 2).to(dtype)
    teacher = (torch.randn(shape) * 2).to(dtype)
    adv = torch.linspace(-1.0, 1.0, shape[0])
    calls = {
        "rlsd": lambda m, s, t: m.rlsd_loss(s, t, tokens, adv.to(s.dtype) if s.dtype == torch.float64 else adv),
        "opsd": lambda m, s, t: m.opsd_loss(s, t, tokens),
        "grpo_opsd": lambda m, s, t: m.grpo_opsd_loss(s, t, tokens, adv.to(s.dtype) if s.dtype == torch.float64
                                                      else adv),
    }
    grads = []
    for factor in (1.0, upstream):
        s = student.clone().requires_grad_()
        (calls[op](rlsd_kernels, s, teacher) * factor).backward()
        grads.append(s.grad.double())
    ref_s = student.double().requires_grad_()
    (calls[op](reference, ref_s, teacher.double()) * upstream).backward()
    assert torch.isfinite(grads[1]).all(), "the upstream gradient overflowed"
    assert_close(grads[1], ref_s.grad, what="grad", **GRAD[dtype])
    if measure_bias:
        # Against the gradient at upstream 1 times the factor: +0.2 % when the factor is rounded to
        # bfloat16 first, and only the noise of rounding to nearest (about 1e-4 here) when it is not.
        expected = grads[0] * upstream
        bias = ((grads[1] - expected) * expected.sign()).sum() / expected.abs().sum()
        assert abs(bias.item()) < 5e-4, f"gradient biased by {bias.item():.2e}"


# -- 5. Log-probs at large logits ------------------------------------------------------------------------

# Where the row's maximum lies decides the kernels' path: "plain" rows have it within a few units of
# their first block's (the fast path's reference); "jump" rows have logits 120 above it in a later
# block, "dead_first" rows a first block of -inf (reference 0), and at a large offset both overflow
# the fast path's sums and take the exact pass. Tokens lie outside the first block, on the jump where
# there is one (elsewhere a log-prob near -120 and its float32 ulps would make every bound loose).
LAYOUTS = ("plain", "jump", "dead_first")
LAYOUT_OFFSETS = [("plain", 0.0), ("plain", 100.0), ("plain", 1e3), ("plain", 1e4), ("jump", 0.0), ("jump", 1e4),
                  ("dead_first", 1e4)]


def _layout(x, layout):
    """Float32 rows ``x`` (float64 values) with the layout's maximum placed; a copy."""
    x = x.clone()
    if layout == "jump":
        x[:, 2 * BLOCK + 1:2 * BLOCK + 4] += 120.0
    elif layout == "dead_first":
        x[:, :BLOCK] = float("-inf")
    return x.float()


def _layout_tokens(n, vocab, layout):
    if layout == "jump":
        return torch.randint(2 * BLOCK + 1, 2 * BLOCK + 4, (n,))
    return torch.randint(BLOCK, vocab, (n,))


@pytest.mark.parametrize("layout,offset", LAYOUT_OFFSETS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_precise_at_large_logits(layout, offset, temperature, backend):
    """Log-probs (student and teacher) within 2x the error of float32 ``torch.log_softmax`` (plus
    a few float32 ulps at 1) when every logit is shifted by a large offset: formed from ``z - max``,
    not from ``z * log2(e) - lse``, on the fast path and on the exact pass alike (``LAYOUTS``)."""
    n, vocab = 64, 3 * BLOCK + 5
    tokens = _layout_tokens(n, vocab, layout)
    base = torch.randn(n, vocab) * 3
    logits = _layout(base.double() + offset, layout)
    exact = torch.log_softmax(logits.double() / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
    f32 = torch.log_softmax(logits / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
    bound = 2 * (f32.double() - exact).abs().max().item() + 4e-7 * exact.abs().max().item() + 1e-6

    lp = rlsd_kernels.token_logprobs(logits, tokens, temperature=temperature)
    assert (lp.double() - exact).abs().max().item() <= bound, "token_logprobs"

    teacher = _layout(torch.randn(n, vocab).double() * 3 + offset, layout)
    exact_t = torch.log_softmax(teacher.double() / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
    f32_t = torch.log_softmax(teacher / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
    bound_t = 2 * (f32_t.double() - exact_t).abs().max().item() + 4e-7 * exact_t.abs().max().item() + 1e-6
    # loss_agg="none" with lam = 1 and A = 1: the per-token loss is -w, and w = exp(clamp(lp_T - lp_S));
    # a wide eps_w keeps the clamp away, so the weight shows both log-probs.
    adv = torch.ones(n)
    out = rlsd_kernels.rlsd_loss(logits, teacher, tokens, adv, temperature=temperature, eps_w=0.999999,
                                 loss_agg="none", dual_clip=None)
    expected = -torch.exp((exact_t - exact).clamp(math.log1p(-0.999999), math.log1p(0.999999)))
    got_delta = torch.log(-out.double())
    assert (got_delta - torch.log(-expected)).abs().max().item() <= bound + bound_t, "rlsd_loss delta"

    # The entropy, from sums of the centred logits (exp2(d) * d), not as lse - E[z].
    _, entropy = rlsd_kernels.token_logprobs(logits, tokens, temperature=temperature, return_entropy=True)
    # The reference in float64 and in float32: the exact value and float32 log_softmax's error.
    exact_h, f32_h = (reference.token_logprobs(x, tokens, temperature=temperature, return_entropy=True)[1]
                      for x in (logits.double(), logits))
    bound_h = 2 * (f32_h.double() - exact_h).abs().max().item() + 1e-6
    assert (entropy.double() - exact_h).abs().max().item() <= bound_h, "entropy"


@pytest.mark.parametrize("distance", [10.0, 40.0, 85.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_between_the_fast_path_and_the_exact_pass(distance, temperature, backend):
    """A row whose maximum lies ``distance`` (logits / tau) above its first block's, short of the ~88
    that overflows the fast path's sums: the kernels' sums stay centred on the first block's maximum,
    so their log-probs and entropies add up to about ``distance * 2**-22`` to twice float32's error
    (README, Precision); the PyTorch path centres on the row's maximum and keeps within twice."""
    n, vocab = 64, 3 * BLOCK + 5
    tokens = _layout_tokens(n, vocab, "plain")
    x = torch.randn(n, vocab).double() * 3
    x[:, 2 * BLOCK + 1:2 * BLOCK + 4] += distance * temperature
    x = x.float()
    exact_lp, exact_h = reference.token_logprobs(x.double(), tokens, temperature=temperature, return_entropy=True)
    f32_lp, f32_h = reference.token_logprobs(x, tokens, temperature=temperature, return_entropy=True)
    lp, h = rlsd_kernels.token_logprobs(x, tokens, temperature=temperature, return_entropy=True)
    extra = distance * 2.0**-22 if backend == "triton" else 0.0
    for got, exact, f32 in ((lp, exact_lp, f32_lp), (h, exact_h, f32_h)):
        bound = 2 * (f32.double() - exact).abs().max().item() + 1e-6 + extra
        assert (got.double() - exact).abs().max().item() <= bound


@pytest.mark.parametrize("layout,offset", [(lay, off) for lay, off in LAYOUT_OFFSETS if off != 1e3])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "sampled_token"])
def test_divergences_precise_at_large_logits(divergence, layout, offset, backend):
    """Every OPSD divergence per token (and the sampled token's log-probs behind the last) within 2x
    the error of the float32 reference (``log_softmax``; plus a few float32 ulps) when every logit is
    shifted by a large offset: the sums take the difference of the two rows' centred logits, on the
    fast path and on the exact pass alike."""
    n, vocab = 32, 3 * BLOCK + 5
    tokens = _layout_tokens(n, vocab, layout)
    student = _layout(torch.randn(n, vocab).double() * 3 + offset, layout)
    teacher = _layout(torch.randn(n, vocab).double() * 3 + offset, layout)
    exact, f32 = (reference.opsd_loss(s, t, tokens, divergence=divergence, loss_agg="none")
                  for s, t in ((student.double(), teacher.double()), (student, teacher)))
    bound = 2 * (f32.double() - exact).abs().max().item() + 4e-7 * exact.abs().max().item() + 1e-6
    got = rlsd_kernels.opsd_loss(student, teacher, tokens, divergence=divergence, loss_agg="none")
    assert (got.double() - exact).abs().max().item() <= bound


@pytest.mark.parametrize("layout,offset", [(lay, off) for lay, off in LAYOUT_OFFSETS if off != 1e3])
@pytest.mark.parametrize("op", ["rlsd", "opsd_reverse_kl", "opsd_jsd", "grpo_opsd"])
def test_gradients_precise_at_large_logits(op, layout, offset, backend):
    """The logits' gradient of the fused forward (and of the PyTorch path when the rows are one chunk)
    within a few float32 ulps of the float64 reference, relative to its largest entry, when every
    logit is shifted by a large offset: the probabilities come from centred logits. (The separate
    backward kernel forms them from the stored logsumexp, a relative error of about |lse| * 2**-24:
    README, Precision.)"""
    n, vocab = 32, 3 * BLOCK + 5
    tokens = _layout_tokens(n, vocab, layout)
    adv = torch.linspace(-1.0, 1.0, n)
    student = _layout(torch.randn(n, vocab).double() * 3 + offset, layout)
    teacher = _layout(torch.randn(n, vocab).double() * 3 + offset, layout)
    calls = {
        "rlsd": lambda m, s, t: m.rlsd_loss(s, t, tokens, adv.to(s.dtype)),
        "opsd_reverse_kl": lambda m, s, t: m.opsd_loss(s, t, tokens, divergence="reverse_kl"),
        "opsd_jsd": lambda m, s, t: m.opsd_loss(s, t, tokens),
        "grpo_opsd": lambda m, s, t: m.grpo_opsd_loss(s, t, tokens, adv.to(s.dtype)),
    }
    ref_s = student.double().requires_grad_()
    calls[op](reference, ref_s, teacher.double()).backward()
    s = student.clone().requires_grad_()
    with force_choice("fused"):
        calls[op](rlsd_kernels, s, teacher).backward()
    error = (s.grad.double() - ref_s.grad).abs().max() / ref_s.grad.abs().max()
    assert error.item() < 4e-6, f"relative gradient error {error.item():.1e}"


# bfloat16 with 1/3: on CPU its matmul read the padding of the row-padded gradient tile (NaN in dH)
# until the padding was zeroed; the poisoned allocations of the tests make that visible.
@pytest.mark.parametrize("dtype,upstream", [(torch.float16, 65536.0), (torch.bfloat16, 1 / 3)])
@pytest.mark.parametrize("op", ["rlsd_linear", "opsd_linear"])
def test_linear_upstream_gradient_scaled_in_float32(op, dtype, upstream, backend):
    """dH and dW of the fused-linear forms, computed in the forward and scaled by the upstream
    gradient in the backward, the same way: never inf under float16 loss scaling, never biased."""
    n, hidden, vocab = 64, 16, 2 * BLOCK + 3
    h = torch.randn(n, hidden).to(dtype)
    h_t = torch.randn(n, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) / 4).to(dtype)
    tokens = torch.randint(0, vocab, (n,))
    adv = torch.linspace(-1.0, 1.0, n)
    grads = []
    for factor in (1.0, upstream):
        hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
        if op == "rlsd_linear":
            loss = rlsd_kernels.rlsd_linear_loss(hs, ws, tokens, adv, teacher_hidden=h_t)
        else:
            loss = rlsd_kernels.opsd_linear_loss(hs, ws, tokens, teacher_hidden=h_t)
        (loss * factor).backward()
        grads.append((hs.grad.double(), ws.grad.double()))
    for got, at_one, what in zip(grads[1], grads[0], ("dH", "dW"), strict=True):
        assert torch.isfinite(got).all(), f"{what}: the upstream gradient overflowed"
        expected = at_one * upstream
        assert_close(got, expected, what=what, **GRAD[dtype])
        if backend == "torch" or torch.cuda.is_available():  # the interpreter rounds toward zero
            bias = ((got - expected) * expected.sign()).sum() / expected.abs().sum()
            assert abs(bias.item()) < 5e-4, f"{what} biased by {bias.item():.2e}"
