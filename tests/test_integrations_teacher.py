"""The trainer-independent teacher: its inputs on several chat templates, and its weight policies."""

import types

import pytest
import torch
from tolerances import CHUNKED_LOGPROBS

pytest.importorskip("transformers", reason="the trl or verl extra is not installed")

from tiny_lm import CHATML, PLAIN, SYSTEM_FIRST, char_tokenizer, tiny_qwen2  # noqa: E402

from rlsd_kernels.integrations.teacher import (  # noqa: E402
    DEFAULT_TEMPLATE,
    TeacherWeights,
    build_teacher_inputs,
    check_template,
    fresh_copy,
    teacher_logprobs,
    teacher_prompt,
)

pytestmark = pytest.mark.integration


def _completions(tok, texts, width):
    ids = torch.full((len(texts), width), tok.pad_token_id)
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    for i, text in enumerate(texts):
        row = tok(text, add_special_tokens=False)["input_ids"]
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


@pytest.mark.parametrize("template", [CHATML, PLAIN, SYSTEM_FIRST])
def test_chat_prompts_carry_the_context_in_the_last_user_turn(template):
    tok = char_tokenizer(template)
    prompts = [
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"}],
        [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
         {"role": "user", "content": "second question"}],
    ]
    contexts = ["the answer is 7", "ref B"]
    ids, mask = _completions(tok, ["abc", "hello!"], 7)
    batch = build_teacher_inputs(tok, prompts, contexts, ids, mask)
    width = ids.shape[1]
    assert batch["logits_to_keep"] == width
    assert torch.equal(batch["input_ids"][:, -width:], ids)
    assert torch.equal(batch["attention_mask"][:, -width:], mask)
    for i, (prompt, context) in enumerate(zip(prompts, contexts, strict=True)):
        n = batch["prompt_lengths"][i]
        prompt_part = batch["input_ids"][i, :-width]
        # Left padding: pads first, then exactly the teacher prompt's tokens.
        pads = prompt_part.shape[0] - n
        assert torch.equal(prompt_part[:pads], torch.full((pads,), tok.pad_token_id))
        assert batch["attention_mask"][i, :pads].sum() == 0 and batch["attention_mask"][i, pads:-width].all()
        messages = teacher_prompt(prompt, context, tokenizer=tok)
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.decode(prompt_part[pads:]) == expected
        assert messages[:-1] == prompt[:-1]
        assert messages[-1]["content"] == DEFAULT_TEMPLATE.format(question=prompt[-1]["content"], context=context)
        assert "Here is a reference solution:\n" + context in expected


def test_plain_prompts_truncation_and_empty_contexts():
    tok = char_tokenizer()
    ids, mask = _completions(tok, ["xy", "z"], 3)
    batch = build_teacher_inputs(tok, ["Q: 1+1?", "Q: 2+2?"], ["0123456789", ""], ids, mask, max_context_tokens=4,
                                 template="{question}|{context}")
    width = 3
    first = tok.decode(batch["input_ids"][0, :-width], skip_special_tokens=True)
    second = tok.decode(batch["input_ids"][1, :-width], skip_special_tokens=True)
    assert first == "Q: 1+1?|0123"
    assert second == "Q: 2+2?"  # an empty context leaves the student's prompt
    assert batch["prompt_lengths"] == [len("Q: 1+1?|0123"), len("Q: 2+2?")]
    assert teacher_prompt("q", None, tokenizer=tok) == "q"
    assert teacher_prompt("q", "abcdef", tokenizer=tok, template=lambda q, c: c + q, max_context_tokens=None) \
        == "abcdefq"


def test_bad_inputs_name_the_argument():
    tok = char_tokenizer()
    ids, mask = _completions(tok, ["a"], 2)
    with pytest.raises(ValueError, match="contexts"):
        build_teacher_inputs(tok, ["q"], [], ids, mask)
    with pytest.raises(ValueError, match="completion_mask"):
        build_teacher_inputs(tok, ["q"], ["c"], ids, mask[:, :1])
    with pytest.raises(ValueError, match="user turn"):
        teacher_prompt([{"role": "system", "content": "s"}], "c", tokenizer=tok)
    with pytest.raises(ValueError, match="max_context_tokens"):
        teacher_prompt("q", "c", tokenizer=tok, max_context_tokens=-1)
    with pytest.raises(ValueError, match="teacher policy"):
        TeacherWeights(torch.nn.Linear(2, 2), "mirror")


