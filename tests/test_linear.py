"""``rlsd_linear_loss`` and ``token_logprobs_linear`` against the float64 reference applied to the
materialised logits ``hidden @ weight.T + bias``: loss, metrics and the gradients of the hidden
states, the weight and the bias."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from harness import assert_sum_close, compare
from tolerances import FP32, GRAD, MATMUL_FP32, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference
from rlsd_kernels.forms.linear import default_chunk_size
from rlsd_kernels.launch.tuning import RowConfig, force_row_config

BLOCK = 16  # forced under test so that small vocabularies hit the block edges


@dataclass
class LinearCase:
    """Inputs for ``rlsd_linear_loss`` and the keyword arguments to call it with."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    teacher: torch.Tensor | None
    tokens: torch.Tensor
    advantages: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    def call(self, hidden=None, weight=None, bias=None, **extra):
        """The op on the case's inputs; ``hidden``, ``weight``, ``bias`` replace the case's (e.g. by leaves)."""
        kwargs = {"teacher_hidden": self.teacher, "bias": self.bias if bias is None else bias, **self.kwargs, **extra}
        with force_row_config(RowConfig(BLOCK, 1)):
            return rlsd_kernels.rlsd_linear_loss(
                self.hidden if hidden is None else hidden, self.weight if weight is None else weight,
                self.tokens, self.advantages, **kwargs,
            )

    def leaves64(self):
        """The hidden states, weight and bias as float64 leaves that require a gradient."""
        return tuple(None if x is None else x.detach().double().requires_grad_()
                     for x in (self.hidden, self.weight, self.bias))

    def reference(self, **extra):
        """``((h, w, b) float64 leaves, reference.rlsd_loss(h @ w.T + b, ...))``."""
        h, w, b = self.leaves64()
        teacher = None if self.teacher is None else logits64(self.teacher.double(), w, b).detach()
        kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in {**self.kwargs, **extra}.items()
                  if k not in ("chunk_size", "validate", "inplace_backward")}
        out = reference.rlsd_loss(logits64(h, w, b), teacher, self.tokens, self.advantages.double(), **kwargs)
        return (h, w, b), out


def logits64(h, w, b):
    return h @ w.T + (0.0 if b is None else b)


def hidden_states(token_shape, size, dtype, device, layout, generator):
    """``[B, T, H]`` (``view``: a ``x[:, :-1]`` slice, which cannot be flattened without a copy;
    ``contiguous``) or ``[N, H]`` (``packed``)."""
    if layout == "view":
        b, t = token_shape
        return torch.randn(b, t + 1, size, generator=generator, device=device).to(dtype)[:, :-1]
    return torch.randn(*token_shape, size, generator=generator, device=device).to(dtype)


