"""RLSDTrainer in TRL on CPU: a real three-step run; lam = 0 against TRL's own GRPO loss and metrics; the
teacher prompt tokenized as the student's; the credit metrics over a window; the config's defaults and checks."""

import math
import os

import pytest
import torch
from test_integrations_teacher import bos_tokenizer
from tiny_lm import CHATML, PLAIN, char_tokenizer, tiny_qwen2
from tolerances import TRAINER_GRAD, TRAINER_LOSS, TWO_ROUTES_FP32

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("trl", reason="the trl extra is not installed")

from datasets import Dataset  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from rlsd_kernels.integrations.teacher import DEFAULT_TEMPLATE, teacher_prompt  # noqa: E402
from rlsd_kernels.integrations.trl import SUPPORTED_LOSS_TYPES, RLSDConfig, RLSDTrainer, check_config  # noqa: E402

pytestmark = pytest.mark.integration

SOLUTIONS = ["2 since 1+1=2", "6 as 2*3=6", "4 because 8/2=4", "9 from 3^2"]
QUESTIONS = ["1+1?", "2*3?", "8/2?", "3^2?"]


def digit_reward(completions, solution, **kwargs):
    """1 per digit of the completion matching the solution's first character (varies, so A != 0)."""
    out = []
    for completion, sol in zip(completions, solution, strict=True):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        out.append(float(text.count((sol or "1")[0])) + 0.1 * len(text))
    return out


def dataset():
    rows = [{"prompt": [{"role": "user", "content": q}], "solution": s} for q, s in zip(QUESTIONS, SOLUTIONS,
                                                                                        strict=True)]
    return Dataset.from_list(rows)


def config(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        max_steps=3, learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        seed=0, teacher_refresh_steps=2, dataloader_num_workers=0, bf16=False,
    )
    base.update(overrides)
    return RLSDConfig(**base)


def trainer(tmp_path, cls=RLSDTrainer, tok=None, **overrides):
    tok = tok or char_tokenizer()
    model = tiny_qwen2(tok)
    if overrides.get("beta"):
        # TRL builds the reference model from the policy's path.
        model.save_pretrained(tmp_path / "model")
        model = str(tmp_path / "model")
    return cls(model=model, reward_funcs=digit_reward, args=config(tmp_path, **overrides), train_dataset=dataset(),
               processing_class=tok)


