"""Bad input gets a clear error that names the tensor, or a documented result; never a crash or NaN."""

import pytest
import torch
from cases import make_case
from tolerances import FP32, assert_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.launch.tuning import RowConfig, force_row_config


@pytest.fixture
def case(device):
    return make_case(device, mask="none", ratio=None)


def call(case, **kw):
    args = dict(student_logits=case.student.view, teacher_logits=case.teacher.view, tokens=case.tokens,
                advantages=case.advantages)
    args.update(kw)
    positional = [args.pop(k) for k in ("student_logits", "teacher_logits", "tokens", "advantages")]
    with force_row_config(RowConfig(16, 1)):
        return rlsd_kernels.rlsd_loss(*positional, **{**case.kwargs, **args})


def reference_loss(case, mask):
    """The float64 reference on the case with ``mask``; masked rows' logits set to 0 (any finite value)."""
    student, teacher = case.student.view.detach().double(), case.teacher.view.double()
    student = torch.where(mask[..., None], student, 0.0)
    teacher = torch.where(mask[..., None], teacher, 0.0)
    kwargs = {k: v for k, v in case.kwargs.items() if k not in ("mask",)}
    return reference.rlsd_loss(student, teacher, case.tokens, case.advantages.double(), mask=mask, **kwargs)


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda c: dict(student_logits=c.student.view.double()), TypeError, "student_logits"),
        (lambda c: dict(student_logits=c.student.view.long()), TypeError, "student_logits"),
        (lambda c: dict(student_logits=c.student.view[0, 0]), ValueError, "student_logits"),
        (lambda c: dict(teacher_logits=c.teacher.view[:, :-1]), ValueError, "teacher_logits"),
        (lambda c: dict(teacher_logits=c.teacher.view.to("meta")), ValueError, "teacher_logits"),
        (lambda c: dict(tokens=c.tokens.float()), TypeError, "tokens"),
        (lambda c: dict(tokens=c.tokens[:, :-1]), ValueError, "tokens"),
        (lambda c: dict(tokens=c.tokens.to("meta")), ValueError, "tokens"),
        (lambda c: dict(advantages=c.advantages[:-1]), ValueError, "advantages"),
        (lambda c: dict(advantages=c.advantages.long()), TypeError, "advantages"),
        (lambda c: dict(mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, "mask"),
        (lambda c: dict(old_logprobs=torch.zeros(3)), ValueError, "old_logprobs"),
        (lambda c: dict(teacher_logits=None), ValueError, "teacher_logprobs"),
        (lambda c: dict(teacher_logprobs=torch.zeros(3, 5)), ValueError, "teacher_logprobs"),
        (lambda c: dict(eps_w=1.5), ValueError, "eps_w"),
        (lambda c: dict(lam=2.0), ValueError, "lam"),
        (lambda c: dict(clip_low=-0.1), ValueError, "clip_low"),
        (lambda c: dict(dual_clip=0.5), ValueError, "dual_clip"),
        (lambda c: dict(temperature=0.0), ValueError, "temperature"),
        (lambda c: dict(loss_agg="mean"), ValueError, "loss_agg"),
        (lambda c: dict(normalizer=0), ValueError, "normalizer"),
        (lambda c: dict(normalizer=5, loss_agg="none"), ValueError, "normalizer"),
        (lambda c: dict(cu_seqlens=torch.tensor([0, 15])), ValueError, "cu_seqlens"),
        (lambda c: dict(is_weights=-torch.ones_like(c.advantages)), ValueError, "is_weights"),
        (lambda c: dict(is_weights=torch.ones_like(c.advantages), rollout_logprobs=torch.zeros(c.tokens.shape)),
         ValueError, "is_weights"),
        (lambda c: dict(lam="0.5"), TypeError, "lam"),
        (lambda c: dict(tokens=c.tokens.to(torch.int16)), TypeError, "tokens"),
    ],
)
def test_argument_errors_name_the_argument(case, change, error, name):
    with pytest.raises(error, match=name):
        call(case, **change(case))


def test_packed_sequence_modes_need_boundaries(device):
    case = make_case(device, layout="packed", mask="none")
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(case, loss_agg="seq-mean-token-mean")
    with pytest.raises(ValueError, match="cu_seqlens ends at"):
        call(case, loss_agg="seq-mean-token-mean", cu_seqlens=torch.tensor([0, 4, 9], device=device))


