"""The "rlsd" policy loss in verl's registry: "vanilla" at lam = 0, the fused API otherwise, and the
teacher log-probs through verl's DataProto / TensorDict round trip."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_lm import char_tokenizer, tiny_qwen2
from tolerances import FLOAT64_SAME, MATMUL_FP32, TRAINER_GRAD, TWO_ROUTES_FP32

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("verl", reason="the verl extra is not installed")

from omegaconf import OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.utils.metric import Metric, reduce_metrics  # noqa: E402
from verl.utils.py_functional import append_to_dict  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.engine.utils import postprocess_batch_func  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

import rlsd_kernels  # noqa: E402
from rlsd_kernels.integrations import verl as rlsd_verl  # noqa: E402
from rlsd_kernels.integrations.teacher import build_teacher_inputs, teacher_logprobs  # noqa: E402

pytestmark = pytest.mark.integration

VERL_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
SHARED_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def actor_config(actor=None, **policy):
    return FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=1,
                           clip_ratio_low=0.2, clip_ratio_high=0.28,
                           policy_loss=rlsd_verl.RLSDPolicyLossConfig(**policy), **(actor or {}))


def inputs(b=6, r=9, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, r, v, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, v, (b, r), generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    # Old log-probs far enough away that both PPO clip sides and the dual clip (ratio > 3) bind.
    old = lp + 0.6 * torch.randn(b, r, generator=g, dtype=torch.float64)
    old[0, :3] -= 2.0
    teacher = lp + 0.5 * torch.randn(b, r, generator=g, dtype=torch.float64)
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, r).clone()
    adv[0] = -1.0
    mask = torch.ones(b, r, dtype=torch.bool)
    for i in range(b):
        mask[i, r - i:] = False
    is_weights = torch.rand(b, r, generator=g, dtype=torch.float64) + 0.5
    return logits, tokens, old, teacher, adv, mask, is_weights


def test_registry_returns_ours():
    assert get_policy_loss_fn("rlsd") is rlsd_verl.compute_policy_loss_rlsd


@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("mode", VERL_MODES)
def test_lam_zero_is_vanilla(mode, with_is):
    logits, tokens, old, teacher, adv, mask, is_weights = inputs()
    config = actor_config(lam=0.0)
    results = []
    for name in ("rlsd", "vanilla"):
        lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0].detach().requires_grad_()
        extra = {"teacher_log_prob": teacher} if name == "rlsd" else {}
        loss, metrics = get_policy_loss_fn(name)(old, lp, adv, mask, mode, config,
                                                 is_weights if with_is else None, **extra)
        loss.backward()
        results.append((loss.detach(), lp.grad, metrics))
    (ours, our_grad, our_metrics), (theirs, their_grad, their_metrics) = results
    torch.testing.assert_close(ours, theirs, **FLOAT64_SAME)
    torch.testing.assert_close(our_grad, their_grad, **FLOAT64_SAME)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert our_metrics[key] == pytest.approx(their_metrics[key], abs=1e-12), key
    assert their_metrics["actor/pg_clipfrac"] > 0 and their_metrics["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("with_is", [False, True])
def test_sapo_at_lam_zero_is_verls_sapo(with_is):
    """``surrogate="sapo"`` at ``lam = 0`` is verl's ``"sapo"`` loss (which always aggregates
    ``seq-mean-token-mean``), with the actor's gate temperatures."""
    logits, tokens, old, teacher, adv, mask, is_weights = inputs(seed=2)
    config = actor_config(dict(tau_pos=1.3, tau_neg=2.0), lam=0.0, surrogate="sapo")
    results = []
    for name in ("rlsd", "sapo"):
        lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0].detach().requires_grad_()
        extra = {"teacher_log_prob": teacher} if name == "rlsd" else {}
        loss, _ = get_policy_loss_fn(name)(old, lp, adv, mask, "seq-mean-token-mean", config,
                                           is_weights if with_is else None, **extra)
        loss.backward()
        results.append((loss.detach(), lp.grad))
    torch.testing.assert_close(results[0][0], results[1][0], **FLOAT64_SAME)
    torch.testing.assert_close(results[0][1], results[1][1], **FLOAT64_SAME)
    other = actor_config(dict(tau_pos=1.3, tau_neg=1.05), lam=0.0, surrogate="sapo")
    loss, _ = get_policy_loss_fn("rlsd")(old, lp.detach(), adv, mask, "seq-mean-token-mean", other,
                                         teacher_log_prob=teacher)
    assert not torch.allclose(loss, results[0][0]), "the gate temperatures reach the loss"