def test_three_steps_train_and_log(tmp_path):
    t = trainer(tmp_path)
    captured = []
    generate = t._generate_and_score_completions

    def spy(inputs):
        out = generate(inputs)
        captured.append((out["completion_ids"].clone(), t.last_teacher_inputs, list(t.teacher.refreshes),
                         t.state.global_step))
        return out

    t._generate_and_score_completions = spy
    before = {k: v.detach().clone() for k, v in t.model.named_parameters()}
    frozen_start = {k: v.detach().clone() for k, v in t.teacher.model.named_parameters()}
    t.train()

    changed = [k for k, v in t.model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert len(changed) == len(before)
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    for name in ("rlsd/lam", "rlsd/dual_clip_frac", "clip_ratio/low_mean", "entropy"):
        assert all(name in h for h in t.state.log_history if "loss" in h), name
    # The credit metrics average the tokens with A != 0: a step whose rewards are all equal has none.
    has_credit = [h["reward_std"] > 0 for h in t.state.log_history if "loss" in h]
    assert any(has_credit)
    for name in ("rlsd/credit_weight_mean", "rlsd/delta_mean"):
        assert [name in h for h in t.state.log_history if "loss" in h] == has_credit, name
    lams = [h["rlsd/lam"] for h in t.state.log_history if "loss" in h]
    assert lams == pytest.approx([0.5 * (1 - s / 60) for s in (1, 2, 3)])

    assert len(captured) == 3
    tok = t.processing_class
    for completion_ids, batch, _, _ in captured:
        width = completion_ids.shape[1]
        assert batch["logits_to_keep"] == width
        assert torch.equal(batch["input_ids"][:, -width:], completion_ids)
        for row in batch["input_ids"]:
            text = tok.decode(row[:-width], skip_special_tokens=True)
            assert "Here is a reference solution:" in text
            assert any(s in text for s in SOLUTIONS)
    # Snapshot teacher: refreshed after step 2 (K = 2) and not before.
    assert [c[2] for c in captured] == [[], [], [2]]
    assert t.teacher.refreshes == [2]
    teacher_now = dict(t.teacher.model.named_parameters())
    policy_now = dict(t.model.named_parameters())
    assert all(not torch.equal(frozen_start[k], teacher_now[k]) for k in frozen_start)
    assert all(not torch.equal(policy_now[k].detach(), teacher_now[k]) for k in teacher_now)


def _batch(t):
    t.model.train()
    t.current_gradient_accumulation_steps = t.args.gradient_accumulation_steps
    generation_batch = next(iter(t.get_train_dataloader()))
    inputs = t._prepare_inputs(generation_batch)
    g = torch.Generator().manual_seed(1)
    lp = inputs["completion_mask"].float()
    width = lp.shape[1]
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logits = t.model(input_ids=ids, attention_mask=att).logits[:, -width - 1:-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, inputs["completion_ids"][..., None])[..., 0]
    # Old log-probs away from the current ones, so both clip sides bind on some tokens.
    shift = 0.4 * torch.randn(lp.shape, generator=g) + 0.3 * torch.randn(lp.shape[0], 1, generator=g)
    inputs["old_per_token_logps"] = lp + shift
    inputs["advantages"] = torch.randn(lp.shape[0], generator=g)
    inputs["ref_per_token_logps"] = lp + 0.1 * torch.randn(lp.shape, generator=g)
    return inputs


def _loss_and_grads(t, inputs, fn):
    t.model.zero_grad()
    loss = fn(t.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in t.model.parameters()]


@pytest.mark.parametrize("lam_options, passes", [(dict(lam=0.0), 0), (dict(lam_decay_steps=2), 1)])
def test_no_teacher_pass_once_lam_is_zero(tmp_path, monkeypatch, lam_options, passes):
    """The teacher scores a generation batch only if a step it serves has lam > 0: never at a fixed
    lam = 0, and only for the first step when the schedule reaches 0 at step 2. Those steps train
    as GRPO and log no credit metrics."""
    import rlsd_kernels.integrations.trl as rlsd_trl

    calls = []
    score = rlsd_trl.teacher_logprobs
    monkeypatch.setattr(rlsd_trl, "teacher_logprobs", lambda *a, **k: calls.append(1) or score(*a, **k))
    t = trainer(tmp_path, **lam_options)
    t.train()
    assert len(calls) == passes
    logged = [h for h in t.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(math.isfinite(h["loss"]) for h in logged)
    assert [("rlsd/credit_weight_mean" in h) for h in logged] == [True] * passes + [False] * (3 - passes)


def _logged(t, fn, inputs):
    """The loss, the gradients and what ``fn`` adds to TRL's metrics under TRL's names."""
    t._metrics["train"].clear()
    loss, grads = _loss_and_grads(t, inputs, fn)
    return loss, grads, {k: v for k, v in t._metrics["train"].items() if not k.startswith("rlsd/")}


LEVELS = [(lt, "sequence" if lt == "luspo" else "token") for lt in SUPPORTED_LOSS_TYPES]


@pytest.mark.parametrize("loss_type,level", LEVELS + [("dapo", "sequence"), ("cispo", "sequence")])
def test_lam_zero_equals_trl_loss(tmp_path, loss_type, level):
    """Loss, gradients and the metrics logged under TRL's names equal GRPOTrainer's for the batch."""
    extra = {"sapo_temperature_pos": 1.3, "sapo_temperature_neg": 0.9} if loss_type == "sapo" else {}
    beta = 0.05 if loss_type in ("grpo", "dapo") else 0.0
    t = trainer(tmp_path, loss_type=loss_type, lam=0.0, dual_clip=None, beta=beta, use_bias_correction_kl=False,
                epsilon_high=1.1 if loss_type == "cispo" else 0.28, teacher_policy="live",
                gradient_accumulation_steps=2, importance_sampling_level=level, **extra)
    inputs = _batch(t)
    ours, ours_grads, our_metrics = _logged(t, t.compute_loss, inputs)
    theirs, their_grads, their_metrics = _logged(t, lambda m, x: GRPOTrainer._compute_loss(t, m, x), inputs)
    assert ours.item() != 0.0
    torch.testing.assert_close(ours, theirs, **TRAINER_LOSS)
    for a, b in zip(ours_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, **TRAINER_GRAD)
    assert our_metrics.keys() == their_metrics.keys()
    for name, values in their_metrics.items():
        assert our_metrics[name] == pytest.approx(values, rel=1e-4, abs=1e-6), name
    clipped = {"sapo": None, "cispo": "cispo_clip_ratio"}.get(loss_type, "clip_ratio/region_mean")
    if clipped is not None:  # the clip binds on some tokens or sequences
        assert their_metrics[clipped][-1] > 0
    # At lam = 0 no teacher scored the batch; with one, lam = 1 changes the loss.
    assert inputs["teacher_per_token_logps"] is None
    inputs["teacher_per_token_logps"] = inputs["old_per_token_logps"] - 0.3
    t.args.lam = 1.0
    assert not torch.allclose(t.compute_loss(t.model, inputs), theirs, rtol=1e-3)


@pytest.mark.parametrize("field,value", [
    ("loss_type", "vespo"), ("delta", 2.0), ("top_entropy_quantile", 0.5), ("entropy_coef", 0.1),
    ("teacher_policy", "mirror"), ("lam", 1.5), ("eps_w", 1.5), ("eps_w", -0.1), ("eps_w", 1.0),
    ("dual_clip", 0.5), ("dual_clip", 1.0), ("max_context_tokens", -5), ("max_context_tokens", 2.5),
    ("chunk_size", -1), ("chunk_size", 0), ("teacher_refresh_steps", 0), ("teacher_refresh_steps", 2.5),
    ("teacher_ema_decay", 1.5), ("context_column", ""),
    ("teacher_template", "{question} with no reference"), ("teacher_template", "{question} {solution} {context}"),
    ("teacher_template", "{question} {context"),
])
def test_config_rejects_what_the_loss_cannot_express(tmp_path, field, value):
    extra = {"importance_sampling_level": "token"}
    with pytest.raises(ValueError, match=field):
        config(tmp_path, **{field: value}, **extra)


def test_config_defaults_are_the_official_recipe(tmp_path):
    """RLSDConfig() is the spec's official run wherever GRPOConfig's defaults differ from it, and passes
    its own checks with vLLM rollouts (GRPOConfig's "sequence_mask" correction is refused)."""
    args = RLSDConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    check_config(RLSDConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], use_vllm=True))
    recipe = dict(
        epsilon=0.2, epsilon_high=0.28, eps_w=0.2, lam=None, lam_start=0.5, lam_end=0.0, lam_decay_steps=60,
        lam_warmup_steps=0, dual_clip=3.0, loss_type="dapo", beta=0.0, entropy_coef=0.0, temperature=1.0,
        num_generations=8, scale_rewards="group", importance_sampling_level="token", teacher_policy="snapshot",
        teacher_refresh_steps=20, max_context_tokens=12_000, teacher_template=DEFAULT_TEMPLATE,
        top_entropy_quantile=1.0, delta=None, vllm_importance_sampling_mode="token_truncate",
    )
    assert {k: getattr(args, k) for k in recipe} == recipe


