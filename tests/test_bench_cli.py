"""The benchmark programs' command lines: bad input is a usage error (exit status 2) naming the
argument, before any work; ``report.py`` refuses what is not a complete results CSV; ``gpu_check.sh``
takes ``--help``, needs a GPU unless ``DRY_RUN=1`` and reports its failed parts. Fast: argparse-level
checks and in-process ``main(argv)`` calls, no benchmark run beyond a few milliseconds of work.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import bench_loss  # noqa: E402
import bench_memory  # noqa: E402
import bench_throughput  # noqa: E402
import common  # noqa: E402
import host_overhead  # noqa: E402
import host_timing  # noqa: E402
import providers as P  # noqa: E402
import report  # noqa: E402
import segmented_check  # noqa: E402

GPU_CHECK = BENCH / "gpu_check.sh"


def _usage_error(main, argv, capsys, *words):
    """``main(argv)`` exits with status 2 and a message naming ``words``, before any work."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    return err


THROUGHPUT_BAD = [
    (["--ns", "0"], "--ns"), (["--ns=-1k"], "--ns"), (["--ns", ""], "--ns"), (["--ns", "64,,128"], "--ns"),
    (["--ns", "1.3k"], "--ns"), (["--ns", "abc"], "--ns"), (["--vocabs", "0"], "--vocabs"),
    (["--vocabs", ""], "--vocabs"), (["--seqlen", "-4"], "--seqlen"), (["--seqlen", "0"], "--seqlen"),
    (["--hidden", "0"], "--hidden"), (["--rep-ms", "-1"], "--rep-ms"), (["--budget-s", "-1"], "--budget-s"),
    (["--max-call-s", "-1"], "--max-call-s"), (["--budget-s", "nan"], "--budget-s"), (["--forms", ""], "--forms"),
    (["--modes", ""], "--modes"), (["--forms", "logits,"], "--forms"), (["--providers", ""], "--providers"),
    (["--providers", ","], "--providers"), (["--providers", "nope"], "nope"), (["--out", ""], "--out"),
    (["--ns", "64,100", "--seqlen", "32"], "100"),
    (["--forms", "linear", "--modes", "fwd", "--providers", "rlsd_kernels_rows"], "rlsd_kernels_rows"),
    (["--forms", "logits", "--modes", "fwd", "--providers", "rlsd_kernels_inplace"], "rlsd_kernels_inplace"),
    (["--forms", "logits,linear", "--providers", "rlsd_kernels_rows"], "linear"),
    (["--logits-share", "0"], "--logits-share"), (["--logits-share", "1.5"], "--logits-share"),
    (["--logits-share", "nan"], "--logits-share"),
]


@pytest.mark.parametrize("argv, word", THROUGHPUT_BAD, ids=[" ".join(a) for a, _ in THROUGHPUT_BAD])
def test_throughput_bad_arguments_are_usage_errors(argv, word, capsys, tmp_path):
    _usage_error(bench_throughput.main, ["--device", "cpu", "--out", str(tmp_path), *argv], capsys, word)


MEMORY_BAD = [
    (["--seqlens", "0"], "--seqlens"), (["--seqlens=-1k"], "--seqlens"), (["--seqlens", ""], "--seqlens"),
    (["--vocab", "-3"], "--vocab"), (["--vocab", "0"], "--vocab"), (["--hidden", "0"], "--hidden"),
    (["--budget-s", "-5"], "--budget-s"), (["--forms", ""], "--forms"), (["--providers", ""], "--providers"),
    (["--forms", "linear", "--providers", "rlsd_kernels_rows"], "rlsd_kernels_rows"),
    (["--logits-share", "-0.1"], "--logits-share"),
]


@pytest.mark.parametrize("argv, word", MEMORY_BAD, ids=[" ".join(a) for a, _ in MEMORY_BAD])
def test_memory_bad_arguments_are_usage_errors(argv, word, capsys, tmp_path):
    _usage_error(bench_memory.main, ["--device", "cpu", "--out", str(tmp_path), *argv], capsys, word)


