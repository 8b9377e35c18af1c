"""Runs a study: warm starts (cached), then every (task, method, seed) RL run, one process per core.

Each run writes ``runs/<task>__<method>__seed<k>.csv`` under the output folder, so a study can be
extended or resumed and ``report`` reads whatever is there. The settings that determine a run (or a
warm start) are recorded with it (``runs/<name>.settings.json``, the warm start's json): a resumed
study keeps a finished run only when they match the command's, and stops with ``SettingsMismatch``
otherwise. The operational flags (workers, output folder, device, attention) are not compared.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import sys
import time
from dataclasses import asdict, dataclass, field

from .methods import parse_method
from .train import RLConfig


@dataclass
class StudyConfig:
    tasks: list[str]
    methods: list[str]
    seeds: list[int]
    rl: RLConfig
    out: str
    chain_steps: int = 13
    sum_terms: int = 4
    num_train: int = 20000
    num_test: int = 200
    warm_target: float = 0.3
    warm_max_steps: int = 1500
    warm_lr: float = 1e-3
    warm_lr_end: float | None = None
    warm_check_every: int = 50
    warm_per_seed: bool = False
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    workers: int = 1
    rollout: str = "builtin"
    trainer: str = "native"
    device: str = "cpu"  # where the models train and sample ("cuda": one worker)
    attention: str = "auto"  # model.resolve_attention: flash-attn on a GPU where it is installed, else SDPA
    extra: dict = field(default_factory=dict)


class SettingsMismatch(ValueError):
    """A kept run or warm start under the output folder was made with other settings than this command's."""


def warm_settings(cfg: StudyConfig, task: str, seed: int) -> dict:
    """What determines the warm start of ``task`` (``seed`` only with ``warm_per_seed``)."""
    task_option = {"chain": {"chain_steps": cfg.chain_steps}, "fib": {"chain_steps": cfg.chain_steps},
                   "sum": {"sum_terms": cfg.sum_terms}}.get(task, {})
    return {"task": task, **task_option, "num_train": cfg.num_train, "num_test": cfg.num_test,
            "warm_target": cfg.warm_target, "warm_max_steps": cfg.warm_max_steps, "warm_lr": cfg.warm_lr,
            "warm_lr_end": cfg.warm_lr_end, "warm_check_every": cfg.warm_check_every,
            "warm_per_seed": cfg.warm_per_seed, "warm_seed": seed if cfg.warm_per_seed else 0,
            "temperature": cfg.rl.temperature, "hidden": cfg.hidden, "layers": cfg.layers, "heads": cfg.heads,
            **({"extra": cfg.extra} if cfg.extra else {})}


def run_settings(cfg: StudyConfig, task: str, method: str, seed: int) -> dict:
    """What determines the RL run of (``task``, ``method``, ``seed``): its warm start's settings, the RL
    settings, the rollout engine and the trainer."""
    return {**warm_settings(cfg, task, seed), "method": method, "seed": seed, "rl": asdict(cfg.rl),
            "rollout": cfg.rollout, "trainer": cfg.trainer}


def _normal(settings: dict) -> dict:
    """``settings`` as it reads back from json (tuples as lists, and so on)."""
    return json.loads(json.dumps(settings, default=str))


def _differences(kept: dict | None, want: dict, prefix: str = "") -> str:
    if kept is None:
        return "no settings recorded"
    want, out = _normal(want), []
    for k in sorted(set(kept) | set(want)):
        a, b = kept.get(k), want.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.append(_differences(a, b, prefix + k + "."))
        elif a != b:
            out.append(f"{prefix}{k}: kept {a!r}, now {b!r}")
    return ", ".join(d for d in out if d)


