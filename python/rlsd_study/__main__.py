"""``python -m python.rlsd_study``: train a small model with RLSD, GRPO, OPSD and GRPO+OPSD and compare.

Presets (every flag given on the command line overrides the preset):

- ``default``: the short task, one seed per method, about 7 minutes on a 2-core CPU.
- ``ci``: a smaller run for the test suite (GRPO and RLSD, 40 steps).
- ``study``: the committed study of one task (pass ``--tasks``): three seeds, the four methods,
  and the credit-strength sweep of RLSD.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .methods import BASES
from .model import ATTENTION, resolve_attention, resolve_device
from .report import write_report
from .study import StudyConfig, run_study
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
    return args.preset, merged


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET"):
        print("note: TRITON_INTERPRET is set, so the losses run under the Triton interpreter (slow)",
              file=sys.stderr)
    preset, a = parse_args(argv)
    rl = RLConfig(steps=a["steps"], prompts_per_step=a["prompts"], group=a["group"], lr=a["lr"],
                  temperature=a["temperature"], teacher_every=a["teacher_every"], eval_every=a["eval_every"],
                  num_eval=a["num_eval"])
    device = resolve_device(a["device"])
    resolve_attention(a["attention"], device)  # an attention the device cannot run fails here, not in a worker
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
        print(write_report(cfg.out))
        return
    _, warm = run_study(cfg, warm_only=a["warm_only"])
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
