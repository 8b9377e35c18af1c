"""Vocabulary-parallel ops (``process_group=``) against the unsharded ones, in real multi-process
runs: gloo on CPU, 2 and 4 ranks, both backends (the Triton kernels under the interpreter).

Every spawned rank builds the whole inputs from one seed, takes its contiguous slice of a 37-id
vocabulary (uneven sizes, with tokens in every shard), and checks that the loss, the
metrics and its gradient slice equal the unsharded result computed in the same process, for the
logits and the fused-linear forms, with a fully masked sequence, a partial mask and every
``loss_agg``; that loss and metrics are bit for bit the same on every rank; that bad input raises on
every rank alike; and how many collectives a forward and a backward issue (``count_collectives``).
Spawning is slow, so all checks run in one spawned run per group size. NCCL needs several GPUs and
the project's GPU checks run on one, so there is no gpu-marked test here; the NCCL path differs only
in the device of its buffers.
"""


import pytest
import torch
import torch.distributed as dist
from mp_harness import finish_rank, spawn, start_rank
from tolerances import FP32, GRAD, assert_close

VOCAB = 37
SPLITS = {2: (17, 20), 4: (5, 9, 11, 12)}
# A second split of the same vocabulary over 2 ranks, for a change of shard sizes on one group.
RESPLIT = (25, 12)
BLOCK = 16  # forced, so that shards of 5..25 ids hit the block edges
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "sum", "none")
# The aggregation is the same code for both backends: the interpreted kernels see a scalar and a
# per-token reduction (every mode runs on the PyTorch path).
TRITON_AGGS = ("seq-mean-token-mean", "none")
# The collective of the forward (``all_gather_into_tensor`` where torch lacks ``all_gather_single``).
GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


@pytest.mark.parametrize("world", sorted(SPLITS))
def test_sharded_ops_equal_unsharded_and_count_collectives(world, tmp_path):
    spawn(_worker, world, tmp_path)


def _worker(rank, world, init):
    start_rank(rank, world, init)
    from rlsd_kernels.launch import common as _utils
    from rlsd_kernels.launch.tuning import RowConfig, force_row_config

    run = Run(rank, world, dist.group.WORLD, SPLITS[world])
    with force_row_config(RowConfig(BLOCK, 1)):
        run.count_collectives()
        for backend, aggs in (("torch", LOSS_AGGS), ("triton", TRITON_AGGS)):
            with _utils.backend(backend):
                run.logits_losses(aggs)
                run.linear_losses(aggs)
                run.opsd_linear_losses(aggs)
                run.logprobs()
                run.large_logits()
                run.bad_input()
        if world == 2:
            run.change_of_shard_sizes()
    finish_rank()


def unsharded():
    """The oracle: the unsharded op on the PyTorch path (itself tested against the reference), so
    that the interpreter runs only the sharded kernels."""
    from rlsd_kernels.launch import common as _utils

    return _utils.backend("torch")