def test_config_rejects_an_unknown_surrogate():
    with pytest.raises(ValueError, match="surrogate"):
        rlsd_verl.RLSDPolicyLossConfig(surrogate="cispo")


@pytest.mark.parametrize("mode", SHARED_MODES)
def test_lam_positive_is_the_fused_api(mode):
    logits, tokens, old, teacher, adv, mask, _ = inputs(seed=1)
    config = actor_config(lam=0.7, eps_w=0.15)
    grads = []
    for fn in ("verl", "api"):
        z = logits.clone().float().requires_grad_()
        if fn == "verl":
            lp = torch.log_softmax(z, -1).gather(-1, tokens[..., None])[..., 0]
            loss, _ = rlsd_verl.compute_policy_loss_rlsd(old.float(), lp, adv.float(), mask, mode, config,
                                                         teacher_log_prob=teacher.float())
        else:
            loss = rlsd_kernels.rlsd_loss(z, None, tokens, adv.float(), teacher_logprobs=teacher.float(),
                                          old_logprobs=old.float(), mask=mask, lam=0.7, eps_w=0.15, clip_low=0.2,
                                          clip_high=0.28, dual_clip=3.0, loss_agg=mode)
        loss.backward()
        grads.append((loss.detach(), z.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], **TWO_ROUTES_FP32)
    torch.testing.assert_close(grads[0][1], grads[1][1], **TRAINER_GRAD)


def test_missing_teacher_is_a_clear_error():
    _, _, old, _, adv, mask, _ = inputs()
    with pytest.raises(ValueError, match="teacher_log_prob"):
        rlsd_verl.compute_policy_loss_rlsd(old, old.clone(), adv, mask, "token-mean", actor_config())


def test_config_through_target():
    cfg = OmegaConf.create({"_target_": "rlsd_kernels.integrations.verl.RLSDPolicyLossConfig", "lam": 0.3,
                            "eps_w": 0.1})
    policy = omega_conf_to_dataclass(cfg)
    assert isinstance(policy, rlsd_verl.RLSDPolicyLossConfig)
    assert (policy.loss_mode, policy.lam, policy.eps_w) == ("rlsd", 0.3, 0.1)
    with pytest.raises(Exception, match="lam"):
        omega_conf_to_dataclass(OmegaConf.create({"lam": 0.3}), PolicyLossConfig)
    with pytest.raises(ValueError, match="lam"):
        rlsd_verl.RLSDPolicyLossConfig(lam=2.0)
    schedule = rlsd_verl.RLSDPolicyLossConfig()
    assert [schedule.lam_at(s) for s in (1, 30, 60, 61)] == pytest.approx([0.5 * 59 / 60, 0.25, 0.0, 0.0])


