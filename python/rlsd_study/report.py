"""Reads a study's run CSVs; writes ``curves.csv``, ``summary.csv`` and ``curves.png``; returns the table.

Table columns, per task and method (means over seeds of each seed's value):
final held-out accuracy (the mean of a seed's last three evaluations; mean ± sd over seeds), the
peak of the seed-mean curve (and its step), the first step at which the seed-mean curve (trailing
mean over three evaluations) reaches GRPO's final (and that step over GRPO's own), response length,
the mean credit weight over tokens with a non-zero advantage (RLSD only), and seconds per step split
into rollout, teacher and update.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import statistics
from collections import defaultdict


def load_runs(out: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "runs", "*.csv"))):
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key not in ("task", "method", "rollout"):
                        row[key] = float(value) if value not in ("", None) else math.nan
                rows.append(row)
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
    """Trailing mean over ``window`` evaluations (fewer at the start)."""
    out = []
    for i, (step, _) in enumerate(curve):
        values = [v for _, v in curve[max(0, i - window + 1) : i + 1]]
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
        # A seed's final accuracy: the mean of its last SMOOTH evaluations (one is too noisy).
        finals = [_smooth(sorted(c))[-1][1] for c in by_seed.values()]
        mean_curve = _mean_curve(by_seed)
        peak_step, peak = max(mean_curve, key=lambda x: x[1])
        # Runs through TRL compare with TRL's GRPO run.
        grpo = curves.get((task, "trl-grpo" if method.startswith("trl-") else "grpo"))
        reach = ratio = None
        if grpo:
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
            "last_step": mean_curve[-1][0],
            "steps_to_grpo_final": reach,
            "vs_grpo_steps": ratio,
            "response_len": _mean([r.get("response_len", math.nan) for r in runs]),
            "credit_weight_nonzero": _mean([r.get("credit_weight_nonzero", math.nan) for r in runs]),
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
    for s in summary:
        reach = s["steps_to_grpo_final"]
        if reach is None:
            reach = "not reached"
        elif not isinstance(reach, str):
            reach = f"{reach:.0f} ({_fmt(s['vs_grpo_steps'], '.2f')})"
        lines.append(
            f"| {s['task']} | {s['method']} | {s['seeds']} | {_fmt(s['start_acc'])} "
            f"| {_fmt(s['final_acc'])} ± {_fmt(s['final_sd'])} | {_fmt(s['peak_acc'])} ({s['peak_step']:.0f}) "
            f"| {reach} | {_fmt(s['response_len'], '.1f')} | {_fmt(s['credit_weight_nonzero'], '.4f')} "
            f"| {_fmt(s['rollout_s'], '.2f')} / {_fmt(s['teacher_s'], '.2f')} / {_fmt(s['update_s'], '.2f')} |"
        )
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
