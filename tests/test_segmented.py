"""The segmented strategy of the policy loss (``kernels/rlsd_seg.py``) against the float64 reference.

Every test here runs the Triton kernels with ``force_choice("segmented")`` and 16-column segments
(``SEGMENT_COLUMNS``) of 16-wide blocks, so a row of the usual 37-entry vocabulary spans three
segments, the last one partial. The policy-loss tests of other files that write a gradient are
collected again here (imported below) and run under the same strategy; the tests written here cover
what is particular to segments: their sizes, segments without a finite logit, segments that need
the exact pass, the sampled token in every segment, and the schedule's freedom from deadlock.

Under the interpreter the launcher runs one program (every wait already met when reached). Grids of
several programs that wait for one another run in threads (``concurrent_programs.py``:
``test_programs_waiting_for_one_another``); ``test_schedule_never_deadlocks`` checks a model of the
schedule under random interleavings; what only a GPU shows (memory ordering, the cooperative launch)
is in ``test_gpu_segmented.py``.
"""

import itertools
import random

import pytest
import torch
from cases import make_case
from test_loss_family import test_option_matches_reference, test_options_with_aggregations_and_in_place  # noqa: F401
from test_rlsd import (  # noqa: F401  (collected again under the segmented strategy)
    check_against_reference,
    test_aggregations,
    test_fully_masked_batch,
    test_matches_reference,
    test_normalizer,
    test_padded_vocabulary,
    test_scalar_upstream_of_one,
)
from tolerances import FP32, assert_close

import rlsd_kernels
from rlsd_kernels.launch import common, rlsd_seg, tuning

BLOCK = 16


@pytest.fixture
def backend():
    """The segmented strategy is a Triton kernel: this file runs the Triton backend only."""
    with common.backend("triton"):
        yield "triton"


@pytest.fixture(autouse=True)
def segmented(monkeypatch):
    monkeypatch.setattr(rlsd_seg, "SEGMENT_COLUMNS", BLOCK)
    with tuning.force_choice("segmented"):
        yield


def _launches(monkeypatch):
    """Counts the segmented kernel's launches (a test that meant to run it and did not would pass)."""
    calls = []
    real = rlsd_seg.launch

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(rlsd_seg, "launch", counted)
    return calls


@pytest.mark.parametrize("columns", [16, 32, 48, 64, 1 << 14])
@pytest.mark.parametrize("vocab", [BLOCK - 1, 37, 3 * BLOCK, 3 * BLOCK + 5])
def test_segment_sizes(columns, vocab, device, backend, monkeypatch):
    """One segment, several, a partial last one, a vocabulary of exactly three blocks."""
    monkeypatch.setattr(rlsd_seg, "SEGMENT_COLUMNS", columns)
    launches = _launches(monkeypatch)
    with tuning.force_row_config(tuning.RowConfig(BLOCK, 1)):
        check_against_reference(make_case(device, vocab=vocab, mask="seq", entropy_coef=0.05), torch.float32)
    assert launches, "the segmented kernel did not run"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_dtypes_and_in_place(dtype, inplace, device, backend, monkeypatch):
    """In place the gradient overwrites a segment after its own program read it; the sampled token's
    logit, which other segments' programs need, was published before."""
    launches = _launches(monkeypatch)
    with tuning.force_row_config(tuning.RowConfig(BLOCK, 1)):
        check_against_reference(make_case(device, dtype=dtype, vocab=3 * BLOCK + 5, adv_shape="BT"), dtype,
                                inplace=inplace)
    assert launches


# Logit patterns per row, by column range, over V = 5 * 16 (five segments of one block each):
# "dead_middle" no finite logit in segment 2; "dead_tail" none in the last two (a padded vocabulary);
# "late_peak" a first block far below a later one (the per-lane sums overflow: the exact pass);
# "low_after_dead" a block of -inf before logits far below 0 (with 32-column segments, a segment whose
# first block is -inf: its sum against the reference 0 is under 1, the exact pass); "wide" logits
# a hundred times wider in every segment.
PATTERNS = ("dead_middle", "dead_tail", "late_peak", "low_after_dead", "wide")