def test_rlsd_without_target_runs_the_documented_defaults():
    """``loss_mode=rlsd`` in verl's own ``PolicyLossConfig`` (no ``_target_``, so no RLSD fields) runs
    the documented schedule and ``eps_w``, not ``lam = 0`` (plain GRPO); a mapping keeps its fields."""
    _, _, old, teacher, adv, mask, _ = inputs()
    plain = omega_conf_to_dataclass(OmegaConf.create({"loss_mode": "rlsd"}), PolicyLossConfig)
    assert type(plain) is PolicyLossConfig
    results = []
    for policy in (plain, rlsd_verl.RLSDPolicyLossConfig()):
        config = FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, rollout_n=1,
                                 clip_ratio_low=0.2, clip_ratio_high=0.28, policy_loss=policy)
        results.append(rlsd_verl.compute_policy_loss_rlsd(old, old + 0.1, adv, mask, "token-mean", config,
                                                          teacher_log_prob=teacher))
    (loss, metrics), (documented, documented_metrics) = results
    assert metrics["actor/rlsd_lam"] == pytest.approx(0.5 * 59 / 60)
    torch.testing.assert_close(loss, documented, **FLOAT64_SAME)
    assert metrics == documented_metrics
    assert rlsd_verl.rlsd_policy(plain) == rlsd_verl.RLSDPolicyLossConfig()
    assert rlsd_verl.rlsd_policy({"lam": 0.3, "max_context_tokens": None}) == rlsd_verl.RLSDPolicyLossConfig(
        lam=0.3, max_context_tokens=None)
    assert rlsd_verl.rlsd_policy(OmegaConf.create({"loss_mode": "rlsd", "eps_w": 0.1})).eps_w == 0.1
    with pytest.raises(ValueError, match="eps_w"):
        rlsd_verl.rlsd_policy({"eps_w": 1.5})


def _engine_log_probs(model):
    """verl's FSDP engine on a no-padding batch, as its forward_step runs it (prepare_model_inputs, the
    model, prepare_model_outputs) without FSDP or a device: it reads what the real engine reads (the
    batch's ``temperature`` among them) and scales the logits by the temperature."""
    engine = object.__new__(FSDPEngineWithLMHead)
    engine.module, engine.pad_to_length = model, False
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False)

    def run(td):
        # The packed path (use_remove_padding) needs flash-attn's varlen kernels; verl's worker reads the
        # flag from the model config.
        tu.assign_non_tensor(td, use_remove_padding=False)
        with torch.no_grad():
            model_inputs, output_args = engine.prepare_model_inputs(td)
            out = engine.prepare_model_outputs(model(**model_inputs, use_cache=False), output_args, td, None)
        return TensorDict(out, batch_size=[])

    return run


def verl_batch(tok, prompts, solutions, responses, temperature=1.0, chat_template_kwargs=None):
    """A verl rollout batch: left-padded prompts (rendered with ``chat_template_kwargs``, as verl's
    ``data.apply_chat_template_kwargs``), right-padded responses, raw chat, extra_info and the
    ``temperature`` that ``RayPPOTrainer.fit`` puts in ``meta_info``."""
    b = len(prompts)
    resp_len = max(len(r) for r in responses)
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {}))
             for p in prompts]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    plen = max(len(i) for i in ids)
    prompt_ids = torch.full((b, plen), tok.pad_token_id)
    prompt_mask = torch.zeros(b, plen, dtype=torch.long)
    response_ids = torch.full((b, resp_len), tok.pad_token_id)
    response_mask = torch.zeros(b, resp_len, dtype=torch.long)
    for i in range(b):
        prompt_ids[i, plen - len(ids[i]):] = torch.tensor(ids[i])
        prompt_mask[i, plen - len(ids[i]):] = 1
        r = tok(responses[i], add_special_tokens=False)["input_ids"]
        response_ids[i, :len(r)] = torch.tensor(r)
        response_mask[i, :len(r)] = 1
    attention = torch.cat([prompt_mask, response_mask], 1)
    batch = DataProto.from_dict(
        tensors={"prompts": prompt_ids, "responses": response_ids, "input_ids": torch.cat([prompt_ids, response_ids],
                                                                                         1),
                 "attention_mask": attention, "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
                 "response_mask": response_mask},
        non_tensors={"raw_prompt": np.array(prompts + [None], dtype=object)[:-1],
                     "extra_info": np.array([{"solution": s} for s in solutions], dtype=object)},
        meta_info={"temperature": temperature},
    )
    return batch


