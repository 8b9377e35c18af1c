"""RL from the warm start: groups of rollouts, verified rewards, GRPO advantages, the teacher pass with
the privileged context (a weight snapshot refreshed every ``teacher_every`` steps), one update per
batch with the method's fused loss. Held-out greedy accuracy is recorded every ``eval_every`` steps.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass

import torch

from .data import accuracy, prompts, response_length, response_logits
from .methods import Method, method_loss
from .model import generator, model_device
from .tasks import verify


@dataclass
class RLConfig:
    steps: int = 200
    prompts_per_step: int = 16
    group: int = 8
    lr: float = 1e-4
    temperature: float = 1.0
    teacher_every: int = 20
    eval_every: int = 10
    num_eval: int = 200
    # Also the held-out accuracy of one sample per problem at the rollout temperature (what the
    # reward measures; greedy accuracy can sit near its ceiling while sampling still fails).
    eval_sampled: bool = True


def grpo_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """``(R - mean) / (std + 1e-6)`` within each group of ``group`` consecutive rollouts."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)


class BuiltinRollout:
    """Rollouts from the policy itself with the KV-cache sampler; nothing to sync after an update."""

    name = "builtin"

    def __init__(self, policy, seed: int):
        self.policy = policy
        self.generator = generator(policy, seed)

    def sample(self, prompt_ids, max_new_tokens, temperature):
        from .sampler import sample

        return sample(self.policy, prompt_ids, max_new_tokens, temperature=temperature, generator=self.generator)

    def update(self, policy):
        pass


def credit_sums(metrics):
    """A step's credit weight as its sum and count over the tokens with a non-zero advantage (none
    for a method without credit), so that a window's mean weighs every such token once and a step
    with none (every group all-equal) drops out instead of making the window's mean NaN."""
    if "credit_weight_nonzero" not in metrics:
        return {"credit_sum": 0.0, "credit_count": 0.0}
    count = float(metrics["num_credit_tokens"])
    return {"credit_sum": float(metrics["credit_weight_mean"]) * count if count else 0.0, "credit_count": count}


def window_means(window):
    """The mean of each per-step value over a window, and ``credit_weight_nonzero`` from the steps'
    credit sums (NaN where no step had a token with a non-zero advantage)."""
    if not window:
        return {}
    means = {k: sum(w[k] for w in window) / len(window) for k in window[0] if not k.startswith("credit_")}
    count = sum(w["credit_count"] for w in window)
    means["credit_weight_nonzero"] = sum(w["credit_sum"] for w in window) / count if count else float("nan")
    return means


def train(policy, tok, split, method: Method, cfg: RLConfig, *, seed: int, rollout=None, log=None, progress=None):
    """Trains ``policy`` in place; returns one dict per evaluation (step, accuracy, running metrics)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    rollout = rollout or BuiltinRollout(policy, seed)
    device = model_device(policy)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    budget = response_length(split.train) + 4
    teacher = None
    totals = {"rollout_s": 0.0, "teacher_s": 0.0, "update_s": 0.0}
    window = []
    rows = []

    def evaluate(step):
        acc = accuracy(policy, tok, split.test[: cfg.num_eval])
        scores = {"step": step, "accuracy": acc}
        if cfg.eval_sampled:
            # The same sampling noise at every evaluation of every run.
            gen = generator(policy, 12345)
            scores["sampled_accuracy"] = accuracy(policy, tok, split.test[: cfg.num_eval], greedy=False,
                                                  temperature=cfg.temperature, generator=gen)
        means = window_means(window)
        done = max(step, 1)
        rows.append({**scores, **means, **{k: v / done for k, v in totals.items()}})
        window.clear()
        if log:
            row = rows[-1]
            log(f"{method.label} seed {seed} step {step}: accuracy {acc:.3f}, sampled "
                f"{row.get('sampled_accuracy', float('nan')):.3f}, reward {row.get('reward', float('nan')):.3f}, "
                f"all-equal groups {row.get('zero_adv_groups', float('nan')):.2f}")

    evaluate(0)
    for step in range(cfg.steps):
        if method.needs_teacher and step % cfg.teacher_every == 0:
            teacher = copy.deepcopy(policy).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        problems = [p for p in rng.sample(split.train, cfg.prompts_per_step) for _ in range(cfg.group)]
        prompt_ids = prompts(tok, problems)

        t0 = time.perf_counter()
        ro = rollout.sample(prompt_ids, budget, cfg.temperature).to(device)
        rewards = torch.tensor([float(verify(p, tok.decode(r))) for p, r in zip(problems, ro.tokens.tolist(),
                                                                                  strict=True)])
        adv = grpo_advantages(rewards, cfg.group).to(device)
        sel = ro.mask
        tokens = ro.tokens[sel]
        token_adv = adv[:, None].expand_as(ro.tokens)[sel]

        t1 = time.perf_counter()
        teacher_logits = None
        if method.needs_teacher:
            with torch.no_grad():
                teacher_ids = prompts(tok, problems, teacher=True)
                teacher_logits = response_logits(teacher, teacher_ids, ro.tokens)[sel]

        t2 = time.perf_counter()
        policy.train()
        student_logits = response_logits(policy, prompt_ids, ro.tokens)[sel]
        rollout_lp = ro.logprobs[sel] if rollout.name != "builtin" else None
        loss, metrics, lam = method_loss(method, step, student_logits, teacher_logits, tokens, token_adv, rollout_lp,
                                         temperature=cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rollout.update(policy)
        t3 = time.perf_counter()

        totals["rollout_s"] += t1 - t0
        totals["teacher_s"] += t2 - t1
        totals["update_s"] += t3 - t2
        window.append({
            "reward": rewards.mean().item(),
            "response_len": sel.sum().item() / sel.shape[0],
            "zero_adv_groups": float((rewards.view(-1, cfg.group).std(1) == 0).float().mean()),
            "lam": lam,
            **credit_sums(metrics),
            "loss": loss.item(),
        })
        if progress is not None:
            progress.update(1)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evaluate(step + 1)
    return rows
