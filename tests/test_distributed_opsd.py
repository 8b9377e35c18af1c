"""``opsd_loss`` and ``grpo_opsd_loss`` with ``process_group=`` against the unsharded ops, in real
multi-process runs: gloo on CPU, 2 and 4 ranks, both backends (the Triton kernels under the
interpreter, on a few cases).

Every spawned rank builds the whole inputs from one seed and takes its contiguous slice of a 37-id
vocabulary (uneven sizes, tokens in every shard). For each divergence (the KLs, the JSD with beta
0.5 and its endpoints 0 and 1, the sampled token) it checks that the loss and metrics equal the
unsharded loss's float64 reference (the oracle ``test_opsd`` holds the unsharded kernels to, with the
same tolerances) and are bit for bit the same on every rank, and that the gradient is the slice of
the unsharded one: with a fully masked sequence, several ``loss_agg``
modes, ``token_clip`` binding on half the tokens, in-place gradients, a padded vocabulary (a whole
shard of -inf logits with 4 ranks) and the policy term; that bad input raises on every rank alike;
and how many collectives a forward and a backward issue. All checks run in one spawned run per
group size (spawning is slow).
"""


import pytest
import torch
import torch.distributed as dist
from mp_harness import finish_rank, spawn, start_rank
from test_distributed import GATHER, Counter
from tolerances import FP32, GRAD, assert_close

VOCAB = 37
SPLITS = {2: (17, 20), 4: (5, 9, 11, 12)}
BLOCK = 16  # forced, so that shards of 5..20 ids hit the block edges
# (divergence, beta): the JSD's endpoints are the two KLs.
DIVERGENCES = (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0),
               ("sampled_token", 0.5))
