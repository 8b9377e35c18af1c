"""The host's work per loss call, with the kernels stubbed out (``bench/host_overhead.py``): an upper
bound on the ATen ops of a forward and backward, so that a regression in argument preparation,
option packing or the autograd Functions is caught; no zero-filled gradients for the outputs that
nobody differentiates; and the caches of options by value keep every check.
"""

import sys
from pathlib import Path

import pytest
import torch

import rlsd_kernels
from rlsd_kernels.api import compose
from rlsd_kernels.call.losses import DistillLoss, PolicyLoss
from rlsd_kernels.call.options import DistillOptions, PolicyOptions
from rlsd_kernels.flags import Flag
from rlsd_kernels.forms import ops
from rlsd_kernels.launch import common

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import host_overhead  # noqa: E402

# Measured at N = 1024, V = 151,936 (bench/host_overhead.py): 20 ops with validation, 18 without,
# of which 3 are allocations (the packed outputs, the flags, the gradient) and 1 autograd's own
# gradient of the loss.
MAX_OPS = {True: 20, False: 18}
ZERO_FILLS = {"zeros", "zeros_like", "zero_", "fill_", "new_zeros", "full", "full_like"}


@pytest.fixture
def stubbed(monkeypatch):
    """Kernels stubbed, the launchers' allocations left plain (the suite fills them with NaN)."""
    monkeypatch.setattr(common, "empty", lambda shape, *, dtype, device: torch.empty(shape, dtype=dtype,
                                                                                    device=device))
    restore = host_overhead.stub_kernels()
    yield
    restore()


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("variant", ["default", "trainer"])
def test_ops_per_call_bounded(stubbed, validate, variant):
    fn = host_overhead.make_call(256, 512, torch.bfloat16, torch.device("cpu"), variant)
    fn(validate)
    ops_ = host_overhead.count_ops(fn, validate)
    extra = 4 if variant == "trainer" else 0  # the mask's and the old log-probs' flattening
    assert sum(ops_.values()) <= MAX_OPS[validate] + extra, dict(ops_)


def test_default_call_does_no_more_aten_work_than_the_floor(stubbed):
    """Without validation the default call dispatches no ATen op beyond the hand-written least it
    must do (``host_overhead._Floor``): its extra host cost is Python alone."""
    counts = {}
    for variant in ("default", "floor"):
        fn = host_overhead.make_call(256, 512, torch.bfloat16, torch.device("cpu"), variant)
        fn(False)
        counts[variant] = host_overhead.count_ops(fn, False)
    assert sum(counts["default"].values()) <= sum(counts["floor"].values()), counts


def test_cached_blocks_reuse_only_freed_storage():
    """The timing's allocator emulation hands a large block out again only once nothing holds its
    storage (a view or a detached alias keeps it), and small blocks always come fresh."""
    cache = host_overhead.CachedLargeBlocks(lambda shape, *, dtype, device: torch.empty(shape, dtype=dtype,
                                                                                      device=device))
    cpu, shape = torch.device("cpu"), (512, 1024)

    def storage(x):
        return x.untyped_storage().data_ptr()

    a = cache(shape, dtype=torch.float32, device=cpu)
    alias, first = a.detach()[1:], storage(a)
    del a
    b = cache(shape, dtype=torch.float32, device=cpu)  # the first block is still held by the alias
    second = storage(b)
    assert second != first and storage(alias) == first
    del alias, b
    assert storage(cache(shape, dtype=torch.float32, device=cpu)) == second  # freed: handed out again
    cache((4,), dtype=torch.float32, device=cpu)
    assert list(cache.blocks) == [(shape, torch.float32)]


@pytest.mark.parametrize("loss_agg", ["token-mean", "none"])
def test_backward_fills_no_gradient_of_unused_outputs(stubbed, loss_agg):
    """The per-token outputs and flags are non-differentiable and the Functions do not materialise
    gradients: the backward allocates and fills nothing for them (11 outputs, N elements each)."""
    b, t, v = 2, 16, 64
    student = torch.randn(b, t, v, requires_grad=True)
    teacher = torch.randn(b, t, v)
    tokens = torch.randint(0, v, (b, t))
    value, metrics = rlsd_kernels.rlsd_loss(student, teacher, tokens, torch.randn(b), loss_agg=loss_agg,
                                            return_metrics=True)
    assert all(not m.requires_grad for m in metrics.values() if isinstance(m, torch.Tensor))
    upstream = torch.ones_like(value)
    ops_ = host_overhead.count_ops(lambda: value.backward(upstream))
    assert not (set(ops_) & ZERO_FILLS), dict(ops_)
    assert student.grad is not None and student.grad.shape == student.shape