def test_teacher_logprobs_match_the_full_logits():
    tok = char_tokenizer()
    model = tiny_qwen2(tok).eval()
    ids, mask = _completions(tok, ["abc", "hello"], 6)
    batch = build_teacher_inputs(tok, ["q one", "q2"], ["ctx", None], ids, mask)
    lp = teacher_logprobs(model, batch["input_ids"], batch["attention_mask"], ids, mask, temperature=0.8,
                          batch_size=1, chunk_size=4)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -7:-1]
    expected = torch.log_softmax(logits.float() / 0.8, -1).gather(-1, ids[..., None])[..., 0] * mask
    torch.testing.assert_close(lp, expected, **CHUNKED_LOGPROBS)


def _step(model, scale):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)


def test_weight_policies():
    tok = char_tokenizer()
    policy = tiny_qwen2(tok)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    teachers = {name: TeacherWeights(policy, name, refresh_steps=3, ema_decay=0.5)
                for name in ("live", "frozen", "snapshot", "ema")}
    assert teachers["live"].model is policy
    for step in range(1, 5):
        _step(policy, 1.1)
        for t in teachers.values():
            t.on_step_end(step)
    name = "model.layers.0.mlp.up_proj.weight"
    now = policy.state_dict()[name]
    assert torch.equal(teachers["frozen"].model.state_dict()[name], start[name])
    assert teachers["snapshot"].refreshes == [3]
    torch.testing.assert_close(teachers["snapshot"].model.state_dict()[name], start[name] * 1.1 ** 3)
    ema = start[name]
    for step in range(1, 5):
        ema = 0.5 * ema + 0.5 * start[name] * 1.1 ** step
    torch.testing.assert_close(teachers["ema"].model.state_dict()[name], ema)
    assert not torch.equal(now, teachers["snapshot"].model.state_dict()[name])
    assert all(not p.requires_grad for p in teachers["frozen"].model.parameters())


def test_fresh_copy_ignores_instance_patches():
    tok = char_tokenizer()
    model = tiny_qwen2(tok)
    original_forward = model.forward

    def patched(self, *args, **kwargs):  # a trainer's patch, bound to the original instance
        return original_forward(*args, **kwargs)

    model.forward = types.MethodType(patched, model)
    copy = fresh_copy(model)
    assert "forward" not in vars(copy)
    _step(copy, 0.0)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert not torch.allclose(copy(input_ids=ids).logits, model(input_ids=ids).logits)


def test_docs_teacher_example():
    from docs_snippets import blocks

    tok = char_tokenizer()
    model = tiny_qwen2(tok).eval()
    completion_ids, completion_mask = _completions(tok, ["42", "x = 3"], 5)
    namespace = {"tokenizer": tok, "prompts": ["1+41?", [{"role": "user", "content": "solve x - 3 = 0"}]],
                 "solutions": ["42", "x = 3 since 3 - 3 = 0"], "completion_ids": completion_ids,
                 "completion_mask": completion_mask, "teacher_model": model}
    exec(compile(blocks("Use from any trainer")[0], "README.md", "exec"), namespace)
    batch = namespace["batch"]
    assert torch.equal(batch["input_ids"][:, -5:], completion_ids)
    expected = teacher_logprobs(model, batch["input_ids"], batch["attention_mask"], completion_ids, completion_mask)
    torch.testing.assert_close(namespace["teacher_lp"], expected)


def bos_tokenizer(template=CHATML):
    """The character tokenizer adding ``<|im_start|>`` as a BOS to every string (Llama/Gemma-style)."""
    from tokenizers import processors

    tok = char_tokenizer(template)
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                  special_tokens=[("<|im_start|>", bos)])
    assert tok("ab")["input_ids"][0] == bos
    return tok


