"""Shared benchmark plumbing: device facts, timing, peak memory, ceilings, OOM guards, CSV rows.

Every figure a benchmark writes carries the card's name, the torch and triton versions, the commit
and the date; figures from different cards are never put side by side (:func:`read_csvs` refuses).
The same functions run on CUDA and, at tiny sizes, on CPU, so every code path of the GPU benchmarks
can be exercised without a GPU.
"""

from __future__ import annotations

import csv
import datetime
import functools
import gc
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
GPU_ONLY = ("{what} needs a CUDA GPU and none is visible here, so nothing was measured. "
            "For a dry run of its code paths at tiny sizes on CPU, pass --device cpu.")


class Unavailable(Exception):
    """A provider that cannot run here (not installed, not in this version, needs CUDA)."""


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(GPU_ONLY.format(what=what))


def pick_device(requested: str | None, what: str) -> torch.device:
    """``cuda`` unless ``cpu`` is asked for; a clear exit (no traceback) when CUDA is asked for and absent."""
    if requested == "cpu":
        return torch.device("cpu")
    require_cuda(what)
    return torch.device("cuda")


def _git_tree_hash(folder: Path) -> str:
    """Git's tree hash of a folder of plain files (``git rev-parse HEAD:<folder>`` gives the same when clean)."""
    entries = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name + ("/" if p.is_dir() else "")):
        if path.name in ("__pycache__", ".git") or path.name.endswith(".pyc"):
            continue
        if path.is_dir():
            mode, digest = b"40000", bytes.fromhex(_git_tree_hash(path))
        else:
            data = path.read_bytes()
            mode = b"100755" if os.access(path, os.X_OK) else b"100644"
            digest = hashlib.sha1(b"blob %d\0" % len(data) + data).digest()
        entries.append(mode + b" " + path.name.encode() + b"\0" + digest)
    body = b"".join(entries)
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


@functools.cache
def commit() -> str:
    """The commit, ``-dirty`` when the library's files differ from it; without git, the library's tree hash."""
    try:
        run = functools.partial(subprocess.run, capture_output=True, text=True, cwd=ROOT, timeout=10)
        head = run(["git", "rev-parse", "--short=12", "HEAD"]).stdout.strip()
        if head:
            dirty = run(["git", "status", "--porcelain", "--", "rlsd_kernels"]).stdout.strip()
            return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    # A copy of the working tree without .git: `git log --format=%h -1 <commit>:rlsd_kernels` style
    # look-ups match this against the history.
    return "tree-" + _git_tree_hash(ROOT / "rlsd_kernels")[:12]


@functools.cache
def device_info(device: str = "") -> dict:
    """Columns every CSV row carries. ``device`` is ``"cpu"`` or ``"cuda"`` (default: cuda when present)."""
    import triton

    on_cuda = device == "cuda" or (device == "" and torch.cuda.is_available())
    return {
        "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "",
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
    }


def card_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower() or "cpu"


def write_csv(rows: list[dict], name: str, out_dir: str | Path | None = None, device: str = "") -> Path:
    """Writes rows under ``bench/results/<card>/<name>.csv`` (or ``out_dir``) and returns the path.

    Called again with more rows it rewrites the file, so a sweep that is stopped keeps what it measured.
    """
    if not rows:
        raise ValueError("no rows to write")
    info = device_info(device)
    folder = Path(out_dir) if out_dir else RESULTS / card_slug(info["device"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    fields = list(info)
    for row in rows:
        fields += [k for k in row if k not in fields]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**info, **{k: _cell(v) for k, v in row.items()}})
    tmp.replace(path)
    return path


