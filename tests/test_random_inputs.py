"""Classes of input, drawn at random with a fixed seed per case: shapes, dtypes, layouts (views, packed),
masks, advantages with exact zeros, -inf entries in the logits and the per-token log-probs, and the
options of the loss family, on both backends, against the float64 reference: wherever the spec says
finite, the loss and gradient are finite and equal to the reference's."""

import math

import pytest
import torch
from tolerances import DIVERGENCE_ULPS, FP32, GRAD, MEAN_ABS, assert_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.launch.tuning import RowConfig, force_row_config

CASES = 48
OPTIONS = [
    {}, {"surrogate": "cispo"}, {"ratio_level": "sequence"}, {"eps_w_low": 0.1, "eps_w_high": 0.5},
    {"credit_base": "old"}, {"credit_negative_only": True}, {"dual_clip": None}, {"kl_coef": 0.1},
    {"entropy_coef": 0.03}, {"lam": 0.0}, {"temperature": 0.7}, {"surrogate": "sapo", "sapo_tau_neg": 2.0},
]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "sum", "none"]


def padded_logits(g, pick, b, t, v, scale):
    """Student logits ``[b, t + 1, v]`` of std ``scale``, teacher logits near them, sampled ids
    ``[b, t]``, drawn from ``g`` (``pick`` chooses from a list with it); then -inf at the same entries
    of both models in a few rows (a padded or filtered vocabulary), never at a sampled token or at a
    row's first entry, so that no row is all -inf and every divergence stays finite."""
    student = torch.randn(b, t + 1, v, generator=g) * scale
    teacher = student + torch.randn(b, t + 1, v, generator=g) * pick([0.1, 1.0])
    tokens = torch.randint(0, v, (b, t), generator=g)
    pad = torch.rand(b, t + 1, v, generator=g) < 0.2
    pad[..., :1] = False
    hit = torch.zeros_like(pad)
    hit[:, :t].scatter_(2, tokens[..., None], True)
    return student.masked_fill(pad & ~hit, -math.inf), teacher.masked_fill(pad & ~hit, -math.inf), tokens


def _draw(seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]  # noqa: E731
    b, t = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    v = pick([3, 15, 16, 17, 40])
    dtype = pick([torch.float32, torch.float16, torch.bfloat16])
    layout = pick(["contiguous", "view", "packed"])
    # Logit scales up to 8: larger ones give log-probs of tens of nats, whose float32 rounding alone
    # passes the metrics' absolute tolerance. Precision at large logits and offsets is tested in
    # test_reliability_numerics.py.
    student, teacher, tokens = padded_logits(g, pick, b, t, v, pick([0.5, 3.0, 8.0]))
    adv = torch.randn(b, generator=g).round()  # exact zeros among them
    mask = pick([None, torch.rand(b, t, generator=g) > 0.3, torch.rand(b, t, generator=g)])
    options = dict(pick(OPTIONS))
    lp_s = reference.token_logprobs(student[:, :t].double(), tokens)
    if options.get("credit_base") == "old" or pick([True, False]):
        options["old_logprobs"] = (lp_s + 0.3 * torch.randn(b, t, generator=g).double()).float()
    if options.get("kl_coef"):
        options["ref_logprobs"] = (lp_s + 0.3 * torch.randn(b, t, generator=g).double()).float()
    teacher_lp = None
    if pick([False, False, True]):
        # Precomputed teacher log-probs, some of them -inf (a top-k filtered teacher).
        teacher_lp = reference.token_logprobs(teacher[:, :t].double(), tokens).float()
        teacher_lp = teacher_lp.masked_fill(torch.rand(b, t, generator=g) < 0.2, -math.inf)
    return dict(student=student.to(dtype), teacher=teacher.to(dtype), tokens=tokens, adv=adv, mask=mask, t=t,
                layout=layout, options=options, teacher_lp=teacher_lp, agg=pick(AGGS), dtype=dtype)


def _shape(x, case):
    if case["layout"] == "contiguous":
        return x[:, :case["t"]].contiguous()
    if case["layout"] == "view":
        return x[:, :case["t"]]
    return x[:, :case["t"]].reshape(-1, *x.shape[2:])


# Beyond the first CASES: draws whose loss sums terms of both signs to about 0 (|loss| 1.7e-3 from
# terms of order 1; exactly 0 in float64).
CANCELLING = [167, 261]