def test_config_rejects_kl_with_bias_correction(tmp_path):
    with pytest.raises(ValueError, match="use_bias_correction_kl"):
        config(tmp_path, beta=0.1, use_bias_correction_kl=True)


def test_docs_example_trains(tmp_path, monkeypatch):
    from docs_snippets import blocks

    import rlsd_kernels.integrations.trl as rlsd_trl

    sizes = dict(output_dir=str(tmp_path), num_generations=4, max_completion_length=8, per_device_train_batch_size=4,
                 max_steps=1, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    seen = {}

    class SmallConfig(RLSDConfig):
        """The documented config at test sizes."""

        def __post_init__(self):
            seen.update(teacher_policy=self.teacher_policy, loss_type=self.loss_type)
            for key, value in sizes.items():
                setattr(self, key, value)
            super().__post_init__()

    monkeypatch.setattr(rlsd_trl, "RLSDConfig", SmallConfig)
    tok = char_tokenizer()
    namespace = {"model": tiny_qwen2(tok), "reward_fn": digit_reward, "dataset": dataset(), "tokenizer": tok}
    (code,) = blocks("Use with TRL")
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 1
    assert seen["teacher_policy"] == "snapshot" and seen["loss_type"] == "dapo"
    assert "rlsd/credit_weight_mean" in namespace["trainer"].state.log_history[0]


@pytest.mark.parametrize("loss_type,mode", [("dapo", "token_truncate"), ("grpo", "sequence_truncate")])
def test_vllm_importance_sampling_matches_trl(tmp_path, loss_type, mode):
    t = trainer(tmp_path, loss_type=loss_type, lam=0.0, dual_clip=None, teacher_policy="live")
    inputs = _batch(t)
    # As TRL's _generate_and_score_completions leaves a vLLM batch (without starting vLLM).
    t.use_vllm, t.vllm_importance_sampling_correction = True, True
    t.vllm_importance_sampling_mode, t.vllm_importance_sampling_clip_max = mode, 1.3
    g = torch.Generator().manual_seed(2)
    mask = inputs["completion_mask"]
    sampled = inputs["old_per_token_logps"] + 0.3 * torch.randn(mask.shape, generator=g)
    sampled[0, 0] = float("nan")  # a token vLLM could not score: no correction
    diff = torch.nan_to_num((inputs["old_per_token_logps"] - sampled) * mask, nan=0.0)
    if mode == "sequence_truncate":
        diff = diff.sum(-1, keepdim=True)
    inputs["sampling_per_token_logps"] = sampled
    inputs["importance_sampling_ratio"] = torch.exp(diff).clamp(max=1.3)
    assert (inputs["importance_sampling_ratio"] == 1.3).any() and (inputs["importance_sampling_ratio"] < 1).any()
    ours, ours_grads = _loss_and_grads(t, inputs, t.compute_loss)
    theirs, their_grads = _loss_and_grads(t, inputs, lambda m, x: GRPOTrainer._compute_loss(t, m, x))
    torch.testing.assert_close(ours, theirs, **TRAINER_LOSS)
    for a, b in zip(ours_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, **TRAINER_GRAD)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_lam_positive_through_the_kernels(tmp_path, backend):
    """The trainer's loss through the Triton kernels (interpreted on CPU) equals the PyTorch path."""
    from rlsd_kernels.launch import common as _utils

    assert _utils.use_triton(torch.empty(1))
    t = trainer(tmp_path, loss_type="dapo", lam=0.5, teacher_policy="live", chunk_size=16)
    inputs = _batch(t)
    inputs["teacher_per_token_logps"] = inputs["old_per_token_logps"] + 0.2
    kernels, kernel_grads = _loss_and_grads(t, inputs, t.compute_loss)
    with _utils.backend("torch"):
        torch_loss, torch_grads = _loss_and_grads(t, inputs, t.compute_loss)
    torch.testing.assert_close(kernels, torch_loss, **TWO_ROUTES_FP32)
    for a, b in zip(kernel_grads, torch_grads, strict=True):
        torch.testing.assert_close(a, b, **TRAINER_GRAD)


def _unpadded(ids, mask):
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_teacher_prompt_is_tokenized_as_trl_tokenizes_the_student(tmp_path, chat, bos):
    """With an empty context the teacher's prompt ids are the student's; with one, they are TRL's
    tokenization of the teacher prompt (strings keep the tokenizer's BOS)."""
    tok = bos_tokenizer(PLAIN) if bos else char_tokenizer(PLAIN)
    t = trainer(tmp_path, tok=tok, lam=0.5, teacher_policy="live")
    contexts = ["", "since 1+1=2", None, "6"]
    rows = [{"prompt": [{"role": "user", "content": q}] if chat else q, "solution": c}
            for q, c in zip(QUESTIONS, contexts, strict=True)]
    out = t._generate_and_score_completions(rows)
    width = out["completion_ids"].shape[1]
    batch = t.last_teacher_inputs
    teacher = _unpadded(batch["input_ids"][:, :-width], batch["attention_mask"][:, :-width])
    student = _unpadded(out["prompt_ids"], out["prompt_mask"])
    bos_id = tok.convert_tokens_to_ids("<|im_start|>")
    for row, s_ids, t_ids in zip(rows, student, teacher, strict=True):
        if not row["solution"]:
            assert t_ids == s_ids
        else:
            expected = t._tokenize_prompts([teacher_prompt(row["prompt"], row["solution"], tokenizer=tok)])[0][0]
            assert t_ids == list(expected)
        assert (t_ids[0] == bos_id) == (bos and not chat)


def multiply(a: int, b: int) -> int:
    """Multiplies two integers.

    Args:
        a: first factor
        b: second factor
    """
    return a * b


@pytest.mark.parametrize("key", ["pixel_values", "image_grid_thw", "image_sizes"])
def test_image_batches_are_refused(tmp_path, monkeypatch, key):
    """The student's and the teacher's forward passes take token ids only: a vision-language batch
    was scored without its images, silently."""
    t = trainer(tmp_path, lam=0.5, teacher_policy="live")
    completion = {"completion_ids": torch.tensor([[5, 6], [7, 8]]), "completion_mask": torch.ones(2, 2),
                  key: torch.zeros(2, 3)}
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: dict(completion))
    with pytest.raises(ValueError, match=f"text-only models.*{key}"):
        t._generate_and_score_completions([{"prompt": QUESTIONS[i], "solution": SOLUTIONS[i]} for i in range(2)])


