"""The teacher as a trainer of one's own would use it: teacher batches against hand-built sequences,
context truncation on real tokenizer kinds, argument errors, and the weight policies' edge cases."""

import math

import pytest
import torch

pytest.importorskip("transformers", reason="the trl or verl extra is not installed")

from test_integrations_teacher import _completions  # noqa: E402
from tiny_lm import CHATML, char_tokenizer  # noqa: E402

from rlsd_kernels.integrations.teacher import (  # noqa: E402
    TeacherWeights,
    build_teacher_inputs,
    prompt_token_ids,
    teacher_logprobs,
    teacher_prompt,
    truncate_context,
)

pytestmark = pytest.mark.integration

CORPUS = ["the answer is x = 3 since 3 - 3 = 0", "héllo wörld ∑ π 数学 résumé", "{a} {{b}} {0}"]


def _model(kind, tok, *, tied=False, dropout=0.0, seed=0):
    """A one-layer model of ``kind``: ``rope`` (Qwen2, rotary positions) or ``absolute`` (GPT-2,
    learned position embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    if kind == "absolute":
        config = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=256,
                            tie_word_embeddings=tied, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                            **ids)
        return GPT2LMHeadModel(config)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=tied, attention_dropout=dropout, **ids)
    return Qwen2ForCausalLM(config)


def _right_padded(tok, texts):
    """Completion ids and mask ``[B, T]``, right-padded; ``T`` is the longest text (0 if all are empty)."""
    return _completions(tok, texts, max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts))


def _hand_built_logprobs(model, prompt_ids, completion):
    """Log-probs (float64 from float32 logits) of ``completion`` after ``prompt_ids``, one unpadded row."""
    seq = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0].double()
    rows = torch.log_softmax(logits[len(prompt_ids) - 1:-1], -1)
    return rows.gather(-1, torch.tensor(completion, dtype=torch.long)[:, None])[:, 0]


# Rows of (prompt, context, completion): left padding from prompts of several lengths, chat and
# plain prompts, completions with EOS in the middle, of length 0 and of different lengths; contexts
# empty, None, with format fields and braces, unicode, and longer than the context limit.
ROWS = [
    ("Q: 1+1?", "{question} {0} {{x}} }{", "2<eos>tail"),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "a longer chat question?"}],
     "ref é π 数学 " * 4, "ok<eos>"),
    ([{"role": "user", "content": "q"}], "", ""),
    ("x", None, "abc def g"),
    ("mid prompt", "0123456789" * 6, "z"),
]
MAX_CONTEXT = 20
TEMPLATES = {"default": None, "context-first": "{context}\n---\n{question}", "callable": lambda q, c: f"[{c}]({q})"}


ROW_SETS = {"batch": slice(None), "one": slice(0, 1), "empty-completion": slice(2, 3)}
CASES = [(kind, template, "batch") for kind in ("rope", "absolute") for template in TEMPLATES] + \
    [(kind, "default", rows) for kind in ("rope", "absolute") for rows in ("one", "empty-completion")]


@pytest.mark.parametrize("kind,template,rows", CASES)
def test_teacher_logprobs_equal_the_hand_built_sequence(kind, template, rows):
    """Each row's teacher log-probs, from the padded batch, equal the same model's on the unpadded
    ``teacher prompt + completion``; the completion holds the last T columns as the student's; the
    context cut never reaches the question or the completion."""
    tok = char_tokenizer(CHATML)
    model = _model(kind, tok).eval()
    prompts, contexts, texts = zip(*ROWS[ROW_SETS[rows]], strict=True)
    options = {"max_context_tokens": MAX_CONTEXT}
    if TEMPLATES[template] is not None:
        options["template"] = TEMPLATES[template]
    ids, mask = _right_padded(tok, texts)
    batch = build_teacher_inputs(tok, list(prompts), list(contexts), ids, mask, **options)
    t = ids.shape[1]
    assert batch["logits_to_keep"] == t
    assert torch.equal(batch["input_ids"][:, batch["input_ids"].shape[1] - t:], ids)
    assert torch.equal(batch["attention_mask"][:, batch["attention_mask"].shape[1] - t:], mask)
    lp = teacher_logprobs(model, batch["input_ids"], batch["attention_mask"], ids, mask)
    assert lp.shape == ids.shape and lp.dtype == torch.float32
    for i, (prompt, context) in enumerate(zip(prompts, contexts, strict=True)):
        built = teacher_prompt(prompt, context, tokenizer=tok, **options)
        question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        text = built if isinstance(built, str) else built[-1]["content"]
        assert question in text
        prompt_ids = prompt_token_ids(tok, [built])[0]
        assert batch["prompt_lengths"][i] == len(prompt_ids)
        n = int(mask[i].sum())
        expected = _hand_built_logprobs(model, prompt_ids, ids[i, :n].tolist())
        torch.testing.assert_close(lp[i, :n].double(), expected, rtol=0, atol=2e-5)
        assert torch.all(lp[i, n:] == 0)


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def _metaspace_tokenizer():
    """SentencePiece-style: words carry a leading ``▁``, with byte fallback for unseen characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", *bytes_], show_progress=False)
    core.train_from_iterator(CORPUS[:1] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


class _NoOffsets:
    """A tokenizer without offsets (not a fast tokenizer): truncation decodes the kept ids."""

    is_fast = False

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        assert not return_offsets_mapping
        return self.tok(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


TOKENIZERS = {"byte-level": _byte_level_tokenizer, "metaspace": _metaspace_tokenizer, "char": char_tokenizer,
              "byte-level-no-offsets": lambda: _NoOffsets(_byte_level_tokenizer())}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_context_is_cut_on_a_character_boundary(kind):
    """For every limit: the cut context has no replacement character, holds at most the limit's
    tokens (and at most a character's bytes fewer), and is the context's own prefix where offsets
    exist; at or above the context's length it is whole."""
    tok = TOKENIZERS[kind]()
    count = (tok.tok if isinstance(tok, _NoOffsets) else tok)

    def n_tokens(text):
        return len(count(text, add_special_tokens=False)["input_ids"])

    for context in ("数学 π ∑ résumé the answer", "x = 3 {0} {{a}} ü"):
        total = n_tokens(context)
        for limit in range(total + 2):
            cut = truncate_context(tok, context, limit)
            if limit >= total:
                assert cut == context
                continue
            assert "\ufffd" not in cut, (limit, cut)
            assert limit - 3 <= n_tokens(cut) <= limit, (limit, cut)
            if kind != "byte-level-no-offsets":
                assert context.startswith(cut), (limit, cut)


def _check_message(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert all(w in str(info.value) for w in words), str(info.value)


BAD_INPUTS = {
    "prompts-as-string": (dict(prompts="q"), TypeError, ["prompts", "string"]),
    "contexts-as-string": (dict(contexts="c"), TypeError, ["contexts", "string"]),
    "prompt-none": (dict(prompts=[None]), TypeError, ["prompt", "NoneType"]),
    "prompt-one-message": (dict(prompts=[{"role": "user", "content": "q"}]), TypeError, ["prompt", "dict"]),
    "template-one-argument": (dict(template=lambda q: q), TypeError, ["template", "(question, context)"]),
    "template-returns-none": (dict(template=lambda q, c: None), TypeError, ["template", "string", "NoneType"]),
    "template-returns-list": (dict(template=lambda q, c: [q, c]), TypeError, ["template", "string", "list"]),
    "template-format-spec": (dict(template="{question} {context:d}"), ValueError, ["template", "format"]),
    "template-nested-field": (dict(template="{question} {context:>{width}}"), ValueError, ["template", "format"]),
    "template-conversion": (dict(template="{question!z} {context}"), ValueError, ["template"]),
    "max-context-float": (dict(max_context_tokens=3.0), ValueError, ["max_context_tokens", "3.0"]),
    "max-context-bool": (dict(max_context_tokens=True), ValueError, ["max_context_tokens", "True"]),
    "max-context-negative": (dict(max_context_tokens=-1), ValueError, ["max_context_tokens", "-1"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_teacher_inputs_name_the_argument(case):
    tok = char_tokenizer()
    ids = torch.tensor([[5, 6]])
    options, error, words = BAD_INPUTS[case]
    args = {"prompts": ["q"], "contexts": ["a context"], **options}
    _check_message(lambda: build_teacher_inputs(tok, args.pop("prompts"), args.pop("contexts"), ids, **args),
                   error, words)


@pytest.mark.parametrize("policy,option,value", [
    ("ema", "ema_decay", math.nan), ("ema", "ema_decay", -0.01), ("ema", "ema_decay", 1.01),
    ("ema", "ema_decay", math.inf), ("ema", "ema_decay", True), ("ema", "ema_decay", "0.9"),
    ("snapshot", "refresh_steps", 0), ("snapshot", "refresh_steps", 2.0), ("snapshot", "refresh_steps", True),
])
def test_bad_weight_options_name_the_option(policy, option, value):
    _check_message(lambda: TeacherWeights(torch.nn.Linear(2, 2), policy, **{option: value}), ValueError,
                   [option, repr(value)])


def test_empty_prompt_columns_are_a_clear_error():
    tok = char_tokenizer()
    model = _model("rope", tok)
    ids = torch.tensor([[5, 6]])
    _check_message(lambda: teacher_logprobs(model, ids, torch.ones_like(ids), ids), ValueError,
                   ["input_ids", "prompt column"])


def _policy_steps(model, steps, *, seed=1, scale=1e-3):
    """``steps`` optimizer-like updates: float32 master weights moved by small noise, cast to the
    model's dtype (as mixed-precision optimizers write bf16 weights). Yields after each step."""
    g = torch.Generator().manual_seed(seed)
    masters = {n: p.detach().double() for n, p in model.named_parameters()}
    for step in range(1, steps + 1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                masters[n] += scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device)
                p.copy_(masters[n])
        yield step


def _unique_named_tensors(model):
    return {n: p for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("tied", [False, True])
def test_ema_teacher_is_the_float64_average(dtype, decay, tied):
    """The EMA teacher (tied weights averaged once) equals the float64 average of the policy's
    weights after each step, to the teacher dtype's rounding; decay 0 is the policy and 1 the
    initial weights, exactly. The teacher copy keeps the model's dtype and gets no gradient."""
    tok = char_tokenizer()
    model = _model("rope", tok, tied=tied).to(dtype)
    teacher = TeacherWeights(model, "ema", ema_decay=decay)
    start = {n: p.detach().double().clone() for n, p in _unique_named_tensors(model).items()}
    average = dict(start)
    for step in _policy_steps(model, 30):
        teacher.on_step_end(step)
        for n, p in _unique_named_tensors(model).items():
            average[n] = decay * average[n] + (1 - decay) * p.detach().double()
    copy = dict(teacher.model.named_parameters())
    assert (teacher.model.get_output_embeddings().weight is teacher.model.get_input_embeddings().weight) == tied
    for n, p in _unique_named_tensors(model).items():
        assert copy[n].dtype == dtype and not copy[n].requires_grad
        if decay in (0.0, 1.0):
            assert torch.equal(copy[n], (p if decay == 0.0 else start[n].to(dtype)).detach()), n
        else:
            # One rounding step of the teacher's dtype; in float32, the 30 roundings of the average.
            rtol = max(torch.finfo(dtype).eps, 2.0 ** -20)
            torch.testing.assert_close(copy[n].double(), average[n].to(dtype).double(), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("policy", ["snapshot", "ema"])
def test_a_repeated_step_count_changes_nothing(policy):
    """A second call for the same optimizer step (several callbacks, or one per micro-batch) leaves
    the teacher as one call would."""
    tok = char_tokenizer()
    model = _model("rope", tok)
    once = TeacherWeights(model, policy, refresh_steps=2, ema_decay=0.5)
    repeated = TeacherWeights(model, policy, refresh_steps=2, ema_decay=0.5)
    for step in _policy_steps(model, 4, scale=0.1):
        once.on_step_end(step)
        for _ in range(3):
            repeated.on_step_end(step)
    assert repeated.refreshes == once.refreshes
    for (n, a), b in zip(once.model.state_dict().items(), repeated.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("kind", ["rope", "absolute"])
def test_live_teacher_scores_without_dropout_and_keeps_the_modes(kind):
    """A live teacher is the policy in train mode: scoring turns dropout off, and gives every
    module back its own mode (one left in eval stays in eval)."""
    tok = char_tokenizer()
    model = _model(kind, tok, dropout=0.5).train()
    list(model.modules())[-1].eval()
    modes = [m.training for m in model.modules()]
    teacher = TeacherWeights(model, "live")
    ids = torch.tensor([[7, 8, 9, 10, 11, 12], [0, 0, 9, 10, 11, 12]])
    attention = (ids != 0).long()
    runs = [teacher_logprobs(teacher.model, ids, attention, ids[:, -3:]) for _ in range(2)]
    assert [m.training for m in model.modules()] == modes
    model.eval()
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    torch.testing.assert_close(runs[0], teacher_logprobs(model, ids, attention, ids[:, -3:]), rtol=0, atol=0)
    assert not runs[0].requires_grad


@pytest.mark.gpu
def test_ema_teacher_follows_a_policy_moved_to_another_device():
    """The policy moved to the GPU after the teacher was built: the update reads it across devices."""
    tok = char_tokenizer()
    model = _model("rope", tok)
    teacher = TeacherWeights(model, "ema", ema_decay=0.5)
    model.cuda()
    for step in _policy_steps(model, 2):
        teacher.on_step_end(step)
    name = "model.layers.0.mlp.up_proj.weight"
    assert teacher.model.state_dict()[name].device.type == "cpu"
    assert not torch.equal(teacher.model.state_dict()[name], model.state_dict()[name].cpu())
