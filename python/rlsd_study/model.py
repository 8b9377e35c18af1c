"""A small Qwen2-architecture model built from a config, and a character tokenizer built in code."""

from __future__ import annotations

import torch

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789+-*=;:>?\nref"


class CharTokenizer:
    """One id per character of ``CHARS`` after three specials (pad, begin, end of sequence)."""

    def __init__(self):
        self.itos = ["<pad>", "<s>", "</s>", *CHARS]
        self.stoi = {c: i for i, c in enumerate(self.itos) if i > EOS}
        self.vocab_size = len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"text holds a character outside the vocabulary: {e.args[0]!r}") from None

    def decode(self, ids) -> str:
        """Text of the ids up to the first end-of-sequence (specials dropped)."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i > EOS:
                out.append(self.itos[i])
        return "".join(out)

    def prompt(self, text: str) -> list[int]:
        return [BOS, *self.encode(text)]

    def response(self, text: str) -> list[int]:
        return [*self.encode(text), EOS]


def make_config(vocab_size: int, *, hidden: int = 128, layers: int = 2, heads: int = 2, max_positions: int = 512):
    """Qwen2 config; head dimension ``hidden / heads`` (64 by default: vLLM's CPU attention needs it)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        torch_dtype="float32",
    )


def make_model(config, seed: int = 0, attn_implementation: str = "sdpa"):
    """The model from ``config`` with weights drawn from ``seed``.

    ``attn_implementation="flash_attention_2"`` needs a GPU, the flash-attn package and a half-precision
    model (``model.to(torch.bfloat16)``); the study's float32 model uses PyTorch's SDPA.
    """
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    return Qwen2ForCausalLM(config)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