def make_linear_case(device, *, dtype=torch.float32, batch=2, seqlen=5, hidden_size=12, vocab=37,
                     layout="contiguous", bias=True, teacher="hidden", mask="partial", ratio="near", chunk_size=8,
                     rollout=False, ref=False, credit_mask=False, **kwargs):
    """A random case; each keyword picks one axis of the test matrix (as ``cases.make_case`` does for
    logits). ``rollout``, ``ref`` and ``credit_mask`` add rollout and reference log-probs near the
    student's and a random credit mask, as ``test_loss_family`` does; other keywords go to the loss."""
    g = torch.Generator(device=device).manual_seed(1234)
    packed = layout == "packed"
    token_shape = (batch * seqlen,) if packed else (batch, seqlen)
    hidden = hidden_states(token_shape, hidden_size, dtype, device, layout, g)
    # Logits with a spread of about 2, as in the logits tests.
    weight = (torch.randn(vocab, hidden_size, generator=g, device=device) * 2 / math.sqrt(hidden_size)).to(dtype)
    b = (torch.randn(vocab, generator=g, device=device) * 0.5).to(dtype) if bias else None
    tokens = torch.randint(0, vocab, token_shape, generator=g, device=device)
    adv = torch.randn(token_shape if packed else (batch,), generator=g, device=device)
    extra = dict(kwargs, chunk_size=chunk_size)
    if mask == "partial":
        extra["mask"] = torch.rand(token_shape, generator=g, device=device) > 0.3
    elif mask == "seq":
        # A fully masked sequence next to full ones; ids there are out of range on purpose.
        m = torch.ones(token_shape, dtype=torch.bool, device=device)
        first = slice(0, seqlen) if packed else 0
        m[first] = False
        tokens[first] = vocab + 5
        extra["mask"] = m
    elif mask == "float":
        extra["mask"] = torch.rand(token_shape, generator=g, device=device)
    temperature = kwargs.get("temperature", 1.0)
    z = logits64(hidden.double(), weight.double(), None if b is None else b.double())
    lp_s = reference.token_logprobs(z, tokens.clamp(max=vocab - 1), temperature=temperature).float()
    t_hidden = None
    if teacher == "hidden":
        # The same response under a privileged prompt: hidden states close to the student's.
        t_hidden = hidden_states(token_shape, hidden_size, torch.float32, device, layout, g) * 0.5
        t_hidden = (t_hidden + hidden.float()).to(dtype)
    else:
        extra["teacher_logprobs"] = lp_s + torch.randn(token_shape, generator=g, device=device) * 0.3
    noise = lambda spread: spread * torch.randn(token_shape, generator=g, device=device)  # noqa: E731
    if ratio == "near":
        extra["old_logprobs"] = lp_s + noise(0.05)
    if rollout:
        # Wide enough that the importance weight of some tokens reaches the default cap of 2.
        extra["rollout_logprobs"] = lp_s + noise(0.9)
    if ref:
        extra["ref_logprobs"] = lp_s + noise(0.3)
    if credit_mask:
        extra["credit_mask"] = torch.rand(token_shape, generator=g, device=device) > 0.4
    return LinearCase(hidden, weight, b, t_hidden, tokens, adv, extra)


def check_against_reference(case, dtype, *, loss_agg="token-mean", upstream=None, **extra):
    """Loss, metrics and every gradient against the float64 reference, with a random upstream."""
    leaves = dict(zip(("hidden", "weight", "bias"), (None if x is None else x.detach().requires_grad_()
                                                      for x in (case.hidden, case.weight, case.bias)), strict=True))
    reference_leaves = {}

    def run_reference():
        (h, w, b), out = case.reference(loss_agg=loss_agg, return_metrics=True, **extra)
        reference_leaves.update(hidden=h, weight=w, bias=b)
        return out

    def run():
        return case.call(*leaves.values(), loss_agg=loss_agg, return_metrics=True, **extra)

    options = {**case.kwargs, **extra}
    return compare(run, run_reference, leaves, reference_leaves, dtype, upstream=upstream,
                   terms=lambda: case.reference(loss_agg="none", **extra)[1].detach(), loss_agg=loss_agg,
                   aggregation=dict(normalizer=options.get("normalizer"), cu_seqlens=options.get("cu_seqlens")))


AXES = [
    dict(),
    dict(dtype=torch.float16),
    dict(dtype=torch.bfloat16),
    dict(layout="view", chunk_size=4),
    dict(layout="view", chunk_size=5),
    dict(layout="packed", chunk_size=5),
    dict(layout="packed", chunk_size=7),
    dict(chunk_size=None),
    dict(chunk_size=1),
    dict(vocab=BLOCK + 1, bias=False),
    dict(vocab=45, hidden_size=16, teacher="logprobs"),
    dict(mask="none"),
    dict(mask="seq"),
    dict(mask="float"),
    dict(ratio=None, dual_clip=None),
    dict(lam=0.5, temperature=0.7),
    dict(dtype=torch.bfloat16, layout="view", teacher="logprobs", mask="seq", temperature=0.7, lam=0.5),
]


def _id(axis):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in axis.items()) or "base"