def test_packed_options_round_trip():
    """``unpack(pack(loss))`` rebuilds equal options, by value (None fields, choices, derived fields),
    from the cache and without it."""
    losses = [PolicyLoss(PolicyOptions()),
              PolicyLoss(PolicyOptions(dual_clip=None, surrogate="cispo", eps_w_low=0.1, kl_coef=0.5, num_seqs=3)),
              DistillLoss(PolicyOptions(lam=0.0), DistillOptions(divergence="forward_kl", token_clip=2.0, grpo=True))]
    for loss in losses:
        for _ in range(2):  # a miss, then a hit
            _, floats, ints = ops.pack(loss, ops.TokenInputs(tokens=None, adv=None, weight=None))
            again, _ = ops.unpack([None] * len(ops.INPUT_NAMES), floats, ints)
            assert again.options == loss.options and again.distill == loss.distill
            assert ops._unpack_loss(floats, ints).options == loss.options


@pytest.mark.parametrize("keyword, good, bad, error", [
    ("clip_low", 0.2, True, TypeError),
    ("lam", 1, 2, ValueError),
    ("dual_clip", 3.0, 1.0, ValueError),
    ("surrogate", "ppo", "PPO", ValueError),
])
def test_cached_options_keep_their_checks(keyword, good, bad, error):
    """A call with a good value (kept by value) does not let an equal-looking bad one through."""
    student, teacher = torch.randn(4, 8), torch.randn(4, 8)
    tokens, adv = torch.randint(0, 8, (4,)), torch.randn(4)
    first = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, **{keyword: good})
    second = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, **{keyword: good})
    assert torch.equal(first, second)
    with pytest.raises(error, match=keyword):
        rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, **{keyword: bad})


# --- validate="deferred": the error bits are read without a blocking sync, at a later call ---

@pytest.fixture
def pending():
    compose._pending.clear()
    yield compose._pending
    compose._pending.clear()


class _Event:
    """A CUDA event's interface on CPU: ``done`` says whether the device has reached it."""

    def __init__(self, done):
        self.done, self.waited = done, False

    def query(self):
        return self.done

    def synchronize(self):
        self.waited, self.done = True, True


def _bad_call(validate, v=8):
    student, teacher = torch.randn(4, v), torch.randn(4, v)
    tokens = torch.tensor([0, v + 3, 1, 2])  # an id outside [0, V) at flat position 1
    return rlsd_kernels.rlsd_loss(student, teacher, tokens, torch.randn(4), validate=validate), tokens


def test_deferred_off_cuda_checks_at_once(pending):
    """On CPU nothing runs ahead of the host: the deferred check is the strict one, in the call."""
    with pytest.raises(ValueError, match=r"tokens: 1 token ids outside \[0, 8\).*flat position 1: id 11"):
        _bad_call("deferred")
    assert not pending
    value, _ = _bad_call(False)  # unchecked, as documented
    assert value.shape == ()


def test_deferred_check_reads_only_what_has_arrived(pending):
    """A pending check is read without blocking once its event is done, raising with the argument,
    count and position of the earlier call; a check not yet done waits only when asked to."""
    flags = torch.zeros(4, dtype=torch.int32)
    flags[1] = int(Flag.BAD_TOKEN)
    tokens = torch.tensor([0, 11, 1, 2])
    event = _Event(done=False)
    pending.append((event, torch.tensor(True), flags, tokens, 8, ops.NAMES))
    compose.check_deferred(wait=False)  # not arrived: nothing read, nothing waited for
    assert len(pending) == 1 and not event.waited
    with pytest.raises(ValueError, match=r"earlier call with validate='deferred'.*tokens: 1 token ids.*id 11"):
        compose.check_deferred(wait=True)
    assert event.waited and not pending
    # A clean one is dropped silently; the next deferred call reads what has arrived before it runs.
    pending.append((_Event(done=True), torch.tensor(False), torch.zeros(4, dtype=torch.int32), tokens, 8, ops.NAMES))
    pending.append((_Event(done=True), torch.tensor(True), flags, tokens, 8, ops.NAMES))
    with pytest.raises(ValueError, match="earlier call"):
        rlsd_kernels.rlsd_loss(torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 1, 2, 3]), torch.randn(4),
                               validate="deferred")
    assert not pending