def _pattern(logits, name):
    x = logits.clone()
    if name == "dead_middle":
        x[..., 32:48] = float("-inf")
    elif name == "dead_tail":
        x[..., 48:] = float("-inf")
    elif name == "late_peak":
        x[..., 20:24] += 150.0
    elif name == "low_after_dead":
        x[..., 32:48] = float("-inf")
        x[..., 48:64] -= 120.0
    elif name == "wide":
        x = x * 100.0
    return x


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("columns", [16, 32])
def test_segments_at_the_edges(pattern, columns, device, backend, monkeypatch):
    monkeypatch.setattr(rlsd_seg, "SEGMENT_COLUMNS", columns)
    launches = _launches(monkeypatch)
    case = make_case(device, vocab=5 * BLOCK, mask="seq", entropy_coef=0.05)
    for buf in (case.student, case.teacher):
        buf.view.data.copy_(_pattern(buf.view.data, pattern))
    # Sampled tokens with a finite logit in both models, in every segment.
    finite = torch.isfinite(case.student.view.data) & torch.isfinite(case.teacher.view.data)
    case.tokens.copy_(torch.multinomial(finite.reshape(-1, 5 * BLOCK).float(), 1).reshape(case.tokens.shape))
    with tuning.force_row_config(tuning.RowConfig(BLOCK, 1)):
        check_against_reference(case, torch.float32)
    assert launches


@pytest.mark.parametrize("programs", [2, 3, 7])
def test_several_programs_over_whole_rows(programs, device, backend, monkeypatch):
    """A grid of several programs (item ``pid + j * G``, finished a step later) where each row is
    one segment: the interpreter can run it, since no program then waits for another."""
    monkeypatch.setattr(rlsd_seg, "SEGMENT_COLUMNS", 64)
    monkeypatch.setattr(rlsd_seg, "GRID_CAP", programs)
    launches = _launches(monkeypatch)
    with tuning.force_row_config(tuning.RowConfig(BLOCK, 1)):
        check_against_reference(make_case(device, vocab=37, mask="seq", entropy_coef=0.05), torch.float32,
                                inplace=programs == 3)
    assert launches


def test_sampled_token_in_every_segment(device, backend):
    """Each segment publishes the sampled token's logit when it holds it: tokens in the first,
    middle and last segments, at both edges of each."""
    case = make_case(device, vocab=3 * BLOCK + 5, batch=3, seqlen=5, mask="none")
    edges = torch.tensor([0, 15, 16, 31, 32, 47, 48, 52, 1, 17, 33, 50, 8, 40, 24], device=device)
    case.tokens.copy_(edges.reshape(case.tokens.shape))
    with tuning.force_row_config(tuning.RowConfig(BLOCK, 1)):
        check_against_reference(case, torch.float32)


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_in_any_segment_gives_nan(where, device, backend):
    """validate=False: a NaN in any segment of a live row reaches the loss and that row's gradient."""
    tokens = torch.randint(0, 3 * BLOCK + 5, (4,), device=device)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0], device=device)
    for column in (0, 20, 40, 52):
        student = torch.randn(4, 3 * BLOCK + 5, device=device)
        teacher = torch.randn(4, 3 * BLOCK + 5, device=device)
        (student if where == "student" else teacher)[1, column] = float("nan")
        s = student.requires_grad_()
        with tuning.force_row_config(tuning.RowConfig(BLOCK, 1)):
            loss = rlsd_kernels.rlsd_loss(s, teacher, tokens, adv, validate=False)
        assert torch.isnan(loss), f"NaN in the {where}'s column {column} gave {float(loss)}"
        if where == "student":
            loss.backward()
            assert torch.isnan(s.grad[1]).all() and torch.isfinite(s.grad[[0, 2, 3]]).all()


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("value, column", [("nan", 0), ("inf", 20), ("nan", 40), ("inf", 52), ("-inf row", None)])
def test_error_flags_name_the_argument(which, value, column, device, backend):
    """A NaN or +inf in any segment, or a row without a finite logit, is reported naming the argument;
    a token id outside the vocabulary too. Masked, the same row is never read."""
    vocab = 3 * BLOCK + 5
    tokens = torch.randint(0, vocab, (4,), device=device)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0], device=device)
    logits = {"student": torch.randn(4, vocab, device=device), "teacher": torch.randn(4, vocab, device=device)}
    if column is None:
        logits[which][2] = float("-inf")
    else:
        logits[which][2, column] = float(value)
    s = logits["student"].requires_grad_()
    with tuning.force_row_config(tuning.RowConfig(BLOCK, 1)):
        with pytest.raises(ValueError, match=f"{which}_logits: 1 unmasked rows hold NaN or \\+inf"):
            rlsd_kernels.rlsd_loss(s, logits["teacher"], tokens, adv)
        mask = torch.tensor([True, True, False, True], device=device)
        loss = rlsd_kernels.rlsd_loss(s, logits["teacher"], tokens, adv, mask=mask)
        loss.backward()
    assert torch.isfinite(loss) and torch.equal(s.grad[2], torch.zeros_like(s.grad[2]))