@pytest.mark.parametrize("axis", AXES, ids=[_id(a) for a in AXES])
def test_matches_reference(axis, device, backend):
    check_against_reference(make_linear_case(device, **axis), axis.get("dtype", torch.float32))


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
@pytest.mark.parametrize("layout", ["contiguous", "packed"])
def test_aggregations(loss_agg, layout, device, backend):
    case = make_linear_case(device, layout=layout, mask="seq", chunk_size=7)
    extra = {"cu_seqlens": torch.tensor([0, 5, 7, 10], device=device)} if layout == "packed" else {}
    check_against_reference(case, torch.float32, loss_agg=loss_agg, **extra)


# Options that change the passes over the chunks: a sequence-level ratio or an on-policy
# sequence-level importance weight (every log-prob first), and the entropy term (its own gradient).
OPTIONS = [
    dict(ratio_level="sequence"),
    dict(rollout=True, tis_level="sequence", ratio=None),
    dict(entropy_coef=0.05),
    dict(surrogate="cispo", ratio_level="sequence", rollout=True, tis_level="sequence", ref=True, kl_coef=0.05,
         entropy_coef=0.02, credit_mask=True, credit_base="old", dtype=torch.bfloat16),
]


@pytest.mark.parametrize("option", OPTIONS, ids=[_id(o) for o in OPTIONS])
@pytest.mark.parametrize("loss_agg", ["token-mean", "none"])
def test_options_match_reference(option, loss_agg, device, backend):
    """Chunks of 3 rows cut across the sequences of 5 tokens."""
    case = make_linear_case(device, chunk_size=3, **option)
    _, metrics = check_against_reference(case, option.get("dtype", torch.float32), loss_agg=loss_agg)
    assert ("kl_mean" in metrics) == ("ref_logprobs" in case.kwargs)
    assert ("is_weight_mean" in metrics) == ("rollout_logprobs" in case.kwargs)
    assert "entropy_mean" in metrics


def test_sequence_options_on_packed_tokens(device, backend):
    case = make_linear_case(device, layout="packed", mask="seq", chunk_size=4, ratio_level="sequence", rollout=True,
                            tis_level="sequence", cu_seqlens=torch.tensor([0, 3, 4, 10], device=device))
    check_against_reference(case, torch.float32, loss_agg="seq-mean-token-mean")


def test_normalizer(device, backend):
    check_against_reference(make_linear_case(device), torch.float32, normalizer=torch.tensor(11.0, device=device))


def test_equals_rlsd_loss_on_materialised_logits(device, backend):
    """The fused linear loss is ``rlsd_loss`` on ``hidden @ weight.T + bias``, per token and in sum."""
    case = make_linear_case(device, layout="packed", chunk_size=6)
    hidden = case.hidden.detach().requires_grad_()
    weight = case.weight.detach().requires_grad_()
    bias = case.bias.detach().requires_grad_()
    kwargs = {k: v for k, v in case.kwargs.items() if k != "chunk_size"}
    upstream = torch.randn(case.tokens.shape, device=device)
    with force_row_config(RowConfig(BLOCK, 1)):
        for loss_agg in ("token-mean", "none"):
            teacher_logits = case.teacher @ weight.detach().T + bias.detach()
            expected, expected_metrics = rlsd_kernels.rlsd_loss(
                hidden @ weight.T + bias, teacher_logits, case.tokens, case.advantages,
                loss_agg=loss_agg, return_metrics=True, **kwargs,
            )
            expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight, bias))
            loss, metrics = case.call(hidden, weight, bias, loss_agg=loss_agg, return_metrics=True)
            grads = torch.autograd.grad((loss * upstream).sum(), (hidden, weight, bias))
            if loss.dim():
                assert_close(loss, expected, what="per-token loss", **FP32)
            else:
                assert_sum_close(loss, expected, case.call(loss_agg="none").detach(), loss_agg)
            for key, value in expected_metrics.items():
                assert_close(metrics[key], value, what=f"metrics[{key}]", **FP32)
            for name, g, e in zip(("dhidden", "dweight", "dbias"), grads, expected_grads, strict=True):
                assert_grad_close(g, e, torch.float32, what=f"{loss_agg} {name}")