def _write_atomic(path: str, write, newline=None):
    """Writes ``path`` through ``write(f)`` on a temporary file, then renames it: never half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline=newline) as f:
        write(f)
    os.replace(tmp, path)


def run_done(path: str, steps: int | None = None) -> bool:
    """Whether the run CSV at ``path`` is complete: readable, every row full with a whole ``step`` and a
    numeric ``accuracy``, and (when ``steps`` is given) the last row at ``steps``. An empty, header-only,
    truncated or garbled file is not done, so the run is redone."""
    required = ("task", "method", "seed", "step", "accuracy", "wall_s")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or any(None in row or None in row.values() or not all(row.get(k) for k in required)
                           for row in rows):
            return False
        seen = [int(row["step"]) for row in rows]
        _ = [float(row["accuracy"]) for row in rows]
    except (OSError, csv.Error, UnicodeDecodeError, ValueError):
        return False
    return steps is None or seen[-1] == steps


def _settings_path(run_path: str) -> str:
    return run_path[: -len(".csv")] + ".settings.json"


def _kept_settings(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f).get("settings")
    except (OSError, ValueError, AttributeError):
        return None


def run_name(task: str, method: str, seed: int) -> str:
    return f"{task}__{method.replace(':', '_').replace('=', '')}__seed{seed}"


def _run_path(cfg, task: str, method: str, seed: int) -> str:
    label = "trl-" + method if cfg.trainer == "trl" else method
    return os.path.join(cfg.out, "runs", run_name(task, label, seed) + ".csv")


def _setup(cfg: StudyConfig, task_name: str):
    from .model import CharTokenizer, make_config
    from .tasks import make_split, make_task

    task = make_task(task_name, steps=cfg.chain_steps, terms=cfg.sum_terms)
    split = make_split(task, cfg.num_train, cfg.num_test)
    tok = CharTokenizer()
    return split, tok, make_config(tok.vocab_size, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads)


def _model(cfg: StudyConfig, config, seed: int = 0):
    """The model of ``config`` on the study's device with its attention (``model.make_model``)."""
    from .model import make_model, resolve_attention, resolve_device

    device = resolve_device(cfg.device)
    return make_model(config, seed=seed, attn_implementation=resolve_attention(cfg.attention, device), device=device)


def _warm_path(cfg: StudyConfig, task: str, seed: int) -> str:
    return os.path.join(cfg.out, "warm", f"{task}-seed{seed if cfg.warm_per_seed else 0}")


def _one_thread():
    import torch

    torch.set_num_threads(1)


def warm_job(cfg: StudyConfig, task: str, seed: int, progress=None) -> dict:
    """Trains (or loads) the warm start of ``task`` for ``seed``; returns its summary."""
    import torch

    from .sft import warm_start

    _one_thread()
    path = _warm_path(cfg, task, seed)
    settings = warm_settings(cfg, task, seed)
    if os.path.exists(path + ".json") and os.path.exists(path + ".pt"):
        with open(path + ".json") as f:
            info = json.load(f)
        if info.get("settings") == _normal(settings):
            return info
    split, tok, config = _setup(cfg, task)
    model = _model(cfg, config, seed=seed if cfg.warm_per_seed else 0)
    info = warm_start(model, tok, split, target=cfg.warm_target, max_steps=cfg.warm_max_steps, lr=cfg.warm_lr,
                      lr_end=cfg.warm_lr_end, check_every=cfg.warm_check_every,
                      temperature=cfg.rl.temperature, seed=seed if cfg.warm_per_seed else 0,
                      log=lambda s: _put(progress, ("log", f"{task}: {s}")))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path + ".pt.tmp")
    os.replace(path + ".pt.tmp", path + ".pt")
    info["task"] = task
    info["settings"] = _normal(settings)
    _write_atomic(path + ".json", lambda f: json.dump(info, f))
    return info


def _put(progress, item):
    if progress is not None:
        progress.put(item)


class _QueueBar:
    """Forwards step increments to the parent's progress bar."""

    def __init__(self, q):
        self.q = q

    def update(self, n=1):
        _put(self.q, ("step", n))


def rl_job(cfg: StudyConfig, task: str, method_spec: str, seed: int, progress=None) -> str:
    """One RL run from the warm start; writes its CSV and returns the path."""
    import torch

    from .model import model_device
    from .train import train

    _one_thread()
    split, tok, config = _setup(cfg, task)
    model = _model(cfg, config)
    model.load_state_dict(torch.load(_warm_path(cfg, task, seed) + ".pt", map_location=model_device(model)))
    method = parse_method(method_spec)
    rollout = None
    if cfg.rollout == "vllm":
        from .vllm_rollout import VLLMRollout

        rollout = VLLMRollout(model, seed=seed, workdir=os.path.join(cfg.out, "vllm_model"))
    bar = _QueueBar(progress) if progress is not None else None
    log = (lambda s: _put(progress, ("log", f"{task}: {s}"))) if progress is not None else None
    t0 = time.perf_counter()
    if cfg.trainer == "trl":
        from .trl_trainer import train_trl

        rows = train_trl(model, tok, split, method, cfg.rl, seed=seed, progress=bar, log=log)
    else:
        rows = train(model, tok, split, method, cfg.rl, seed=seed, rollout=rollout, progress=bar, log=log)
    wall = time.perf_counter() - t0
    path = _run_path(cfg, task, method_spec, seed)
    settings = run_settings(cfg, task, method_spec, seed)
    method_spec = "trl-" + method_spec if cfg.trainer == "trl" else method_spec
    fields = ["task", "method", "seed", "rollout", *rows[0].keys(), "wall_s"]
    for row in rows:
        for key in row:
            if key not in fields:
                fields.insert(-1, key)

    def write(f):
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({"task": task, "method": method_spec, "seed": seed, "rollout": cfg.rollout, **row,
                        "wall_s": round(wall, 2)})

    # The settings first: a CSV (the mark of a finished run) never stands without them.
    where = {"device": cfg.device, "attention": cfg.attention}
    _write_atomic(_settings_path(path), lambda f: json.dump({"settings": _normal(settings), **where}, f, indent=1))
    _write_atomic(path, write, newline="")
    return path


