#!/usr/bin/env python3
"""Tables and plots from one card's benchmark CSVs; the short summary ``gpu_check.sh`` prints last.

Reads ``throughput.csv``, ``throughput_gate.csv``, ``memory.csv`` and ``memory_gate.csv`` from one
folder (whichever exist) and refuses CSVs from more than one card, and any that is not a complete
results CSV (a missing column, a row cut short: the error names the file and line). A folder that
does not exist is a usage error (exit status 2); one without any of the four CSVs, exit status 1.

    python bench/report.py bench/results/<card> [--tests "14 passed in 80.1s"] [--plots]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import providers as P  # noqa: E402

FILES = ("throughput", "throughput_gate", "memory", "memory_gate")
# The columns the tables read, beyond those every row carries (common.INFO_COLUMNS), and the figure a
# measured row (status ok, or model for the floor) must carry.
REQUIRED = {
    "throughput": ("provider", "form", "mode", "n", "vocab", "status"),
    "throughput_gate": ("provider", "form", "vocab", "status"),
    "memory": ("provider", "form", "n", "vocab", "status"),
    "memory_gate": ("provider", "form", "vocab", "status"),
}
MEASURED = {"throughput": "ms", "memory": "peak_extra_gb"}
FOCUS = (8192, 151936)
# The peers, then ours, in the order of providers.py, then the model floor: every provider has its place.
ORDER = (*sorted(dict.fromkeys(p.name for p in P.PROVIDERS),
                 key=lambda name: any(p.ours for p in P.PROVIDERS if p.name == name)), "floor")
MODES = {"fwd_bwd": "forward + backward", "fwd": "forward only"}
# One colour per provider in every panel; ours drawn thicker.
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan")
COLORS = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(ORDER[:-1])} | {"floor": "gray"}
FORMS = {"logits": "from logits", "linear": "fused linear (hidden @ W)"}


def load(folder) -> dict[str, list[dict]]:
    folder = Path(folder)
    paths = [folder / f"{name}.csv" for name in FILES if (folder / f"{name}.csv").exists()]
    rows = common.read_csvs(paths, REQUIRED)
    for r in rows:
        figure = MEASURED.get(r["source"])
        if figure and r["status"] in ("ok", "model") and common.number(r.get(figure)) is None:
            raise SystemExit(f"{folder / r['source']}.csv: line {r['source_line']}: status {r['status']} without "
                             f"a number in {figure} (a damaged file)")
    return {name: [r for r in rows if r["source"] == name] for name in FILES}


def _order(name) -> int:
    return ORDER.index(name) if name in ORDER else len(ORDER)


def _k(n) -> str:
    n = int(n)
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def focus_shape(rows, form):
    """The anchors' shape (N = 8192, V = 151,936) when measured, else the largest shape ours ran at."""
    shapes = {(int(r["n"]), int(r["vocab"])) for r in rows if r["form"] == form}
    if FOCUS in shapes:
        return FOCUS
    ran = [(int(r["n"]) * int(r["vocab"]), int(r["n"]), int(r["vocab"])) for r in rows
           if r["form"] == form and r.get("ours") == "1" and r["status"] == "ok"]
    if ran:
        return max(ran)[1:]
    return max(shapes, key=lambda s: s[0] * s[1]) if shapes else None


def throughput_table(rows, form, mode, shape) -> None:
    n, vocab = shape
    picked = sorted((r for r in rows if r["form"] == form and r["mode"] == mode and int(r["n"]) == n
                     and int(r["vocab"]) == vocab), key=lambda r: _order(r["provider"]))
    if not picked:
        return
    ours = next((common.number(r["ms"]) for r in picked if r["provider"] == "rlsd_kernels" and r["status"] == "ok"),
                None)
    first = picked[0]
    logits = form == "logits"
    ceiling = (f"copy {float(first['copy_tbps']):.3g} TB/s" if logits
               else f"matmul {float(first['matmul_tflops']):.3g} TFLOP/s")
    hidden = "" if logits else f" H={first['hidden']}"
    table = []
    for r in picked:
        ms = common.number(r.get("ms"))
        ok = r["status"] in ("ok", "model")
        rate = common.number(r.get("gb_per_s") if logits else r.get("tflop_per_s"))
        frac = common.number(r.get("frac_of_ceiling"))
        q20, q80 = common.number(r.get("ms_q20")), common.number(r.get("ms_q80"))
        note = "" if ok else r["status"][:70]
        if r.get("gate") == "FAILED" and ok:
            note = "gate FAILED: see the gate CSV"
        table.append({
            "provider": r["provider"],
            "ms": ms if ok else None,
            "q20-q80": f"{q20:.3g}-{q80:.3g}" if q20 is not None and q80 is not None else None,
            "GB/s" if logits else "TFLOP/s": rate if ok else None,
            "% ceil": f"{100 * frac:.0f}%" if frac is not None and ok else None,
            "peak GB": common.number(r.get("peak_extra_gb")) if ok else None,
            "t/ours": f"{ms / ours:.2f}" if ours and ms and ok else None,
            "note": note,
        })
    common.print_table(table, list(table[0]), title=f"{FORMS[form]}, {MODES[mode]}: N={n} V={vocab}{hidden} "
                       f"{first['dtype']}, {ceiling}")


