"""Adversarial inputs for the vocabulary-parallel forms (``process_group=``), against the float64
reference on the whole vocabulary, in one 2-rank gloo run through both backends (the Triton kernels
under the interpreter, then the PyTorch path).

Families, each with rows of several kinds in one call:

- the precision band: rows whose maximum lies ``d`` (logits / tau, up to 87) above their shard's
  first block, in either shard, or far above in the other shard, and logits near ``1e4``: log-probs,
  entropies and divergences within README's bound (twice float32's error, plus ``d * 2**-22`` on the
  Triton path, relative for the divergences);
- ``-inf`` filling one shard for some rows (either shard), or the whole of one shard (padding);
- NaN or ``+inf`` in one shard only: with ``validate=True`` every rank raises naming the argument,
  with ``validate=False`` that token's values are non-finite and every other row's gradient is exact;
- tokens on both sides of the shard boundary, ``-100``, ids outside ``[0, V)`` and all rows masked;
- strided views (a Megatron ``[S, B, V_r]`` shard through ``transpose(0, 1)``, the column slice of
  the whole logits), half precision, temperatures and every ``loss_agg``.

The interpreter is slow: its cases are the few that reach each kernel branch; the PyTorch path takes
the rest. Spawning is slow too, so everything runs in one spawned run.
"""

import torch
import torch.distributed as dist
from mp_harness import finish_rank, spawn, start_rank
from tolerances import FP32, GRAD, MEAN_ABS, assert_close

VOCAB = 40
SPLIT = (19, 21)
BLOCK = 16  # forced: a shard of 19 or 21 ids has a first block and a partial second one
B, T = 2, 5
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "sum", "none")
# The precision band's rows: a wider vocabulary, so that each shard has blocks after its first.
BAND_VOCAB = 100
BAND_SPLIT = (48, 52)
# Where a band row's maximum lies: a later block of shard 0, of shard 1, or the other shard's first
# block far above shard 0 (3 d).
BAND_SPOTS = {"shard 0": 2 * BLOCK + 1, "shard 1": 48 + 2 * BLOCK + 1, "far in shard 1": 60}


def test_sharded_adversarial_inputs(tmp_path):
    spawn(_worker, 2, tmp_path)


def _worker(rank, world, init):
    start_rank(rank, world, init)
    import warnings

    from rlsd_kernels.launch import common as _utils
    from rlsd_kernels.launch.tuning import RowConfig, force_row_config

    # A strided vocabulary dimension is copied with a warning; the checks here are about values.
    warnings.simplefilter("ignore")
    failures = []
    with force_row_config(RowConfig(BLOCK, 1)):
        for backend in ("triton", "torch"):
            with _utils.backend(backend):
                probe = Probe(rank, backend, failures)
                for family in (probe.precision_band, probe.padding, probe.non_finite, probe.token_ids,
                               probe.layouts):
                    family()
    finish_rank()
    assert not failures, "\n".join(failures)


def _inputs(seed, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T + 1, vocab, generator=g) * 2
    teacher = student + torch.randn(B, T + 1, vocab, generator=g)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    # Both sides of the shard boundary and both ends of the vocabulary.
    tokens[0] = torch.tensor([SPLIT[0] - 1, SPLIT[0], 0, vocab - 1, 5])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4] = False
    return student, teacher, tokens, torch.tensor([0.7, -1.2]), mask


def _terms(op, student, teacher, args, kw):
    """The per-token terms a scalar loss aggregates (``harness.assert_sum_close`` scales by them)."""
    from rlsd_kernels import reference

    with torch.no_grad():
        return getattr(reference, op)(student, teacher, *args, **dict(kw, loss_agg="none", return_metrics=False))