@pytest.mark.parametrize("seed", [*range(CASES), *CANCELLING])
def test_random_case_matches_reference(seed, backend):
    case = _draw(seed)
    packed = case["layout"] == "packed"
    flat = (lambda x: None if x is None else x.reshape(-1)) if packed else (lambda x: x)  # noqa: E731
    b, t = case["tokens"].shape
    kwargs = {k: flat(v) if isinstance(v, torch.Tensor) else v for k, v in case["options"].items()}
    kwargs.update(mask=flat(case["mask"]), loss_agg=case["agg"])
    if packed:
        kwargs["cu_seqlens"] = torch.arange(0, b * t + 1, t)
    adv = case["adv"].repeat_interleave(t) if packed else case["adv"]
    teacher = None if case["teacher_lp"] is not None else _shape(case["teacher"], case)
    if case["teacher_lp"] is not None:
        kwargs["teacher_logprobs"] = flat(case["teacher_lp"])
    student = _shape(case["student"], case).detach().requires_grad_()
    with force_row_config(RowConfig(16, 1)):
        loss, metrics = rlsd_kernels.rlsd_loss(student, teacher, flat(case["tokens"]), adv, return_metrics=True,
                                               **kwargs)
    ref_student = student.detach().double().requires_grad_()
    ref_kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
    ref_loss, ref_metrics = reference.rlsd_loss(ref_student, None if teacher is None else teacher.double(),
                                                flat(case["tokens"]), adv.double(), return_metrics=True,
                                                **ref_kwargs)
    upstream = torch.randn(ref_loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (ref_loss * upstream).sum().backward()
    (loss * upstream.float()).sum().backward()
    assert torch.isfinite(loss).all(), "the loss is finite for finite inputs with -inf entries"
    assert torch.isfinite(student.grad).all()
    # The loss sums per-token terms of both signs (advantages of both signs; exact cancellations to
    # 0 happen): its tolerance is relative to the same aggregation of the terms' magnitudes.
    with torch.no_grad():
        terms = reference.rlsd_loss(ref_student, None if teacher is None else teacher.double(), flat(case["tokens"]),
                                    adv.double(), **dict(ref_kwargs, mask=None, loss_agg="none"))
        mask = torch.ones_like(terms) if kwargs["mask"] is None else kwargs["mask"].double()
        magnitude = reference.aggregate_loss(terms.abs(), mask, case["agg"], cu_seqlens=kwargs.get("cu_seqlens"))
        # Float32's floor where a value is formed from log-probs of magnitude up to L = max|z| / tau: a
        # few units in the last place of L (an entropy near 0 of peaked rows carries it, for one).
        tau = kwargs.get("temperature", 1.0)
        logits = student.detach().float()
        unit = DIVERGENCE_ULPS * 2.0**-24 * float(logits[logits.isfinite()].abs().max()) / tau
        entropy_floor = reference.aggregate_loss(torch.full_like(mask, abs(kwargs.get("entropy_coef", 0.0)) * unit),
                                                 mask, case["agg"], cu_seqlens=kwargs.get("cu_seqlens"))
    assert_close(loss, ref_loss, what=f"case {seed} loss", scale=magnitude.abs().max(), floor=entropy_floor, **FP32)
    for key, value in ref_metrics.items():
        if key == "delta_mean" and not torch.isfinite(value):
            continue  # a -inf teacher log-prob makes the mean delta -inf in both
        torch.testing.assert_close(metrics[key].double(), value.double(), **MEAN_ABS,
                                   msg=lambda m, key=key: f"case {seed} metrics[{key}]: {m}")
    # A token's row of the gradient is c * (1[v = y] - S_v) / tau (the entropy term's row sums to 0
    # too), and float32's 1 - p_y errs by a few eps: of c, which exceeds the row's own entries when the
    # token is confident, and may exceed the tensor's largest gradient. c = tau * g_y / (1 - S_y) from
    # the float64 row; each entry may be off by |c| * (1[v = y] + S_v) * the floor's units.
    with torch.no_grad():
        rows = ref_student.detach() / tau
        probs = torch.softmax(rows, -1).nan_to_num(0.0)
        index = flat(case["tokens"]).clamp(min=0)[..., None]
        hit = torch.zeros_like(probs).scatter_(-1, index, 1.0)
        rest = 1.0 - probs.gather(-1, index)
        coef = torch.where(rest > 0, tau * ref_student.grad.gather(-1, index) / rest.clamp(min=1e-300), 0.0)
        grad_floor = coef.abs() * (hit + probs) * max(unit, DIVERGENCE_ULPS * 2.0**-24)
    assert_close(student.grad, ref_student.grad, what=f"case {seed} grad", floor=grad_floor, **GRAD[case["dtype"]])
