"""``opsd_loss`` and ``grpo_opsd_loss`` against the float64 reference (loss, metrics, the student-logit
gradient), through both backends; closed forms of the reference; bad input; sm_90 compilation."""


import pytest
import torch
from cases import make_case
from harness import check_logits_canaries, compare
from test_loss_family import OPTIONS, _case
from tolerances import FP32, GRAD, REAL_SIZE_FP32, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.launch.tuning import RowConfig, force_choice, force_row_config

BLOCK = 16  # forced under test so that small vocabularies hit the block edges
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("sampled_token", 0.5)]
DIV_IDS = [f"{d}-{b}" if d == "jsd" else d for d, b in DIVERGENCES]


def _double(kwargs):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}


def check(case, dtype, *, grpo=False, loss_agg="token-mean", inplace=False, upstream=None, teacher=True, **options):
    """Runs the op on ``case`` and its reference in float64 with the same upstream gradient; compares
    the loss, every metric, the student gradient, and the canaries around the logits."""
    if grpo:
        kwargs = {**case.kwargs, **options}
        args = (case.tokens, case.advantages)
        op, ref_op = rlsd_kernels.grpo_opsd_loss, reference.grpo_opsd_loss
    else:
        shared = ("mask", "temperature", "teacher_logprobs")
        kwargs = {**{k: case.kwargs[k] for k in shared if k in case.kwargs}, **options}
        kwargs.pop("lam", None)
        args = (case.tokens,)
        op, ref_op = rlsd_kernels.opsd_loss, reference.opsd_loss
    teacher_logits = case.teacher.view if teacher and case.teacher is not None else None
    ref_student = case.student.view.detach().double().requires_grad_()
    ref_args = tuple(a.double() if a.is_floating_point() else a for a in args)
    ref_teacher = None if teacher_logits is None else teacher_logits.double()
    student = case.student.view.requires_grad_()
    student.grad = None

    def run_reference():
        return ref_op(ref_student, ref_teacher, *ref_args, loss_agg=loss_agg, return_metrics=True, **_double(kwargs))

    def run():
        return op(student, teacher_logits, *args, loss_agg=loss_agg, inplace_backward=inplace, return_metrics=True,
                  **kwargs)

    result = compare(run, run_reference, {"student": student}, {"student": ref_student}, dtype, upstream=upstream)
    check_logits_canaries(case, inplace)
    return result


def opsd_case(device, **axis):
    axis = {"ratio": None, **axis}
    return make_case(device, **axis)


AXES = [
    dict(),
    dict(dtype=torch.float16),
    dict(dtype=torch.bfloat16),
    dict(vocab=BLOCK - 1),
    dict(vocab=BLOCK),
    dict(vocab=BLOCK + 1),
    dict(vocab=3 * BLOCK + 5),
    dict(mask="none"),
    dict(mask="seq"),
    dict(mask="float"),
    dict(layout="contiguous"),
    dict(layout="packed"),
    dict(temperature=0.7),
    dict(dtype=torch.bfloat16, layout="packed", mask="seq", temperature=0.7, vocab=2 * BLOCK + 3),
]


def _id(axis):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in axis.items()) or "base"


@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("axis", AXES, ids=[_id(a) for a in AXES])
def test_opsd_matches_reference(axis, divergence, beta, device, backend):
    with force_row_config(RowConfig(BLOCK, 1)):
        check(opsd_case(device, **axis), axis.get("dtype", torch.float32), divergence=divergence, beta=beta)


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layout", ["view", "packed"])
def test_aggregations(loss_agg, inplace, layout, device, backend):
    case = opsd_case(device, layout=layout, mask="seq")
    extra = {"cu_seqlens": torch.tensor([0, 5, 7, 15], device=device)} if layout == "packed" else {}
    # Each mode meets two divergences across the two layouts.
    i = reference.LOSS_AGG_MODES.index(loss_agg) * 2 + (layout == "packed")
    divergence, beta = DIVERGENCES[i % len(DIVERGENCES)]
    with force_row_config(RowConfig(BLOCK, 1)):
        check(case, torch.float32, loss_agg=loss_agg, inplace=inplace, divergence=divergence, beta=beta, **extra)


@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("loss_agg, inplace", [("token-mean", False), ("token-mean", True), ("none", False),
                                               ("none", True)])