def test_deferred_leaves_the_values_alone():
    student, teacher = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16)
    tokens, adv = torch.randint(0, 16, (6,)), torch.randn(6)
    grads = []
    for validate in (True, "deferred", False):
        student.grad = None
        loss = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, validate=validate)
        loss.backward()
        grads.append((loss.detach(), student.grad.clone()))
    for loss, grad in grads[1:]:
        assert torch.equal(loss, grads[0][0]) and torch.equal(grad, grads[0][1])


@pytest.mark.parametrize("kwargs,error", [(dict(keep=-1), "keep"), (dict(keep="a"), "keep"), (dict(keep=1.0), "keep"),
                                          (dict(keep=True), "keep"), (dict(wait="no"), "wait")])
def test_check_deferred_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        rlsd_kernels.check_deferred(**kwargs)


@pytest.mark.gpu
def test_deferred_on_cuda_raises_at_the_next_call(pending):
    """On CUDA the bad call returns (no sync); the next deferred call raises for it."""
    v = 64
    student, teacher = torch.randn(4, v, device="cuda"), torch.randn(4, v, device="cuda")
    bad = torch.tensor([0, v + 3, 1, 2], device="cuda")
    good = torch.tensor([0, 1, 2, 3], device="cuda")
    adv = torch.randn(4, device="cuda")
    rlsd_kernels.rlsd_loss(student, teacher, bad, adv, validate="deferred")
    assert len(pending) == 1
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"earlier call.*tokens: 1 token ids.*flat position 1"):
        rlsd_kernels.rlsd_loss(student, teacher, good, adv, validate="deferred")
    rlsd_kernels.rlsd_loss(student, teacher, good, adv, validate="deferred")
    compose.check_deferred()
    assert not pending


def test_nothing_is_timed_while_a_cuda_graph_is_captured(monkeypatch):
    """During a CUDA graph capture the tuner runs no trial (a timing run would be captured, and its
    synchronisation is illegal there): a choice not yet made takes its default, uncached, and a
    choice made before is kept."""
    from rlsd_kernels.launch import tuning

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(tuning, "_cache", {})
    monkeypatch.setattr(tuning, "autotune_enabled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def trial(*_):
        raise AssertionError("a trial ran during capture")

    assert tuning.pick_row_config(("k",), 4096, cuda, trial) == tuning._heuristic(4096)
    assert tuning.pick_choice(("c",), cuda, {"a": trial, "b": trial}, default="b") == "b"
    assert tuning._cache == {}
    chosen = tuning.RowConfig(2048, 4)
    tuning._cache[(0, 4096, "k")] = chosen
    tuning._cache[(0, "c")] = "a"
    assert tuning.pick_row_config(("k",), 4096, cuda, trial) == chosen
    assert tuning.pick_choice(("c",), cuda, {"a": trial, "b": trial}, default="b") == "a"


def test_error_bits_lie_above_every_other_flag():
    """Validation finds an error by ``flags.max() >= LOWEST_ERROR``: that holds only while every error
    bit is above every other bit."""
    from rlsd_kernels.flags import ERRORS, LOWEST_ERROR

    names = {"tokens": "tokens", "student": "student_logits", "teacher": "teacher_logits"}
    for bit in Flag:
        assert (bit >= LOWEST_ERROR) == bool(bit & ERRORS), bit
    flags = torch.tensor([int(Flag.DUAL_CLIP | Flag.PPO_CLIP_HIGH), 0, int(Flag.NONFINITE_TEACHER)],
                         dtype=torch.int32)
    with pytest.raises(ValueError, match="teacher_logits: 1 unmasked rows"):
        common.raise_on_error_flags(flags, torch.zeros(3, dtype=torch.long), 8, names)
    common.raise_on_error_flags(flags[:2], torch.zeros(2, dtype=torch.long), 8, names)
    common.raise_on_error_flags(flags[:0], torch.zeros(0, dtype=torch.long), 8, names)
