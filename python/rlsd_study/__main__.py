"""``python -m python.rlsd_study``: train a small model with RLSD, GRPO, OPSD and GRPO+OPSD and compare.

Presets (every flag given on the command line overrides the preset):

- ``default``: the short task, one seed per method, about 7 minutes on a 2-core CPU.
- ``ci``: a smaller run for the test suite (GRPO and RLSD, 40 steps).
- ``study``: the committed study of one task (pass ``--tasks``): three seeds, the four methods,
  and the credit-strength sweep of RLSD.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from .methods import BASES, OPTIONS, parse_method, same_method
from .model import ATTENTION, resolve_attention, resolve_device
from .report import write_report
from .study import SettingsMismatch, StudyConfig, run_name, run_study
from .tasks import FAMILIES, make_task, split_sizes
from .train import RLConfig

SWEEP = ["rlsd:lam=1", "rlsd:eps_w=0.8", "rlsd:lam=1:eps_w=0.8"]
PRESETS = {
    "default": dict(tasks="add3", methods="grpo,rlsd,opsd,grpo+opsd", seeds=1, steps=200, workers=2),
    "ci": dict(tasks="add3", methods="grpo,rlsd", seeds=1, steps=40, num_eval=100, warm_target=0.25,
               warm_check_every=10, workers=2),
    "study": dict(tasks="add3", methods=",".join(["grpo", "rlsd", "opsd", "grpo+opsd", *SWEEP]), seeds=3,
                  steps=200, workers=2),
}
DEFAULTS = dict(prompts=16, group=8, lr=1e-4, temperature=1.0, teacher_every=20, eval_every=10, num_eval=200,
                chain_steps=13, sum_terms=4, num_train=20000, num_test=200, warm_target=0.3, warm_max_steps=1500,
                warm_lr=1e-3, warm_lr_end=None, warm_check_every=50,
                out=None, rollout="builtin", trainer="native", first_seed=0, device="auto", attention="auto")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m python.rlsd_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--tasks", help="comma-separated task families: add3, chain, fib, sum")
    p.add_argument("--methods", help=f"comma-separated methods ({', '.join(BASES)}; options as rlsd:lam=1:eps_w=0.8)")
    p.add_argument("--seeds", type=int, help="number of seeds per method")
    p.add_argument("--first-seed", type=int, help="the first seed (seeds are consecutive)")
    p.add_argument("--steps", type=int, help="RL steps per run")
    p.add_argument("--prompts", type=int, help="prompts per step")
    p.add_argument("--group", type=int, help="rollouts per prompt")
    p.add_argument("--lr", type=float, help="Adam learning rate of the RL updates")
    p.add_argument("--temperature", type=float, help="rollout temperature")
    p.add_argument("--teacher-every", type=int, help="steps between teacher snapshot refreshes (official 20)")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations")
    p.add_argument("--num-eval", type=int, help="held-out problems per evaluation (greedy)")
    p.add_argument("--chain-steps", type=int, help="worked steps of the chain and fib tasks")
    p.add_argument("--sum-terms", type=int, help="numbers added by the sum task (two digits each)")
    p.add_argument("--num-train", type=int, help="training problems (add3)")
    p.add_argument("--num-test", type=int, help="held-out problems")
    p.add_argument("--warm-target", type=float, help="sampled held-out accuracy at which the warm start stops")
    p.add_argument("--warm-max-steps", type=int, help="cap on warm-start steps")
    p.add_argument("--warm-lr", type=float, help="warm-start learning rate")
    p.add_argument("--warm-lr-end", type=float,
                   help="warm-start learning rate reached at --warm-max-steps, linearly (default: constant)")
    p.add_argument("--warm-check-every", type=int,
                   help="warm-start steps between checks of the sampled accuracy (a task whose accuracy jumps "
                        "within a few steps needs frequent checks to stop near --warm-target)")
    p.add_argument("--warm-per-seed", action="store_true", help="one warm start per seed (default: one per task)")
    p.add_argument("--workers", type=int, help="processes (one torch thread each; one per core)")
    p.add_argument("--rollout", choices=["builtin", "vllm"], help="rollout engine (vllm: one worker)")
    p.add_argument("--trainer", choices=["native", "trl"],
                   help="training loop: native (this package's) or trl (RLSDTrainer; grpo and rlsd methods)")
    p.add_argument("--device", help="where the models train and sample: auto (a GPU when torch sees one, else the "
                                    "CPU), cpu, cuda, cuda:1 (on a GPU: one worker)")
    p.add_argument("--attention", choices=ATTENTION,
                   help="the model's attention: auto (flash-attn on a GPU where it is installed, under bfloat16 "
                        "autocast; else SDPA), sdpa, eager, flash_attention_2")
    p.add_argument("--out", help="output folder (default results/<preset>)")
    p.add_argument("--warm-only", action="store_true", help="only train (and cache) the warm starts")
    p.add_argument("--report-only", action="store_true", help="only rewrite the table and plot from --out's runs")
    args = p.parse_args(argv)
    merged = {**DEFAULTS, **PRESETS[args.preset]}
    for key, value in vars(args).items():
        if key != "preset" and (value is not None and value is not False):
            merged[key] = value
    for flag in ("warm_per_seed", "warm_only", "report_only"):
        merged[flag] = getattr(args, flag)
    merged["out"] = merged["out"] or os.path.join("results", args.preset)
    _validate(p, merged)
    return args.preset, merged


# flag -> (accepts, what the value must be); checked before any work, named as on the command line.
_RANGES = {
    "seeds": (lambda v: v >= 1, ">= 1"),
    "steps": (lambda v: v >= 1, ">= 1"),
    "prompts": (lambda v: v >= 1, ">= 1"),
    "group": (lambda v: v >= 2, ">= 2 (GRPO advantages compare the rollouts of a group)"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a positive finite number"),
    "temperature": (lambda v: math.isfinite(v) and v > 0, "a positive finite number"),
    "teacher_every": (lambda v: v >= 1, ">= 1"),
    "eval_every": (lambda v: v >= 1, ">= 1"),
    "num_eval": (lambda v: v >= 1, ">= 1"),
    "chain_steps": (lambda v: v >= 1, ">= 1"),
    "sum_terms": (lambda v: 2 <= v <= 10, "in [2, 10] (the total must fit in three digits)"),
    "num_train": (lambda v: v >= 1, ">= 1"),
    "num_test": (lambda v: v >= 1, ">= 1"),
    "warm_target": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "warm_max_steps": (lambda v: v >= 0, ">= 0"),
    "warm_lr": (lambda v: math.isfinite(v) and v > 0, "a positive finite number"),
    "warm_lr_end": (lambda v: v is None or (math.isfinite(v) and v >= 0), "a finite number >= 0"),
    "warm_check_every": (lambda v: v >= 1, ">= 1"),
    "workers": (lambda v: v >= 1, ">= 1"),
    "first_seed": (lambda v: v >= 0, ">= 0"),
}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _split_list(p, a, key: str) -> list[str]:
    items = a[key].split(",")
    if any(not item for item in items):
        p.error(f"{_flag(key)}: empty entry in {a[key]!r} (comma-separated, no spaces)")
    dup = sorted({item for item in items if items.count(item) > 1})
    if dup:
        p.error(f"{_flag(key)}: {', '.join(dup)} given twice")
    return items


def _validate(p, a):
    """``p.error`` (usage, exit status 2) naming the flag for any value that would fail or mislead later."""
    for key, (accepts, what) in _RANGES.items():
        if not accepts(a[key]):
            p.error(f"{_flag(key)} must be {what}, got {a[key]}")
    if a["num_eval"] > a["num_test"]:
        p.error(f"--num-eval ({a['num_eval']}) must be at most --num-test ({a['num_test']}): the held-out "
                f"problems evaluated are drawn from the test split")
    tasks = _split_list(p, a, "tasks")
    for name in tasks:
        if name not in FAMILIES:
            p.error(f"--tasks: unknown task {name!r} (one of {', '.join(FAMILIES)})")
        task = make_task(name, steps=a["chain_steps"], terms=a["sum_terms"])
        option = {"chain": f" --chain-steps {a['chain_steps']}", "fib": f" --chain-steps {a['chain_steps']}",
                  "sum": f" --sum-terms {a['sum_terms']}"}.get(name, "")
        try:
            train_size, _ = split_sizes(task, a["num_train"], a["num_test"])
        except ValueError as e:
            p.error(f"--tasks {name} with --num-train {a['num_train']} --num-test {a['num_test']}{option}: {e}")
        if train_size < a["prompts"]:
            p.error(f"--tasks {name}: the {train_size} training problems (--num-train {a['num_train']}, the "
                    f"{task.size} problems of {name} less --num-test {a['num_test']}) are fewer than --prompts "
                    f"{a['prompts']} (each step draws --prompts distinct problems)")
    specs = _split_list(p, a, "methods")
    methods = []
    for spec in specs:
        try:
            methods.append(parse_method(spec))
        except ValueError as e:
            options = "; ".join(f"{b}: {', '.join(o) or 'none'}" for b, o in OPTIONS.items())
            p.error(f"--methods: {e} (options by method: {options})")
    for i, m in enumerate(methods):
        for other in methods[:i]:
            if same_method(m, other) or run_name("", m.label, 0) == run_name("", other.label, 0):
                p.error(f"--methods: {other.label!r} and {m.label!r} are the same run")
    if a["trainer"] == "trl":
        if a["rollout"] == "vllm":
            p.error("--rollout vllm with --trainer trl: the TRL trainer generates with model.generate, so the "
                    "vLLM engine would go unused (use --trainer native)")
        for m in methods:
            if m.base not in ("grpo", "rlsd"):
                p.error(f"--trainer trl runs grpo and rlsd methods only, got {m.label!r} in --methods")
            if m.eps_w_high is not None:
                p.error(f"--trainer trl takes eps_w alone (RLSDConfig's symmetric clip), got {m.label!r}")
    try:
        device = resolve_device(a["device"])
        resolve_attention(a["attention"], device)
    except ValueError as e:
        p.error(f"--device {a['device']} --attention {a['attention']}: {e}")


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET"):
        print("note: TRITON_INTERPRET is set, so the losses run under the Triton interpreter (slow)",
              file=sys.stderr)
    preset, a = parse_args(argv)
    rl = RLConfig(steps=a["steps"], prompts_per_step=a["prompts"], group=a["group"], lr=a["lr"],
                  temperature=a["temperature"], teacher_every=a["teacher_every"], eval_every=a["eval_every"],
                  num_eval=a["num_eval"])
    device = resolve_device(a["device"])  # parse_args checked the device and its attention
    # One process drives a GPU (and vLLM's engine): the worker pool forks, which CUDA does not survive.
    workers = 1 if a["rollout"] == "vllm" or device.type == "cuda" else a["workers"]
    cfg = StudyConfig(
        tasks=a["tasks"].split(","), methods=a["methods"].split(","),
        seeds=list(range(a["first_seed"], a["first_seed"] + a["seeds"])), rl=rl, out=a["out"],
        chain_steps=a["chain_steps"], sum_terms=a["sum_terms"], num_train=a["num_train"], num_test=a["num_test"],
        warm_target=a["warm_target"], warm_max_steps=a["warm_max_steps"], warm_lr=a["warm_lr"],
        warm_lr_end=a["warm_lr_end"], warm_check_every=a["warm_check_every"],
        warm_per_seed=a["warm_per_seed"], workers=workers, rollout=a["rollout"], trainer=a["trainer"],
        device=str(device), attention=a["attention"],
    )
    t0 = time.perf_counter()
    if a["report_only"]:
        try:
            print(write_report(cfg.out))
        except ValueError as e:  # no runs, or a malformed run CSV (named in the message)
            sys.exit(f"error: {e}")
        return
    try:
        _, warm = run_study(cfg, warm_only=a["warm_only"])
    except SettingsMismatch as e:
        sys.exit(f"error: {e}")
    for w in warm:
        print(f"warm start {w['task']}: {w['sft_steps']} steps, {w['sft_seconds']:.0f} s, sampled accuracy "
              f"{w['sft_sampled_acc']:.2f}, greedy {w['sft_greedy_acc']:.2f}, teacher context greedy "
              f"{w['teacher_greedy_acc']:.2f}")
    if a["warm_only"]:
        return
    print(write_report(cfg.out))
    print(f"\n{preset}: {time.perf_counter() - t0:.0f} s; CSV, table and plot in {cfg.out}/")


if __name__ == "__main__":
    main()