def _prompt_rows(batch, width):
    """The unpadded teacher prompt of each row."""
    return [row[:-width][mask[:-width].bool()].tolist()
            for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_teacher_prompt_is_tokenized_as_the_student_prompt(bos, chat):
    """As TRL tokenizes the student's prompt: strings with the special tokens (a BOS where the
    tokenizer adds one), chat through the template. With an empty context the ids are the student's."""
    tok = bos_tokenizer(PLAIN) if bos else char_tokenizer(PLAIN)
    questions = ["1+1?", "what is 2*3?", "8/2?", "x"]
    prompts = [[{"role": "user", "content": q}] if chat else q for q in questions]
    contexts = ["", None, "since 8/2=4", "ref"]

    def as_student(prompt):
        if chat:
            return tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
        return tok(text=prompt)["input_ids"]

    ids, mask = _completions(tok, ["ab", "c", "def", "g"], 3)
    rows = _prompt_rows(build_teacher_inputs(tok, prompts, contexts, ids, mask), 3)
    for prompt, context, row in zip(prompts, contexts, rows, strict=True):
        expected = as_student(teacher_prompt(prompt, context, tokenizer=tok))
        assert row == expected
        if not context:
            assert row == as_student(prompt)
        assert (row[0] == tok.convert_tokens_to_ids("<|im_start|>")) == (bos and not chat)


def test_trainer_tokenizer_and_template_kwargs_reach_the_teacher_prompt():
    template = "{% if tools %}[T:{{ tools | length }}]{% endif %}{{ note }}" + CHATML
    tok = char_tokenizer(template)
    prompts = [[{"role": "user", "content": "q"}], [{"role": "user", "content": "r"}]]
    ids, mask = _completions(tok, ["a", "b"], 2)
    kwargs = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "note": "N!"}
    batch = build_teacher_inputs(tok, prompts, ["", "ctx"], ids, mask, chat_template_kwargs=kwargs)
    texts = [tok.decode(r) for r in _prompt_rows(batch, 2)]
    assert all(t.startswith("[T:1]N!<|im_start|>user") for t in texts) and "ctx" in texts[1]

    seen = []

    def tokenize(teacher_prompts):
        seen.append(teacher_prompts)
        return [[7] * (i + 1) for i in range(len(teacher_prompts))]

    batch = build_teacher_inputs(tok, prompts, ["", "ctx"], ids, mask, tokenize_prompts=tokenize)
    assert seen == [[prompts[0], teacher_prompt(prompts[1], "ctx", tokenizer=tok)]]
    assert _prompt_rows(batch, 2) == [[7], [7, 7]]
    with pytest.raises(ValueError, match="tokenize_prompts"):
        build_teacher_inputs(tok, prompts, ["", "ctx"], ids, mask, tokenize_prompts=lambda p: [[7]])


@pytest.mark.parametrize("template,message", [
    ("{question} and nothing else", "must contain {context}"),
    ("Here is the reference: {context}", "must contain {question}"),
    ("no field at all", "must contain {question} and {context}"),
    ("{question}\n{solution}\n{context}", "'{solution}'"),
    ("{question} {context} {}", "'{}'"),
    ("{question} {context.upper}", "'{context.upper}'"),
    ("{question} {context", "not a valid format string"),
])
def test_template_without_its_fields_is_refused(template, message):
    tok = char_tokenizer()
    ids, mask = _completions(tok, ["a"], 2)
    for call in (lambda: check_template(template, "teacher_template"),
                 lambda: build_teacher_inputs(tok, ["q"], [None], ids, mask, template=template),
                 lambda: teacher_prompt("q", "c", tokenizer=tok, template=template)):
        with pytest.raises(ValueError, match="template") as info:
            call()
        assert message in str(info.value)
    with pytest.raises(TypeError, match="teacher_template"):
        check_template(3, "teacher_template")
    check_template("{{literal}} {question}: {context!r}", "teacher_template")
    check_template(lambda q, c: q + c, "teacher_template")
