"""The built-in sampler: batched decoding with the model's KV cache (the default rollout on CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import model as M
from .model import EOS, PAD


@dataclass
class Rollout:
    tokens: torch.Tensor  # [N, T] sampled ids; PAD after the end of sequence
    logprobs: torch.Tensor  # [N, T] float32 log-probs of the sampled ids under softmax(z / temperature)
    mask: torch.Tensor  # [N, T] bool: response tokens up to and including the end of sequence

    def to(self, device) -> Rollout:
        return Rollout(self.tokens.to(device), self.logprobs.to(device), self.mask.to(device))


def response_mask(tokens: torch.Tensor) -> torch.Tensor:
    """True up to and including each row's first EOS (all True for a row without one)."""
    is_eos = tokens == EOS
    before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return before == 0


@torch.no_grad()
def sample(model, prompts: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, greedy: bool = False,
           generator: torch.Generator | None = None) -> Rollout:
    """Samples ``max_new_tokens`` per row of ``prompts`` ``[N, P]`` (same length, no padding), on the
    model's device (``generator`` must be there too).

    Decoding stops early once every row has ended; ids after a row's EOS are ``PAD``.
    """
    from transformers import DynamicCache

    if prompts.dim() != 2:
        raise ValueError(f"prompts must be [N, P], got shape {tuple(prompts.shape)}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    was_training = model.training
    model.eval()
    prompts = prompts.to(M.model_device(model))
    n = prompts.shape[0]
    cache = DynamicCache()
    with M.autocast(model):
        out = model(input_ids=prompts, past_key_values=cache, use_cache=True)
    logits = out.logits[:, -1]
    tokens, logprobs = [], []
    done = torch.zeros(n, dtype=torch.bool, device=prompts.device)
    for _ in range(max_new_tokens):
        z = logits.float() / (1.0 if greedy else temperature)
        logp = torch.log_softmax(z, dim=-1)
        if greedy:
            y = z.argmax(-1)
        else:
            y = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        y = torch.where(done, PAD, y)
        tokens.append(y)
        logprobs.append(torch.where(done, 0.0, logp.gather(1, y[:, None]).squeeze(1)))
        done = done | (y == EOS)
        if bool(done.all()):
            break
        with M.autocast(model):
            out = model(input_ids=y[:, None], past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
    model.train(was_training)
    tokens = torch.stack(tokens, 1)
    if tokens.shape[1] < max_new_tokens:
        pad = torch.full((n, max_new_tokens - tokens.shape[1]), PAD, dtype=tokens.dtype, device=tokens.device)
        tokens = torch.cat([tokens, pad], 1)
        logprobs.extend([torch.zeros(n, device=prompts.device)] * pad.shape[1])
    return Rollout(tokens, torch.stack(logprobs, 1), response_mask(tokens))
