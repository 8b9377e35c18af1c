"""Reads a study's run CSVs; writes ``curves.csv``, ``summary.csv`` and ``curves.png``; returns the table.

Table columns, per task and method (means over seeds of each seed's value):
final held-out accuracy (the mean of a seed's last three evaluations after step 0, up to the last
step that every seed of the method has; mean ± sd over seeds; marked † with a note under the table
where the seeds end at different steps), the peak of the seed-mean curve (and its step), the first
step at which the seed-mean curve (trailing mean over three evaluations after step 0) reaches GRPO's
final (and that step over GRPO's own; "not reached", "GRPO no gain" where GRPO's final is not above
its start, "no GRPO run"), response length, the mean credit weight over tokens with a non-zero
advantage (RLSD only; over the evaluation windows with λ > 0, where the weight acts), and seconds per
step split into rollout, teacher and update.

A run CSV whose last row was cut off (an interrupted write) loses that row, and an empty or
header-only one is skipped, each with a warning on stderr; a malformed one raises ``ValueError``
naming the file.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import statistics
import sys
from collections import defaultdict

TEXT_COLUMNS = ("task", "method", "rollout")
REQUIRED_COLUMNS = ("task", "method", "seed", "step", "accuracy", "rollout_s", "teacher_s", "update_s")


def _warn(message: str):
    print(f"warning: {message}", file=sys.stderr)


def read_run(path: str) -> list[dict]:
    """The rows of one run CSV, numbers as floats (an empty cell is NaN).

    An empty or header-only file gives no rows and a last row cut short (fewer cells than the
    header, or no line end) is dropped, each with a warning; a missing column, a short row before the
    last, a long row or a cell that is not a number raises ``ValueError`` naming the file.
    """
    try:
        with open(path, newline="") as f:
            text = f.read()
        table = list(csv.reader(text.splitlines(keepends=True)))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"run CSV {path}: unreadable ({e})") from None
    if not table:
        _warn(f"run CSV {path} is empty; skipped")
        return []
    header, body = table[0], table[1:]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"run CSV {path}: no column {', '.join(missing)} (header: {','.join(header)})")
    if body and (len(body[-1]) < len(header) or not text.endswith(("\n", "\r"))):
        _warn(f"run CSV {path}: last row (line {len(table)}) is incomplete (an interrupted write?); skipped")
        body = body[:-1]
    if not body:
        _warn(f"run CSV {path} has a header and no rows; skipped")
        return []
    rows = []
    for line, cells in enumerate(body, start=2):
        if len(cells) != len(header):
            raise ValueError(f"run CSV {path}, line {line}: {len(cells)} cells, the header has {len(header)}")
        row = dict(zip(header, cells, strict=True))
        for key, value in row.items():
            if key in TEXT_COLUMNS:
                continue
            try:
                row[key] = float(value) if value != "" else math.nan
            except ValueError:
                raise ValueError(f"run CSV {path}, line {line}: {key} is {value!r}, not a number") from None
        for key in ("seed", "step"):
            if not float(row[key]).is_integer():
                raise ValueError(f"run CSV {path}, line {line}: {key} is {row[key]!r}, not a whole number")
        rows.append(row)
    return rows


def load_runs(out: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "runs", "*.csv"))):
        rows.extend(read_run(path))
    return rows


def _curves(rows, metric="accuracy"):
    """``{(task, method): {seed: [(step, value), ...]}}`` of ``metric``."""
    curves = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if not math.isnan(r.get(metric, math.nan)):
            curves[(r["task"], r["method"])][int(r["seed"])].append((int(r["step"]), r[metric]))
    return curves


def _mean_curve(by_seed):
    """Seed-mean accuracy at the steps every seed has."""
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in by_seed.values())))
    table = {seed: dict(c) for seed, c in by_seed.items()}
    return [(s, statistics.fmean(t[s] for t in table.values())) for s in steps]


SMOOTH = 3


def _smooth(curve, window=SMOOTH):
    """Trailing mean over ``window`` evaluations (fewer at the start). The step-0 evaluation (the warm
    start) stays as it is and enters no later point's mean, whatever the spacing of the evaluations."""
    out = []
    for i, (step, value) in enumerate(curve):
        values = [v for s, v in curve[max(0, i - window + 1) : i + 1] if s > 0] if step > 0 else [value]
        out.append((step, statistics.fmean(values)))
    return out


def _first_reach(curve, level):
    for step, acc in curve:
        if step > 0 and acc >= level - 1e-9:
            return step
    return None


def _mean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


