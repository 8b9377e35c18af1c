"""Warm start: supervised training on the plain prompt and on the prompt with the reference solution.

The student learns the format and some arithmetic; the teacher context (question and reference)
learns to use the reference, which it does long before the arithmetic. Training stops once the
*sampled* accuracy of the plain prompt (at the rollout temperature) reaches ``target``: greedy
accuracy is much higher and would leave RL from a start too weak to give groups mixed rewards.
"""

from __future__ import annotations

import random
import time

import torch

from .data import accuracy, prompts, references, response_logits


def sft_loss(model, tok, problems) -> torch.Tensor:
    """Cross-entropy of the reference response, half the batch with the plain prompt, half with the teacher's."""
    half = len(problems) // 2
    total, count = 0.0, 0
    for group, teacher in ((problems[:half], False), (problems[half:], True)):
        if not group:
            continue
        ref = references(tok, group)
        logits = response_logits(model, prompts(tok, group, teacher=teacher), ref).float()
        total = total + torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                          ref.to(logits.device).reshape(-1), reduction="sum")
        count += ref.numel()
    return total / count


def warm_start(model, tok, split, *, target: float, max_steps: int, batch: int = 64, lr: float = 3e-3,
               lr_end: float | None = None, check_every: int = 50, num_check: int = 128, temperature: float = 1.0,
               seed: int = 0, log=None, progress=None):
    """Trains until the sampled accuracy on ``num_check`` held-out problems reaches ``target``.

    The learning rate is ``lr`` throughout, or with ``lr_end`` goes linearly from ``lr`` to ``lr_end``
    over ``max_steps`` (a constant rate can stall a long task on a plateau of loss spikes).

    Progress: ``progress.update(1)`` per step where given (as ``train``'s); otherwise, in the main
    process, a tqdm bar over the steps (shown on a terminal only, removed when done; in a worker
    process none, since a worker's bar would overwrite the parent's). ``log`` (default: ``tqdm.write``)
    gets a line at each check.

    Returns a dict: steps, seconds, sampled and greedy held-out accuracy, and the teacher
    context's greedy accuracy (how well the model reads the reference).
    """
    import multiprocessing

    from tqdm import tqdm

    from .model import generator

    bar = None
    if progress is None and multiprocessing.parent_process() is None:
        bar = progress = tqdm(total=max_steps, desc="warm start", unit="step", disable=None, leave=False)
    log = log or tqdm.write
    rng = random.Random(seed)
    gen = generator(model, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    check = split.test[:num_check]
    t0 = time.perf_counter()
    step, sampled = 0, 0.0
    model.train()
    while step < max_steps:
        if lr_end is not None:
            for group in opt.param_groups:
                group["lr"] = lr + (lr_end - lr) * step / max_steps
        loss = sft_loss(model, tok, rng.sample(split.train, batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if progress is not None:
            progress.update(1)
        if step % check_every == 0 or step == max_steps:
            sampled = accuracy(model, tok, check, greedy=False, temperature=temperature, generator=gen)
            log(f"warm start step {step}: loss {loss.item():.3f}, sampled accuracy {sampled:.3f}")
            if sampled >= target:
                break
    if bar is not None:
        bar.close()
    return {
        "sft_steps": step,
        "sft_seconds": time.perf_counter() - t0,
        "sft_sampled_acc": sampled,
        "sft_greedy_acc": accuracy(model, tok, check),
        "teacher_greedy_acc": teacher_accuracy(model, tok, check),
    }


@torch.no_grad()
def teacher_accuracy(model, tok, problems) -> float:
    """Greedy accuracy with the reference in the prompt (the privileged context)."""
    from .data import response_length
    from .sampler import sample
    from .tasks import verify

    r = sample(model, prompts(tok, problems, teacher=True), response_length(problems) + 4, greedy=True)
    return sum(verify(p, tok.decode(row)) for p, row in zip(problems, r.tokens.tolist(), strict=True)) / len(problems)