@pytest.mark.parametrize("teacher", ["hidden", "logprobs"])
def test_tied_weights(teacher, device, backend):
    check_tied_weights(teacher, device)


def check_tied_weights(teacher, device):
    """The weight is also the input embedding: autograd adds both gradients into ``weight.grad``."""
    case = make_linear_case(device, layout="packed", teacher=teacher, bias=False, chunk_size=6)
    ids = torch.randint(0, case.weight.shape[0], case.tokens.shape, device=device)

    def run(weight, loss_fn):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, weight) + case.hidden)
        return loss_fn(hidden, weight)

    w64 = case.weight.detach().double().requires_grad_()
    teacher64 = None if case.teacher is None else logits64(case.teacher.double(), w64.detach(), None)
    kwargs = {k: v for k, v in case.kwargs.items() if k != "chunk_size"}
    ref = run(w64, lambda h, w: reference.rlsd_loss(h @ w.T, teacher64, case.tokens, case.advantages.double(),
                                                    **{k: (v.double() if v.is_floating_point() else v)
                                                       for k, v in kwargs.items()}))
    ref.backward()
    weight = case.weight.detach().requires_grad_()
    loss = run(weight, lambda h, w: case.call(h, w))
    loss.backward()
    assert_close(loss, ref, what="loss", **FP32)
    assert_grad_close(weight.grad, w64.grad, torch.float32, what="dweight (head and embedding)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("layout", ["view", "packed"])
def test_token_logprobs_linear(dtype, entropy, layout, device, backend):
    case = make_linear_case(device, dtype=dtype, layout=layout, vocab=BLOCK + 1, temperature=0.7)
    tokens = case.tokens.clone()
    tokens.view(-1)[::4] = -100
    h64, w64, b64 = case.leaves64()
    ref = reference.token_logprobs(logits64(h64, w64, b64), tokens, temperature=0.7, return_entropy=entropy)
    ref = ref if entropy else (ref,)
    upstream = [torch.randn_like(r) for r in ref]
    sum((r * u).sum() for r, u in zip(ref, upstream, strict=True)).backward()

    hidden = case.hidden.detach().requires_grad_()
    weight = case.weight.detach().requires_grad_()
    bias = case.bias.detach().requires_grad_()
    with force_row_config(RowConfig(BLOCK, 1)):
        out = rlsd_kernels.token_logprobs_linear(hidden, weight, tokens, bias=bias, temperature=0.7,
                                                 return_entropy=entropy, chunk_size=4)
    out = out if entropy else (out,)
    sum((o * u.float()).sum() for o, u in zip(out, upstream, strict=True)).backward()
    for name, o, r in zip(("lp", "entropy"), out, ref, strict=False):
        assert o.dtype == torch.float32 and o.shape == tokens.shape
        assert_close(o, r, what=name, **FP32)
    assert (out[0][tokens == -100] == 0).all()
    for name, x, r in (("hidden", hidden, h64), ("weight", weight, w64), ("bias", bias, b64)):
        assert_grad_close(x.grad, r.grad, dtype, what=f"d{name}")
    assert (hidden.grad[tokens == -100] == 0).all()


def test_fully_masked_batch(device, backend):
    case = make_linear_case(device, mask="none")
    case.kwargs["mask"] = torch.zeros_like(case.tokens, dtype=torch.bool)
    hidden, weight, bias = (x.detach().requires_grad_() for x in (case.hidden, case.weight, case.bias))
    loss, metrics = case.call(hidden, weight, bias, return_metrics=True)
    loss.backward()
    assert float(loss.detach()) == 0.0
    for x in (hidden, weight, bias):
        assert torch.equal(x.grad, torch.zeros_like(x.grad))
    assert float(metrics["num_tokens"]) == 0
    assert all(torch.isfinite(v) for v in metrics.values())


def test_empty_batch(device, backend):
    hidden = torch.randn(0, 8, device=device, requires_grad=True)
    weight = torch.randn(11, 8, device=device, requires_grad=True)
    tokens = torch.zeros(0, dtype=torch.long, device=device)
    loss = rlsd_kernels.rlsd_linear_loss(hidden, weight, tokens, torch.zeros(0, device=device),
                                         teacher_hidden=hidden.detach())
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_no_grad_frozen_weight_and_detached_inputs(device, backend):
    """Only the gradients asked for are computed; the loss is the same whatever is asked for."""
    case = make_linear_case(device)
    with torch.no_grad():
        a = case.call()
    hidden = case.hidden.detach().requires_grad_()
    b = case.call(hidden)
    b.backward()
    c = case.call(case.hidden.detach())
    assert not a.requires_grad and b.requires_grad and not c.requires_grad
    assert case.weight.grad is None and case.bias.grad is None
    assert_close(a, b, what="loss", **FP32)
    assert_close(c, b, what="loss", **FP32)
    (h64, _, _), ref = case.reference()
    ref.backward()
    assert_grad_close(hidden.grad, h64.grad, torch.float32, what="dhidden")


def test_backward_twice_is_refused(device, backend):
    case = make_linear_case(device)
    loss = case.call(case.hidden.detach().requires_grad_())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_default_chunk_size():
    """256 rows at the Qwen vocabulary in bf16 on a GPU (160 MiB of chunk buffers), never below 64."""
    cuda = torch.device("cuda")
    assert default_chunk_size(151936, cuda, torch.bfloat16) == 256
    assert default_chunk_size(151936, cuda, torch.float32) == 128
    assert default_chunk_size(32000, cuda, torch.bfloat16) == 1280
    assert default_chunk_size(10**9, cuda, torch.bfloat16) == 64


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda c: dict(hidden=c.hidden[..., :-1]), ValueError, "hidden size mismatch: student_hidden"),
        (lambda c: dict(weight=c.weight[:, :-1]), ValueError, "hidden size mismatch"),
        (lambda c: dict(hidden=c.hidden.double()), TypeError, "student_hidden"),
        (lambda c: dict(weight=c.weight.half()), TypeError, "weight"),
        (lambda c: dict(weight=c.weight[0]), ValueError, "weight"),
        (lambda c: dict(weight=c.weight[:0]), ValueError, "weight"),
        (lambda c: dict(weight=c.weight.to("meta")), ValueError, "weight"),
        (lambda c: dict(teacher_hidden=c.teacher[:, :-1]), ValueError, "teacher_hidden"),
        (lambda c: dict(teacher_hidden=None), ValueError, "teacher_logprobs"),
        (lambda c: dict(teacher_logprobs=torch.zeros(c.tokens.shape)), ValueError, "teacher_logprobs"),
        (lambda c: dict(bias=c.bias[:-1]), ValueError, "bias"),
        (lambda c: dict(bias=c.bias.long()), TypeError, "bias"),
        (lambda c: dict(chunk_size=0), ValueError, "chunk_size"),
        (lambda c: dict(tokens=c.tokens[:, :-1]), ValueError, "tokens"),
        (lambda c: dict(advantages=c.advantages[:-1]), ValueError, "advantages"),
        (lambda c: dict(loss_agg="mean"), ValueError, "loss_agg"),
    ],
)
def test_argument_errors_name_the_argument(change, error, name, device):
    case = make_linear_case(device, mask="none", ratio=None)
    args = dict(hidden=case.hidden, weight=case.weight, tokens=case.tokens, advantages=case.advantages)
    kwargs = {"teacher_hidden": case.teacher, "bias": case.bias, **case.kwargs}
    for key, value in change(case).items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(error, match=name):
        rlsd_kernels.rlsd_linear_loss(*args.values(), **kwargs)