def speedups(rows) -> list[str]:
    """Each peer's time over ours (``rlsd_kernels``) across every shape both ran: geometric mean, min, max."""
    lines = []
    for form in FORMS:
        for mode in MODES:
            sel = [r for r in rows if r["form"] == form and r["mode"] == mode and r["status"] == "ok"]
            ours = {(r["n"], r["vocab"]): float(r["ms"]) for r in sel if r["provider"] == "rlsd_kernels"}
            parts = []
            for peer in sorted({r["provider"] for r in sel if r.get("ours") == "0"}, key=_order):
                ratios = [float(r["ms"]) / ours[r["n"], r["vocab"]] for r in sel
                          if r["provider"] == peer and (r["n"], r["vocab"]) in ours]
                if ratios:
                    gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
                    parts.append(f"{peer} {gm:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)})")
            if parts:
                lines.append(f"{form} {mode}: " + "; ".join(parts))
    return lines


def memory_table(rows, form) -> None:
    sel = [r for r in rows if r["form"] == form]
    if not sel:
        return
    ns = sorted({int(r["n"]) for r in sel})
    table = []
    for name in sorted({r["provider"] for r in sel}, key=_order):
        row = {"provider": name}
        for n in ns:
            r = next((r for r in sel if r["provider"] == name and int(r["n"]) == n), None)
            if r is None:
                cell = None
            elif r["status"] == "ok":
                cell = f"{float(r['peak_extra_gb']):.2f}"
            elif r["status"] == "OOM" or "OOM" in r["status"]:
                cell = "OOM"
            elif "do not fit" in r["status"]:
                cell = "no fit"
            else:
                cell = r["status"].split(":")[0]
            row[_k(n)] = cell
        table.append(row)
    first = sel[0]
    hidden = "" if form == "logits" else f" H={first['hidden']}"
    common.print_table(table, list(table[0]), title=f"peak extra GB, {FORMS[form]}, one sequence of N tokens, "
                       f"V={first['vocab']}{hidden} {first['dtype']} (fwd+bwd)")


def gate_summary(rows) -> list[str]:
    if not rows:
        return []
    bad = {}
    for r in rows:
        if r["status"] != "ok":
            bad.setdefault((r["form"], r["provider"], r["status"][:90]), set()).add(r["vocab"])
    ok = sum(r["status"] == "ok" for r in rows)
    lines = [f"gate vs float64 reference: {ok}/{len(rows)} ok"]
    for (form, prov, status), vocabs in sorted(bad.items()):
        lines.append(f"  {form} {prov}: {status} (V={','.join(sorted(vocabs))})")
    return lines