def _double(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


class Probe:
    """One rank's checks; a failed comparison is recorded (the run goes on, so that every rank makes
    the same collectives) and fails the test at the end."""

    def __init__(self, rank, backend, failures):
        self.rank, self.backend, self.failures = rank, backend, failures
        self.interpreted = backend == "triton"
        self.group = dist.group.WORLD

    def record(self, what, check):
        try:
            check()
        except AssertionError as error:
            self.failures.append(f"[{self.backend}, rank {self.rank}] {what}: {error}")

    def columns(self, split):
        lo = sum(split[: self.rank])
        return slice(lo, lo + split[self.rank])

    def shard(self, x, split=SPLIT):
        return None if x is None else x[..., self.columns(split)]

    # -- the comparison against the reference ------------------------------------------------------

    def check(self, what, op, student, teacher, tokens, adv=None, mask=None, **kw):
        """``op`` (a loss of ``rlsd_kernels`` and ``reference``, or ``"token_logprobs"``) on this
        rank's shard of ``[B, T + 1, V]`` logits against the float64 reference on the whole
        vocabulary: per-token values (or the scalar, within the float32 rounding of its terms), metrics
        and this rank's columns of the gradient (an uneven upstream for per-token outputs)."""
        import rlsd_kernels
        from rlsd_kernels import reference

        agg = kw.get("loss_agg", "token-mean")
        per_token = op == "token_logprobs" or agg == "none"
        upstream = torch.linspace(-1.0, 2.0, B * T, dtype=torch.float64).view(B, T) if per_token else 1.7
        args = (tokens,) if adv is None else (tokens, adv)
        ref_args = tuple(_double(a) for a in args)
        full = student.double().requires_grad_()
        ref_teacher = None if teacher is None else teacher[:, :-1].double()
        part = self.shard(student).clone().requires_grad_()
        if op == "token_logprobs":
            expected, metrics = reference.token_logprobs(full[:, :-1], tokens, **kw), {}
            got, s_metrics = rlsd_kernels.token_logprobs(part[:, :-1], tokens, process_group=self.group, **kw), {}
        else:
            kw = dict(mask=mask, return_metrics=True, **kw)
            expected, metrics = getattr(reference, op)(full[:, :-1], ref_teacher, *ref_args, **kw)
            got, s_metrics = getattr(rlsd_kernels, op)(part[:, :-1], self.shard(teacher)[:, :-1], *args,
                                                       process_group=self.group, **kw)
        (expected * upstream).sum().backward()
        (got * upstream).sum().backward()
        if per_token:
            self.record(f"{what} loss", lambda: assert_close(got, expected, what="loss", **FP32))
        else:
            from harness import assert_sum_close  # it imports the library: after start_rank

            terms = _terms(op, full[:, :-1], ref_teacher, ref_args, kw)
            self.record(f"{what} loss", lambda: assert_sum_close(got, expected, terms, agg))
        self.record(f"{what} metrics", lambda: self.same_metrics(s_metrics, metrics))
        self.record(f"{what} grad", lambda: assert_close(part.grad, self.shard(full.grad), what="grad",
                                                          **GRAD[student.dtype]))

    @staticmethod
    def same_metrics(got, expected):
        assert got.keys() == expected.keys(), f"metrics {sorted(got)} != {sorted(expected)}"
        for key, value in expected.items():
            # Masked means of values of both signs (delta): an absolute float32 rounding.
            torch.testing.assert_close(got[key].double(), value.double(), msg=lambda m, k=key: f"{k}: {m}",
                                       **MEAN_ABS)

    # -- the families ---------------------------------------------------------------------------------

    def precision_band(self):
        """Rows whose maximum lies ``d`` above their shard's first block (short of the ~88 that sends a
        row to the exact pass), or far above in the other shard, and the same rows near ``1e4``:
        log-probs and entropies within twice float32's error plus ``d * 2**-22`` (README, Precision;
        the extra only on the Triton path), the divergences within the same relative to their value."""
        cases = [(87.0, 0.7, 1e4), (20.0, 1.0, 0.0)] if self.interpreted else \
            [(87.0, 1.0, 0.0), (60.0, 0.7, 0.0), (20.0, 1.0, 1e4), (87.0, 0.7, -1e4)]
        for distance, temperature, offset in cases:
            student, teacher, tokens, rows = self.band_rows(distance, temperature, offset)
            band = distance * 2.0**-22 if self.interpreted else 0.0
            what = f"band d={distance} tau={temperature} offset={offset}"
            self.band_logprobs(what, student, tokens, rows, temperature, band)
            for divergence in ("forward_kl", "reverse_kl", "jsd"):
                self.band_divergence(f"{what} {divergence}", student, teacher, tokens, rows, temperature, band,
                                     divergence)

    @staticmethod
    def band_rows(distance, temperature, offset):
        """``(student, teacher, tokens, rows)``: 4 rows per ``BAND_SPOTS`` entry (``rows`` names their
        slices), float32 with float64 values; half of each kind's tokens on its maximum."""
        g = torch.Generator().manual_seed(11)
        per = 4
        n = per * len(BAND_SPOTS)
        student = torch.randn(n, BAND_VOCAB, generator=g).double() * 3
        teacher = torch.randn(n, BAND_VOCAB, generator=g).double() * 3
        tokens = torch.randint(0, BAND_VOCAB, (n,), generator=g)
        rows = {}
        for i, (name, spot) in enumerate(BAND_SPOTS.items()):
            sl = slice(i * per, (i + 1) * per)
            rise = distance * temperature * (3.0 if name.startswith("far") else 1.0)
            student[sl, spot:spot + 3] += rise
            teacher[sl, spot + 1:spot + 4] += rise
            tokens[i * per:i * per + per // 2] = spot + 1
            rows[name] = sl
        return (student + offset).float(), (teacher + offset).float(), tokens, rows

    def band_logprobs(self, what, student, tokens, rows, temperature, band):
        import rlsd_kernels
        from rlsd_kernels import reference

        lp, entropy = rlsd_kernels.token_logprobs(self.shard(student, BAND_SPLIT), tokens, temperature=temperature,
                                                  return_entropy=True, process_group=self.group)
        exact = reference.token_logprobs(student.double(), tokens, temperature=temperature, return_entropy=True)
        f32 = reference.token_logprobs(student, tokens, temperature=temperature, return_entropy=True)
        for name, got, e, f in zip(("log-prob", "entropy"), (lp, entropy), exact, f32, strict=True):
            for kind, sl in rows.items():
                self.record(f"{what} {name} ({kind})", lambda g=got[sl], e=e[sl], f=f[sl]: self.within_band(
                    g, e, f, band))

    def band_divergence(self, what, student, teacher, tokens, rows, temperature, band, divergence):
        import rlsd_kernels
        from rlsd_kernels import reference

        got = rlsd_kernels.opsd_loss(self.shard(student, BAND_SPLIT), self.shard(teacher, BAND_SPLIT), tokens,
                                     divergence=divergence, temperature=temperature, loss_agg="none",
                                     process_group=self.group)
        exact, f32 = (reference.opsd_loss(s, t, tokens, divergence=divergence, temperature=temperature,
                                          loss_agg="none")
                      for s, t in ((student.double(), teacher.double()), (student, teacher)))
        for kind, sl in rows.items():
            self.record(f"{what} ({kind})", lambda g=got[sl], e=exact[sl], f=f32[sl]: self.within_band(
                g, e, f, band * e.abs().max().clamp(min=1.0).item()))

    @staticmethod
    def within_band(got, exact, f32, band):
        """README's bound: twice float32's error on these rows, a few float32 ulps, and ``band``."""
        bound = 2 * (f32.double() - exact).abs().max().item() + 4e-7 * exact.abs().max().item() + 1e-6 + band
        error = (got.double() - exact).abs().max().item()
        assert error <= bound, f"error {error:.2e} > bound {bound:.2e}"

    def padding(self):
        """``-inf`` filling shard 1 for some rows and shard 0 for others, in both models (the entropy
        term and metrics too), and the whole of shard 1 for every row (a padded vocabulary)."""
        student, teacher, tokens, adv, mask = _inputs(1)
        cut = SPLIT[0]
        student[0, 1:3, cut:] = teacher[0, 1:3, cut:] = float("-inf")
        student[1, :2, :cut] = teacher[1, :2, :cut] = float("-inf")
        # The student alone loses part of shard 1 on one row, and the whole of it on another: finite
        # reverse KLs, infinite forward ones.
        student[1, 2, cut + 6:] = float("-inf")
        student[1, 3, cut:] = float("-inf")
        tokens[0, 1:3] = torch.tensor([cut - 1, 3])
        tokens[1, :4] = torch.tensor([cut, VOCAB - 10, cut + 1, 7])
        cases = [("rlsd_loss", None, dict(entropy_coef=0.1, loss_agg="none")),
                 ("grpo_opsd_loss", None, dict(divergence="jsd", entropy_coef=0.1, temperature=0.8)),
                 ("opsd_loss", False, dict(divergence="reverse_kl", loss_agg="none")),
                 ("opsd_loss", False, dict(divergence="forward_kl", token_clip=5.0)),
                 ("token_logprobs", False, dict(return_entropy=False))]
        if self.interpreted:
            cases = cases[:2]
        for op, with_adv, kw in cases:
            self.check(f"shard of -inf on some rows: {op} {kw}", op, student, teacher,
                       torch.where(mask, tokens, -100) if op == "token_logprobs" else tokens,
                       adv if with_adv is None else None, mask, **kw)
        if self.interpreted:
            return
        student, teacher, tokens, adv, mask = _inputs(2)
        student[..., SPLIT[0]:] = teacher[..., SPLIT[0]:] = float("-inf")
        tokens = tokens % SPLIT[0]
        for op, with_adv, kw in cases:
            self.check(f"padded shard 1: {op} {kw}", op, student, teacher,
                       torch.where(mask, tokens, -100) if op == "token_logprobs" else tokens,
                       adv if with_adv is None else None, mask, **kw)
        # Entropy log-probs with a gradient through both outputs, on a padded shard.
        self.entropy_outputs(student, torch.where(mask, tokens, -100))

    def entropy_outputs(self, student, tokens):
        import rlsd_kernels
        from rlsd_kernels import reference

        full = student.double().requires_grad_()
        part = self.shard(student).clone().requires_grad_()
        ups = torch.linspace(-1.0, 1.0, B * T).view(B, T), torch.linspace(2.0, 0.5, B * T).view(B, T)
        expected = reference.token_logprobs(full[:, :-1], tokens, return_entropy=True)
        got = rlsd_kernels.token_logprobs(part[:, :-1], tokens, return_entropy=True, process_group=self.group)
        sum(((e * u.double()).sum() for e, u in zip(expected, ups, strict=True))).backward()
        sum(((g * u).sum() for g, u in zip(got, ups, strict=True))).backward()
        for name, g, e in zip(("log-prob", "entropy"), got, expected, strict=True):
            self.record(f"padded shard 1: token_logprobs {name}", lambda g=g, e=e: assert_close(g, e, **FP32))
        self.record("padded shard 1: token_logprobs grad",
                    lambda: assert_close(part.grad, self.shard(full.grad), **GRAD[torch.float32]))

    def non_finite(self):
        """NaN or ``+inf`` in shard 1 only, at an unmasked row (and in a masked row, which is not
        read): ``validate=True`` raises on every rank naming the argument; ``validate=False`` gives
        that token a non-finite value, a non-finite scalar, and every other row its exact gradient."""
        student, teacher, tokens, adv, mask = _inputs(3)
        ops = {"rlsd_loss": {}, "grpo_opsd_loss": dict(divergence="forward_kl"), "opsd_loss": dict(divergence="jsd"),
               "token_logprobs": {}}
        bads = (float("nan"),) if self.interpreted else (float("nan"), float("inf"))
        for bad in bads:
            for who in ("student", "teacher"):
                for op, kw in ops.items():
                    if op == "token_logprobs" and who == "teacher":
                        continue
                    if self.interpreted and (op, who) not in (("rlsd_loss", "teacher"), ("grpo_opsd_loss", "student")):
                        continue
                    s, t = student.clone(), teacher.clone()
                    (s if who == "student" else t)[0, 2, VOCAB - 5] = bad
                    (s if who == "student" else t)[1, 4, VOCAB - 7] = bad  # masked
                    self.non_finite_case(f"{bad} in {who} shard 1, {op}", op, kw, s, t, student, teacher, tokens,
                                         adv, mask, "logits" if op == "token_logprobs" else f"{who}_logits")

    def non_finite_case(self, what, op, kw, s, t, student, teacher, tokens, adv, mask, name):
        import pytest

        import rlsd_kernels
        from rlsd_kernels import reference

        if op == "token_logprobs":
            tokens = torch.where(mask, tokens, -100)

        def call(logits, validate, agg):
            if op == "token_logprobs":
                return rlsd_kernels.token_logprobs(logits, tokens, process_group=self.group, validate=validate)
            args = (tokens, adv) if op != "opsd_loss" else (tokens,)
            return getattr(rlsd_kernels, op)(logits, self.shard(t)[:, :-1], *args, mask=mask, loss_agg=agg,
                                             validate=validate, process_group=self.group, **kw)

        with pytest.raises(ValueError, match=f"{name}: 1 unmasked rows hold NaN"):
            call(self.shard(s)[:, :-1], True, "token-mean")
        if op != "token_logprobs":
            self.record(f"{what}: the scalar", lambda: self.non_finite_scalar(call(self.shard(s)[:, :-1], False,
                                                                                   "token-mean")))
        part = self.shard(s).clone().requires_grad_()
        per_token = call(part[:, :-1], False, "none")
        upstream = torch.linspace(-1.0, 2.0, B * T).view(B, T)
        (per_token.nan_to_num(0.0, 0.0, 0.0) * upstream).sum().backward()
        full = student.double().requires_grad_()
        args = (tokens,) if op in ("token_logprobs", "opsd_loss") else (tokens, adv.double())
        extra = {} if op == "token_logprobs" else dict(mask=mask, loss_agg="none", **kw)
        if op == "token_logprobs":
            expected = reference.token_logprobs(full[:, :-1], tokens)
        else:
            expected = getattr(reference, op)(full[:, :-1], teacher[:, :-1].double(), *args, **extra)
        (expected * upstream.double()).sum().backward()
        rest = torch.ones(B, T, dtype=torch.bool)
        rest[0, 2] = False
        self.record(f"{what}: the token", lambda: self.non_finite_token(per_token[0, 2]))
        self.record(f"{what}: the other tokens", lambda: assert_close(per_token[rest], expected[rest], **FP32))
        self.record(f"{what}: the other rows' gradient", lambda: assert_close(
            part.grad[:, :-1][rest], self.shard(full.grad)[:, :-1][rest], **GRAD[torch.float32]))

    @staticmethod
    def non_finite_scalar(value):
        assert not torch.isfinite(value), f"a finite loss {value.item()} from non-finite logits"

    @staticmethod
    def non_finite_token(value):
        assert not torch.isfinite(value), f"a finite value {value.item()} at the non-finite row"

    def token_ids(self):
        """Ids on both sides of the boundary (every case), ``-100``, ids outside ``[0, V)``
        (``validate=True`` raises on every rank; ``validate=False``: log-prob -inf, the policy term
        ``-A`` with no gradient), and a batch with every row masked (loss 0, gradient 0)."""
        import pytest

        import rlsd_kernels

        student, teacher, tokens, adv, mask = _inputs(4)
        ignored = tokens.clone()
        ignored[1, :3] = -100
        if not self.interpreted:
            self.check("-100 ids: grpo_opsd_loss sampled_token", "grpo_opsd_loss", student, teacher, ignored, adv,
                       mask, divergence="sampled_token")
            self.check("-100 ids: token_logprobs", "token_logprobs", student, None, ignored)
        none = torch.zeros_like(mask)
        self.check("all masked: rlsd_loss", "rlsd_loss", student, teacher, tokens, adv, none)
        if not self.interpreted:
            self.check("all masked: opsd_loss", "opsd_loss", student, teacher, tokens, None, none.float(),
                       divergence="reverse_kl", loss_agg="seq-mean-token-mean")
        outside = tokens.clone()
        outside[0, 1], outside[0, 3], outside[1, 0] = VOCAB, -7, VOCAB + 100
        with pytest.raises(ValueError, match=rf"tokens: 3 token ids outside \[0, {VOCAB}\)"):
            rlsd_kernels.rlsd_loss(self.shard(student)[:, :-1], self.shard(teacher)[:, :-1], outside, adv,
                                   process_group=self.group)
        lp = rlsd_kernels.token_logprobs(self.shard(student)[:, :-1], outside, process_group=self.group,
                                         validate=False)
        at = (torch.tensor([0, 0, 1]), torch.tensor([1, 3, 0]))
        self.record("ids outside: log-probs", lambda: self.equal(lp[at], torch.full((3,), float("-inf"))))
        part = self.shard(student).clone().requires_grad_()
        loss = rlsd_kernels.rlsd_loss(part[:, :-1], self.shard(teacher)[:, :-1], outside, adv, loss_agg="none",
                                      process_group=self.group, validate=False)
        (loss * torch.linspace(1.0, 2.0, B * T).view(B, T)).sum().backward()
        self.record("ids outside: policy term", lambda: self.equal(loss[at], -adv[at[0]]))
        self.record("ids outside: gradient", lambda: self.equal(part.grad[:, :-1][at], torch.zeros(3, part.shape[-1])))

    @staticmethod
    def equal(got, expected):
        assert torch.equal(got, expected), f"{got} != {expected}"

    def layouts(self):
        """A Megatron sequence-first shard (``transpose(0, 1)``), the column slice of the whole
        logits (rows strided by the whole vocabulary), half precision, temperatures and every
        ``loss_agg``."""
        student, teacher, tokens, adv, mask = _inputs(5)
        aggs = ("none",) if self.interpreted else LOSS_AGGS
        for agg in aggs:
            self.check(f"rlsd_loss {agg}", "rlsd_loss", student, teacher, tokens, adv, mask, loss_agg=agg,
                       temperature=0.7)
            if not self.interpreted:
                self.check(f"grpo_opsd_loss jsd {agg}", "grpo_opsd_loss", student, teacher, tokens, adv, mask,
                           loss_agg=agg, temperature=1.3, lam=0.5)
        for dtype in (torch.float16, torch.bfloat16)[: 1 if self.interpreted else 2]:
            half_s, half_t = student.to(dtype), teacher.to(dtype)
            self.check(f"{dtype} opsd_loss reverse_kl", "opsd_loss", half_s, half_t, tokens, None, mask,
                       divergence="reverse_kl", temperature=0.9)
            if not self.interpreted:
                self.check(f"{dtype} student, float32 teacher: rlsd_loss", "rlsd_loss", half_s, teacher, tokens, adv,
                           mask)
        self.strided(student, teacher, tokens, adv, mask)

    def strided(self, student, teacher, tokens, adv, mask):
        """The shard as Megatron leaves it, ``[S, B, V_r]`` passed as ``transpose(0, 1)``, and as a
        column slice of the whole logits that requires grad, both read in place."""
        import rlsd_kernels
        from rlsd_kernels import reference

        seq_first = student.transpose(0, 1).contiguous().requires_grad_()
        t_first = teacher.transpose(0, 1).contiguous()
        full = student.double().requires_grad_()
        expected = reference.rlsd_loss(full[:, :-1], teacher[:, :-1].double(), tokens, adv.double(), mask=mask)
        expected.backward()
        part = self.shard(seq_first).detach().clone().requires_grad_()
        got = rlsd_kernels.rlsd_loss(part.transpose(0, 1)[:, :-1], self.shard(t_first).transpose(0, 1)[:, :-1],
                                     tokens, adv, mask=mask, process_group=self.group)
        got.backward()
        self.record("sequence-first loss", lambda: assert_close(got, expected, **FP32))
        self.record("sequence-first grad", lambda: assert_close(part.grad.transpose(0, 1), self.shard(full.grad),
                                                                **GRAD[torch.float32]))
        whole = student.clone().requires_grad_()
        full.grad = None
        expected = reference.opsd_loss(full[:, :-1], teacher[:, :-1].double(), tokens, mask=mask, loss_agg="sum")
        expected.backward()
        got = rlsd_kernels.opsd_loss(self.shard(whole)[:, :-1], self.shard(teacher)[:, :-1], tokens, mask=mask,
                                     loss_agg="sum", process_group=self.group)
        got.backward()
        self.record("column slice loss", lambda: assert_close(got, expected, **FP32))
        self.record("column slice grad", lambda: assert_close(self.shard(whole.grad), self.shard(full.grad),
                                                              **GRAD[torch.float32]))
        others = torch.ones(VOCAB, dtype=torch.bool)
        others[self.columns(SPLIT)] = False
        self.record("column slice: other columns untouched", lambda: self.equal(
            whole.grad[..., others], torch.zeros_like(whole.grad[..., others])))