def test_per_token_and_in_place(divergence, beta, loss_agg, inplace, device, backend):
    with force_row_config(RowConfig(BLOCK, 1)):
        check(opsd_case(device, mask="seq"), torch.float32, loss_agg=loss_agg, inplace=inplace, divergence=divergence,
              beta=beta)


@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_split_strategy(divergence, beta, inplace, device, backend):
    """The gradient written by the forward-then-row-backward strategy the tuner may pick instead."""
    with force_row_config(RowConfig(BLOCK, 1)), force_choice("split"):
        check(opsd_case(device, dtype=torch.bfloat16, mask="seq"), torch.bfloat16, inplace=inplace,
              divergence=divergence, beta=beta)
        check(opsd_case(device), torch.float32, grpo=True, divergence=divergence, beta=beta, alpha=0.5)


@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
def test_token_clip(divergence, beta, device, backend):
    """A cap halfway between two middle divergences: half the tokens clipped, with a margin far
    above float32 rounding."""
    case = opsd_case(device, mask="none", temperature=0.7)
    kwargs = dict(divergence=divergence, beta=beta, temperature=0.7)
    if divergence == "sampled_token":
        lp_s = reference.token_logprobs(case.student.view.double(), case.tokens, temperature=0.7)
        lp_t = reference.token_logprobs(case.teacher.view.double(), case.tokens, temperature=0.7)
        d = lp_s - lp_t
    else:
        d = reference.opsd_token_divergence(case.student.view.double(), case.teacher.view.double(), **kwargs)
    ordered = d.reshape(-1).sort().values
    clip = float(ordered[len(ordered) // 2 - 1: len(ordered) // 2 + 1].mean())
    with force_row_config(RowConfig(BLOCK, 1)):
        _, metrics = check(case, torch.float32, divergence=divergence, beta=beta, token_clip=clip)
        check(case, torch.float32, grpo=True, divergence=divergence, beta=beta, token_clip=clip, loss_agg="none")
    expected = float((d > clip).double().mean())
    assert 0 < expected < 1 and abs(float(metrics["token_clip_frac"]) - expected) < 1e-6


GRPO_AXES = [
    dict(),
    dict(dtype=torch.bfloat16, mask="seq"),
    dict(layout="packed", temperature=0.7, lam=0.5),
    dict(vocab=BLOCK + 1, adv_shape="BT", ratio=None, dual_clip=None),
]


@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("axis", GRPO_AXES, ids=[_id(a) for a in GRPO_AXES])
def test_grpo_opsd_matches_reference(axis, divergence, beta, device, backend):
    axis = dict(axis)
    options = {k: axis.pop(k) for k in ("dual_clip",) if k in axis}
    with force_row_config(RowConfig(BLOCK, 1)):
        check(make_case(device, lam=axis.pop("lam", 0.0), **axis), axis.get("dtype", torch.float32), grpo=True,
              divergence=divergence, beta=beta, alpha=0.7, **options)


@pytest.mark.parametrize("option", [OPTIONS[0], OPTIONS[2], OPTIONS[10], OPTIONS[11], OPTIONS[14], OPTIONS[-1]],
                         ids=lambda o: "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in o.items()))
@pytest.mark.parametrize("divergence, loss_agg, inplace", [("jsd", "token-mean", False), ("reverse_kl", "none", True),
                                                          ("sampled_token", "seq-mean-token-mean", False),
                                                          ("forward_kl", "token-mean", True)])
def test_grpo_opsd_with_policy_options(option, divergence, loss_agg, inplace, device, backend):
    """The RLSD options (CISPO, sequence-level ratios and importance weights, KL, entropy) next to
    each divergence, including those that wait for a sequence pass before the gradient."""
    case, dtype = _case(device, option, mask="seq")
    with force_row_config(RowConfig(BLOCK, 1)):
        check(case, dtype, grpo=True, divergence=divergence, alpha=1.3, loss_agg=loss_agg, inplace=inplace)


@pytest.mark.parametrize("grpo", [False, True])
def test_sampled_token_with_teacher_logprobs(grpo, device, backend):
    case = opsd_case(device, mask="seq", dtype=torch.bfloat16)
    case.kwargs["teacher_logprobs"] = reference.token_logprobs(
        case.teacher.view.double(), case.tokens.clamp(0, 36)).float() + 0.1
    with force_row_config(RowConfig(BLOCK, 1)):
        check(case, torch.bfloat16, grpo=grpo, teacher=False, divergence="sampled_token", lam=0.5)
        check(case, torch.bfloat16, grpo=grpo, teacher=False, divergence="sampled_token", loss_agg="none")


def test_grpo_opsd_is_the_sum_of_its_parts(device, backend):
    case = make_case(device, mask="seq", lam=0.5)
    kwargs = {k: case.kwargs[k] for k in ("mask", "temperature")}
    with force_row_config(RowConfig(BLOCK, 1)):
        both = case.call(rlsd_kernels.grpo_opsd_loss, case.student.view, alpha=0.3, divergence="jsd")
        pg = case.call(rlsd_kernels.rlsd_loss, case.student.view)
        distill = rlsd_kernels.opsd_loss(case.student.view, case.teacher.view, case.tokens, divergence="jsd",
                                         **kwargs)
        grpo = case.call(rlsd_kernels.grpo_opsd_loss, case.student.view, alpha=0.0)
    assert_close(both, pg + 0.3 * distill, what="GRPO+OPSD vs the two losses", **FP32)
    assert_close(grpo, pg, what="alpha = 0 vs rlsd_loss", **FP32)


@pytest.mark.parametrize("beta, divergence", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_endpoints_are_the_two_kls(beta, divergence, device, backend):
    case = opsd_case(device, mask="seq", temperature=0.8)
    results = []
    for kwargs in (dict(divergence="jsd", beta=beta), dict(divergence=divergence)):
        student = case.student.view.detach().clone().requires_grad_()
        with force_row_config(RowConfig(BLOCK, 1)):
            loss = rlsd_kernels.opsd_loss(student, case.teacher.view, mask=case.kwargs["mask"], temperature=0.8,
                                          **kwargs)
        loss.backward()
        results.append((loss, student.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    # Both sides above may share one branch: pin the endpoint to the KL written out here, with its
    # gradient (S - T) / tau (forward) or S * ((a - b) - KL) / tau (reverse), in float64.
    mask = case.kwargs["mask"]
    a = torch.log_softmax(case.student.view.detach().double() / 0.8, -1)
    b = torch.log_softmax(case.teacher.view.double() / 0.8, -1)
    s, t = a.exp(), b.exp()
    kl = (t * (b - a)).sum(-1) if beta == 0.0 else (s * (a - b)).sum(-1)
    grad = (s - t) if beta == 0.0 else s * ((a - b) - kl[..., None])
    count = mask.sum()
    assert float(kl[mask].min()) > 1e-3, "the case cannot tell the KL from the mixture's limit 0"
    assert_close(results[0][0], kl[mask].sum() / count, what="JSD endpoint loss", **FP32)
    assert_close(results[0][1], grad / 0.8 / count * mask[..., None], what="JSD endpoint grad", **GRAD[torch.float32])


@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("grpo", [False, True])
def test_identical_student_and_teacher_give_zero(divergence, beta, grpo, device, backend):
    """The same rows for student and teacher: zero OPSD loss and zero OPSD gradient (with the policy
    term, the loss and gradient of the policy term alone)."""
    case = opsd_case(device, mask="seq", temperature=0.7)
    case.teacher.view.data.copy_(case.student.view.data)
    student = case.student.view.detach().clone().requires_grad_()
    with force_row_config(RowConfig(BLOCK, 1)):
        if grpo:
            loss = case.call(rlsd_kernels.grpo_opsd_loss, student, divergence=divergence, beta=beta, alpha=2.0)
            policy_student = case.student.view.detach().clone().requires_grad_()
            policy = case.call(rlsd_kernels.rlsd_loss, policy_student)
            policy.backward()
        else:
            loss = rlsd_kernels.opsd_loss(student, case.teacher.view, case.tokens, mask=case.kwargs["mask"],
                                          divergence=divergence, beta=beta, temperature=0.7)
    loss.backward()
    if grpo:
        assert_close(loss, policy, what="GRPO+OPSD on identical rows", **FP32)
        assert_grad_close(student.grad, policy_student.grad, torch.float32)
    else:
        # Exactly 0 for the KLs and the sampled token; the JSD's log M rounds to within 1 ulp of log S.
        assert abs(float(loss.detach())) < 1e-7 and student.grad.abs().max() < 1e-7


def test_reference_closed_forms():
    """Two-entry distributions by hand; padded entries add nothing and give a zero, finite gradient."""
    s, t = torch.tensor([0.3, 0.7], dtype=torch.float64), torch.tensor([0.6, 0.4], dtype=torch.float64)
    zs = torch.cat([s.log(), torch.tensor([float("-inf")], dtype=torch.float64)]).requires_grad_()
    zt = torch.cat([t.log(), torch.tensor([float("-inf")], dtype=torch.float64)])
    kl = lambda p, q: float((p * (p / q).log()).sum())  # noqa: E731
    for beta in (0.3, 0.5):
        m = beta * t + (1 - beta) * s
        jsd = reference.opsd_token_divergence(zs, zt, divergence="jsd", beta=beta)
        assert float(jsd) == pytest.approx(beta * kl(t, m) + (1 - beta) * kl(s, m), rel=1e-12)
    assert float(reference.opsd_token_divergence(zs, zt, divergence="forward_kl")) == pytest.approx(kl(t, s))
    reverse = reference.opsd_token_divergence(zs, zt, divergence="reverse_kl")
    assert float(reverse) == pytest.approx(kl(s, t))
    reverse.backward()
    # d KL(S||T) / dz_S = S * ((log S - log T) - KL(S||T)), and exactly 0 at the padded entry.
    expected = s * ((s / t).log() - kl(s, t))
    assert torch.allclose(zs.grad[:2], expected) and zs.grad[2] == 0


def test_padded_vocabulary(device, backend):
    """-inf logits in both models (a padded vocabulary) give finite results equal to the reference."""
    for divergence, beta in DIVERGENCES:
        case = opsd_case(device, vocab=40)
        for buf in (case.student, case.teacher):
            buf.view.data[..., 33:] = float("-inf")
        case.tokens.clamp_(max=32)
        with force_row_config(RowConfig(BLOCK, 1)):
            check(case, torch.float32, divergence=divergence, beta=beta)
            check(case, torch.float32, grpo=True, divergence=divergence, beta=beta, loss_agg="none")


@pytest.mark.parametrize("pattern", ["spike", "leading_pad"])
def test_wide_logit_range(pattern, device, backend):
    """Logits far above the first block's (the per-lane sums overflow) and rows whose first block is
    all -inf: the exact rescaling pass, with its KL cross sums, matches the reference."""
    case = opsd_case(device, vocab=3 * BLOCK + 5, mask="none")
    for buf, shift in ((case.student, 0.0), (case.teacher, 3.0)):
        if pattern == "spike":
            buf.view.data[0, 1, 2 * BLOCK + 3] = 150.0 + shift
            buf.view.data[2, 4, BLOCK + 1] = 400.0 - shift
        else:
            buf.view.data[1, :, :BLOCK] = float("-inf")
    case.tokens[1].clamp_(min=BLOCK)
    # Not the sampled token: its loss D * lp_S of a token ~400 nats below the spike carries the float32
    # rounding of lp_S (~3e-5) times 400; its log-probs take the exact path of rlsd_loss's kernel.
    for divergence, beta in DIVERGENCES[:-1]:
        with force_row_config(RowConfig(BLOCK, 1)):
            check(case, torch.float32, divergence=divergence, beta=beta)
            check(case, torch.float32, grpo=True, divergence=divergence, beta=beta, entropy_coef=0.1)


def test_persistent_grid(device, backend):
    """Fewer programs than rows: each program walks several rows."""
    with force_row_config(RowConfig(BLOCK, 1, programs_per_sm=2)):
        check(opsd_case(device, layout="packed", mask="seq"), torch.float32, divergence="jsd")
        check(opsd_case(device), torch.float32, grpo=True, divergence="reverse_kl", inplace=True)


@pytest.mark.parametrize("grpo", [False, True])
def test_fully_masked_batch(grpo, device, backend):
    case = opsd_case(device, mask="none")
    case.kwargs["mask"] = torch.zeros_like(case.tokens, dtype=torch.bool)
    student = case.student.view.requires_grad_()
    with force_row_config(RowConfig(BLOCK, 1)):
        if grpo:
            loss, metrics = case.call(rlsd_kernels.grpo_opsd_loss, student, return_metrics=True)
        else:
            loss, metrics = rlsd_kernels.opsd_loss(student, case.teacher.view, mask=case.kwargs["mask"],
                                                   return_metrics=True)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student.grad))
    assert float(metrics["num_tokens"]) == 0
    assert all(torch.isfinite(v) for v in metrics.values())


def test_empty_batch(device, backend):
    student = torch.randn(0, 7, device=device, requires_grad=True)
    loss, metrics = rlsd_kernels.opsd_loss(student, student.detach(), return_metrics=True)
    loss.backward()
    assert float(loss) == 0.0 and student.grad.shape == (0, 7) and float(metrics["num_tokens"]) == 0
    tokens = torch.zeros(0, dtype=torch.long, device=device)
    loss = rlsd_kernels.grpo_opsd_loss(student, student.detach(), tokens, torch.zeros(0, device=device),
                                       loss_agg="none")
    assert loss.shape == (0,)


def test_no_grad_and_backward_twice(device, backend):
    case = opsd_case(device)
    with force_row_config(RowConfig(BLOCK, 1)):
        with torch.no_grad():
            a = rlsd_kernels.opsd_loss(case.student.view, case.teacher.view)
        b = rlsd_kernels.opsd_loss(case.student.view.detach(), case.teacher.view)
        student = case.student.view.requires_grad_()
        loss = rlsd_kernels.opsd_loss(student, case.teacher.view)
    assert not a.requires_grad and not b.requires_grad
    assert_close(a, b, what="loss", **FP32)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@pytest.mark.parametrize("inplace", [False, True])
def test_shifted_view_gradient_goes_to_its_base(inplace, device, backend):
    logits = torch.randn(3, 6, 29, device=device)
    teacher = torch.randn(3, 6, 29, device=device)
    expected_base = logits.double().requires_grad_()
    reference.opsd_loss(expected_base[:, :-1], teacher[:, :-1].double()).mul(2.5).backward()
    base = logits.clone().requires_grad_()
    with force_row_config(RowConfig(BLOCK, 1)):
        loss = rlsd_kernels.opsd_loss(base[:, :-1], teacher[:, :-1], inplace_backward=inplace)
    (2.5 * loss).backward()
    assert_grad_close(base.grad, expected_base.grad, torch.float32)
    assert torch.equal(base.grad[:, -1], torch.zeros_like(base.grad[:, -1]))


def test_bad_arguments_name_the_argument(device):
    case = opsd_case(device)
    s, t = case.student.view, case.teacher.view
    for kwargs, error, name in (
        (dict(divergence="kl"), ValueError, "divergence"),
        (dict(beta=1.5), ValueError, "beta"),
        (dict(token_clip=float("inf")), ValueError, "token_clip"),
        (dict(loss_agg="mean"), ValueError, "loss_agg"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, "mask"),
        (dict(divergence="sampled_token"), ValueError, "tokens"),
        (dict(teacher_logits=None), ValueError, "teacher_logits"),
        (dict(teacher_logits=t[:, :-1]), ValueError, "teacher_logits"),
        (dict(teacher_logits=None, teacher_logprobs=torch.zeros(3, 5)), ValueError, "teacher_logits"),
        (dict(student_logits=s.double()), TypeError, "student_logits"),
        (dict(tokens=case.tokens.float()), TypeError, "tokens"),
    ):
        args = dict(student_logits=s, teacher_logits=t, tokens=None)
        args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
        with pytest.raises(error, match=name):
            rlsd_kernels.opsd_loss(args["student_logits"], args["teacher_logits"], args["tokens"], **kwargs)
    with pytest.raises(ValueError, match="alpha"):
        rlsd_kernels.grpo_opsd_loss(s, t, case.tokens, case.advantages, alpha=-1.0)
    with pytest.raises(ValueError, match="lam"):
        rlsd_kernels.grpo_opsd_loss(s, t, case.tokens, case.advantages, lam=2.0)


def test_token_ids_are_checked_where_used(device, backend):
    case = opsd_case(device, mask="none")
    case.tokens[1, 3] = 37
    with force_row_config(RowConfig(BLOCK, 1)):
        with pytest.raises(ValueError, match=r"tokens: 1 token ids outside \[0, 37\)"):
            rlsd_kernels.opsd_loss(case.student.view, case.teacher.view, case.tokens, divergence="sampled_token")
        with pytest.raises(ValueError, match="tokens"):
            rlsd_kernels.grpo_opsd_loss(case.student.view, case.teacher.view, case.tokens, case.advantages)
        # The full-vocabulary divergences use the ids only as a mask (-100).
        assert torch.isfinite(rlsd_kernels.opsd_loss(case.student.view, case.teacher.view, case.tokens))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_non_finite_logits_are_reported(value, which, device, backend):
    case = opsd_case(device, mask="none")
    buf = case.student if which == "student_logits" else case.teacher
    buf.view.data[2, 1, 5] = value
    mask = torch.ones_like(case.tokens, dtype=torch.bool)
    with force_row_config(RowConfig(BLOCK, 1)):
        for divergence in ("jsd", "sampled_token"):
            with pytest.raises(ValueError, match=f"{which}: 1 unmasked rows hold NaN or \\+inf"):
                rlsd_kernels.opsd_loss(case.student.view, case.teacher.view, case.tokens, divergence=divergence)
        mask[2, 1] = False
        loss = rlsd_kernels.opsd_loss(case.student.view, case.teacher.view, mask=mask)
        assert torch.isfinite(loss), "a masked row is never read"
        assert not torch.isfinite(rlsd_kernels.opsd_loss(case.student.view, case.teacher.view, validate=False))


@pytest.mark.parametrize("grpo", [False, True])
@pytest.mark.parametrize("loss_agg", ["token-mean", "none"])
def test_compiles_fullgraph(grpo, loss_agg, device, backend):
    case = make_case(device, mask="seq")
    torch._dynamo.reset()

    def step(student, teacher, tokens, advantages, mask):
        if grpo:
            loss, metrics = rlsd_kernels.grpo_opsd_loss(student, teacher, tokens, advantages, mask=mask,
                                                        loss_agg=loss_agg, return_metrics=True)
        else:
            loss, metrics = rlsd_kernels.opsd_loss(student, teacher, mask=mask, loss_agg=loss_agg, token_clip=5.0,
                                                   return_metrics=True)
        return (loss * 2.0).sum(), metrics["divergence_mean"]

    args = (case.teacher.view, case.tokens, case.advantages, case.kwargs["mask"])
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        student = case.student.view.detach().clone().requires_grad_()
        with force_row_config(RowConfig(BLOCK, 1)):
            loss, divergence = fn(student, *args)
            loss.backward()
        results.append((loss, divergence, student.grad))
    for name, eager, compiled in zip(("loss", "divergence", "grad"), *results, strict=True):
        assert_close(compiled, eager, what=name, **FP32)


def _gpu_inputs(n, vocab, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    student = torch.randn(n, vocab, device="cuda", generator=g) * 2
    # A teacher near the student, as a snapshot of the same model would be: divergences of O(0.1).
    teacher = (student + 0.5 * torch.randn(n, vocab, device="cuda", generator=g)).bfloat16()
    tokens = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    adv = torch.randn(n, device="cuda", generator=g)
    mask = torch.rand(n, device="cuda", generator=g) > 0.1
    return student.bfloat16(), teacher, tokens, adv, mask




@pytest.mark.gpu
@pytest.mark.parametrize("grpo", [False, True])
@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
def test_qwen_vocabulary_on_gpu(divergence, beta, grpo):
    """N = 2048 rows of V = 151,936 bf16 logits: the per-token path (its backward streams the rows
    again) against float64 on a sample of rows, and the fused scalar path against the per-token one."""
    n, vocab = 2048, 151936
    student, teacher, tokens, adv, mask = _gpu_inputs(n, vocab)
    rows = torch.arange(0, n, 97, device="cuda")
    normalizer = float(mask.sum())
    kwargs = dict(mask=mask, divergence=divergence, beta=beta, temperature=0.9, token_clip=1.0)
    op, ref_op = rlsd_kernels.opsd_loss, reference.opsd_loss
    args, ref_args = (tokens,), (tokens[rows],)
    if grpo:
        op, ref_op = rlsd_kernels.grpo_opsd_loss, reference.grpo_opsd_loss
        args, ref_args = (tokens, adv), (tokens[rows], adv[rows].double())
        kwargs.update(alpha=0.5, lam=0.5)

    s = student[rows].double().requires_grad_()
    ref = ref_op(s, teacher[rows].double(), *ref_args, loss_agg="none", **dict(kwargs, mask=mask[rows]))
    (ref.sum() / normalizer).backward()
    x = student.clone().requires_grad_()
    loss = op(x, teacher, *args, loss_agg="none", **kwargs)
    (loss.sum() / normalizer).backward()
    assert_close(loss[rows], ref, what="per-token loss", **REAL_SIZE_FP32)
    assert_grad_close(x.grad[rows], s.grad, torch.bfloat16)

    y = student.clone().requires_grad_()
    full = op(y, teacher, *args, **kwargs)
    (3.0 * full).backward()
    assert_close(full, loss.sum() / normalizer, what="token-mean vs none", **FP32)
    assert_grad_close(y.grad[rows], 3.0 * x.grad[rows], torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("divergence", ["jsd", "forward_kl"])
def test_shifted_view_in_place_on_gpu(divergence):
    """``logits[:, :-1]`` views of [B, T+1, V], the gradient written in place into the logits."""
    b, t, vocab = 4, 512, 151936
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(b, t + 1, vocab, device="cuda", generator=g) * 2).bfloat16()
    teacher = (logits.float() + 0.5 * torch.randn(b, t + 1, vocab, device="cuda", generator=g)).bfloat16()
    x = logits.clone().requires_grad_()
    loss = rlsd_kernels.opsd_loss(x[:, :-1], teacher[:, :-1], divergence=divergence, inplace_backward=True)
    (2.0 * loss).backward()
    with torch.no_grad():
        full_ref = torch.stack([
            reference.opsd_token_divergence(logits[i, :-1].double(), teacher[i, :-1].double(), divergence=divergence)
            for i in range(b)
        ]).mean()
    positions = slice(0, t, 61)
    y = logits[:, positions].double().requires_grad_()
    ref = reference.opsd_loss(y, teacher[:, positions].double(), divergence=divergence, loss_agg="sum") / (b * t)
    (2.0 * ref).backward()
    assert_close(loss, full_ref, what="loss", **REAL_SIZE_FP32)
    assert_grad_close(x.grad[:, positions], y.grad, torch.bfloat16)
    assert torch.equal(x.grad[:, -1], torch.zeros_like(x.grad[:, -1]))


def _per_token_grad(fn, divergence, teacher, change=None):
    """The student gradient of ``fn(..., loss_agg="none")`` summed, with ``change(teacher)`` in place
    between the forward and the backward."""
    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, 4, 37, generator=g).requires_grad_()
    tokens = torch.randint(0, 37, (2, 4), generator=g)
    extra = {"advantages": torch.tensor([1.0, -0.5])} if fn is rlsd_kernels.grpo_opsd_loss else {}
    loss = fn(student, teacher, tokens, divergence=divergence, loss_agg="none", **extra)
    if change is not None:
        change(teacher)
    loss.sum().backward()
    return student.grad


@pytest.mark.parametrize("fn", [rlsd_kernels.opsd_loss, rlsd_kernels.grpo_opsd_loss], ids=["opsd", "grpo_opsd"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "sampled_token"])
def test_teacher_logits_changed_in_place_before_backward(fn, divergence, backend):
    """The per-token backward of a full-vocabulary divergence reads the teacher's logits again: changed
    in place after the forward, they raise (as a tensor autograd saved would), where they once gave
    the gradient against the changed teacher silently. The sampled token keeps the forward's teacher
    log-probs, and a teacher made under inference mode keeps no version: both run."""
    teacher = torch.randn(2, 4, 37, generator=torch.Generator().manual_seed(6))
    unchanged = _per_token_grad(fn, divergence, teacher.clone())
    if divergence == "sampled_token":
        assert torch.equal(_per_token_grad(fn, divergence, teacher.clone(), lambda t: t.mul_(3.0)), unchanged)
    else:
        with pytest.raises(RuntimeError, match="teacher_logits has been modified by an inplace operation"):
            _per_token_grad(fn, divergence, teacher.clone(), lambda t: t.mul_(3.0))
    with torch.inference_mode():
        frozen = teacher.clone()
    assert torch.equal(_per_token_grad(fn, divergence, frozen), unchanged)