def plot_throughput(rows, path) -> Path | None:
    """Time against N at the focus vocabulary, forward + backward, one panel per form."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    forms = [f for f in FORMS if any(r["form"] == f for r in rows)]
    fig, axes = plt.subplots(1, len(forms), figsize=(6.5 * len(forms), 4.8), squeeze=False)
    for ax, form in zip(axes[0], forms, strict=True):
        shape = focus_shape(rows, form)
        sel = [r for r in rows if r["form"] == form and r["mode"] == "fwd_bwd" and int(r["vocab"]) == shape[1]
               and r["status"] in ("ok", "model")]
        for name in sorted({r["provider"] for r in sel}, key=_order):
            pts = sorted((int(r["n"]), float(r["ms"])) for r in sel if r["provider"] == name)
            style = {"linestyle": "--"} if name == "floor" else {"marker": "o"}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, color=COLORS.get(name),
                    linewidth=2.5 if name.startswith("rlsd_kernels") else 1.2, **style)
        ax.set(yscale="log", ylabel="ms (median)", title=f"{FORMS[form]}, fwd+bwd, V={shape[1]}")
        _tokens_axis(ax, {int(r["n"]) for r in sel}, "tokens N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['device']}, {rows[0]['dtype']}, torch {rows[0]['torch']}, commit {rows[0]['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_memory(rows, path) -> Path | None:
    """Peak extra memory against sequence length, one panel per form; where each provider ran out."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    forms = [f for f in FORMS if any(r["form"] == f for r in rows)]
    fig, axes = plt.subplots(1, len(forms), figsize=(6.5 * len(forms), 4.8), squeeze=False)
    for ax, form in zip(axes[0], forms, strict=True):
        sel = [r for r in rows if r["form"] == form]
        for name in sorted({r["provider"] for r in sel}, key=_order):
            mine = [r for r in sel if r["provider"] == name]
            pts = sorted((int(r["n"]), float(r["peak_extra_gb"])) for r in mine if r["status"] == "ok")
            oom = sorted(int(r["n"]) for r in mine if r["status"] == "OOM")
            label = name + (f" (OOM at N={_k(oom[0])})" if oom else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, color=COLORS.get(name),
                    linewidth=2.5 if name.startswith("rlsd_kernels") else 1.2)
            if oom:
                # Where it ran out: a cross on the top edge of the panel.
                ax.plot([oom[0]], [1.0], marker="X", markersize=10, color=COLORS.get(name),
                        transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set(ylabel="peak extra GB (forward + backward)", title=f"{FORMS[form]}, V={sel[0]['vocab']}")
        ax.set_ylim(bottom=0)
        _tokens_axis(ax, {int(r["n"]) for r in sel}, "sequence length N (tokens, one sequence)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['device']}, {rows[0]['dtype']}, torch {rows[0]['torch']}, commit {rows[0]['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _tokens_axis(ax, ns, label):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ns), [_k(n) for n in sorted(ns)])
    ax.minorticks_off()
    ax.set_xlabel(label)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    return plt


def mixed_runs(rows) -> str | None:
    """A line naming each file's commit and date where the CSVs come from more than one run (a
    folder reused by a later run that wrote only some of them), else None."""
    runs = {}
    for r in rows:
        runs.setdefault(r["source"], (r["commit"], r["date"]))
    if len(set(runs.values())) < 2:
        return None
    files = "; ".join(f"{name}.csv: commit {c}, {d}" for name, (c, d) in runs.items())
    return f"note: these CSVs come from more than one run ({files}); the tables put them side by side"


def summary(folder, tests: str | None = None) -> bool:
    """The short table: device, tests, gate, the anchors' shape per form, speed-ups, long-trace memory.
    False (and a line saying so) when the folder holds no benchmark CSV."""
    data = load(folder)
    every = [r for rows in data.values() for r in rows]
    if not every:
        print(f"no benchmark CSVs ({', '.join(f + '.csv' for f in FILES)}) in {folder}", file=sys.stderr)
        return False
    r0 = every[0]
    print(f"\n=== rlsd-kernels on {r0['device']}: torch {r0['torch']}, triton {r0['triton']}, commit {r0['commit']}, "
          f"{r0['date']} ===")
    mixed = mixed_runs(every)
    if mixed:
        print(mixed)
    if tests:
        print(f"gpu tests: {tests}")
    thr = data["throughput"]
    if thr:
        print(f"ceilings (measured): copy {float(thr[0]['copy_tbps']):.3g} TB/s, "
              f"matmul {float(thr[0]['matmul_tflops']):.3g} TFLOP/s")
    for line in gate_summary(data["throughput_gate"] + data["memory_gate"]):
        print(line)
    for form in FORMS:
        shape = focus_shape(thr, form)
        if shape:
            throughput_table(thr, form, "fwd_bwd", shape)
    lines = speedups(thr)
    if lines:
        print("\npeer time / ours across the grid: geometric mean (min-max, shapes)")
        for line in lines:
            print("  " + line)
    for form in FORMS:
        memory_table(data["memory"], form)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="one card's results folder (bench/results/<card>, or $OUT)")
    parser.add_argument("--tests", default=None, help="the gpu test summary line, printed with the table")
    parser.add_argument("--plots", action="store_true", help="(re)write throughput.png and memory.png there too")
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        parser.error(f"folder {args.folder!r} does not exist or is not a folder")
    if args.plots:
        data = load(args.folder)
        for name, fn in (("throughput", plot_throughput), ("memory", plot_memory)):
            out = fn(data[name], Path(args.folder) / f"{name}.png")
            if out:
                print(f"written: {out}")
    return 0 if summary(args.folder, args.tests) else 1


if __name__ == "__main__":
    sys.exit(main())
