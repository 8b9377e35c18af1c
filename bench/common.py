"""Shared benchmark plumbing: device facts, timing, peak memory, ceilings, OOM guards, CSV rows.

Every figure a benchmark writes carries the card's name, the torch and triton versions, the commit
and the date; figures from different cards are never put side by side (:func:`read_csvs` refuses).
The same functions run on CUDA and, at tiny sizes, on CPU, so every code path of the GPU benchmarks
can be exercised without a GPU.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import hashlib
import io
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
GPU_ONLY = "{what} needs a CUDA GPU and none is visible here, so nothing was measured. {hint}"
DRY_RUN_HINT = "For a dry run of its code paths at tiny sizes on CPU, pass --device cpu."


class Unavailable(Exception):
    """A provider that cannot run here (not installed, not in this version, needs CUDA)."""


def require_cuda(what: str, hint: str = DRY_RUN_HINT) -> None:
    """A clear exit (no traceback) where no CUDA GPU is visible; ``hint`` says what runs without one."""
    if not torch.cuda.is_available():
        raise SystemExit(GPU_ONLY.format(what=what, hint=hint))


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


# The columns every results row carries filled (``cuda`` is empty on a CPU-only torch).
INFO_COLUMNS = ("device", "torch", "triton", "commit", "date")


def read_csv(path, required=()) -> list[dict]:
    """Rows of one CSV written by :func:`write_csv`, each with ``source`` (the file's stem) and
    ``source_line`` (its line in the file).

    Refuses (a clear exit naming the file and line) what :func:`write_csv` never writes: a file that is
    not UTF-8 text, a header without the columns of :data:`INFO_COLUMNS` or of ``required``, a row with fewer or more
    fields than the header or an empty ``device``/version/commit/date cell, a last line cut short.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise SystemExit(f"{path}: not a results CSV (not UTF-8 text)") from None
    if "\0" in text:
        raise SystemExit(f"{path}: not a results CSV (binary content)")
    if text and not text.endswith("\n"):
        raise SystemExit(f"{path}: the last line is cut short (the file does not end with a line break)")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise SystemExit(f"{path}: empty file, not a results CSV")
    missing = [c for c in (*INFO_COLUMNS, *required) if c not in header]
    if missing:
        raise SystemExit(f"{path}: not a results CSV: no column {', '.join(missing)}")
    rows = []
    for record in reader:
        line = reader.line_num
        if len(record) != len(header):
            raise SystemExit(f"{path}: line {line} has {len(record)} fields, the header {len(header)} "
                             "(a truncated or damaged file)")
        row = dict(zip(header, record, strict=True))
        empty = [c for c in INFO_COLUMNS if not row[c]]
        if empty:
            raise SystemExit(f"{path}: line {line}: empty {', '.join(empty)} (a truncated or damaged file)")
        rows.append(dict(row, source=path.stem, source_line=line))
    return rows


def read_csvs(paths, required=None) -> list[dict]:
    """Rows of several CSVs (:func:`read_csv`; ``required`` maps a file's stem to the columns it must
    have); refuses figures from more than one card."""
    rows = []
    for path in paths:
        rows += read_csv(path, (required or {}).get(Path(path).stem, ()))
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


def positive_int(part: str) -> int:
    """An argparse type: one size, ``k`` = 1024 (``"1.5k"`` -> 1536); anything but a whole number of at
    least 1 is refused."""
    text = part.strip().lower()
    scale = 1024 if text.endswith("k") else 1
    try:
        value = Decimal(text[:-1] if scale > 1 else text) * scale
    except ArithmeticError:
        raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a size (a whole number, k = 1024)") from None
    if not value.is_finite() or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{part.strip()!r}: must be a whole number of at least 1")
    return int(value)


def parse_ints(text: str) -> list[int]:
    """An argparse type: ``"1k,4k,151936"`` -> ``[1024, 4096, 151936]`` (k = 1024).

    Every value must be a whole number of at least 1; an empty list or an empty item is refused, and
    a repeated value is dropped (the first one keeps its place).
    """
    parts = text.split(",")
    if any(not part.strip() for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated sizes, e.g. 1k,8k (no empty item)")
    return list(dict.fromkeys(positive_int(part) for part in parts))


def non_negative(text: str) -> float:
    """An argparse type: a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of at least 0")
    return value


def share(text: str) -> float:
    """An argparse type: a part of a whole, a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number in (0, 1]")
    return value


def names(allowed, what: str):
    """An argparse type for a comma list of names from ``allowed``: a list without duplicates, in order;
    an empty list, an empty item or an unknown name is refused."""

    def parse(text: str) -> list[str]:
        parts = [part.strip() for part in text.split(",")]
        if any(not part for part in parts):
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {what} from {', '.join(allowed)} "
                                             "(no empty item)")
        bad = [part for part in parts if part not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
        return list(dict.fromkeys(parts))

    return parse


def out_folder(text: str) -> Path:
    """An argparse type for ``--out``: a folder, created now (a path that cannot be one is refused)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (leave --out out for the default folder)")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot use {text!r} as a folder: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}")
    return path


def sweep_arguments(p: argparse.ArgumentParser, presets, forms, provider_names, *, max_call_s: float,
                    providers_help: str) -> None:
    """The arguments both sweeps (throughput and memory) take besides their sizes: device and preset,
    forms and providers, the time budget and its logits share, the per-call limit, output and display."""
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a dry run of the code paths at tiny sizes (no figures worth keeping)")
    p.add_argument("--preset", choices=sorted(presets), default=None,
                   help="sizes: full (default on cuda), quick, tiny (default on cpu); a size flag given "
                        "replaces the preset's")
    p.add_argument("--forms", type=names(forms, "forms"), default=list(forms), help="logits, linear or both")
    p.add_argument("--providers", type=names(provider_names, "providers"), default=None,
                   help=f"a subset of {','.join(provider_names)}; {providers_help}")
    p.add_argument("--budget-s", type=non_negative, default=0,
                   help="start nothing new after this many seconds (0: no limit)")
    p.add_argument("--logits-share", type=share, default=0.4,
                   help="the part of the budget (in (0, 1]) the logits form may use before the linear form starts")
    p.add_argument("--max-call-s", type=non_negative, default=max_call_s,
                   help="a provider whose call took longer is not tried at larger N (0: no limit)")
    p.add_argument("--out", type=out_folder, default=None,
                   help="folder for CSVs and the plot, created if need be (default bench/results/<card>/)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="log lines only, no progress bar")
