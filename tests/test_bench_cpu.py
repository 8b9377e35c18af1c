"""The benchmarks on CPU: pytest-benchmark cases and dry runs of the GPU benchmarks' code paths.

The benchmark cases time the CPU path against the naive PyTorch loss at small sizes and check both
against the float64 reference. The dry runs take ``bench/bench_throughput.py`` and
``bench/bench_memory.py`` through every step a lent GPU runs (gate, measurement, OOM and budget
handling, CSVs, plots, the summary table) with ``--device cpu`` at tiny sizes.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tolerances import FP32, MATMUL_FP32, assert_close, assert_grad_close

import rlsd_kernels
from rlsd_kernels import reference

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import bench_loss  # noqa: E402
import bench_memory  # noqa: E402
import bench_throughput  # noqa: E402
import common  # noqa: E402
import gate as G  # noqa: E402
import providers as P  # noqa: E402
import report  # noqa: E402
from sweep import Sweep  # noqa: E402

CPU = torch.device("cpu")
TINY = {"warmup_ms": 0.0, "rep_ms": 1.0, "min_reps": 2}
# Providers that run here without optional packages or a compiler, quickly.
LOCAL = "naive_eager,rlsd_kernels,rlsd_kernels_rows,rlsd_kernels_inplace"


def _provider(form, name):
    return next(p for p in P.providers(form) if p.name == name)


@pytest.mark.parametrize("name", ["rlsd_kernels", "naive_eager"])
def test_benchmark_logits_form_cpu(benchmark, name):
    inp = P.make_logits_inputs(4, 64, 4096, torch.float32, CPU)
    run = _provider("logits", name).make(inp, True)
    benchmark.group = "RLSD loss from logits, forward + backward, CPU, N=256 V=4096"
    loss, (grad,) = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    ref_loss, (ref_grad,) = G.reference_result(inp, "rlsd", True)
    assert_close(loss, ref_loss, what="loss", **FP32)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("name", ["rlsd_kernels", "naive_eager"])
def test_benchmark_linear_form_cpu(benchmark, name):
    inp = P.make_linear_inputs(2, 64, 2048, 64, torch.float32, CPU)
    try:
        run = _provider("linear", name).make(inp, True)
    except common.Unavailable as e:
        pytest.skip(str(e))
    benchmark.group = "RLSD loss, fused linear, forward + backward, CPU, N=128 V=2048 H=64"
    loss, grads = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    ref_loss, ref_grads = G.reference_result(inp, "rlsd", True)
    assert_close(loss, ref_loss, what="loss", **MATMUL_FP32)
    for got, want, what in zip(grads, ref_grads, ("d hidden", "d weight"), strict=True):
        assert_close(got, want, what=what, **MATMUL_FP32)


def test_benchmark_token_logprobs_cpu(benchmark):
    logits = torch.randn(512, 4096) * 2
    tokens = torch.randint(0, 4096, (512,))
    benchmark.group = "token_logprobs, CPU, N=512 V=4096"
    lp = benchmark.pedantic(rlsd_kernels.token_logprobs, (logits, tokens), rounds=3, warmup_rounds=1)
    assert_close(lp, reference.token_logprobs(logits.double(), tokens), what="lp", **FP32)


def test_byte_and_flop_counts():
    assert P.work("logits", "fwd_bwd", 8192, 151936, None, 2) == {"bytes": 3 * 8192 * 151936 * 2}
    assert P.work("logits", "fwd", 8192, 151936, None, 2) == {"bytes": 2 * 8192 * 151936 * 2}
    assert P.work("linear", "fwd_bwd", 8192, 151936, 4096, 2) == {"flop": 8 * 8192 * 4096 * 151936}
    assert P.work("linear", "fwd", 8192, 151936, 4096, 2) == {"flop": 4 * 8192 * 4096 * 151936}
    ceil = {"copy_tbps": 3.0, "matmul_tflops": 700.0}
    at_floor = P.floor_ms("logits", "fwd_bwd", 8192, 151936, None, 2, ceil)
    assert P.rates("logits", "fwd_bwd", 8192, 151936, None, 2, at_floor, ceil)["frac_of_ceiling"] == pytest.approx(1)
    at_floor = P.floor_ms("linear", "fwd", 8192, 151936, 4096, 2, ceil)
    assert P.rates("linear", "fwd", 8192, 151936, 4096, 2, at_floor, ceil)["tflop_per_s"] == pytest.approx(700)


def test_sizes_parse_with_k():
    assert common.parse_ints("1k, 8k,151936") == [1024, 8192, 151936]


def test_gpu_benchmarks_exit_clearly_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for main in (bench_throughput.main, bench_memory.main):
        with pytest.raises(SystemExit) as info:
            main([])
        assert "needs a CUDA GPU" in str(info.value.code) and "--device cpu" in str(info.value.code)


def test_unknown_names_exit_clearly(capsys):
    with pytest.raises(SystemExit) as info:
        bench_throughput.main(["--device", "cpu", "--providers", "nope"])
    assert info.value.code == 2 and "unknown providers: nope" in capsys.readouterr().err


def test_dry_runs_write_csvs_plots_and_the_summary(tmp_path, capsys):
    thr = ["--device", "cpu", "--ns", "32,64", "--vocabs", "300,512", "--hidden", "16", "--seqlen", "32",
           "--providers", LOCAL, "--out", str(tmp_path), "--no-progress"]
    assert bench_throughput.main(thr) == 0
    mem = ["--device", "cpu", "--seqlens", "32,64", "--vocab", "300", "--hidden", "16", "--providers", LOCAL,
           "--out", str(tmp_path), "--no-progress"]
    assert bench_memory.main(mem) == 0
    data = report.load(tmp_path)
    rows = data["throughput"]
    assert {r["device"] for r in rows} == {"cpu"}
    assert all(r["torch"] and r["triton"] and r["commit"] and r["date"] for r in rows)
    # 2 N x 2 V x (fwd_bwd: 4 providers + floor; fwd: 2 providers + floor), per form (linear: 2 + floor each)
    assert len(rows) == 2 * 2 * (5 + 3) + 2 * 2 * (3 + 3)
    measured = [r for r in rows if r["provider"] != "floor"]
    assert all(r["status"] == "ok" or _linear_ours_missing(r) for r in measured), [r["status"] for r in measured]
    measured = [r for r in measured if r["status"] == "ok"]
    assert all(float(r["gb_per_s"]) > 0 for r in measured if r["form"] == "logits")
    assert all(float(r["tflop_per_s"]) > 0 for r in measured if r["form"] == "linear")
    assert all(0 < float(r["frac_of_ceiling"]) for r in measured)
    gates = data["throughput_gate"] + data["memory_gate"]
    assert all(r["status"] == "ok" or _linear_ours_missing(r) for r in gates)
    assert all(float(r["peak_extra_gb"]) >= 0 for r in data["memory"] if not _linear_ours_missing(r))
    for name in ("throughput", "memory"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0 or not _has_matplotlib()
    capsys.readouterr()
    report.main([str(tmp_path), "--tests", "3 passed in 1.0s"])
    out = capsys.readouterr().out
    assert out.index("gpu tests: 3 passed") < out.index("from logits, forward + backward")
    assert out.rindex("peak extra GB, fused linear") > out.index("from logits, forward + backward")


def test_bench_loss_main_job_on_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bench_loss.main(["--batch", "2", "--seqlen", "16", "--vocab", "300", "--no-compile", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "rlsd_kernels           loss err" in out and "-> ok" in out
    rows = common.read_csvs([tmp_path / "loss_logits.csv"])
    assert {r["provider"]: r["status"] for r in rows if r["provider"] != "liger"} == {
        "naive_eager": "ok", "rlsd_kernels": "ok", "rlsd_kernels_rows": "ok", "rlsd_kernels_nosync": "ok",
        "rlsd_kernels_inplace": "ok"}


def _linear_ours_missing(row):
    """The fused linear loss reported as unavailable by a version of the library without it."""
    return (row["form"] == "linear" and row["provider"] == "rlsd_kernels" and row["status"].startswith("unavailable")
            and not hasattr(rlsd_kernels, "rlsd_linear_loss"))


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _oom_above(n_max):
    """A provider that runs the naive loss, and runs out of memory above ``n_max`` tokens."""

    def make(inp, backward):
        run = P.logits_naive_eager(inp, backward)

        def maybe_oom():
            if inp.n > n_max:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return run()

        return maybe_oom

    return P.Provider("fake", "logits", make, "naive, out of memory above a size")


def test_oom_is_recorded_and_not_retried_at_larger_n():
    sweep = Sweep(CPU, torch.float32, {"copy_tbps": 1.0, "matmul_tflops": 1.0}, measure_kw=TINY)
    for n in (32, 64, 128):
        sweep.shape("logits", [_oom_above(32)], ["fwd_bwd"], batch=1, seqlen=n, vocab=300, hidden=None)
    fake = [r for r in sweep.rows if r["provider"] == "fake"]
    assert [r["status"] for r in fake] == ["ok", "OOM", "skipped: OOM at N=64"]
    assert [r["status"] for r in sweep.gate_rows] == ["ok"]


def test_nothing_new_starts_past_the_deadline():
    sweep = Sweep(CPU, torch.float32, {"copy_tbps": 1.0, "matmul_tflops": 1.0}, measure_kw=TINY)
    sweep.shape("logits", P.providers("logits", {"naive_eager", "rlsd_kernels"}), ["fwd_bwd"], batch=1, seqlen=32,
                vocab=300, hidden=None, deadline=time.monotonic() - 1)
    assert {r["status"] for r in sweep.rows} == {"skipped: time budget"} and not sweep.gate_rows


def test_a_wrong_provider_fails_the_gate_and_ours_are_not_timed():
    def make(inp, backward):
        run = P.logits_ours(inp, backward)
        return lambda: (lambda loss, grads: (loss * 1.01, grads))(*run())

    wrong = P.Provider("rlsd_kernels", "logits", make, "ours, off by 1 %", ours=True)
    sweep = Sweep(CPU, torch.float32, {"copy_tbps": 1.0, "matmul_tflops": 1.0}, measure_kw=TINY)
    sweep.shape("logits", [wrong], ["fwd_bwd"], batch=1, seqlen=32, vocab=300, hidden=None)
    assert sweep.gate_rows[0]["status"] == "FAILED" and sweep.ours_failed
    assert sweep.rows[0]["status"] == "not timed: gate FAILED"


def test_figures_from_different_cards_are_refused(tmp_path):
    row = {"provider": "a", "form": "logits", "mode": "fwd", "n": 64, "vocab": 300, "status": "ok", "ms": 1.0}
    common.write_csv([row], "throughput", tmp_path, "cpu")
    other = tmp_path / "memory.csv"
    other.write_text((tmp_path / "throughput.csv").read_text().replace("cpu", "NVIDIA H200", 1)
                     .replace("\ncpu,", "\nNVIDIA H200,"))
    with pytest.raises(SystemExit, match="different cards"):
        report.load(tmp_path)


def test_commit_without_git_is_the_library_tree_hash(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.txt").write_text("b\n")
    git = ["git", "-C", str(tmp_path)]
    try:
        subprocess.run(git + ["init", "-q"], check=True)
        subprocess.run(git + ["add", "-A"], check=True)
        tree = subprocess.run(git + ["write-tree"], check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not usable here")
    assert common._git_tree_hash(tmp_path) == tree


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
