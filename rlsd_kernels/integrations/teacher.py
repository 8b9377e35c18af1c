"""The RLSD teacher, independent of any trainer: its inputs and its weights.

The teacher is the policy shown privileged context (a reference solution). It scores the tokens the
student sampled, so its input is ``teacher prompt ⊕ completion`` with the completion at the same
positions from the end as in the student's input: one ``logits_to_keep`` (the completion length)
then serves both models. :func:`build_teacher_inputs` builds that batch from plain-text or chat
prompts; :class:`TeacherWeights` (``teacher_weights.py``, imported here too) keeps the teacher's
weights under one of four policies.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import string
from collections.abc import Callable, Mapping, Sequence

import torch

import rlsd_kernels

from .teacher_weights import TEACHER_POLICIES, TeacherWeights, fresh_copy  # noqa: F401 (the teacher's API)

DEFAULT_TEMPLATE = (
    "{question}\n\n"
    "Here is a reference solution:\n"
    "{context}\n\n"
    "After understanding the reference solution, please try to solve this problem using your own approach."
)
"""The official teacher prompt: the question, a blank line, "Here is a reference solution:", the
reference, a blank line, then an instruction to solve the problem in its own way."""

DEFAULT_MAX_CONTEXT_TOKENS = 12_000
TEMPLATE_FIELDS = ("question", "context")


def check_template(template, name: str = "template"):
    """Raises for a teacher template that would drop the question or the context or fail to format:
    a string must name ``{question}`` and ``{context}`` and no other field (``{{`` and ``}}`` are
    literal braces); a callable must take ``(question, context)`` and return a string."""
    if callable(template):
        _check_template_signature(template, name)
        return
    if not isinstance(template, str):
        raise TypeError(f"{name} must be a format string or a callable (question, context) -> str, "
                        f"got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"{name} is not a valid format string ({e}): {template!r}") from None
    unknown = sorted({repr("{" + f + "}") for f in fields if f not in TEMPLATE_FIELDS})
    if unknown:
        raise ValueError(f"{name} may only use the fields {{question}} and {{context}}, found "
                         f"{', '.join(unknown)} (write a literal brace as {{{{ or }}}})")
    missing = [f for f in TEMPLATE_FIELDS if f not in fields]
    if missing:
        raise ValueError(f"{name} must contain {' and '.join('{' + f + '}' for f in missing)}: without it the "
                         f"teacher prompt drops the {' and the '.join(missing)}")
    try:  # a format spec or conversion (``{context:d}``, ``{context:>{question}}``) can still fail
        template.format(question="question", context="context")
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{name} does not format with a question and a context ({e}): {template!r}") from None


def _check_template_signature(template, name):
    try:
        signature = inspect.signature(template)
    except (TypeError, ValueError):  # a builtin without a signature: left to the call
        return
    try:
        signature.bind("question", "context")
    except TypeError:
        raise TypeError(f"{name} must be callable as {name}(question, context), its signature is "
                        f"{signature}") from None


def truncate_context(tokenizer, context: str, max_tokens: int | None) -> str:
    """``context`` cut to its first ``max_tokens`` tokens (``None`` keeps it whole), on a character
    boundary: a token that holds only part of a character (byte-level BPE splits a multi-byte
    character over several tokens) is dropped with that character, so the cut text never holds
    a replacement character nor more than ``max_tokens`` tokens. With a fast tokenizer the result
    is a prefix of ``context`` itself (no decode, which can alter text)."""
    if max_tokens is None:
        return context
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 0:
        raise ValueError(f"max_context_tokens must be None or an integer >= 0, got {max_tokens!r}")
    fast = getattr(tokenizer, "is_fast", False)
    encoded = tokenizer(context, add_special_tokens=False, return_offsets_mapping=fast)
    ids = encoded["input_ids"]
    if len(ids) <= max_tokens:
        return context
    if fast:
        return context[:_prefix_end(encoded["offset_mapping"], max_tokens)]
    return _decode_whole_characters(tokenizer, ids[:max_tokens])


def _prefix_end(offsets, n: int) -> int:
    """The end, in characters, of the text of the first ``n`` tokens. Tokens that split a character
    share its span, so where token ``n - 1`` ends past the start of token ``n`` the character is
    cut: end before it."""
    if n == 0:
        return 0
    return min(offsets[n - 1][1], offsets[n][0])


def _decode_whole_characters(tokenizer, ids: list[int]) -> str:
    """``ids`` decoded, less the trailing tokens that decode to part of a character (a
    replacement character, at most three tokens of a UTF-8 character)."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    while ids and text.endswith("\ufffd"):
        ids = ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=False)
    return text


