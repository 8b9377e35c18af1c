"""Runs a study: warm starts (cached), then every (task, method, seed) RL run, one process per core.

Each run writes ``runs/<task>__<method>__seed<k>.csv`` under the output folder, so a study can be
extended or resumed and ``report`` reads whatever is there.
"""

from __future__ import annotations

import csv
import json
import os
import queue
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
    if os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            return json.load(f)
    split, tok, config = _setup(cfg, task)
    model = _model(cfg, config, seed=seed if cfg.warm_per_seed else 0)
    info = warm_start(model, tok, split, target=cfg.warm_target, max_steps=cfg.warm_max_steps, lr=cfg.warm_lr,
                      lr_end=cfg.warm_lr_end, check_every=cfg.warm_check_every,
                      temperature=cfg.rl.temperature, seed=seed if cfg.warm_per_seed else 0,
                      log=lambda s: _put(progress, ("log", f"{task}: {s}")))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path + ".pt")
    info["task"] = task
    with open(path + ".json", "w") as f:
        json.dump(info, f)
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
    method_spec = "trl-" + method_spec if cfg.trainer == "trl" else method_spec
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = ["task", "method", "seed", "rollout", *rows[0].keys(), "wall_s"]
    for row in rows:
        for key in row:
            if key not in fields:
                fields.insert(-1, key)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({"task": task, "method": method_spec, "seed": seed, "rollout": cfg.rollout, **row,
                        "wall_s": round(wall, 2)})
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


def run_study(cfg: StudyConfig, warm_only: bool = False):
    """Warm starts, then the RL runs (long tasks first); returns the CSV paths and warm-start summaries."""
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, f"config-{'-'.join(cfg.tasks)}.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1, default=str)
    for spec in cfg.methods:
        parse_method(spec)
    warm_seeds = cfg.seeds if cfg.warm_per_seed else [0]
    warm = _pool_run(cfg, warm_job, [(t, s) for t in cfg.tasks for s in warm_seeds], "warm start", None)
    if warm_only:
        return [], warm
    # Method by method in the order given, every seed of one before the next: a study cut short keeps
    # whole methods. Runs whose CSV exists are kept, so a study resumes where it stopped.
    jobs = [(t, m, s) for t in sorted(cfg.tasks, key=lambda t: t == "add3") for m in cfg.methods for s in cfg.seeds
            if not os.path.exists(_run_path(cfg, t, m, s))]
    paths = _pool_run(cfg, rl_job, jobs, "RL", len(jobs) * cfg.rl.steps)
    return paths, warm