AGGS = ("token-mean", "none", "seq-mean-token-sum", "sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# Columns from PAD on are -inf in both models: with 4 ranks the whole last shard.
PAD = 25


@pytest.mark.parametrize("world", sorted(SPLITS))
def test_sharded_opsd_equals_unsharded_and_counts_collectives(world, tmp_path):
    spawn(_worker, world, tmp_path)


def _worker(rank, world, init):
    start_rank(rank, world, init)
    from rlsd_kernels.launch import common as _utils
    from rlsd_kernels.launch.tuning import RowConfig, force_row_config

    run = Run(rank, world, dist.group.WORLD, SPLITS[world])
    with force_row_config(RowConfig(BLOCK, 1)):
        run.count_collectives()
        with _utils.backend("torch"):
            run.divergences()
            run.token_clip()
            run.padded_vocabulary()
            run.bad_input()
            run.no_grad_and_backward_twice()
        with _utils.backend("triton"):
            run.interpreted()
    finish_rank()


class Run:
    """One rank's inputs and checks."""

    def __init__(self, rank, world, group, split):
        self.rank, self.world, self.group = rank, world, group
        self.lo = sum(split[:rank])
        self.hi = self.lo + split[rank]
        g = torch.Generator().manual_seed(4321)
        b, t = 3, 4
        self.tokens = torch.randint(0, VOCAB, (b, t), generator=g)
        # Tokens in every shard of both splits and on both sides of the 2-rank boundary, unmasked.
        self.tokens[1] = torch.tensor([1, 8, 20, 30])
        self.tokens[2, :2] = torch.tensor([16, 17])
        m = torch.rand(b, t, generator=g) > 0.25
        # A fully masked sequence; its ids are out of range on purpose.
        m[0] = False
        self.tokens[0] = VOCAB + 5
        m[1], m[2, :2] = True, True
        self.mask = m
        self.adv = torch.randn(b, generator=g)
        self.student = torch.randn(b, t + 1, VOCAB, generator=g) * 2
        self.teacher = torch.randn(b, t + 1, VOCAB, generator=g) * 2
        self.old = torch.randn(b, t, generator=g) * 0.05 - 3.0
        self.upstream = torch.randn(b, t, generator=g)

    def shard(self, x):
        return x[..., self.lo:self.hi]

    def same_on_every_rank(self, values, what):
        """Bit for bit: every rank's ``values`` equal rank 0's."""
        mine = torch.stack([v.detach().float().reshape(()) for v in values])
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        for other in every:
            assert torch.equal(other.view(torch.int32), mine.view(torch.int32)), f"{what}: ranks differ"

    def check(self, what, grpo=False, student=None, teacher=None, tokens=None, group=None, **kwargs):
        """The sharded op against the float64 reference of the unsharded one (as ``test_opsd`` holds
        the unsharded kernels to it) on the same inputs: loss, metrics and this rank's slice of the
        gradient, with a random upstream gradient for per-token losses."""
        import rlsd_kernels
        from rlsd_kernels import reference

        student = self.student if student is None else student
        teacher = self.teacher if teacher is None else teacher
        tokens = self.tokens if tokens is None else tokens
        op, ref_op = rlsd_kernels.opsd_loss, reference.opsd_loss
        args = (tokens,)
        if grpo:
            op, ref_op = rlsd_kernels.grpo_opsd_loss, reference.grpo_opsd_loss
            args = (tokens, self.adv)
            kwargs.setdefault("old_logprobs", self.old)
        kwargs = dict(mask=self.mask, **kwargs)
        precomputed = kwargs.get("teacher_logprobs") is not None
        inplace = kwargs.pop("inplace_backward", False)
        per_token = kwargs.get("loss_agg") == "none"
        upstream = self.upstream.double() if per_token else torch.tensor(1.7, dtype=torch.float64)

        def double(x):
            return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        full = student.double().requires_grad_()
        ref_args = [double(a) for a in args]
        ref_kwargs = {k: double(v) for k, v in kwargs.items()}
        ref_teacher = None if precomputed else teacher[:, :-1].double()
        loss, metrics = ref_op(full[:, :-1], ref_teacher, *ref_args, return_metrics=True, **ref_kwargs)
        (loss * upstream).sum().backward()

        part = self.shard(student).clone().requires_grad_()
        s_loss, s_metrics = op(part[:, :-1], None if precomputed else self.shard(teacher)[:, :-1], *args,
                               process_group=group or self.group, inplace_backward=inplace, return_metrics=True,
                               **kwargs)
        if per_token:
            assert_close(s_loss, loss, what=f"{what} loss", **FP32)
        else:
            # The scalar sums terms of both signs (policy and divergence, the sampled token's D): its
            # rounding is the terms', so its tolerance is relative to their magnitudes, aggregated alike.
            with torch.no_grad():
                terms = ref_op(full[:, :-1], ref_teacher, *ref_args, **dict(ref_kwargs, loss_agg="none"))
            scale = reference.aggregate_loss(terms.abs(), self.mask.double(), kwargs.get("loss_agg", "token-mean"))
            error = abs(float(s_loss) - float(loss))
            assert error <= FP32["rtol"] * abs(float(loss)) + FP32["atol"] * float(scale), f"{what} loss: {error}"
        assert s_metrics.keys() == metrics.keys()
        for key, value in metrics.items():
            assert_close(s_metrics[key], value, what=f"{what} metrics[{key}]", **FP32)
        self.same_on_every_rank([s_loss.sum(), *s_metrics.values()], what)
        (s_loss * upstream.float()).sum().backward()
        assert_close(part.grad, self.shard(full.grad), what=f"{what} grad", **GRAD[torch.float32])
        if inplace:
            assert torch.equal(part.detach()[:, :-1], part.grad[:, :-1]), f"{what}: not written in place"

    def divergences(self):
        """Every divergence alone and with the policy term, over the aggregation modes, in place or
        not, and the sequence pass and entropy gradient of the policy term."""
        for i, (divergence, beta) in enumerate(DIVERGENCES):
            kw = dict(divergence=divergence, beta=beta)
            self.check(f"opsd {kw} {AGGS[i]}", loss_agg=AGGS[i], inplace_backward=i % 2 == 0,
                       temperature=0.7 if i % 3 == 0 else 1.0, **kw)
            agg = AGGS[(i + 3) % len(AGGS)]
            self.check(f"grpo_opsd {kw} {agg}", grpo=True, loss_agg=agg, alpha=0.7, lam=0.5,
                       inplace_backward=i % 2 == 1, **kw)
        for divergence in ("jsd", "reverse_kl", "sampled_token"):
            self.check(f"grpo_opsd {divergence} sequence ratio, entropy", grpo=True, divergence=divergence,
                       loss_agg="seq-mean-token-mean", ratio_level="sequence", entropy_coef=0.05, kl_coef=0.1,
                       ref_logprobs=self.old + 0.2, temperature=0.8)
        lp_t = self.old - 0.1
        for grpo, agg in ((False, "token-mean"), (True, "none")):
            self.check(f"sampled_token teacher_logprobs grpo={grpo}", grpo=grpo, divergence="sampled_token",
                       teacher_logprobs=lp_t, loss_agg=agg)

    def token_clip(self):
        """A cap halfway between two middle divergences of the unmasked tokens: half of them clipped,
        with a margin far above float32 rounding."""
        from rlsd_kernels import reference

        valid = self.mask
        for divergence, beta in DIVERGENCES[:3] + DIVERGENCES[-1:]:
            s, t = self.student[:, :-1].double(), self.teacher[:, :-1].double()
            if divergence == "sampled_token":
                tokens = self.tokens.clamp(max=VOCAB - 1)
                d = reference.token_logprobs(s, tokens) - reference.token_logprobs(t, tokens)
            else:
                d = reference.opsd_token_divergence(s, t, divergence=divergence, beta=beta)
            ordered = d[valid].sort().values
            clip = float(ordered[len(ordered) // 2 - 1: len(ordered) // 2 + 1].mean())
            kw = dict(divergence=divergence, beta=beta, token_clip=clip)
            self.check(f"opsd token_clip {kw}", **kw)
            self.check(f"grpo_opsd token_clip {kw}", grpo=True, loss_agg="none", **kw)

    def padded_vocabulary(self):
        """-inf logits from ``PAD`` on in both models (a whole shard without mass with 4 ranks), and
        in the student's alone."""
        student, teacher = self.student.clone(), self.teacher.clone()
        student[..., PAD:] = float("-inf")
        teacher[..., PAD:] = float("-inf")
        tokens = torch.where(self.tokens < VOCAB, self.tokens % PAD, self.tokens)
        for divergence, beta in DIVERGENCES[:3] + DIVERGENCES[-1:]:
            kw = dict(divergence=divergence, beta=beta, student=student, teacher=teacher, tokens=tokens)
            self.check(f"opsd padded {divergence}", **kw)
            self.check(f"grpo_opsd padded {divergence}", grpo=True, loss_agg="none", entropy_coef=0.1, **kw)
            # The student alone without mass there: an infinite forward KL, clipped to a constant.
            kw["teacher"] = self.teacher
            self.check(f"opsd student-only padding {divergence}", loss_agg="none", token_clip=5.0, **kw)

    def interpreted(self):
        """The Triton kernels (interpreted) on a few cases: each divergence's statistics kernel, the
        JSD's second sweep, the row gradient, the log-prob path, in place and per token."""
        self.check("triton opsd forward_kl", divergence="forward_kl", inplace_backward=True, temperature=0.7)
        self.check("triton opsd jsd none", divergence="jsd", loss_agg="none")
        self.check("triton grpo_opsd reverse_kl", grpo=True, divergence="reverse_kl", entropy_coef=0.05,
                   loss_agg="seq-mean-token-mean")
        self.check("triton grpo_opsd jsd 0.3 none", grpo=True, divergence="jsd", beta=0.3, loss_agg="none",
                   inplace_backward=True)
        self.check("triton grpo_opsd sampled_token", grpo=True, divergence="sampled_token", lam=0.5)
        # Padding (a whole shard of -inf with 4 ranks) and logits far above their row's first block
        # (the per-lane sums overflow): the exact pass of the statistics kernel, with its KL cross sums.
        student, teacher = self.student.clone(), self.teacher.clone()
        student[..., PAD:] = teacher[..., PAD:] = float("-inf")
        student[1, 2, 20], teacher[1, 2, 20] = 150.0, 147.0
        student[2, 0, 3], teacher[2, 0, 9] = 400.0, 397.0
        tokens = torch.where(self.tokens < VOCAB, self.tokens % PAD, self.tokens)
        for divergence in ("forward_kl", "reverse_kl"):
            self.check(f"triton padded, wide range {divergence}", divergence=divergence, student=student,
                       teacher=teacher, tokens=tokens, loss_agg="none")

    def no_grad_and_backward_twice(self):
        import rlsd_kernels

        part = self.shard(self.student).clone().requires_grad_()
        args = (part[:, :-1], self.shard(self.teacher)[:, :-1], self.tokens)
        with torch.no_grad():
            quiet = rlsd_kernels.opsd_loss(*args, mask=self.mask, process_group=self.group)
        loss = rlsd_kernels.opsd_loss(*args, mask=self.mask, process_group=self.group)
        assert not quiet.requires_grad and torch.equal(quiet, loss.detach())
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="twice"):
            loss.backward()

    def bad_input(self):
        """Every rank raises the same error, whichever rank's shard holds the bad value, and the
        group is still usable afterwards (no rank left waiting in a collective)."""
        import rlsd_kernels

        part, teacher = self.shard(self.student)[:, :-1], self.shard(self.teacher)[:, :-1]
        bad = self.tokens.clone()
        bad[1, 2] = VOCAB
        for divergence in ("sampled_token", "jsd"):
            with pytest.raises(ValueError, match=r"tokens: 1 token ids outside \[0, 37\)"):
                rlsd_kernels.grpo_opsd_loss(part, teacher, bad, self.adv, mask=self.mask, divergence=divergence,
                                            process_group=self.group)
        with pytest.raises(ValueError, match=r"tokens: 1 token ids outside \[0, 37\)"):
            rlsd_kernels.opsd_loss(part, teacher, bad, mask=self.mask, divergence="sampled_token",
                                   process_group=self.group)
        # The full-vocabulary divergences use the ids only as a mask.
        loss = rlsd_kernels.opsd_loss(part, teacher, bad, mask=self.mask, process_group=self.group)
        assert torch.isfinite(loss)
        nan_teacher = self.shard(self.teacher).clone()
        if self.rank == self.world - 1:
            nan_teacher[2, 1, 0] = float("nan")
        for divergence in ("forward_kl", "jsd", "sampled_token"):
            with pytest.raises(ValueError, match="teacher_logits: 1 unmasked rows hold NaN"):
                rlsd_kernels.opsd_loss(part, nan_teacher[:, :-1], self.tokens, mask=self.mask,
                                       divergence=divergence, process_group=self.group)
            # validate=False: a non-finite value at that token, no error, on every rank.
            loss = rlsd_kernels.opsd_loss(part, nan_teacher[:, :-1], self.tokens, mask=self.mask,
                                          divergence=divergence, loss_agg="none", process_group=self.group,
                                          validate=False)
            assert torch.isnan(loss[2, 1]) and torch.isfinite(loss[1]).all()
        self.check("after the errors", divergence="jsd")

    def count_collectives(self):
        """Collectives per call: after the one-time handshake of a group (one small all-gather of
        the shard sizes), one per forward (two for the JSD: its sums wait for the logsumexps), none
        per backward, with and without the policy term, for a scalar and a per-token loss."""
        import rlsd_kernels

        group = dist.new_group(list(range(self.world)))
        first = True
        with Counter() as counter:
            for divergence, beta in DIVERGENCES[:3] + DIVERGENCES[-1:]:
                expected = [GATHER, "all_reduce"] if divergence == "jsd" else [GATHER]
                for grpo, agg in ((False, "token-mean"), (True, "none")):
                    part = self.shard(self.student).clone().requires_grad_()
                    op = rlsd_kernels.grpo_opsd_loss if grpo else rlsd_kernels.opsd_loss
                    args = (self.tokens, self.adv) if grpo else (self.tokens,)
                    loss = op(part[:, :-1], self.shard(self.teacher)[:, :-1], *args, mask=self.mask,
                              divergence=divergence, beta=beta, loss_agg=agg, return_metrics=grpo,
                              process_group=group)
                    loss = loss[0] if grpo else loss
                    what = f"{divergence} grpo={grpo} {agg}"
                    assert counter.take() == [GATHER] * first + expected, f"{what}: the forward issued more"
                    first = False
                    (loss * self.upstream if agg == "none" else loss).sum().backward()
                    assert counter.take() == [], f"{what}: the backward communicated"
        dist.barrier(group)
        dist.destroy_process_group(group)