def test_teacher_log_prob_round_trip():
    tok = char_tokenizer()
    model = tiny_qwen2(tok).eval()
    prompts = [[{"role": "user", "content": q}] for q in ("1+1?", "what is 2*3?", "8/2?")]
    solutions = ["2", "6 since 2*3=6", None]
    batch = verl_batch(tok, prompts, solutions, ["2", "it is 6", "4!"])

    teacher = rlsd_verl.teacher_log_prob(batch, tok, _engine_log_probs(model), max_context_tokens=8)
    lp = teacher.batch[rlsd_verl.TEACHER_KEY]
    responses, response_mask = batch.batch["responses"], batch.batch["response_mask"]
    direct = build_teacher_inputs(tok, prompts, solutions, responses, response_mask, max_context_tokens=8)
    position_ids = (direct["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(rlsd_verl.teacher_batch(batch, tok, max_context_tokens=8).batch["position_ids"], position_ids)
    expected = teacher_logprobs(model, direct["input_ids"], direct["attention_mask"], responses, response_mask,
                                batch_size=1)
    torch.testing.assert_close(lp * response_mask, expected, **MATMUL_FP32)

    # Through the actor's loss: DataProto -> TensorDict -> no padding, as verl's _update_actor does.
    old = expected.detach() + 0.1
    merged = batch.union(teacher).union(DataProto.from_dict(tensors={
        "old_log_probs": old, "advantages": torch.tensor([[1.0], [-0.5], [0.3]]).expand_as(old).contiguous()}))
    td = left_right_2_no_padding(merged.to_tensordict())
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=None, global_batch_size=None, global_steps=1)
    current = _engine_log_probs(model)(td)["log_probs"]
    config = actor_config(lam=None)
    loss, metrics = rlsd_verl.rlsd_ppo_loss(config, {"log_probs": current}, td)
    assert metrics["actor/rlsd_lam"].values == [pytest.approx(0.5 * 59 / 60)]
    student = no_padding_2_padding(current, td)
    direct_loss, _ = rlsd_verl.compute_policy_loss_rlsd(
        old, student, merged.batch["advantages"], response_mask.bool(), config.loss_agg_mode, config,
        teacher_log_prob=lp)
    torch.testing.assert_close(loss, direct_loss, **TWO_ROUTES_FP32)
    with pytest.raises(ValueError, match="teacher_log_prob"):
        rlsd_verl.rlsd_ppo_loss(config, {"log_probs": current}, td.exclude(rlsd_verl.TEACHER_KEY))


def test_tool_outputs_inside_a_response_are_attended_by_the_teacher():
    """A multi-turn rollout's response holds a tool output: attended (attention mask 1) but not trained
    on (response mask 0). The teacher attends to it as the student did, and every response token
    keeps its own log-prob (a hole in the attention once shifted the tokens after it)."""
    tok = char_tokenizer()
    model = tiny_qwen2(tok).eval()
    prompts = [[{"role": "user", "content": q}] for q in ("1+1?", "what is 2*3?")]
    solutions = ["2", "6 since 2*3=6"]
    batch = verl_batch(tok, prompts, solutions, ["calc(1+1)=2 so 2", "tool: 6, so it is 6"])
    response_mask = batch.batch["response_mask"].clone()
    response_mask[0, 4:10] = 0
    response_mask[1, 0:7] = 0
    batch.batch["response_mask"] = response_mask
    attended = batch.batch["attention_mask"][:, -response_mask.shape[1]:]

    lp = rlsd_verl.teacher_log_prob(batch, tok, _engine_log_probs(model)).batch[rlsd_verl.TEACHER_KEY]
    responses = batch.batch["responses"]
    direct = build_teacher_inputs(tok, prompts, solutions, responses, attended)
    expected = teacher_logprobs(model, direct["input_ids"], direct["attention_mask"], responses, response_mask)
    torch.testing.assert_close(lp * response_mask, expected, **MATMUL_FP32)
    built = rlsd_verl.teacher_batch(batch, tok)
    assert torch.equal(built.batch["attention_mask"][:, -responses.shape[1]:], attended)
    assert torch.equal(built.batch["response_mask"], response_mask)


def _rows(batch):
    """Each row's unpadded input ids."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.batch["input_ids"], batch.batch["attention_mask"],
                                                           strict=True)]


@pytest.mark.parametrize(("context_key", "available"), [
    ("extra_info.soluton", "['solution']"),
    ("extra_inf.solution", "'extra_info'"),
    ("reward_model.ground_truth", "'raw_prompt'"),
    ("extra_info.solution.text", "[]"),
])
def test_a_context_key_no_row_has_is_a_clear_error(context_key, available):
    tok = char_tokenizer()
    prompts = [[{"role": "user", "content": "1+1?"}], [{"role": "user", "content": "2*3?"}]]
    batch = verl_batch(tok, prompts, ["2 since 1+1=2", "6 as 2*3=6"], ["2", "6!"])
    with pytest.raises(KeyError, match="context_key") as raised:
        rlsd_verl.teacher_batch(batch, tok, context_key=context_key)
    assert context_key in str(raised.value) and available in str(raised.value)


def test_rows_without_a_context_get_the_students_prompt():
    tok = char_tokenizer()
    prompts = [[{"role": "user", "content": q}] for q in ("1+1?", "2*3?", "8/2?")]
    batch = verl_batch(tok, prompts, ["2 since 1+1=2", None, None], ["2", "6!", "4"])
    batch.non_tensor_batch["extra_info"][2] = {}
    student, teacher = _rows(batch), _rows(rlsd_verl.teacher_batch(batch, tok))
    assert teacher[0] != student[0] and teacher[1:] == student[1:]


THINKING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
            "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_teacher_prompt_takes_verls_chat_template_kwargs():
    """``data.apply_chat_template_kwargs`` renders the teacher's prompt as it rendered the student's:
    without a context the two inputs are the same."""
    tok = char_tokenizer(THINKING)
    model = tiny_qwen2(tok).eval()
    kwargs = {"enable_thinking": False}
    prompts = [[{"role": "user", "content": "1+1?"}], [{"role": "user", "content": "2*3?"}]]
    batch = verl_batch(tok, prompts, [None, "6 as 2*3=6"], ["2", "6!"], chat_template_kwargs=kwargs)
    built = rlsd_verl.teacher_batch(batch, tok, chat_template_kwargs=kwargs)
    assert _rows(built)[0] == _rows(batch)[0]
    assert "reference solution" in tok.decode(_rows(built)[1]) and "</think>" in tok.decode(_rows(built)[1])
    trainer = _log_prob_trainer(tok, model, data={"apply_chat_template_kwargs": kwargs})
    trainer._compute_old_log_prob(batch)
    teacher_td = trainer.actor_rollout_wg.seen[1]
    assert torch.equal(teacher_td["input_ids"].values(),
                       left_right_2_no_padding(built.to_tensordict())["input_ids"].values())


class _FakeActorGroup:
    """Stands in for the actor's Ray worker group: verl's engine code on the model; keeps each batch."""

    def __init__(self, model):
        self.run = _engine_log_probs(model)
        self.seen = []

    def compute_log_prob(self, td):
        self.seen.append(td)
        out = self.run(td)
        tu.assign_non_tensor(out, metrics={"mfu": 0.0})
        return out


def _log_prob_trainer(tok, model, policy=None, data=None):
    trainer = object.__new__(rlsd_verl.RLSDRayPPOTrainer)
    trainer.config = OmegaConf.create({"actor_rollout_ref": {"actor": {"policy_loss": policy or {"loss_mode": "rlsd"}}},
                                       "data": data or {}})
    trainer.actor_rollout_wg = _FakeActorGroup(model)
    trainer.tokenizer = tok
    trainer.use_reference_policy = False
    return trainer


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_adds_teacher_next_to_old_log_probs(temperature):
    """The teacher is scored by verl's engine at the rollout temperature (from ``meta_info``, as
    verl's old log-probs are), through the trainer's ``_compute_old_log_prob``."""
    tok = char_tokenizer()
    model = tiny_qwen2(tok).eval()
    prompts = [[{"role": "user", "content": q}] for q in ("1+1?", "what is 2*3?")]
    solutions, responses = ["2", "6 since 2*3=6"], ["2", "6!"]
    batch = verl_batch(tok, prompts, solutions, responses, temperature=temperature)
    batch.meta_info["global_token_num"] = batch.batch["attention_mask"].sum(-1).tolist()
    trainer = _log_prob_trainer(tok, model)
    old, _ = trainer._compute_old_log_prob(batch)
    assert len(trainer.actor_rollout_wg.seen) == 2
    responses, response_mask = batch.batch["responses"], batch.batch["response_mask"]
    direct = build_teacher_inputs(tok, prompts, solutions, responses, response_mask)
    expected = teacher_logprobs(model, direct["input_ids"], direct["attention_mask"], responses, response_mask,
                                temperature=temperature)
    torch.testing.assert_close(old.batch[rlsd_verl.TEACHER_KEY] * response_mask, expected, **MATMUL_FP32)
    teacher, student = (old.batch[key] * response_mask for key in (rlsd_verl.TEACHER_KEY, "old_log_probs"))
    assert not torch.allclose(teacher, student)
    teacher_td = trainer.actor_rollout_wg.seen[1]
    assert tu.get(teacher_td, "global_token_num") == direct["attention_mask"].sum(-1).tolist()
    trainer.config.actor_rollout_ref.actor.policy_loss.teacher_policy = "frozen"
    with pytest.raises(ValueError, match="use_kl_loss"):
        trainer._compute_old_log_prob(batch)


@pytest.mark.parametrize("ref_in_actor", [False, True])
def test_frozen_teacher_runs_where_verl_runs_its_reference(ref_in_actor):
    """``teacher_policy="frozen"`` scores with verl's reference policy: its own worker group's
    ``compute_ref_log_prob``, or, with LoRA (``ref_in_actor``, where verl sets ``ref_policy_wg`` to
    the actor group, which holds no reference model), the actor's ``compute_log_prob`` without the
    adapter, as verl's ``_compute_ref_log_prob`` does; the actor group was once asked for a
    reference it does not have."""
    tok = char_tokenizer()
    model = tiny_qwen2(tok).eval()
    prompts = [[{"role": "user", "content": q}] for q in ("1+1?", "what is 2*3?")]
    batch = verl_batch(tok, prompts, ["2", "6 since 2*3=6"], ["2", "6!"])
    trainer = _log_prob_trainer(tok, model, policy={"loss_mode": "rlsd", "teacher_policy": "frozen"})
    trainer.use_reference_policy, trainer.ref_in_actor = True, ref_in_actor
    reference = _FakeActorGroup(model)
    reference.compute_ref_log_prob = reference.compute_log_prob
    trainer.ref_policy_wg = trainer.actor_rollout_wg if ref_in_actor else reference
    old, _ = trainer._compute_old_log_prob(batch)
    scored = trainer.actor_rollout_wg.seen[1:] if ref_in_actor else reference.seen
    assert len(scored) == 1 and rlsd_verl.TEACHER_KEY in old.batch.keys()
    assert tu.get_non_tensor_data(scored[0], "no_lora_adapter", False) is ref_in_actor


def test_task_runner_uses_the_rlsd_worker():
    config = OmegaConf.create({"algorithm": {"use_kl_in_reward": False},
                               "actor_rollout_ref": {"model": {"lora_rank": 0}, "actor": {"use_kl_loss": True}}})
    runner = rlsd_verl.RLSDTaskRunner()
    cls, _ = runner.add_actor_rollout_worker(config)
    assert cls is rlsd_verl.RLSDActorRolloutRefWorker
    (worker,) = runner.role_worker_mapping.values()
    assert worker.__ray_actor_class__ is rlsd_verl.RLSDActorRolloutRefWorker


def test_docs_recipe_configures_the_rlsd_loss():
    from docs_snippets import blocks, cli_overrides
    from hydra import compose, initialize_config_dir

    (entry,) = blocks("Use with verl")
    namespace = {"__name__": "rlsd_main"}
    exec(compile(entry, "README.md", "exec"), namespace)
    assert callable(namespace["main"])
    with initialize_config_dir(config_dir=namespace["CONFIG_DIR"], version_base=None):
        config = compose("ppo_trainer", overrides=cli_overrides("Use with verl") + [
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"])
    assert config.trainer.use_v1 is False and config.data.return_raw_chat is True
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, rlsd_verl.RLSDPolicyLossConfig)
    assert (actor.policy_loss.loss_mode, actor.policy_loss.eps_w, actor.policy_loss.lam) == ("rlsd", 0.2, None)
    _, _, old, teacher, adv, mask, _ = inputs()
    loss, metrics = get_policy_loss_fn(actor.policy_loss.loss_mode)(old, old + 0.1, adv, mask, actor.loss_agg_mode,
                                                                    actor, teacher_log_prob=teacher)
    assert torch.isfinite(loss) and metrics["actor/rlsd_lam"] == pytest.approx(0.5 * 59 / 60)


class _FakeUpdateGroup:
    def __init__(self, metrics=None):
        self.seen, self.metrics = None, metrics or {"mfu": 0.0}

    def update_actor(self, td):
        self.seen = td
        out = TensorDict({}, batch_size=[])
        tu.assign_non_tensor(out, metrics=self.metrics)
        return out


def _update_trainer(metrics=None):
    trainer = object.__new__(rlsd_verl.RLSDRayPPOTrainer)
    trainer.config = OmegaConf.create({
        "actor_rollout_ref": {
            "rollout": {"multi_turn": {"enable": False}, "temperature": 1.0, "n": 1},
            "actor": {"calculate_entropy": False, "entropy_coeff": 0.0, "ppo_mini_batch_size": 2, "ppo_epochs": 1,
                      "data_loader_seed": 0, "shuffle": False},
        },
    })
    trainer.distillation_config = None
    trainer.global_steps = 7
    trainer.actor_rollout_wg = _FakeUpdateGroup(metrics)
    return trainer


def test_trainer_keeps_prompts_and_passes_the_step():
    tok = char_tokenizer()
    prompts = [[{"role": "user", "content": "1+1?"}], [{"role": "user", "content": "2*3?"}]]
    batch = verl_batch(tok, prompts, ["2", "6"], ["2", "6!"])
    trainer = object.__new__(rlsd_verl.RLSDRayPPOTrainer)
    gen_batch = trainer._get_gen_batch(batch)
    assert "raw_prompt" in gen_batch.non_tensor_batch and "raw_prompt" not in batch.non_tensor_batch
    assert list(batch.non_tensor_batch[rlsd_verl.PROMPT_KEY]) == prompts
    assert rlsd_verl.teacher_batch(batch, tok).batch["input_ids"].shape[0] == 2

    trainer = _update_trainer()
    trainer._update_actor(batch)
    assert tu.get_non_tensor_data(trainer.actor_rollout_wg.seen, "global_steps", None) == 7


def _worker_metrics(config, run, merged, dp, micro=2):
    """The actor's metrics as verl's worker returns them for one mini-batch: ``rlsd_ppo_loss`` per
    micro-batch, gathered per rank by verl's ``postprocess_batch_func``, then over the dp ranks as
    ``update_actor`` does (``Metric.aggregate_dp``; without a dp group the Metrics pass as they are)."""
    tokens, rows = int(merged.batch["response_mask"].sum()), len(merged) // dp
    ranks = []
    for rank in range(dp):
        outputs = []
        for start in range(rank * rows, (rank + 1) * rows, micro):
            td = left_right_2_no_padding(merged[start:start + micro].to_tensordict())
            tu.assign_non_tensor(td, dp_size=dp, batch_num_tokens=tokens, global_batch_size=len(merged),
                                 global_steps=1)
            outputs.append({"metrics": rlsd_verl.rlsd_ppo_loss(config, run(td), td)[1]})
        ranks.append(postprocess_batch_func(outputs, None, td)["metrics"])
    gathered = ranks[0] if dp == 1 else {k: Metric.aggregate_dp([r[k] for r in ranks]) for k in ranks[0]}
    metrics = {}
    append_to_dict(metrics, dict(gathered, mfu=0.0))
    return metrics


@pytest.mark.parametrize(("dp", "advantages"), [
    (1, [0.0, 0.0, 0.0, 1.0, -0.5, 0.8, 0.0, 1.3]),
    (2, [0.0, 0.0, 0.0, 1.0, -0.5, 0.8, 0.0, 1.3]),
    (2, [0.0] * 8),
])
def test_credit_metrics_are_means_over_the_steps_credit_tokens(dp, advantages):
    """Micro-batches hold different numbers of tokens with a non-zero advantage (none at all in the
    first): the logged credit metrics are still the means over all of the step's credit tokens, and
    are left out of a step (or a direct call of the loss) that has none."""
    tok = char_tokenizer()
    model = tiny_qwen2(tok).eval()
    questions = ("1+1?", "2*3?", "8/2?", "3^2?", "5-1?", "7+2?", "9/3?", "4*4?")
    batch = verl_batch(tok, [[{"role": "user", "content": q}] for q in questions], ["2"] * 8,
                       ["2", "6!", "4 ok", "9", "4 it is", "9?", "3", "16 so"])
    run = _engine_log_probs(model)
    full = left_right_2_no_padding(batch.to_tensordict())
    current = no_padding_2_padding(run(full)["log_probs"], full)
    g = torch.Generator().manual_seed(3)
    mask = batch.batch["response_mask"]
    adv = torch.tensor(advantages)[:, None].expand_as(current).contiguous()
    extra = {"old_log_probs": current + 0.3 * torch.randn(current.shape, generator=g),
             "teacher_log_prob": current + torch.randn(current.shape, generator=g), "advantages": adv}
    merged = batch.union(DataProto.from_dict(tensors=extra))
    config = actor_config(lam=0.6, eps_w=0.15)
    trainer = _update_trainer(_worker_metrics(config, run, merged, dp))
    logged = reduce_metrics(trainer._update_actor(batch).meta_info["metrics"])
    _, whole = rlsd_verl.compute_policy_loss_rlsd(extra["old_log_probs"], current, adv, mask.bool(), "token-mean",
                                                  config, teacher_log_prob=extra["teacher_log_prob"])
    credit = [f"actor/rlsd_{name}" for name in rlsd_verl.CREDIT_METRICS]
    leftovers = [k for k in logged if k.endswith("_sum") or k == rlsd_verl.CREDIT_COUNT]
    assert leftovers == []
    if not any(advantages):
        assert not set(credit) & (set(logged) | set(whole)) and whole[rlsd_verl.CREDIT_COUNT] == 0
        return
    assert 0.0 < whole[rlsd_verl.CREDIT_COUNT] < mask.sum()
    for key in credit:
        assert logged[key] == pytest.approx(whole[key], abs=1e-6), key
    assert 0.85 <= logged["actor/rlsd_credit_weight_mean"] <= 1.15
