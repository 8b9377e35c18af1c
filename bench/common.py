"""Shared benchmark plumbing: device facts, timing, peak memory, ceilings and CSV rows.

Every figure a benchmark writes carries the card's name, the torch and triton versions, the commit
and the date; figures from different cards are never put side by side.
"""

from __future__ import annotations

import csv
import datetime
import os
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{what} needs a CUDA GPU; none is visible here (nothing was measured).")


def device_info() -> dict:
    import triton

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit or "unknown",
        "date": datetime.date.today().isoformat(),
    }


def card_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower() or "cpu"


def write_csv(rows: list[dict], name: str, out_dir: str | None = None) -> Path:
    """Writes rows under ``bench/results/<card>/<name>.csv`` (or ``out_dir``) and returns the path."""
    if not rows:
        raise ValueError("no rows to write")
    info = device_info()
    folder = Path(out_dir) if out_dir else RESULTS / card_slug(info["device"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    fields = list(info) + [k for k in rows[0] if k not in info]
    for row in rows[1:]:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**info, **row})
    return path


def cuda_time_ms(fn, *, warmup_ms=100, rep_ms=500) -> dict:
    """Median and quantiles (20%, 80%) of ``fn`` with CUDA events (``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    q20, median, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    return {"ms": median, "ms_q20": q20, "ms_q80": q80}


def cpu_time_ms(fn, *, reps=5) -> dict:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms": times[len(times) // 2], "ms_q20": times[len(times) // 5], "ms_q80": times[(4 * len(times)) // 5]}


def peak_extra_gb(fn) -> float:
    """Peak device memory a call allocates beyond what is alive before it (returned gradients count)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 1e9


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_extra_gb(fn) -> float:
    """Peak resident memory a call adds on CPU (Linux: the peak is reset through clear_refs)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kb("VmRSS")
    out = fn()
    peak = _rss_kb("VmHWM") - base
    del out
    return peak * 1024 / 1e9


def copy_bandwidth_tbps(numel=1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read plus written, on random bf16 data."""
    x = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = cuda_time_ms(lambda: y.copy_(x), warmup_ms=50, rep_ms=300)["ms"]
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e12


def matmul_tflops(m=8192, n=8192, k=8192) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, warmup_ms=50, rep_ms=300)["ms"]
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def print_table(rows: list[dict], columns: list[str], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")