@pytest.mark.parametrize("bad_id", [37, 1000, -1, -7])
def test_token_ids_out_of_range(case, bad_id, backend):
    case.tokens[1, 3] = bad_id
    with pytest.raises(ValueError, match=r"tokens: 1 token ids outside \[0, 37\).*id " + str(bad_id)):
        call(case)
    mask = torch.ones_like(case.tokens, dtype=torch.bool)
    mask[1, 3] = False
    # A masked token's id is never used: the loss equals the one with a valid id there, and the
    # reference's (which scores masked positions as ignored).
    masked = call(case, mask=mask)
    case.tokens[1, 3] = 0
    assert torch.equal(masked, call(case, mask=mask))
    case.tokens[1, 3] = bad_id
    assert_close(masked, reference_loss(case, mask), what="masked bad id", **FP32)
    with pytest.raises(ValueError, match="tokens"):
        rlsd_kernels.token_logprobs(case.student.view, case.tokens)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_non_finite_logits_are_reported(case, value, which, backend):
    buf = case.student if which == "student_logits" else case.teacher
    buf.view.data[2, 1, 5] = value
    with pytest.raises(ValueError, match=f"{which}: 1 unmasked rows hold NaN or \\+inf"):
        call(case)
    mask = torch.ones_like(case.tokens, dtype=torch.bool)
    mask[2, 1] = False
    # A masked row is never read: the loss is the reference's, and that row's gradient exactly 0.
    student = case.student.view.requires_grad_()
    loss = call(case, mask=mask, student_logits=student)
    assert_close(loss, reference_loss(case, mask), what="masked non-finite row", **FP32)
    loss.backward()
    assert torch.equal(student.grad[2, 1], torch.zeros_like(student.grad[2, 1]))
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    student.grad = None
    # validate=False is the documented way out of the check (no device-to-host sync): then it shows.
    assert not torch.isfinite(call(case, validate=False))


def test_rows_without_a_finite_logit(case, backend):
    case.student.view.data[0, 0] = float("-inf")
    with pytest.raises(ValueError, match="no finite value"):
        call(case)


def test_non_unit_vocabulary_stride_warns_and_copies(case):
    transposed = case.student.view.detach().contiguous().transpose(0, 2).contiguous().transpose(0, 2)
    assert transposed.stride(-1) != 1
    with pytest.warns(UserWarning, match="vocabulary stride"):
        loss = call(case, student_logits=transposed)
    torch.testing.assert_close(loss, call(case))


def _public_calls(device):
    """One call of every public function that takes ``validate``: ``name -> fn(**keywords)``."""
    s, t = torch.randn(2, 3, 11, device=device), torch.randn(2, 3, 11, device=device)
    h, w = torch.randn(2, 3, 8, device=device), torch.randn(11, 8, device=device)
    y, a = torch.randint(0, 11, (2, 3), device=device), torch.randn(2, device=device)
    return {
        "rlsd_loss": lambda **k: rlsd_kernels.rlsd_loss(s, t, y, a, **k),
        "opsd_loss": lambda **k: rlsd_kernels.opsd_loss(s, t, y, **k),
        "grpo_opsd_loss": lambda **k: rlsd_kernels.grpo_opsd_loss(s, t, y, a, **k),
        "token_logprobs": lambda **k: rlsd_kernels.token_logprobs(s, y, **k),
        "rlsd_linear_loss": lambda **k: rlsd_kernels.rlsd_linear_loss(h, w, y, a, teacher_hidden=h, **k),
        "opsd_linear_loss": lambda **k: rlsd_kernels.opsd_linear_loss(h, w, y, teacher_hidden=h, **k),
        "grpo_opsd_linear_loss": lambda **k: rlsd_kernels.grpo_opsd_linear_loss(h, w, y, a, teacher_hidden=h, **k),
        "token_logprobs_linear": lambda **k: rlsd_kernels.token_logprobs_linear(h, w, y, **k),
    }


def _signature(name):
    import inspect

    return inspect.signature(getattr(rlsd_kernels, name)).parameters


def test_every_validated_function_is_covered():
    takes = {n for n in rlsd_kernels.__all__ if callable(getattr(rlsd_kernels, n)) and "validate" in _signature(n)}
    assert takes == set(_public_calls(torch.device("cpu")))


def _finite(out):
    return torch.isfinite(out[0] if isinstance(out, tuple) else out).all()