def summarize(rows, metric="accuracy") -> list[dict]:
    curves = _curves(rows, metric)
    last = {}
    for r in rows:
        key = (r["task"], r["method"], int(r["seed"]))
        if key not in last or r["step"] > last[key]["step"]:
            last[key] = r
    by_run = defaultdict(list)
    for r in rows:
        if r["step"] > 0:
            by_run[(r["task"], r["method"])].append(r)
    out = []
    for (task, method), by_seed in sorted(curves.items()):
        mean_curve = _mean_curve(by_seed)
        if not mean_curve:
            raise ValueError(f"{task} {method}: its seeds {sorted(by_seed)} share no evaluation step")
        # A seed's final accuracy: the mean of its last SMOOTH evaluations (one is too noisy), all seeds
        # at the last step they share (a resume with another --steps leaves runs of different lengths).
        end = mean_curve[-1][0]
        finals = [_smooth([x for x in sorted(c) if x[0] <= end])[-1][1] for c in by_seed.values()]
        seed_ends = sorted({max(s for s, _ in c) for c in by_seed.values()})
        peak_step, peak = max(mean_curve, key=lambda x: x[1])
        # Runs through TRL compare with TRL's GRPO run.
        grpo = curves.get((task, "trl-grpo" if method.startswith("trl-") else "grpo"))
        reach = ratio = None
        if not grpo:
            reach = "no GRPO run"
        else:
            # Steps at which the seed-mean curve, smoothed like the finals, first reaches GRPO's final.
            grpo_curve = _smooth(_mean_curve(grpo))
            level = grpo_curve[-1][1]
            # GRPO's final at or below its start: there is no gain whose speed could be compared.
            if level > grpo_curve[0][1]:
                reach = _first_reach(_smooth(mean_curve), level)
                grpo_reach = _first_reach(grpo_curve, level)
                if reach is not None and grpo_reach:
                    ratio = reach / grpo_reach
            else:
                reach = "GRPO no gain"
        runs = by_run[(task, method)]
        # The credit weight acts only where lam > 0 (a run without a lam column: every window).
        credit = [r.get("credit_weight_nonzero", math.nan) for r in runs
                  if math.isnan(r.get("lam", math.nan)) or r["lam"] > 0]
        lasts = [last[(task, method, s)] for s in by_seed]
        out.append({
            "metric": metric,
            "task": task,
            "method": method,
            "seeds": len(by_seed),
            "start_acc": mean_curve[0][1],
            "final_acc": statistics.fmean(finals),
            "final_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "peak_acc": peak,
            "peak_step": peak_step,
            "last_step": end,
            "seed_last_steps": "/".join(f"{s:.0f}" for s in seed_ends),
            "steps_to_grpo_final": reach,
            "vs_grpo_steps": ratio,
            "response_len": _mean([r.get("response_len", math.nan) for r in runs]),
            "credit_weight_nonzero": _mean(credit),
            "rollout_s": _mean([r["rollout_s"] for r in lasts]),
            "teacher_s": _mean([r["teacher_s"] for r in lasts]),
            "update_s": _mean([r["update_s"] for r in lasts]),
        })
    return out


def _fmt(x, spec=".3f"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def table(summary) -> str:
    head = (f"{summary[0]['metric']} (held-out):\n\n"
            "| task | method | seeds | start | final ± sd | peak (step) | steps to GRPO final (×GRPO) "
            "| resp. len | credit w (A≠0) | s/step rollout / teacher / update |")
    lines = [head, "|" + "---|" * 10]
    notes = []
    for s in summary:
        reach = s["steps_to_grpo_final"]
        if reach is None:
            reach = "not reached"
        elif not isinstance(reach, str):
            reach = f"{reach:.0f} ({_fmt(s['vs_grpo_steps'], '.2f')})"
        mark = ""
        if "/" in s["seed_last_steps"]:
            mark = " †"
            notes.append(f"{s['task']} {s['method']}: seeds end at steps {s['seed_last_steps']}")
        lines.append(
            f"| {s['task']} | {s['method']} | {s['seeds']} | {_fmt(s['start_acc'])} "
            f"| {_fmt(s['final_acc'])} ± {_fmt(s['final_sd'])}{mark} | {_fmt(s['peak_acc'])} ({s['peak_step']:.0f}) "
            f"| {reach} | {_fmt(s['response_len'], '.1f')} | {_fmt(s['credit_weight_nonzero'], '.4f')} "
            f"| {_fmt(s['rollout_s'], '.2f')} / {_fmt(s['teacher_s'], '.2f')} / {_fmt(s['update_s'], '.2f')} |"
        )
    if notes:
        lines.append("\n† final, peak and curve at the last step that every seed has; " + "; ".join(notes) + ".")
    return "\n".join(lines)


def plot(rows, path: str, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    # One colour per method across every panel.
    colors = {m: f"C{i % 10}" for i, m in enumerate(sorted({r["method"] for r in rows}))}
    fig, axes = plt.subplots(len(metrics), len(tasks), figsize=(6.5 * len(tasks), 4.2 * len(metrics)), squeeze=False)
    for (row, metric), (col, task) in ((m, t) for m in enumerate(metrics) for t in enumerate(tasks)):
        ax, curves = axes[row][col], _curves(rows, metric)
        methods = sorted(m for t, m in curves if t == task)
        for method in methods:
            color = colors[method]
            by_seed = curves[(task, method)]
            for c in by_seed.values():
                ax.plot(*zip(*sorted(c), strict=True), color=color, alpha=0.2, lw=0.8)
            ax.plot(*zip(*_mean_curve(by_seed), strict=True), color=color, lw=2,
                    label=f"{method} ({len(by_seed)} seeds)")
        ax.set_title(f"{task}: held-out {'greedy' if metric == 'accuracy' else 'sampled (T=1)'} accuracy")
        ax.set_xlabel("RL step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: str) -> str:
    rows = load_runs(out)
    if not rows:
        raise ValueError(f"no run CSVs under {os.path.join(out, 'runs')}")
    keys = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    with open(os.path.join(out, "curves.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    metrics = [m for m in ("accuracy", "sampled_accuracy") if any(not math.isnan(r.get(m, math.nan)) for r in rows)]
    summaries = [summarize(rows, m) for m in metrics]
    for s in summaries[0]:
        if "/" in s["seed_last_steps"]:
            _warn(f"{s['task']} {s['method']}: seeds end at steps {s['seed_last_steps']}; its final is taken "
                  f"at step {s['last_step']:.0f}, the last step they all have")
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summaries[0][0].keys()))
        w.writeheader()
        for summary in summaries:
            w.writerows(summary)
    plot(rows, os.path.join(out, "curves.png"), metrics)
    text = "\n\n".join(table(s) for s in summaries)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    return text