def test_teacher_prompt_has_the_tools_and_template_kwargs(tmp_path, monkeypatch):
    """What TRL passes to the student's chat template (tools, chat_template_kwargs) reaches the
    teacher's: with an empty context the two prompts are the same ids."""
    import trl.trainer.grpo_trainer as grpo

    template = ("{% if tools %}<TOOLS>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}</TOOLS>{% endif %}"
                "{{ note }}" + CHATML)
    # The tiny template renders the schema but parses no tool call: generation is replaced below.
    monkeypatch.setattr(grpo, "supports_tool_calling", lambda *a, **k: True)
    monkeypatch.setattr(grpo, "add_response_schema", lambda processing_class: processing_class)
    tok = char_tokenizer(template)
    t = RLSDTrainer(model=tiny_qwen2(tok), reward_funcs=digit_reward, tools=[multiply], processing_class=tok,
                    args=config(tmp_path, lam=0.5, teacher_policy="live", chat_template_kwargs={"note": "[N]"}),
                    train_dataset=dataset())
    completion = {"completion_ids": torch.tensor([[5, 6], [7, 8]]),
                  "completion_mask": torch.ones(2, 2, dtype=torch.long)}
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: dict(completion))
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[:2]]
    t._generate_and_score_completions([{"prompt": prompts[0], "solution": ""},
                                       {"prompt": prompts[1], "solution": SOLUTIONS[1]}])
    batch = t.last_teacher_inputs
    teacher = _unpadded(batch["input_ids"][:, :-2], batch["attention_mask"][:, :-2])
    assert teacher[0] == list(t._tokenize_prompts(prompts[:1])[0][0])
    text = tok.decode(teacher[1])
    assert text.startswith("<TOOLS>multiply;</TOOLS>[N]<|im_start|>user") and SOLUTIONS[1] in text