def test_token_logprobs_linear_errors(device):
    case = make_linear_case(device)
    with pytest.raises(ValueError, match="hidden size mismatch: hidden"):
        rlsd_kernels.token_logprobs_linear(case.hidden[..., :-1], case.weight, case.tokens)
    with pytest.raises(ValueError, match="tokens"):
        rlsd_kernels.token_logprobs_linear(case.hidden, case.weight, case.tokens[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        rlsd_kernels.token_logprobs_linear(case.hidden, case.weight, case.tokens, temperature=0.0)


@pytest.mark.parametrize("bad_id", [37, -1])
def test_token_ids_out_of_range(bad_id, device, backend):
    case = make_linear_case(device, mask="none", ratio=None)
    case.tokens[1, 3] = bad_id
    with pytest.raises(ValueError, match=r"tokens: 1 token ids outside \[0, 37\).*id " + str(bad_id)):
        case.call()
    mask = torch.ones_like(case.tokens, dtype=torch.bool)
    mask[1, 3] = False
    assert torch.isfinite(case.call(mask=mask))
    with pytest.raises(ValueError, match="tokens"):
        rlsd_kernels.token_logprobs_linear(case.hidden, case.weight, case.tokens)


@pytest.mark.parametrize("which", ["student_hidden", "teacher_hidden"])
def test_non_finite_hidden_states_are_reported(which, device, backend):
    case = make_linear_case(device, mask="none", ratio=None)
    x = case.hidden.clone() if which == "student_hidden" else case.teacher.clone()
    x[1, 1, 5] = float("nan")
    replace = {"hidden": x} if which == "student_hidden" else {"teacher_hidden": x}
    with pytest.raises(ValueError, match=f"logits of {which} @ weight.T: 1 unmasked rows hold NaN"):
        case.call(**replace)
    mask = torch.ones_like(case.tokens, dtype=torch.bool)
    mask[1, 1] = False
    # A masked row does not count, and gives no NaN to any gradient.
    hidden, weight, bias = (y.detach().requires_grad_() for y in (replace.pop("hidden", case.hidden), case.weight,
                                                                     case.bias))
    loss = case.call(hidden, weight, bias, mask=mask, **replace)
    loss.backward()
    assert torch.isfinite(loss)
    for g in (hidden.grad, weight.grad, bias.grad):
        assert torch.isfinite(g).all()
    assert (hidden.grad[1, 1] == 0).all()




def _gpu_inputs(n, hidden_size, vocab, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, hidden_size, device="cuda", generator=g).bfloat16()
    teacher = (hidden.float() + 0.5 * torch.randn(n, hidden_size, device="cuda", generator=g)).bfloat16()
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=g) * 2 / math.sqrt(hidden_size)).bfloat16()
    tokens = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    adv = torch.randn(n, device="cuda", generator=g)
    mask = torch.rand(n, device="cuda", generator=g) > 0.1
    return hidden, teacher, weight, tokens, adv, mask