def _cell(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def read_csvs(paths) -> list[dict]:
    """Rows of several CSVs written by :func:`write_csv`; refuses figures from more than one card."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows += [dict(r, source=Path(path).stem) for r in csv.DictReader(f)]
    devices = sorted({r["device"] for r in rows})
    if len(devices) > 1:
        raise SystemExit(f"these CSVs come from different cards ({', '.join(devices)}): figures from different "
                         "cards are never put side by side; give one card's folder")
    return rows


def number(v):
    """A CSV cell as a float, or None when empty."""
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Returns cached device memory; ``collect`` first breaks reference cycles (an exception's frames)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_free_gb(device: torch.device) -> float | None:
    """Free device memory (CUDA), or None where it cannot be known cheaply (CPU)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) / 1e9


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def guarded(task, device: torch.device):
    """Runs ``task()``; returns ``(result, status)``, status ``ok``, ``OOM``, ``unavailable: ...`` or ``error: ...``.

    Memory is freed after the exception is gone (its traceback holds the frames and their tensors).
    """
    result, status, failed = None, "ok", False
    try:
        result = task()
    except Unavailable as e:
        status = f"unavailable: {e}"
    except Exception as e:  # one provider failing must not cost the others
        failed = True
        if is_oom(e):
            status = "OOM"
        else:
            status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            import traceback

            traceback.print_exc(limit=-3, file=sys.stdout)
    free_memory(device, collect=failed)
    return result, status


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class _Clock:
    """Per-call timing: CUDA events on a GPU, the wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pairs = []

    def __call__(self, fn):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pairs.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            self.pairs.append((t0, time.perf_counter()))

    def times_ms(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [s.elapsed_time(e) for s, e in self.pairs]
        return [(e - s) * 1e3 for s, e in self.pairs]


class _Peak:
    """Peak memory a block allocates beyond what is alive when it starts (CUDA allocator; CPU resident set)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # resets the peak (VmHWM) to the current resident set; Linux only
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = _rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 1e9
        else:
            self.gb = max(0, _rss_bytes("VmHWM") - self.base) / 1e9
        return False


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn, device: torch.device, *, timing=True, warmup_ms=25.0, rep_ms=100.0, min_reps=3,
            max_reps=200, slow_ms=250.0) -> dict:
    """Times ``fn()`` (one call, outputs discarded) and its peak extra memory.

    The first call (compilation, tuning) is timed by the wall clock only (``first_call_s``). The
    second call gives an estimate and the peak memory. Then, after ``warmup_ms`` of warm-up, as many
    calls as fit in ``rep_ms``, with at least ``min_reps`` timed calls in all (two where a call takes
    longer than ``slow_ms``); median and 20/80 % quantiles are over the timed calls, the estimate
    included. Peak extra memory counts everything a call allocates beyond its inputs, the returned
    gradients included. With ``timing=False`` only the two first calls run (memory sweeps).
    """
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first_call_s = time.perf_counter() - t0
    clock = _Clock(device)
    with _Peak(device) as peak:
        clock(fn)
        estimate = clock.times_ms()[0]
    out = {"first_call_s": first_call_s, "peak_extra_gb": peak.gb}
    if not timing:
        return {**out, "ms": estimate, "ms_q20": None, "ms_q80": None, "reps": 1}
    for _ in range(min(max_reps, int(warmup_ms / max(estimate, 1e-3)))):
        fn()
    floor = 1 if estimate > slow_ms else min_reps - 1
    for _ in range(max(floor, min(max_reps, int(rep_ms / max(estimate, 1e-3))))):
        clock(fn)
    times = sorted(clock.times_ms())
    return {**out, "ms": _quantile(times, 0.5), "ms_q20": _quantile(times, 0.2), "ms_q80": _quantile(times, 0.8),
            "reps": len(times)}


def copy_bandwidth_tbps(device: torch.device | str = "cuda", numel: int | None = None, rep_ms=300.0) -> float:
    """Copy bandwidth, bytes read plus written, on random bf16 (CUDA: 2 GiB) or float32 (CPU) data."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    numel = numel or (1 << 30 if cuda else 1 << 22)
    x = torch.randn(numel, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    y = torch.empty_like(x)
    ms = measure(lambda: y.copy_(x), device, warmup_ms=rep_ms / 6, rep_ms=rep_ms)["ms"]
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e12


def matmul_tflops(device: torch.device | str = "cuda", size: int | None = None, rep_ms=300.0) -> float:
    """Dense matmul rate: bf16 8192^3 on CUDA, float32 256^3 on CPU."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    size = size or (8192 if cuda else 256)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = measure(lambda: a @ b, device, warmup_ms=rep_ms / 6, rep_ms=rep_ms)["ms"]
    return 2 * size**3 / (ms * 1e-3) / 1e12


def ceilings(device: torch.device, rep_ms=300.0) -> dict:
    """The card's measured copy bandwidth and matmul rate, the denominators of every fraction reported."""
    out = {"copy_tbps": copy_bandwidth_tbps(device, rep_ms=rep_ms),
           "matmul_tflops": matmul_tflops(device, rep_ms=rep_ms)}
    free_memory(device)
    return out


class Progress:
    """A tqdm bar where there is a terminal (and tqdm), plain log lines always."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc)
            except ImportError:
                pass

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_table(rows: list[dict], columns: list[str], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if v != 0 and abs(v) < 0.01:
            return f"{v:.1e}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}" if abs(v) >= 1000 else f"{v:.1f}"
    return str(v)


def parse_ints(text: str) -> list[int]:
    """``"1k,4k,151936"`` -> ``[1024, 4096, 151936]`` (k = 1024)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def check_choices(**given) -> None:
    """A clear exit for an unknown name in a comma list: ``check_choices(forms=(given, allowed))``."""
    for what, (values, allowed) in given.items():
        bad = sorted(set(values) - set(allowed))
        if bad:
            raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")