def test_unusable_out_is_refused_up_front(tmp_path, capsys):
    regular = tmp_path / "file"
    regular.write_text("x")
    for out in (str(regular), str(regular / "sub")):
        for main in (bench_throughput.main, bench_memory.main, bench_loss.main):
            _usage_error(main, ["--device", "cpu", "--out", out], capsys, "--out")
    created = tmp_path / "a" / "b"
    bench_throughput.parse(["--device", "cpu", "--out", str(created)])
    assert created.is_dir()


def test_sizes_take_the_preset_only_when_absent():
    args = bench_throughput.parse(["--device", "cpu", "--hidden", "16", "--ns", "64,64,32,1k,1024"])
    assert args.size == {"ns": [64, 32, 1024], "vocabs": [1000, 2048], "hidden": 16, "seqlen": 32}
    args = bench_memory.parse(["--device", "cpu", "--vocab", "300", "--seqlens", "32,32"])
    assert (args.seqlens, args.vocab, args.hidden) == ([32], 300, 32)


def test_sizes_parse_whole_numbers_only():
    assert common.parse_ints("1.5k, 8k,151936,8192") == [1536, 8192, 151936]
    for bad in ("1.3k", "0", "-1", "", "1,,2", "1e-3", "inf", "nan", "k"):
        with pytest.raises(Exception, match=r"size|whole|at least|empty"):
            common.parse_ints(bad)


def test_rep_ms_is_honoured_with_the_tiny_preset():
    assert bench_throughput.timing(bench_throughput.parse(["--device", "cpu", "--rep-ms", "7"]))["rep_ms"] == 7
    assert bench_throughput.timing(bench_throughput.parse(["--device", "cpu"]))["rep_ms"] == 1.0
    assert bench_throughput.timing(bench_throughput.parse(["--preset", "quick"]))["rep_ms"] == 100.0


def test_written_names_only_files_written(tmp_path, capsys):
    """Past its budget before the first shape, the sweep gates nothing: no gate CSV, and none named."""
    argv = ["--device", "cpu", "--ns", "32", "--vocabs", "300", "--forms", "logits", "--modes", "fwd",
            "--providers", "naive_eager", "--budget-s", "1e-9", "--no-plot", "--no-progress", "--out", str(tmp_path)]
    assert bench_throughput.main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("written:"))
    assert "throughput.csv" in line and "throughput_gate.csv" not in line
    assert not (tmp_path / "throughput_gate.csv").exists()


def _floor_only(folder):
    """A throughput CSV with the model floor and no provider rows (what a provider with no form wrote)."""
    row = {"bench": "throughput", "form": "linear", "n": 64, "batch": 2, "seqlen": 32, "vocab": 1000, "hidden": 32,
           "dtype": "fp32", "mode": "fwd_bwd", "provider": "floor", "what": "FLOP", "status": "model", "ms": 0.5,
           "copy_tbps": 0.01, "matmul_tflops": 0.1}
    return common.write_csv([row], "throughput", folder, "cpu")