def _reference_in_chunks(hidden, teacher, weight, tokens, adv, mask, old, vocab_rows, rows=256):
    """Float64 token-mean loss, dH and the dW rows ``vocab_rows``, chunk by chunk (the loss is a sum)."""
    w64 = weight.double()
    normalizer = mask.sum().double()
    loss, d_hidden, d_weight = 0.0, torch.empty_like(hidden, dtype=torch.float64), 0.0
    for s in range(0, hidden.shape[0], rows):
        sl = slice(s, s + rows)
        z = (hidden[sl].double() @ w64.T).requires_grad_()
        part = reference.rlsd_loss(z, teacher[sl].double() @ w64.T, tokens[sl], adv[sl].double(),
                                   old_logprobs=old[sl].double(), mask=mask[sl], loss_agg="sum") / normalizer
        part.backward()
        loss = loss + part.detach()
        d_hidden[sl] = z.grad @ w64
        d_weight = d_weight + z.grad[:, vocab_rows].T @ hidden[sl].double()
    return loss, d_hidden, d_weight


@pytest.mark.gpu
def test_qwen_size_against_reference():
    n, hidden_size, vocab = 4096, 4096, 151936
    hidden, teacher, weight, tokens, adv, mask = _gpu_inputs(n, hidden_size, vocab)
    # Advantages of one sign: a mean of terms of both signs may cancel far below its float32 error.
    adv = adv.abs()
    old = rlsd_kernels.token_logprobs_linear(hidden, weight, tokens) + 0.05 * torch.randn(n, device="cuda")
    vocab_rows = torch.cat([tokens[:64], torch.arange(0, vocab, 4099, device="cuda")])
    ref_loss, ref_dh, ref_dw = _reference_in_chunks(hidden, teacher, weight, tokens, adv, mask, old, vocab_rows)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = rlsd_kernels.rlsd_linear_loss(h, w, tokens, adv, teacher_hidden=teacher, old_logprobs=old, mask=mask)
    (2.5 * loss).backward()
    assert_close(loss, ref_loss, what="loss", **MATMUL_FP32)
    rows = torch.arange(0, n, 37, device="cuda")
    assert_grad_close(h.grad[rows], 2.5 * ref_dh[rows], torch.bfloat16, what="dhidden")
    assert_grad_close(w.grad[vocab_rows], 2.5 * ref_dw, torch.bfloat16, what="dweight")
    # dW accumulates in bf16 across 16 chunks: its overall error stays near bf16 rounding.
    err = (w.grad[vocab_rows].double() - 2.5 * ref_dw).norm() / ref_dw.norm() / 2.5
    assert err < GRAD[torch.bfloat16]["rtol"], f"relative error of dW {float(err):.2e}"