@pytest.mark.parametrize("bad_id", [3 * BLOCK + 5, 1000, -1, -7])
def test_token_ids_out_of_range(bad_id, device, backend):
    vocab = 3 * BLOCK + 5
    tokens = torch.randint(0, vocab, (4,), device=device)
    tokens[1] = bad_id
    s = torch.randn(4, vocab, device=device, requires_grad=True)
    with tuning.force_row_config(tuning.RowConfig(BLOCK, 1)):
        with pytest.raises(ValueError, match=rf"tokens: 1 token ids outside \[0, {vocab}\).*id {bad_id}"):
            rlsd_kernels.rlsd_loss(s, torch.randn(4, vocab, device=device), tokens, torch.ones(4, device=device))


def test_rows_far_apart_in_the_same_call(device, backend):
    """Rows whose logits sit at different magnitudes (the merge rescales segments per row only)."""
    case = make_case(device, vocab=3 * BLOCK + 5, mask="none")
    offsets = torch.tensor([0.0, 80.0, -80.0], device=device)[:, None, None]
    for buf in (case.student, case.teacher):
        buf.view.data.add_(offsets)
    with tuning.force_row_config(tuning.RowConfig(BLOCK, 1)):
        check_against_reference(case, torch.float32)


def test_same_result_as_the_fused_strategy(device, backend):
    """The strategies differ in how they sum, not in what: loss, metrics and gradient agree to
    float32's precision on a larger case (several blocks per segment)."""
    torch.manual_seed(3)
    student = torch.randn(64, 300, device=device) * 4
    teacher = torch.randn(64, 300, device=device) * 4
    tokens = torch.randint(0, 300, (64,), device=device)
    tokens[::7] = -100
    adv = torch.randn(64, device=device)
    results = []
    for choice in ("fused", "segmented"):
        s = student.clone().requires_grad_()
        with tuning.force_row_config(tuning.RowConfig(32, 1)), tuning.force_choice(choice):
            loss, metrics = rlsd_kernels.rlsd_loss(s, teacher, tokens, adv, entropy_coef=0.01, return_metrics=True)
        loss.backward()
        results.append((loss.detach(), metrics, s.grad))
    (loss_f, metrics_f, grad_f), (loss_s, metrics_s, grad_s) = results
    assert_close(loss_s, loss_f, what="loss", **FP32)
    for key in metrics_f:
        assert_close(metrics_s[key], metrics_f[key], what=f"metrics[{key}]", **FP32)
    assert_close(grad_s, grad_f, what="grad", **FP32)
    assert torch.equal(grad_s[::7], torch.zeros_like(grad_s[::7]))


def test_no_gradient_and_sequence_options_keep_their_paths(device, backend, monkeypatch):
    """The segmented strategy only replaces the fused forward that writes a gradient: a forward
    without one, and options that need every token of a sequence first, keep their kernels."""
    launches = _launches(monkeypatch)
    case = make_case(device, vocab=37)
    with torch.no_grad():
        case.call(rlsd_kernels.rlsd_loss, case.student.view)
    case.call(rlsd_kernels.rlsd_loss, case.student.view.requires_grad_(), ratio_level="sequence").backward()
    assert launches == []


# -- The schedule ---------------------------------------------------------------------------------------