def test_report_without_our_rows(tmp_path, capsys):
    _floor_only(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    assert "fused linear" in capsys.readouterr().out


def test_report_folder_errors(tmp_path, capsys):
    regular = tmp_path / "file"
    regular.write_text("x")
    for folder in (tmp_path / "missing", regular):
        _usage_error(report.main, [str(folder)], capsys, str(folder))
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 1
    assert "no benchmark CSVs" in capsys.readouterr().err


def _csv_text(folder):
    path = _floor_only(folder)
    common.write_csv([{**common.read_csv(path)[0], "provider": "rlsd_kernels", "status": "ok", "ms": "1.25"}] * 2,
                     "throughput", folder, "cpu")
    return path, path.read_text()


@pytest.mark.parametrize("cut", ["in ms", "in commit", "mid-file"])
def test_report_refuses_truncated_csv(tmp_path, cut):
    path, text = _csv_text(tmp_path)
    header = text.splitlines()[0].split(",")
    if cut == "in ms":
        # ms is the last column written here: cut after "1."
        assert header[-1] == "ms" or "ms" in header
        damaged = text[:text.rindex("1.25") + 2]
    elif cut == "in commit":
        last = text.rstrip("\r\n").rsplit("\n", 1)[1]
        commit = common.device_info("cpu")["commit"]
        damaged = text[:text.rindex(last) + last.index(commit) + 3] + "\r\n"
    else:
        lines = text.splitlines(keepends=True)
        damaged = lines[0] + lines[1][: len(lines[1]) // 2] + "\r\n" + lines[2]
    path.write_text(damaged)
    with pytest.raises(SystemExit, match=re.escape(str(path))):
        report.main([str(tmp_path)])


@pytest.mark.parametrize("damage", ["no device", "ok without ms", "binary", "not csv"])
def test_report_refuses_malformed_csv(tmp_path, damage):
    path, text = _csv_text(tmp_path)
    if damage == "no device":
        path.write_text(text.replace("device,", "card,", 1))
        match = "no column device"
    elif damage == "ok without ms":
        path.write_text(text.replace(",1.25", ",", 1))
        match = "line 2.*without a number in ms"
    elif damage == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
        match = "not a results CSV"
    else:
        path.write_text("hello,world\n1,2\n")
        match = "no column device"
    with pytest.raises(SystemExit, match=f"{re.escape(str(path))}.*{match}"):
        report.main([str(tmp_path)])


def test_report_orders_and_colours_every_provider():
    names = {p.name for p in P.PROVIDERS}
    assert names | {"floor"} == set(report.ORDER) and report.ORDER[-1] == "floor"
    assert set(report.COLORS) == set(report.ORDER) and len(set(report.COLORS.values())) == len(report.COLORS)
    assert report.ORDER.index("rlsd_kernels_nosync") < report.ORDER.index("floor")


LOSS_BAD = [["--batch", "0"], ["--seqlen", "0"], ["--vocab", "0"], ["--batch", "-1"], ["--device", "gpu"]]


@pytest.mark.parametrize("argv", LOSS_BAD, ids=[" ".join(a) for a in LOSS_BAD])
def test_bench_loss_bad_arguments(argv, capsys):
    _usage_error(bench_loss.main, argv, capsys, argv[0])


def test_bench_loss_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_loss.main(["--device", "cuda"])


HOST_BAD = [["--variants", "bogus"], ["--variants", ""], ["--dtype", "foo"], ["--calls", "0"], ["--n", "-5"],
            ["--n", "0"], ["--vocab", "0"], ["--device", "tpu"], ["--out", "x.txt"]]


@pytest.mark.parametrize("argv", HOST_BAD, ids=[" ".join(a) for a in HOST_BAD])
def test_host_overhead_bad_arguments(argv, capsys):
    _usage_error(host_overhead.main, argv, capsys, argv[0])


def test_host_overhead_needs_a_gpu_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        host_overhead.main(["--device", "cuda"])


def test_host_overhead_rows_carry_versions(tmp_path):
    out = tmp_path / "sub" / "h.csv"
    host_overhead.main(["--n", "4", "--vocab", "16", "--calls", "1", "--variants", "default", "--out", str(out)])
    rows = common.read_csv(out)
    assert [r["validate"] for r in rows] == ["True", "deferred", "False"]
    assert all(r["device"] == "cpu" and r["variant"] == "default" for r in rows)


def test_host_timing_needs_a_gpu_unless_dry_run(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--dry-run"):
        host_timing.main([])
    _usage_error(host_timing.main, ["--bogus"], capsys, "--bogus")
    seen = []
    monkeypatch.setattr(host_timing, "run", lambda *a: seen.append(a))
    host_timing.main(["--dry-run"])
    assert seen[0][0].type == "cpu" and seen[0][1:3] == ((32, 64), 700)


def test_host_timing_rows(tmp_path, capsys):
    """Every validation mode and pass at each N, then the eager call (the graph replay needs CUDA)."""
    host_timing.run(torch.device("cpu"), (4, 8), 16, tmp_path)
    rows = common.read_csv(tmp_path / "host_timing.csv")
    expected = [(n, p, v) for n in ("4", "8") for v in ("True", "deferred", "False") for p in ("fwd+bwd", "fwd")]
    assert [(r["n"], r["pass"], r["validate"]) for r in rows] == expected + [("4", "fwd+bwd eager", "False")]
    assert all(float(r["ms"]) > 0 and r["device"] == "cpu" for r in rows)
    assert "graph replay: skipped" in capsys.readouterr().out


def test_segmented_check_arguments(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--dry-run"):
        segmented_check.parse(["--ns", "1k"])
    _usage_error(segmented_check.parse, ["--dry-run"], capsys, "TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for extra in (["--ns", "5"], ["--vocab", "3"], ["--ncu"]):
        _usage_error(segmented_check.parse, ["--dry-run", *extra], capsys, extra[0])
    args = segmented_check.parse(["--dry-run"])
    assert (args.ns, args.vocab) == ([32], 700)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert segmented_check.parse(["--ns", "1k,8k"]).ns == [1024, 8192]
    _usage_error(segmented_check.parse, ["--ns", "0"], capsys, "--ns")


def test_kernel_resources_refuses_unknown_capability():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(BENCH / "kernel_resources.py"), "--capability", "12"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--capability" in run.stderr and "Traceback" not in run.stderr


def _gpu_check(*args, **env):
    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_gpu_check_help_lists_every_setting():
    run = _gpu_check("--help")
    assert run.returncode == 0 and run.stdout.startswith("usage:")
    read = set(re.findall(r"\$\{([A-Z_]+):-", GPU_CHECK.read_text()))
    assert {"OUT", "PYTHON", "DRY_RUN", "SEGMENTED_CHECK", "LINEAR_CHECK", "THROUGHPUT_ARGS"} <= read
    assert [v for v in sorted(read) if v not in run.stdout] == []
    for bad in (["--bogus"], ["--help", "x"]):
        run = _gpu_check(*bad)
        assert run.returncode == 2 and "unknown argument" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_gpu_check_needs_a_gpu_without_dry_run(tmp_path):
    run = _gpu_check(OUT=str(tmp_path / "out"), PYTHON=sys.executable, DRY_RUN="0")
    assert run.returncode != 0 and "no CUDA GPU" in run.stderr and "DRY_RUN=1" in run.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_gpu_check_reports_failed_parts(tmp_path):
    """Every part failing (a Python that always exits 1): each still runs, and the script exits 1."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    run = _gpu_check(OUT=str(tmp_path / "out"), PYTHON=str(fake), DRY_RUN="1")
    assert run.returncode == 1, run.stdout[-2000:]
    failed = next(x for x in run.stdout.splitlines() if "== FAILED:" in x)
    for name in ("gpu tests (exit 1)", "throughput (exit 1)", "memory (exit 1)", "report (exit 1)"):
        assert name in failed


def test_gpu_check_opt_in_only(tmp_path):
    """``OPT_IN_ONLY=1`` runs the chosen opt-in parts and none of the standard ones, and refuses to run
    with none chosen."""
    run = _gpu_check(OUT=str(tmp_path / "none"), PYTHON=sys.executable, DRY_RUN="1", OPT_IN_ONLY="1")
    assert run.returncode == 2 and "none is chosen" in run.stderr
    assert not (tmp_path / "none").exists()
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    run = _gpu_check(OUT=str(tmp_path / "out"), PYTHON=str(fake), DRY_RUN="1", OPT_IN_ONLY="1", HOST_OVERHEAD="1")
    assert run.returncode == 1, run.stdout[-2000:]
    failed = next(x for x in run.stdout.splitlines() if "== FAILED:" in x)
    assert "host overhead, kernels stubbed (exit 1)" in failed and "host overhead, kernels running" in failed
    for name in ("gpu tests", "throughput", "memory", "report", "linear", "segmented"):
        assert name not in failed


def test_report_names_the_runs_of_a_reused_folder(tmp_path, capsys):
    """A folder where a later run rewrote only some CSVs: the summary says which run each file is from."""
    _floor_only(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    assert "more than one run" not in capsys.readouterr().out
    row = {"bench": "memory", "form": "logits", "n": 64, "vocab": 1000, "dtype": "fp32", "provider": "rlsd_kernels",
           "status": "ok", "peak_extra_gb": 0.1}
    path = common.write_csv([row], "memory", tmp_path, "cpu")
    path.write_text(path.read_text().replace(common.commit(), "0123456789ab"))
    assert report.main([str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "more than one run" in x)
    assert "memory.csv: commit 0123456789ab" in line and f"throughput.csv: commit {common.commit()}" in line