def _check_prompt(prompt):
    """Raises unless ``prompt`` is a string or a sequence of chat-message mappings."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, Mapping) or not hasattr(prompt, "__iter__") or \
            not all(isinstance(m, Mapping) for m in prompt):
        raise TypeError(f"a prompt must be a string or a list of chat messages ({{'role', 'content'}} dicts), "
                        f"got {type(prompt).__name__}: {prompt!r:.80}")


def teacher_prompt(prompt, context, *, tokenizer, template: str | Callable = DEFAULT_TEMPLATE,
                   max_context_tokens: int | None = DEFAULT_MAX_CONTEXT_TOKENS):
    """The teacher's prompt for one example, in the student prompt's form.

    ``prompt`` is a string or a list of chat messages (``{"role", "content"}`` dicts with string
    content); for chat prompts the context goes into the last user turn and every other turn is
    kept. ``template`` is a format string with ``{question}`` and ``{context}``, or a callable
    ``(question, context) -> str`` (:func:`check_template`). An empty or ``None`` context returns
    the prompt unchanged (the teacher then sees what the student saw).
    """
    check_template(template)
    _check_prompt(prompt)
    if context is None or context == "":
        return prompt
    if not isinstance(context, str):
        raise ValueError(f"the privileged context must be a string or None, got {type(context).__name__}")
    context = truncate_context(tokenizer, context, max_context_tokens)

    def fill(question):
        if not callable(template):
            return template.format(question=question, context=context)
        text = template(question, context)
        if not isinstance(text, str):
            raise TypeError(f"template(question, context) must return a string, got {type(text).__name__}")
        return text

    if isinstance(prompt, str):
        return fill(prompt)
    messages = [dict(m) for m in prompt]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ValueError("a chat prompt needs a user turn to carry the privileged context")
    last = messages[users[-1]]
    if not isinstance(last["content"], str):
        raise ValueError("the last user turn must have string content to carry the privileged context")
    last["content"] = fill(last["content"])
    return messages


def prompt_token_ids(tokenizer, prompts: Sequence, *, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of each prompt, as TRL's ``GRPOTrainer`` tokenizes the student's: a string with the
    tokenizer's special tokens (a BOS where it adds one), chat messages by ``apply_chat_template``
    with the generation prompt and ``chat_template_kwargs`` (e.g. ``tools``, ``chat_template``,
    ``enable_thinking``), which adds no special tokens the template does not write."""
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = tokenizer(text=prompt)["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                **(chat_template_kwargs or {}))["input_ids"]
        out.append([int(i) for i in ids])
    return out


def build_teacher_inputs(
    tokenizer,
    prompts: Sequence,
    contexts: Sequence,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    *,
    template: str | Callable = DEFAULT_TEMPLATE,
    max_context_tokens: int | None = DEFAULT_MAX_CONTEXT_TOKENS,
    chat_template_kwargs: dict | None = None,
    pad_token_id: int | None = None,
    tokenize_prompts: Callable[[list], Sequence[Sequence[int]]] | None = None,
) -> dict:
    """The teacher's batch: ``input_ids`` and ``attention_mask`` ``[B, P + T]``, left-padded.

    Row ``i`` is ``pad ⊕ teacher_prompt(prompts[i], contexts[i]) ⊕ completion_ids[i]``: the ``T``
    completion columns (right padding included) are the last ``T``, exactly as in the student's
    ``cat([prompt_ids, completion_ids])``, so the teacher's log-probs of the last ``T`` positions
    line up with the student's. ``completion_mask`` ``[B, T]`` (default all ones) becomes the
    completion part of the attention mask. Also returns ``logits_to_keep`` (``T``) and
    ``prompt_lengths`` (the teacher prompt's token count per row).

    The teacher prompts are tokenized by ``tokenize_prompts`` (a list of prompts to their id lists),
    by default :func:`prompt_token_ids` with ``chat_template_kwargs``: pass the trainer's own prompt
    tokenizer so that the teacher's prompt is tokenized exactly as the student's (with an empty
    context the two are then the same ids).
    """
    check_template(template)
    for name, value in (("prompts", prompts), ("contexts", contexts)):
        if isinstance(value, str):  # a string has a length, so its characters would pass for rows
            raise TypeError(f"{name} must be a sequence with one entry per row, got a string")
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be [B, T], got shape {tuple(completion_ids.shape)}")
    b, t = completion_ids.shape
    if len(prompts) != b or len(contexts) != b:
        raise ValueError(f"prompts ({len(prompts)}) and contexts ({len(contexts)}) need one entry per row ({b})")
    if completion_mask is None:
        completion_mask = torch.ones_like(completion_ids)
    if tuple(completion_mask.shape) != (b, t):
        raise ValueError(f"completion_mask has shape {tuple(completion_mask.shape)}, expected {(b, t)}")
    pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad_token_id: pass pad_token_id")
    texts = [teacher_prompt(p, c, tokenizer=tokenizer, template=template, max_context_tokens=max_context_tokens)
             for p, c in zip(prompts, contexts, strict=True)]
    if tokenize_prompts is None:
        rows = prompt_token_ids(tokenizer, texts, chat_template_kwargs=chat_template_kwargs)
    else:
        rows = [[int(i) for i in r] for r in tokenize_prompts(texts)] if texts else []
    if len(rows) != b:
        raise ValueError(f"tokenize_prompts returned {len(rows)} rows for {b} prompts")
    width = max((len(r) for r in rows), default=0)
    device = completion_ids.device
    prompt_ids = torch.full((b, width), pad, dtype=completion_ids.dtype, device=device)
    prompt_mask = torch.zeros((b, width), dtype=completion_mask.dtype, device=device)
    for i, r in enumerate(rows):
        if r:
            prompt_ids[i, width - len(r):] = torch.tensor(r, dtype=completion_ids.dtype, device=device)
            prompt_mask[i, width - len(r):] = 1
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
        "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
        "logits_to_keep": t,
        "prompt_lengths": [len(r) for r in rows],
    }