def _simulate(n_rows, n_seg, programs, lag, rng):
    """Runs the kernel's schedule (``_rlsd_seg_kernel``'s loop) with programs interleaved at random,
    one step phase at a time, and returns whether every item was finished exactly once. A program
    whose wait is not met yields; if no program can move, the schedule has deadlocked."""
    n_items = n_rows * n_seg
    published = [0] * n_rows
    finished = []
    steps = [-(-(n_items - p) // programs) for p in range(programs)]
    state = [(0, "publish") for _ in range(programs)]  # (step j, phase)
    while True:
        movable = []
        for p in range(programs):
            j, phase = state[p]
            if j >= steps[p] + lag:
                continue
            if phase == "finish" and j >= lag:
                row = (p + (j - lag) * programs) // n_seg
                if published[row] < n_seg:
                    continue
            movable.append(p)
        if not movable:
            break
        p = rng.choice(movable)
        j, phase = state[p]
        if phase == "publish":
            if j < steps[p]:
                published[(p + j * programs) // n_seg] += 1
            state[p] = (j, "finish")
        else:
            if j >= lag:
                finished.append(p + (j - lag) * programs)
            state[p] = (j + 1, "publish")
    done = all(state[p][0] >= steps[p] + lag for p in range(programs))
    return done and sorted(finished) == list(range(n_items))


@pytest.mark.parametrize("n_seg", [1, 2, 3, 5, 8])
def test_schedule_never_deadlocks(n_seg):
    """With every program resident (a cooperative grid), the launcher's lag lets the schedule finish
    under any interleaving: for grids smaller and larger than a row's segments, and one program."""
    rng = random.Random(n_seg)
    for n_rows, programs in itertools.product((1, 2, 5), (1, 2, 3, 4, 7, 16)):
        programs = min(programs, n_rows * n_seg)
        lag = rlsd_seg.lag(n_seg, programs)
        for _ in range(20):
            assert _simulate(n_rows, n_seg, programs, lag, rng), (n_rows, n_seg, programs, lag)


def test_schedule_model_finds_a_deadlock():
    """The model can fail: with no lag beyond one step, one program waits on its own later items."""
    rng = random.Random(0)
    assert not _simulate(2, 3, 1, 1, rng)


def test_occupancy_of_a_hopper_multiprocessor():
    """sm_90: 65,536 registers, 2,048 threads and 228 KB of shared memory per multiprocessor. The
    default configuration (8 warps) compiles to 103-127 registers (bench/kernel_resources.py): two
    programs; over 128 registers one; 80 registers: three (6 at 4 warps, capped)."""
    hopper = dict(regs=65536, threads=2048, shared=228 << 10)
    assert rlsd_seg.occupancy(102, 1024, 8, **hopper) == 2
    assert rlsd_seg.occupancy(128, 1024, 8, **hopper) == 2
    assert rlsd_seg.occupancy(129, 1024, 8, **hopper) == 1
    assert rlsd_seg.occupancy(80, 1024, 8, **hopper) == 3
    assert rlsd_seg.occupancy(80, 1024, 4, **hopper) == rlsd_seg.MAX_PROGRAMS_PER_SM
    assert rlsd_seg.occupancy(32, 0, 4, **hopper) == rlsd_seg.MAX_PROGRAMS_PER_SM
    assert rlsd_seg.occupancy(32, 200 << 10, 4, **hopper) == 1
    assert rlsd_seg.occupancy(255, 1024, 16, **hopper) == 1  # nothing fits: the launch reports it


def test_segments_cover_the_vocabulary():
    for vocab, block, columns in itertools.product((1, 15, 16, 17, 151936), (16, 1024, 4096), (16, 1000, 16384)):
        seg_len, n_seg = rlsd_seg.segments(vocab, block, columns)
        assert seg_len % block == 0 and seg_len >= block
        assert (n_seg - 1) * seg_len < vocab <= n_seg * seg_len



# -- Programs that really wait for one another (threads under the interpreter) -------------------------

@pytest.mark.parametrize("programs", [2, 3, 5, 16])
@pytest.mark.parametrize("columns", [16, 32])
def test_programs_waiting_for_one_another(programs, columns, device, backend, monkeypatch):
    """The grid of a GPU: several programs at once, each finishing items whose other segments other
    programs publish. Five segments (three at 32 columns): a lag of 2 steps with 2 and 3 programs,
    where a lag of 1 can deadlock; 1 with 5 and 16."""
    if device.type == "cuda":
        pytest.skip("the compiled kernel's grid: tests/test_gpu_segmented.py")
    from concurrent_programs import concurrent_programs

    monkeypatch.setattr(rlsd_seg, "SEGMENT_COLUMNS", columns)
    monkeypatch.setattr(rlsd_seg, "interpreter_grid", lambda n_items, n_seg: min(programs, n_items))
    launches = _launches(monkeypatch)
    with concurrent_programs(monkeypatch), tuning.force_row_config(tuning.RowConfig(BLOCK, 1)):
        check_against_reference(make_case(device, vocab=5 * BLOCK, mask="seq", entropy_coef=0.05),
                                torch.float32, inplace=programs == 3)
    assert launches


def test_a_wait_never_met_is_reported(device, backend, monkeypatch):
    """The threaded interpreter reports a deadlock instead of hanging: with no lag, a program waits for
    segments that it publishes itself later."""
    if device.type == "cuda":
        pytest.skip("a deadlock on a GPU hangs the device")
    from concurrent_programs import concurrent_programs

    monkeypatch.setattr(rlsd_seg, "interpreter_grid", lambda n_items, n_seg: 1)
    monkeypatch.setattr(rlsd_seg, "lag", lambda n_seg, programs: 1)
    s = torch.randn(2, 3 * BLOCK + 5, requires_grad=True)
    with concurrent_programs(monkeypatch, timeout_s=5.0), tuning.force_row_config(tuning.RowConfig(BLOCK, 1)):
        with pytest.raises(Exception, match="a wait that is never met"):
            rlsd_kernels.rlsd_loss(s, torch.randn(2, 3 * BLOCK + 5), torch.tensor([1, 2]), torch.ones(2))
