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
        """Text of the ids up to the first end-of-sequence. A pad or begin-of-sequence id before it is
        written as ``<pad>`` / ``<s>``, so that a response holding one never verifies as correct."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
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


ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the GPU when torch sees one, else the CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:<index>, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def resolve_attention(name: str, device: torch.device) -> str:
    """The attention of the model: ``"auto"`` is flash-attn (``flash_attention_2``) on a GPU where the
    flash-attn package is installed, else PyTorch's SDPA. ``flash_attention_2`` elsewhere raises."""
    import importlib.util

    if name not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {name!r}")
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if device.type == "cuda" and has_flash else "sdpa"
    if name == "flash_attention_2" and (device.type != "cuda" or not has_flash):
        raise ValueError(f"attention 'flash_attention_2' needs a CUDA device and the flash-attn package "
                         f"(device {device}, flash-attn {'installed' if has_flash else 'not installed'})")
    return name


def make_model(config, seed: int = 0, attn_implementation: str = "sdpa", device="cpu"):
    """The model from ``config`` with weights drawn from ``seed`` (on the CPU, then moved to ``device``).

    The weights stay in float32 whatever the attention; with ``flash_attention_2`` (half precision
    only) the forward passes run under ``autocast`` (bfloat16).
    """
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    return Qwen2ForCausalLM(config).to(device)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def autocast(model):
    """The context of the model's forward passes: bfloat16 autocast where its attention takes half
    precision only (flash-attn), else nothing."""
    import contextlib

    if getattr(model.config, "_attn_implementation", None) != "flash_attention_2":
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=torch.bfloat16)


def generator(model, seed: int) -> torch.Generator:
    """A random generator on the model's device (sampling draws on the device of the logits)."""
    return torch.Generator(device=model_device(model)).manual_seed(seed)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