def _pool_run(cfg: StudyConfig, fn, jobs, desc: str, total_steps: int | None):
    """Runs ``fn(cfg, *job, progress=q)`` over ``jobs`` in ``cfg.workers`` processes with a tqdm bar."""
    import multiprocessing as mp

    from tqdm import tqdm

    bar = tqdm(total=total_steps if total_steps else len(jobs), desc=desc, unit="step" if total_steps else "job")
    if cfg.workers <= 1 or len(jobs) == 1:
        direct = _Direct(bar, total_steps)
        out = []
        for job in jobs:
            out.append(fn(cfg, *job, progress=direct))
            if not total_steps:
                bar.update(1)
        bar.close()
        return out
    ctx = mp.get_context("fork")
    with ctx.Manager() as manager, ctx.Pool(cfg.workers) as pool:
        q = manager.Queue()
        pending = [pool.apply_async(fn, (cfg, *job), {"progress": q}) for job in jobs]
        while not all(p.ready() for p in pending):
            _drain(q, bar, total_steps)
            time.sleep(0.5)
        _drain(q, bar, total_steps)
        out = [p.get() for p in pending]
    if not total_steps:
        bar.update(len(jobs))
    bar.close()
    return out


def _handle(item, bar, count_steps):
    kind, value = item
    if kind == "step" and count_steps:
        bar.update(value)
    elif kind == "log":
        bar.write(value)


class _Direct:
    """The in-process stand-in for the queue: handles each item at once."""

    def __init__(self, bar, count_steps):
        self.bar, self.count_steps = bar, count_steps

    def put(self, item):
        _handle(item, self.bar, self.count_steps)


def _drain(q, bar, count_steps):
    while True:
        try:
            item = q.get_nowait()
        except (queue.Empty, EOFError):
            return
        _handle(item, bar, count_steps)


def check_kept(cfg: StudyConfig, warm_only: bool = False):
    """Raises ``SettingsMismatch`` naming each kept warm start or finished run under ``cfg.out`` that this
    command would reuse but that was made with other settings. Results made before settings were
    recorded (the committed study's) are kept with a warning naming them: they cannot be checked."""
    problems, unrecorded = [], []

    def check(path, kept, want):
        if kept is None:
            unrecorded.append(path)
        elif kept != _normal(want):
            problems.append(f"{path} ({_differences(kept, want)})")

    for task in cfg.tasks:
        for seed in cfg.seeds if cfg.warm_per_seed else [0]:
            path = _warm_path(cfg, task, seed)
            if os.path.exists(path + ".json"):
                check(path + ".json", _kept_settings(path + ".json"), warm_settings(cfg, task, seed))
        for method in [] if warm_only else cfg.methods:
            for seed in cfg.seeds:
                path = _run_path(cfg, task, method, seed)
                if run_done(path):
                    check(path, _kept_settings(_settings_path(path)), run_settings(cfg, task, method, seed))
    if unrecorded:
        print("warning: kept without a record of their settings (made before settings were recorded), not "
              "checked against this command's:\n  " + "\n  ".join(unrecorded), file=sys.stderr)
    if problems:
        raise SettingsMismatch(
            f"{cfg.out} holds results made with other settings than this command's; pass the same settings, "
            "another --out, or delete these to redo them:\n  " + "\n  ".join(problems))


def run_study(cfg: StudyConfig, warm_only: bool = False):
    """Warm starts, then the RL runs (long tasks first); returns the CSV paths and warm-start summaries."""
    for spec in cfg.methods:
        parse_method(spec)
    warm_seeds = cfg.seeds if cfg.warm_per_seed else [0]
    check_kept(cfg, warm_only)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, f"config-{'-'.join(cfg.tasks)}.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1, default=str)
    warm = _pool_run(cfg, warm_job, [(t, s) for t in cfg.tasks for s in warm_seeds], "warm start", None)
    if warm_only:
        return [], warm
    # Method by method in the order given, every seed of one before the next: a study cut short keeps
    # whole methods. Runs whose CSV exists are kept, so a study resumes where it stopped.
    # (check_kept has made sure a finished run was made with this command's settings.)
    jobs = [(t, m, s) for t in sorted(cfg.tasks, key=lambda t: t == "add3") for m in cfg.methods for s in cfg.seeds
            if not run_done(_run_path(cfg, t, m, s), cfg.rl.steps)]
    paths = _pool_run(cfg, rl_job, jobs, "RL", len(jobs) * cfg.rl.steps)
    return paths, warm
