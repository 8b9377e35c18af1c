"""Problems to token tensors, and the sequence layout shared by the student and the teacher passes."""

from __future__ import annotations

import torch

from .sampler import sample
from .tasks import verify


def prompts(tok, problems, *, teacher: bool = False) -> torch.Tensor:
    """``[N, P]`` prompt ids (the plain question, or with ``teacher`` the question and reference)."""
    rows = [tok.prompt(p.teacher_question() if teacher else p.question) for p in problems]
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"prompts of one batch must have one length, got {sorted(lengths)}")
    return torch.tensor(rows, dtype=torch.long)


def references(tok, problems) -> torch.Tensor:
    """``[N, T]`` reference responses (the worked solution and the end of sequence)."""
    return torch.tensor([tok.response(p.solution) for p in problems], dtype=torch.long)


def response_logits(model, prompt_ids: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    """``[N, T, V]`` logits that score ``response_ids`` after ``prompt_ids``.

    The response sits at the end of the input, so the student (question) and the teacher (question
    and reference) score each response token at the same distance from the end. The ids go to the
    model's device; the logits come back there.
    """
    from .model import autocast, model_device

    device = model_device(model)
    ids = torch.cat([prompt_ids.to(device), response_ids.to(device)], dim=1)
    with autocast(model):
        logits = model(input_ids=ids).logits
    p = prompt_ids.shape[1]
    return logits[:, p - 1 : p - 1 + response_ids.shape[1]]


def response_length(problems) -> int:
    """Tokens of the fixed-width reference response (the rollout budget adds a little slack)."""
    return len(problems[0].solution) + 1


@torch.no_grad()
def accuracy(model, tok, problems, *, greedy: bool = True, temperature: float = 1.0, batch: int = 256,
             generator=None, max_new_tokens: int | None = None) -> float:
    """Fraction of ``problems`` whose response (greedy, or sampled) has the right final answer."""
    budget = max_new_tokens or response_length(problems) + 4
    correct = 0
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        r = sample(model, prompts(tok, chunk), budget, temperature=temperature, greedy=greedy, generator=generator)
        correct += sum(verify(p, tok.decode(row)) for p, row in zip(chunk, r.tokens.tolist(), strict=True))
    return correct / max(1, len(problems))