@pytest.mark.gpu
def test_qwen_size_per_token_losses_and_logprobs():
    n, hidden_size, vocab = 4096, 4096, 151936
    hidden, teacher, weight, tokens, adv, mask = _gpu_inputs(n, hidden_size, vocab, seed=1)
    lp_t = rlsd_kernels.token_logprobs_linear(teacher, weight, tokens)
    rows = torch.arange(0, n, 211, device="cuda")
    w64 = weight.double()
    with torch.no_grad():
        ref_lp_t = reference.token_logprobs(teacher[rows].double() @ w64.T, tokens[rows])
    assert_close(lp_t[rows], ref_lp_t, what="teacher lp", **MATMUL_FP32)
    h = hidden.clone().requires_grad_()
    loss = rlsd_kernels.rlsd_linear_loss(h, weight, tokens, adv, teacher_logprobs=lp_t, mask=mask, loss_agg="none",
                                         chunk_size=200)
    upstream = torch.randn(n, device="cuda")
    (loss * upstream).sum().backward()
    h64 = hidden[rows].double().requires_grad_()
    ref = reference.rlsd_loss(h64 @ w64.T, None, tokens[rows], adv[rows].double(), teacher_logprobs=lp_t[rows].double(),
                              mask=mask[rows], loss_agg="none")
    (ref * upstream[rows].double()).sum().backward()
    assert_close(loss[rows], ref, what="per-token loss", **MATMUL_FP32)
    assert_grad_close(h.grad[rows], h64.grad, torch.bfloat16, what="dhidden")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 8192])
def test_peak_memory(n):
    """Extra memory of forward + backward: the returned dW and dH, the chunk buffers, nothing of [N, V]."""
    hidden_size, vocab = 4096, 151936
    hidden, teacher, weight, tokens, adv, mask = _gpu_inputs(n, hidden_size, vocab, seed=2)
    hidden.requires_grad_()
    weight.requires_grad_()

    def step():
        loss = rlsd_kernels.rlsd_linear_loss(hidden, weight, tokens, adv, teacher_hidden=teacher, mask=mask)
        return torch.autograd.grad(loss, (hidden, weight))

    step()  # tunes the row kernels and creates the matmul workspaces
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert all(torch.isfinite(g).all() for g in grads)
    chunk = default_chunk_size(vocab, hidden.device, weight.dtype)
    returned = 2 * vocab * hidden_size + 2 * n * hidden_size
    buffers = 4 * chunk * vocab
    assert extra <= returned + buffers + (32 << 20), f"peak extra {extra / 1e9:.3f} GB"
    if n == 8192:
        assert extra <= 1.5e9, f"peak extra {extra / 1e9:.3f} GB"
