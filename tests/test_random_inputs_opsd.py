"""Classes of input for the distillation losses, drawn at random with a fixed seed per case: shapes,
dtypes, layouts (views, packed), masks, ignored ids, -inf entries of a padded vocabulary, every
divergence (β of the JSD, the sampled-token surrogate with teacher logits or log-probs), token
clips, temperatures and aggregations, on both backends, against the float64 reference: the loss,
its metrics and the gradient of the student's logits."""

import pytest
import torch
from test_random_inputs import AGGS, _shape, padded_logits
from tolerances import DIVERGENCE_ULPS, FP32, GRAD, MEAN_ABS, assert_within_float32_error

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.launch.tuning import RowConfig, force_row_config

CASES = 48
DIVERGENCES = [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9),
               ("sampled_token", None)]


def _draw(seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]  # noqa: E731
    b, t = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    v = pick([3, 15, 16, 17, 40])
    student, teacher, tokens = padded_logits(g, pick, b, t, v, pick([0.5, 3.0, 8.0]))
    tokens = tokens.masked_fill(torch.rand(b, t, generator=g) < 0.15, reference.IGNORE_INDEX)
    divergence, beta = pick(DIVERGENCES)
    options = dict(divergence=divergence, beta=0.5 if beta is None else beta, temperature=pick([1.0, 0.7]),
                   token_clip=pick([None, None, 0.05, 1.0]), loss_agg=pick(AGGS),
                   mask=pick([None, torch.rand(b, t, generator=g) > 0.3, torch.rand(b, t, generator=g)]))
    teacher_lp = None
    if divergence == "sampled_token" and pick([False, True]):
        scored = tokens.clamp(min=0)
        teacher_lp = reference.token_logprobs(teacher[:, :t].double(), scored,
                                              temperature=options["temperature"]).float()
    return dict(student=student.to(pick([torch.float32, torch.float16, torch.bfloat16])), teacher=teacher,
                tokens=tokens, t=t, layout=pick(["contiguous", "view", "packed"]), options=options,
                teacher_lp=teacher_lp)


@pytest.mark.parametrize("seed", range(CASES))
def test_random_opsd_case_matches_reference(seed, backend):
    case = _draw(seed)
    dtype = case["student"].dtype
    packed = case["layout"] == "packed"
    flat = (lambda x: None if x is None else x.reshape(-1)) if packed else (lambda x: x)  # noqa: E731
    b, t = case["tokens"].shape
    kwargs = {k: flat(v) if isinstance(v, torch.Tensor) else v for k, v in case["options"].items()}
    if packed:
        kwargs["cu_seqlens"] = torch.arange(0, b * t + 1, t)
    teacher = _shape(case["teacher"].to(dtype), case)
    if case["teacher_lp"] is not None:
        teacher, kwargs["teacher_logprobs"] = None, flat(case["teacher_lp"])
    tokens = flat(case["tokens"])
    student = _shape(case["student"], case).detach().requires_grad_()
    with force_row_config(RowConfig(16, 1)):
        loss, metrics = rlsd_kernels.opsd_loss(student, teacher, tokens, return_metrics=True, **kwargs)
    ref_student = student.detach().double().requires_grad_()
    ref_kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
    ref_teacher = None if teacher is None else teacher.double()
    ref_loss, ref_metrics = reference.opsd_loss(ref_student, ref_teacher, tokens, return_metrics=True, **ref_kwargs)
    upstream = torch.randn(ref_loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (ref_loss * upstream).sum().backward()
    (loss * upstream.float()).sum().backward()
    assert torch.isfinite(loss).all(), "the loss is finite where both models pad the same entries"
    assert torch.isfinite(student.grad).all()
    # A divergence between close distributions is a small total of terms of order |log p|, and the
    # sampled-token terms take either sign: float32 cannot hold FP32's relative precision there, so
    # the loss and the gradient are held to twice the float32 reference's own error, plus FP32.
    f32_student = student.detach().float().requires_grad_()
    f32_kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
    f32_loss = reference.opsd_loss(f32_student, None if teacher is None else teacher.float(), tokens, **f32_kwargs)
    (f32_loss * upstream.float()).sum().backward()
    # ... and a few units in the last place of the log-probs' largest magnitude L per token (the
    # sampled-token surrogate D * lp_S: L times that), aggregated as the loss is.
    with torch.no_grad():
        logits = torch.cat([x.reshape(-1) for x in (student, teacher) if x is not None]).float()
        big = float(logits[logits.isfinite()].abs().max()) / kwargs["temperature"]
        unit = DIVERGENCE_ULPS * 2.0**-24 * big
        per_token = unit * big if kwargs["divergence"] == "sampled_token" else unit
        mask = (tokens != reference.IGNORE_INDEX).double()
        mask = mask if kwargs["mask"] is None else mask * kwargs["mask"].double()
        floor = reference.aggregate_loss(torch.full(mask.shape, per_token, dtype=torch.float64), mask,
                                         kwargs["loss_agg"], cu_seqlens=kwargs.get("cu_seqlens"))
    assert_within_float32_error(loss, ref_loss, f32_loss, what=f"case {seed} loss", floor=floor, **FP32)
    for key, value in ref_metrics.items():
        # The mean divergence carries the divergences' floor; the clip fraction none.
        slack = unit if key == "divergence_mean" else 0.0
        torch.testing.assert_close(metrics[key].double(), value.double(), rtol=MEAN_ABS["rtol"],
                                   atol=MEAN_ABS["atol"] + slack,
                                   msg=lambda m, key=key: f"case {seed} metrics[{key}]: {m}")
    # The gradient of a token's row is c * S_v * (a difference of log-probs, to that floor) / tau, c the
    # token's share of the upstream gradient (the sampled-token surrogate: c * D * (1[v = y] - S_v));
    # it is written in the logits' dtype, so the float32 reference's, rounded to it, errs by that too.
    with torch.no_grad():
        share = torch.zeros(mask.shape, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            agg = reference.aggregate_loss(share, mask, kwargs["loss_agg"], cu_seqlens=kwargs.get("cu_seqlens"))
            (agg * upstream).sum().backward()
        probs = torch.softmax(ref_student.detach() / kwargs["temperature"], -1).nan_to_num(0.0)
        hit = torch.zeros_like(probs).scatter_(-1, tokens.clamp(min=0)[..., None], 1.0)
        grad_floor = share.grad.abs()[..., None] * (probs + hit) * unit / kwargs["temperature"]
        # One unit in the last place of the output dtype more (subnormal spacing included): a value
        # within the floor of a rounding boundary rounds either way.
        info = torch.finfo(dtype)
        grad_floor = grad_floor + (ref_student.grad.abs() * info.eps).clamp(min=info.tiny * info.eps)
    assert_within_float32_error(student.grad, ref_student.grad, f32_student.grad.to(dtype), what=f"case {seed} grad",
                                floor=grad_floor, **GRAD[dtype])