class Counter:
    """Counts the outermost calls of every ``torch.distributed`` collective while active."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
             "broadcast", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
             "barrier", "send", "recv", "isend", "irecv", "gather", "scatter", "batch_isend_irecv")

    def __init__(self):
        self.calls, self.depth, self.saved = [], 0, {}

    def __enter__(self):
        for name in self.NAMES:
            if hasattr(dist, name):
                self.saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self.saved[name]))
        return self

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.depth == 0:
                self.calls.append(name)
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1

        return counted

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)
        return False

    def take(self):
        calls, self.calls = self.calls, []
        return calls


class Run:
    """One rank's inputs and checks."""

    def __init__(self, rank, world, group, split):
        self.rank, self.world, self.group = rank, world, group
        self.set_split(split)
        g = torch.Generator().manual_seed(1234)
        b, t, hidden = 3, 4, 8
        self.tokens = torch.randint(0, VOCAB, (b, t), generator=g)
        # Tokens in every shard of every split and on both sides of the 2-rank boundary, unmasked.
        self.tokens[1:].view(-1)[: len(SPLITS[4])] = torch.tensor([1, 8, 20, 30])
        self.tokens[2, :2] = torch.tensor([17 - 1, 17])
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
        self.hidden = torch.randn(b, t, hidden, generator=g)
        self.t_hidden = self.hidden + 0.5 * torch.randn(b, t, hidden, generator=g)
        self.weight = torch.randn(VOCAB, hidden, generator=g) * 0.7
        self.bias = torch.randn(VOCAB, generator=g) * 0.5
        self.upstream = torch.randn(b, t, generator=g)

    def set_split(self, split):
        self.split = split
        self.lo = sum(split[: self.rank])
        self.hi = self.lo + split[self.rank]

    def shard(self, x):
        return x[..., self.lo:self.hi]

    def loss_kwargs(self, **extra):
        return dict(old_logprobs=self.old, mask=self.mask, return_metrics=True, **extra)

    def same_on_every_rank(self, values, what):
        """Bit for bit: every rank's ``values`` equal rank 0's."""
        mine = torch.stack([v.detach().float().reshape(()) for v in values])
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        for other in every:
            assert torch.equal(other.view(torch.int32), mine.view(torch.int32)), f"{what}: ranks differ"

    def compare(self, what, loss, metrics, expected_loss, expected_metrics):
        assert_close(loss, expected_loss, what=f"{what} loss", **FP32)
        assert metrics.keys() == expected_metrics.keys()
        for key, value in expected_metrics.items():
            assert_close(metrics[key], value, what=f"{what} metrics[{key}]", **FP32)
        self.same_on_every_rank([loss.sum(), *metrics.values()], what)

    def backward(self, loss, loss_agg):
        (loss * (self.upstream if loss_agg == "none" else 1.7)).sum().backward()

    def logits_losses(self, aggs):
        import rlsd_kernels

        cases = [dict(loss_agg=agg) for agg in aggs] + [
            # The sequence pass, entropy gradient, precomputed teacher and in-place gradient, both reductions.
            dict(loss_agg="seq-mean-token-mean", ratio_level="sequence", entropy_coef=0.05, kl_coef=0.1,
                 ref_logprobs=self.old + 0.2, teacher_logprobs=self.old - 0.1, inplace_backward=True,
                 temperature=0.7),
            dict(loss_agg="none", entropy_coef=0.05, teacher_logprobs=self.old - 0.1, inplace_backward=True),
        ]
        for case in cases:
            case = dict(case)
            what = f"rlsd_loss {case}"
            loss_agg = case["loss_agg"]
            inplace = case.pop("inplace_backward", False)
            precomputed = "teacher_logprobs" in case
            full = self.student.clone().requires_grad_()
            teacher = None if precomputed else self.teacher[:, :-1]
            with unsharded():
                loss, metrics = rlsd_kernels.rlsd_loss(full[:, :-1], teacher, self.tokens, self.adv,
                                                       **self.loss_kwargs(**case))
                self.backward(loss, loss_agg)

            part = self.shard(self.student).clone().requires_grad_()
            s_teacher = None if precomputed else self.shard(self.teacher)[:, :-1]
            s_loss, s_metrics = rlsd_kernels.rlsd_loss(
                part[:, :-1], s_teacher, self.tokens, self.adv, process_group=self.group,
                inplace_backward=inplace, **self.loss_kwargs(**case))
            self.compare(what, s_loss, s_metrics, loss, metrics)
            self.backward(s_loss, loss_agg)
            assert_close(part.grad, self.shard(full.grad), what=f"{what} grad", **GRAD[torch.float32])

    def linear_losses(self, aggs):
        import rlsd_kernels

        for loss_agg in aggs:
            what = f"rlsd_linear_loss {loss_agg}"
            kwargs = self.loss_kwargs(loss_agg=loss_agg, chunk_size=5, teacher_hidden=self.t_hidden,
                                      entropy_coef=0.05 if loss_agg == "sum" else 0.0)
            h, w, b = (x.clone().requires_grad_() for x in (self.hidden, self.weight, self.bias))
            with unsharded():
                loss, metrics = rlsd_kernels.rlsd_linear_loss(h, w, self.tokens, self.adv, bias=b, **kwargs)
                self.backward(loss, loss_agg)

            s_h = self.hidden.clone().requires_grad_()
            s_w, s_b = (x[self.lo:self.hi].clone().requires_grad_() for x in (self.weight, self.bias))
            s_loss, s_metrics = rlsd_kernels.rlsd_linear_loss(s_h, s_w, self.tokens, self.adv, bias=s_b,
                                                              process_group=self.group, **kwargs)
            self.compare(what, s_loss, s_metrics, loss, metrics)
            self.backward(s_loss, loss_agg)
            self.compare_linear_grads(what, (s_h, s_w, s_b), (h, w, b))

    def opsd_linear_losses(self, aggs):
        """The OPSD losses of the fused linear form over shards of the weight rows: the sharded
        wrapper around the linear form, each divergence, alone and with the policy term."""
        import rlsd_kernels

        cases = [("forward_kl", False, aggs[0]), ("jsd", True, aggs[-1]), ("sampled_token", False, aggs[-1]),
                 ("reverse_kl", True, "none")]
        for divergence, grpo, loss_agg in cases:
            what = f"opsd_linear_loss {divergence} grpo={grpo} {loss_agg}"
            kwargs = dict(mask=self.mask, return_metrics=True, loss_agg=loss_agg, chunk_size=5,
                          teacher_hidden=self.t_hidden, divergence=divergence)
            op = rlsd_kernels.grpo_opsd_linear_loss if grpo else rlsd_kernels.opsd_linear_loss
            args = (self.tokens, self.adv) if grpo else (self.tokens,)
            if grpo:
                kwargs.update(old_logprobs=self.old, lam=0.5)
            h, w, b = (x.clone().requires_grad_() for x in (self.hidden, self.weight, self.bias))
            with unsharded():
                loss, metrics = op(h, w, *args, bias=b, **kwargs)
                self.backward(loss, loss_agg)
            s_h = self.hidden.clone().requires_grad_()
            s_w, s_b = (x[self.lo:self.hi].clone().requires_grad_() for x in (self.weight, self.bias))
            s_loss, s_metrics = op(s_h, s_w, *args, bias=s_b, process_group=self.group, **kwargs)
            self.compare(what, s_loss, s_metrics, loss, metrics)
            self.backward(s_loss, loss_agg)
            self.compare_linear_grads(what, (s_h, s_w, s_b), (h, w, b))

    def compare_linear_grads(self, what, sharded, full):
        (s_h, s_w, s_b), (h, w, b) = sharded, full
        tol = GRAD[torch.float32]
        assert_close(s_w.grad, w.grad[self.lo:self.hi], what=f"{what} dW", **tol)
        assert_close(s_b.grad, b.grad[self.lo:self.hi], what=f"{what} db", **tol)
        # Each rank's dH is its partial sum; their sum is the gradient.
        dh = s_h.grad.clone()
        dist.all_reduce(dh, group=self.group)
        assert_close(dh, h.grad, what=f"{what} dH (summed over ranks)", **tol)

    def large_logits(self):
        """Log-probs, entropy and every divergence at a logit offset of 10^4, within twice the error of
        the float32 reference (``log_softmax``; plus a few ulps): the shards exchange their references
        and log-sums, never a logsumexp of the logits' magnitude."""
        import rlsd_kernels
        from rlsd_kernels import reference

        tokens = self.tokens[1:]
        student, teacher = ((x[1:, :-1].double() + 1e4).float() for x in (self.student, self.teacher))

        def check(got, of, what):
            exact, f32 = of(student.double(), teacher.double()), of(student, teacher)
            bound = 2 * (f32.double() - exact).abs().max().item() + 4e-7 * exact.abs().max().item() + 1e-6
            error = (got.double() - exact).abs().max().item()
            assert error <= bound, f"{what} at offset 1e4: error {error:.1e} > {bound:.1e}"

        lp, ent = rlsd_kernels.token_logprobs(self.shard(student), tokens, return_entropy=True,
                                              process_group=self.group)
        check(lp, lambda s, _: reference.token_logprobs(s, tokens), "token_logprobs")
        check(ent, lambda s, _: reference.token_logprobs(s, tokens, return_entropy=True)[1], "entropy")
        for divergence in ("forward_kl", "reverse_kl", "jsd"):
            got = rlsd_kernels.opsd_loss(self.shard(student), self.shard(teacher), tokens, divergence=divergence,
                                         loss_agg="none", process_group=self.group)
            check(got, lambda s, t, d=divergence: reference.opsd_token_divergence(s, t, divergence=d), divergence)

    def logprobs(self):
        import rlsd_kernels

        tokens = self.tokens.clone()
        tokens[0] = -100
        tokens[1, 3] = -100
        for entropy in (False, True):
            what = f"token_logprobs entropy={entropy}"
            full = self.student.clone().requires_grad_()
            part = self.shard(self.student).clone().requires_grad_()
            kw = dict(temperature=0.7, return_entropy=entropy)
            ups = [self.upstream, self.upstream.flip(0)][: 1 + entropy]
            with unsharded():
                out = rlsd_kernels.token_logprobs(full[:, :-1], tokens, **kw)
                out = out if entropy else (out,)
                sum((o * u).sum() for o, u in zip(out, ups, strict=True)).backward()
            s_out = rlsd_kernels.token_logprobs(part[:, :-1], tokens, process_group=self.group, **kw)
            s_out = s_out if entropy else (s_out,)
            for name, s, u in zip(("lp", "entropy"), s_out, out, strict=False):
                assert_close(s, u, what=f"{what} {name}", **FP32)
                self.same_on_every_rank([s.sum()], what)
            sum((o * u).sum() for o, u in zip(s_out, ups, strict=True)).backward()
            assert_close(part.grad, self.shard(full.grad), what=f"{what} grad", **GRAD[torch.float32])

            what = f"token_logprobs_linear entropy={entropy}"
            h, w, b = (x.clone().requires_grad_() for x in (self.hidden, self.weight, self.bias))
            s_h = self.hidden.clone().requires_grad_()
            s_w, s_b = (x[self.lo:self.hi].clone().requires_grad_() for x in (self.weight, self.bias))
            with unsharded():
                out = rlsd_kernels.token_logprobs_linear(h, w, tokens, bias=b, chunk_size=5, **kw)
                out = out if entropy else (out,)
                sum((o * u).sum() for o, u in zip(out, ups, strict=True)).backward()
            s_out = rlsd_kernels.token_logprobs_linear(s_h, s_w, tokens, bias=s_b, chunk_size=5,
                                                       process_group=self.group, **kw)
            s_out = s_out if entropy else (s_out,)
            for name, s, u in zip(("lp", "entropy"), s_out, out, strict=False):
                assert_close(s, u, what=f"{what} {name}", **FP32)
            sum((o * u).sum() for o, u in zip(s_out, ups, strict=True)).backward()
            self.compare_linear_grads(what, (s_h, s_w, s_b), (h, w, b))

    def bad_input(self):
        """Every rank raises the same error, whichever rank's shard holds the bad value, and the
        group is still usable afterwards (no rank left waiting in a collective)."""
        import rlsd_kernels

        part = self.shard(self.student)[:, :-1]
        bad = self.tokens.clone()
        bad[1, 2] = VOCAB
        with pytest.raises(ValueError, match=r"tokens: 1 token ids outside \[0, 37\)"):
            rlsd_kernels.rlsd_loss(part, self.shard(self.teacher)[:, :-1], bad, self.adv, mask=self.mask,
                                   process_group=self.group)
        with pytest.raises(ValueError, match=r"outside \[0, 37\)"):
            rlsd_kernels.token_logprobs(part, bad.clamp(min=0), process_group=self.group)
        nan_teacher = self.shard(self.teacher).clone()
        if self.rank == self.world - 1:
            nan_teacher[2, 1, 0] = float("nan")
        with pytest.raises(ValueError, match="teacher_logits: 1 unmasked rows hold NaN"):
            rlsd_kernels.rlsd_loss(part, nan_teacher[:, :-1], self.tokens, self.adv, mask=self.mask,
                                   process_group=self.group)
        s_w = self.weight[self.lo:self.hi].clone()
        if self.rank == 0:
            s_w[0, 0] = float("inf")
        with pytest.raises(ValueError, match=r"logits of student_hidden @ weight.T: \d+ unmasked rows"):
            rlsd_kernels.rlsd_linear_loss(self.hidden, s_w, self.tokens, self.adv, teacher_hidden=self.t_hidden,
                                          mask=self.mask, process_group=self.group)
        # validate=False: non-finite values, no error, on every rank.
        loss = rlsd_kernels.rlsd_loss(part, nan_teacher[:, :-1], self.tokens, self.adv, mask=self.mask,
                                      loss_agg="none", process_group=self.group, validate=False)
        assert torch.isnan(loss[2, 1])

    def count_collectives(self):
        """Collectives per call: after the one-time handshake of a group (one small all-gather of
        the shard sizes), exactly one per forward and none per backward, for every op."""
        import rlsd_kernels

        group = dist.new_group(list(range(self.world)))
        part = self.shard(self.student).clone().requires_grad_()
        s_w = self.weight[self.lo:self.hi].clone().requires_grad_()
        s_h = self.hidden.clone().requires_grad_()
        ops = {
            "rlsd_loss": lambda agg: rlsd_kernels.rlsd_loss(
                part[:, :-1], self.shard(self.teacher)[:, :-1], self.tokens, self.adv, loss_agg=agg,
                process_group=group, **self.loss_kwargs()),
            "rlsd_linear_loss": lambda agg: rlsd_kernels.rlsd_linear_loss(
                s_h, s_w, self.tokens, self.adv, teacher_hidden=self.t_hidden, loss_agg=agg, process_group=group,
                **self.loss_kwargs()),
            "token_logprobs": lambda agg: (rlsd_kernels.token_logprobs(
                part[:, :-1], self.tokens.clamp(max=VOCAB - 1), return_entropy=True, process_group=group), None),
            "token_logprobs_linear": lambda agg: (rlsd_kernels.token_logprobs_linear(
                s_h, s_w, self.tokens.clamp(max=VOCAB - 1), return_entropy=True, process_group=group), None),
        }
        with Counter() as counter:
            first = True
            for name, op in ops.items():
                for agg in ("token-mean", "none"):
                    out, _ = op(agg)
                    forward = counter.take()
                    expected = [GATHER] * (2 if first else 1)
                    assert forward == expected, f"{name} {agg}: forward issued {forward}"
                    first = False
                    loss = sum(x.sum() for x in out) if isinstance(out, tuple) else out.sum()
                    loss.backward()
                    assert counter.take() == [], f"{name} {agg}: the backward communicated"
        dist.barrier(group)
        dist.destroy_process_group(group)

    def change_of_shard_sizes(self):
        """A new split on a group whose layout is cached: right results with ``validate=True`` (one
        more all-gather on that call), NaN rather than wrong values with ``validate=False``."""
        import rlsd_kernels

        def call(validate=True):
            return rlsd_kernels.rlsd_loss(self.shard(self.student)[:, :-1], self.shard(self.teacher)[:, :-1],
                                          self.tokens, self.adv, process_group=self.group, validate=validate,
                                          **self.loss_kwargs())

        with unsharded():
            expected, expected_metrics = rlsd_kernels.rlsd_loss(self.student[:, :-1], self.teacher[:, :-1],
                                                                self.tokens, self.adv, **self.loss_kwargs())
        old = self.split
        self.set_split(RESPLIT)
        with Counter() as counter:
            loss, metrics = call()
            assert counter.take() == [GATHER] * 2
        self.compare("resplit", loss, metrics, expected, expected_metrics)
        self.set_split(old)
        loss, _ = call(validate=False)
        assert torch.isnan(loss)
        loss, metrics = call()
        self.compare("split back", loss, metrics, expected, expected_metrics)