def backbone_and_head(model):
    """``(backbone, lm_head)`` of a causal LM: the module giving ``last_hidden_state`` and the output
    projection (a ``Linear``). A PEFT wrapper is looked through."""
    inner = model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    head = inner.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError("the model has no output embedding (lm_head) to score the teacher's tokens with")
    return inner.base_model, head


@torch.no_grad()
def teacher_logprobs(model, input_ids, attention_mask, completion_ids, completion_mask=None, *,
                     temperature=1.0, batch_size=None, chunk_size=None, gather_context=None):
    """Log-probs ``[B, T]`` (float32) of ``completion_ids`` under ``model`` given the teacher batch.

    Runs the backbone only and scores the last ``T`` positions with
    :func:`rlsd_kernels.token_logprobs_linear` from the last hidden states and the lm_head weight,
    so no ``[N, V]`` logits are ever formed. Masked completion tokens get 0. ``batch_size`` bounds
    the rows per forward; ``gather_context`` is a callable ``(weight, bias) -> context manager``
    that makes a sharded lm_head whole (ZeRO-3) while it is read.

    The backbone runs in eval mode (dropout off, each module's mode restored after), so a live
    teacher scores deterministically, and with position ids counted over the attention mask, as
    generation numbers the tokens: a row scores as its unpadded sequence would, also for models with
    absolute position embeddings.
    """
    backbone, head = backbone_and_head(model)
    t = completion_ids.shape[1]
    if input_ids.shape[1] <= t:
        raise ValueError(f"input_ids has {input_ids.shape[1]} columns for {t} completion tokens: the first "
                         f"completion token is scored from the column before it, so a prompt column is needed")
    tokens = completion_ids if completion_mask is None else completion_ids.masked_fill(completion_mask == 0, -100)
    positions = _position_ids(backbone, attention_mask)
    step = batch_size or input_ids.shape[0]
    out = []
    with _eval_mode(model):
        for start in range(0, input_ids.shape[0], step):
            sl = slice(start, start + step)
            extra = {} if positions is None else {"position_ids": positions[sl]}
            hidden = backbone(input_ids=input_ids[sl], attention_mask=attention_mask[sl], use_cache=False,
                              **extra).last_hidden_state
            out.append(_score(head, hidden[:, -t - 1:-1], tokens[sl], temperature, chunk_size, gather_context))
    return torch.cat(out, dim=0)


def _score(head, hidden, tokens, temperature, chunk_size, gather_context):
    bias = getattr(head, "bias", None)
    ctx = gather_context(head.weight, bias) if gather_context is not None else contextlib.nullcontext()
    with ctx:
        return rlsd_kernels.token_logprobs_linear(hidden.to(head.weight.dtype), head.weight, tokens, bias=bias,
                                                  temperature=temperature, chunk_size=chunk_size)


def position_ids(attention_mask):
    """Each token's index among the row's attended tokens (pads before them get 0), as generation
    numbers them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _position_ids(backbone, attention_mask):
    """:func:`position_ids`, or None for a backbone that takes none. Without them a model numbers the
    columns, pads included, which moves absolute position embeddings by the row's padding."""
    if "position_ids" not in inspect.signature(backbone.forward).parameters:
        return None
    return position_ids(attention_mask)


class _eval_mode:
    """Puts a module in eval mode and restores each submodule's own mode on exit."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for m, training in self.modes:
            m.training = training
        return False