@pytest.mark.parametrize("value", [None, "false", "Deferred", 1, 0])
def test_validate_takes_only_its_three_values(value, device):
    """``validate=None`` once switched the checks off and ``"false"`` on, silently."""
    for name, fn in _public_calls(device).items():
        with pytest.raises(ValueError, match="validate must be True, False or 'deferred'"):
            fn(validate=value)
        for good in (True, False, "deferred"):
            assert _finite(fn(validate=good)), (name, good)


@pytest.mark.parametrize("value", [None, "false", "no", 1, 0, 1.0])
def test_switches_take_only_true_or_false(value, device):
    """Every on/off keyword (a bool default in a public signature): ``inplace_backward="false"`` once
    wrote the gradient into the logits, ``return_metrics="no"`` returned metrics, and ``1`` or ``0``
    passed for ``credit_negative_only``."""
    checked = 0
    for name, fn in _public_calls(device).items():
        switches = [k for k, p in _signature(name).items() if isinstance(p.default, bool) and k != "validate"]
        for switch in switches:
            with pytest.raises(ValueError, match=f"{switch} must be"):
                fn(**{switch: value})
            for good in (True, False):
                assert _finite(fn(**{switch: good})), (name, switch, good)
            checked += 1
    assert checked >= 14  # inplace_backward, return_metrics, credit_negative_only, return_entropy


@pytest.mark.parametrize("group", ["tp", 2, object()])
def test_process_group_must_be_a_process_group(group, device):
    """A wrong ``process_group`` once failed inside ``torch.distributed`` (``'str' object has no
    attribute 'size'``)."""
    for fn in _public_calls(device).values():
        with pytest.raises(TypeError, match="process_group must be a torch.distributed process group"):
            fn(process_group=group)


def test_distillation_without_a_teacher_names_the_divergence(device):
    """With ``lam=0`` (``grpo_opsd_loss``'s default) the message once said that the credit weight
    (lam > 0) needed the teacher."""
    s, y, a = torch.randn(2, 3, 11, device=device), torch.randint(0, 11, (2, 3), device=device), torch.randn(2)
    h, w = torch.randn(2, 3, 8, device=device), torch.randn(11, 8, device=device)
    calls = [
        lambda: rlsd_kernels.opsd_loss(s, None, y, divergence="sampled_token"),
        lambda: rlsd_kernels.grpo_opsd_loss(s, None, y, a.to(device), divergence="sampled_token"),
        lambda: rlsd_kernels.opsd_linear_loss(h, w, y, divergence="sampled_token"),
        lambda: rlsd_kernels.grpo_opsd_linear_loss(h, w, y, a.to(device), divergence="sampled_token"),
    ]
    for fn in calls:
        with pytest.raises(ValueError, match="give teacher_(logits|hidden) or teacher_logprobs: the divergence"):
            fn()


def test_linear_forms_refuse_an_empty_hidden_size(device):
    """H = 0 once crashed inside the chunking ("cannot reshape tensor of 0 elements")."""
    h, w = torch.randn(2, 3, 0, device=device), torch.randn(11, 0, device=device)
    y, a = torch.randint(0, 11, (2, 3), device=device), torch.randn(2, device=device)
    calls = [lambda: rlsd_kernels.rlsd_linear_loss(h, w, y, a, teacher_hidden=h),
             lambda: rlsd_kernels.opsd_linear_loss(h, w, y, teacher_hidden=h),
             lambda: rlsd_kernels.grpo_opsd_linear_loss(h, w, y, a, teacher_hidden=h),
             lambda: rlsd_kernels.token_logprobs_linear(h, w, y)]
    for fn in calls:
        with pytest.raises(ValueError, match="empty hidden dimension"):
            fn()


def test_linear_forms_name_a_mismatched_teacher(device):
    """A wrong dtype raises ``TypeError`` and a wrong shape ``ValueError``, as for every other input
    (a teacher_hidden of another dtype raised ``ValueError``)."""
    h, w = torch.randn(2, 3, 8, device=device), torch.randn(11, 8, device=device)
    y, a = torch.randint(0, 11, (2, 3), device=device), torch.randn(2, device=device)
    calls = [lambda th: rlsd_kernels.rlsd_linear_loss(h, w, y, a, teacher_hidden=th),
             lambda th: rlsd_kernels.opsd_linear_loss(h, w, y, teacher_hidden=th),
             lambda th: rlsd_kernels.grpo_opsd_linear_loss(h, w, y, a, teacher_hidden=th)]
    for fn in calls:
        with pytest.raises(TypeError, match="teacher_hidden has dtype"):
            fn(h.bfloat16())
        with pytest.raises(ValueError, match="teacher_hidden has shape"):
            fn(h[:, :2])