def _rows(inputs, rows):
    """The micro-batch of ``rows`` of a batch (per-row tensors sliced, the rest kept)."""
    b = inputs["completion_ids"].shape[0]
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v
            for k, v in inputs.items()}


CREDIT = ("rlsd/credit_weight_mean", "rlsd/credit_clip_low_frac", "rlsd/credit_clip_high_frac", "rlsd/delta_mean")


@pytest.mark.parametrize("case", ["zero_advantages", "uneven_tokens", "all_masked", "no_credit_anywhere"])
def test_credit_metrics_are_means_over_credit_tokens(tmp_path, case):
    """Logged over two micro-batches, the credit metrics equal those of one micro-batch holding both:
    the mean over every token with A != 0. A micro-batch without such tokens adds nothing; with none
    in the whole window they are not logged."""
    t = trainer(tmp_path, loss_type="dapo", lam=0.5, teacher_policy="live", gradient_accumulation_steps=2)
    inputs = _batch(t)
    g = torch.Generator().manual_seed(3)
    inputs["teacher_per_token_logps"] = inputs["old_per_token_logps"] + 0.4 * torch.randn(
        inputs["old_per_token_logps"].shape, generator=g)
    inputs["advantages"] = torch.tensor([1.0, -0.5, 0.7, -1.2])
    mask = inputs["completion_mask"].clone()
    if case == "zero_advantages":
        inputs["advantages"][2:] = 0.0
    elif case == "uneven_tokens":
        mask[0, 2:] = 0
        mask[2:, 1:] = 0
    elif case == "all_masked":
        mask[:2] = 0
    else:
        inputs["advantages"][:] = 0.0
    inputs["completion_mask"] = mask

    def logged(*micro_batches):
        for rows in micro_batches:
            t.compute_loss(t.model, _rows(inputs, rows))
        logs = {}
        t.log(logs)
        return {k: logs[k] for k in (*CREDIT, "rlsd/dual_clip_frac") if k in logs}

    split, whole = logged(slice(0, 2), slice(2, 4)), logged(slice(0, 4))
    if case == "no_credit_anywhere":
        assert set(split) == set(whole) == {"rlsd/dual_clip_frac"}
        return
    assert set(split) == set(whole) == {*CREDIT, "rlsd/dual_clip_frac"}
    assert split == pytest.approx(whole, rel=1e-5, abs=1e-7)
    assert 1 - 0.2 <= split["rlsd/credit_weight_mean"] <= 1 + 0.2
    assert split["rlsd/credit_clip_low_frac"] + split["rlsd/credit_clip_high_frac"] > 0
