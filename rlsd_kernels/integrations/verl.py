"""RLSD in verl: the ``"rlsd"`` policy loss, its config, and the teacher pass.

Pinned to verl 0.9.1 (``pip install "rlsd-kernels[verl]"``). Importing this module registers the
``"rlsd"`` policy loss in verl's registry. verl's policy losses receive padded ``[B, R]`` log-probs
(never logits), so the loss is the plain PyTorch specification
(:func:`rlsd_kernels.reference.rlsd_token_terms`) aggregated by verl's own ``agg_loss``: at
``lam = 0`` it is verl's ``"vanilla"`` loss (dual clip ``clip_ratio_c`` included) for every
``loss_agg_mode``.

The pieces:

- :class:`RLSDPolicyLossConfig`: ``actor.policy_loss`` with the RLSD fields, named through
  ``_target_`` (verl's ``PolicyLossConfig`` rejects unknown fields).
- :func:`rlsd_ppo_loss`: the actor's loss function (verl's ``ppo_loss`` with the batch's
  ``teacher_log_prob`` handed to the policy loss; ``lam`` follows the step in ``global_steps``).
- :class:`RLSDRayPPOTrainer` and :class:`RLSDActorRolloutRefWorker`: the trainer adds
  ``teacher_log_prob`` to the batch next to ``old_log_probs``; the worker trains with
  :func:`rlsd_ppo_loss`. :class:`RLSDTaskRunner` puts both in verl's (legacy, ``trainer.use_v1=False``)
  ``main_ppo_v0`` task runner. The teacher is ``live`` (the actor's current weights) or ``frozen``
  (the reference worker's initial weights); verl 0.9.1 has no weight sync into the reference worker,
  so a snapshot refreshed every K steps is not offered here, and the TransferQueue trainer
  (``trainer.use_v1=True``) is not wired.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Optional

import numpy as np
import ray
import torch
from omegaconf import DictConfig, OmegaConf
from verl import DataProto
from verl.single_controller.base.decorator import Dispatch, register
from verl.trainer import main_ppo_v0
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.utils.torch_functional import masked_mean
from verl.workers.config.actor import PolicyLossConfig
from verl.workers.engine_workers import ActorRolloutRefWorker
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

import rlsd_kernels
from rlsd_kernels import reference

from .teacher import DEFAULT_MAX_CONTEXT_TOKENS, DEFAULT_TEMPLATE, build_teacher_inputs, position_ids

TEACHER_KEY = "teacher_log_prob"
PROMPT_KEY = "rlsd_raw_prompt"  # the raw prompts, kept in the batch when verl moves them to generation
_TEACHER = contextvars.ContextVar("rlsd_teacher_log_prob", default=None)
_STEP = contextvars.ContextVar("rlsd_global_step", default=None)
CREDIT_METRICS = ("credit_weight_mean", "credit_clip_low_frac", "credit_clip_high_frac", "delta_mean")
CREDIT_COUNT = "actor/rlsd_num_credit_tokens"
_MISSING = object()


@dataclass
class RLSDPolicyLossConfig(PolicyLossConfig):
    """``actor.policy_loss`` for RLSD. ``lam=None`` follows ``lam_schedule(global_steps, ...)``
    (verl counts steps from 1, so this is the official schedule); a number fixes it. ``surrogate``
    ``"sapo"`` takes SAPO's soft gate (with the actor's ``tau_pos`` / ``tau_neg``, as verl's
    ``"sapo"`` loss) instead of the clip."""

    loss_mode: str = "rlsd"
    surrogate: str = "ppo"
    lam: Optional[float] = None  # noqa: UP045 (omegaconf reads Optional, not X | None, on Python 3.10)
    lam_start: float = 0.5
    lam_end: float = 0.0
    lam_decay_steps: int = 60
    lam_warmup_steps: int = 0
    eps_w: float = 0.2
    teacher_policy: str = "live"
    context_key: str = "extra_info.solution"
    teacher_template: str = DEFAULT_TEMPLATE
    max_context_tokens: Optional[int] = DEFAULT_MAX_CONTEXT_TOKENS  # noqa: UP045

    def __post_init__(self):
        if self.lam is not None and not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"policy_loss.lam must be None or in [0, 1], got {self.lam}")
        if not 0.0 <= self.eps_w < 1.0:
            raise ValueError(f"policy_loss.eps_w must be in [0, 1), got {self.eps_w}")
        if self.surrogate not in ("ppo", "sapo"):
            raise ValueError(f"policy_loss.surrogate must be 'ppo' or 'sapo', got {self.surrogate!r}")
        if self.teacher_policy not in ("live", "frozen"):
            raise ValueError(f"policy_loss.teacher_policy must be 'live' or 'frozen' in verl, got "
                             f"{self.teacher_policy!r}")
        rlsd_kernels.lam_schedule(0, start=self.lam_start, end=self.lam_end, decay_steps=self.lam_decay_steps,
                                  warmup_steps=self.lam_warmup_steps)

    def lam_at(self, global_steps: int | None) -> float:
        if self.lam is not None:
            return float(self.lam)
        step = 1 if global_steps is None else int(global_steps)
        return rlsd_kernels.lam_schedule(step, start=self.lam_start, end=self.lam_end,
                                         decay_steps=self.lam_decay_steps, warmup_steps=self.lam_warmup_steps)


_RLSD_FIELDS = sorted({f.name for f in fields(RLSDPolicyLossConfig)} - {f.name for f in fields(PolicyLossConfig)})


def rlsd_policy(policy) -> RLSDPolicyLossConfig:
    """``actor.policy_loss`` as an :class:`RLSDPolicyLossConfig`. verl's plain ``PolicyLossConfig``
    (``loss_mode=rlsd`` without the ``_target_``) or a mapping keeps the RLSD fields it has and takes
    the documented defaults (the official schedule) for the others, never a silent ``lam = 0``."""
    if isinstance(policy, RLSDPolicyLossConfig):
        return policy
    given = {name: policy.get(name, _MISSING) for name in _RLSD_FIELDS}
    return RLSDPolicyLossConfig(**{name: value for name, value in given.items() if value is not _MISSING})


def _clip_ranges(config):
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    return low, high, config.get("clip_ratio_c", 3.0)


@register_policy_loss("rlsd")
def compute_policy_loss_rlsd(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    teacher_log_prob: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's policy-loss signature, ``[B, R]`` tensors. ``teacher_log_prob`` defaults to the batch's
    (set by :func:`rlsd_ppo_loss`). ``config`` is the actor config: ``clip_ratio*`` and
    ``clip_ratio_c`` as for ``"vanilla"``, ``policy_loss`` read by :func:`rlsd_policy`. The credit
    metrics are means over this call's ``actor/rlsd_num_credit_tokens`` tokens with a non-zero
    advantage, left out when there are none."""
    if config is None:
        raise ValueError("the rlsd policy loss needs the actor config")
    teacher = teacher_log_prob if teacher_log_prob is not None else _TEACHER.get()
    if teacher is None:
        raise ValueError(f"the rlsd policy loss needs {TEACHER_KEY!r} in the batch (RLSDRayPPOTrainer adds it)")
    if teacher.shape != log_prob.shape:
        raise ValueError(f"{TEACHER_KEY} has shape {tuple(teacher.shape)}, expected {tuple(log_prob.shape)}")
    policy = rlsd_policy(config.policy_loss)
    lam = policy.lam_at(_STEP.get())
    low, high, dual = _clip_ranges(config)
    if not dual > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1, got {dual}")
    sapo = {}
    if policy.surrogate == "sapo":
        sapo = dict(surrogate="sapo", sapo_tau_pos=config.tau_pos, sapo_tau_neg=config.tau_neg)
    terms = reference.rlsd_token_terms(
        log_prob, teacher.to(log_prob.dtype), advantages, lp_old=old_log_prob, eps_w=policy.eps_w,
        lam=lam, clip_low=low, clip_high=high, dual_clip=dual, **sapo,
    )
    pg_losses = terms["loss"]
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode,
                       **config.global_batch_info)
    mask = response_mask.bool()
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0).detach()
    metrics = {
        "actor/pg_clipfrac": masked_mean((terms["ppo_clip_low"] | terms["ppo_clip_high"]).float(), mask).item(),
        "actor/ppo_kl": masked_mean(-log_ratio, mask).item(),
        "actor/pg_clipfrac_lower": masked_mean(terms["dual_clip"].float(), mask).item(),
        "actor/rlsd_lam": lam,
    }
    credit = reference.rlsd_metrics(dict(terms, advantage=advantages), mask)
    metrics[CREDIT_COUNT] = credit["num_credit_tokens"].item()
    if metrics[CREDIT_COUNT] > 0:
        metrics.update({f"actor/rlsd_{name}": credit[name].item() for name in CREDIT_METRICS})
    return pg_loss, metrics


def rlsd_ppo_loss(config, model_output, data, dp_group=None):
    """verl's ``ppo_loss`` with the batch's ``teacher_log_prob`` (padded ``[B, R]``) and
    ``global_steps`` handed to the ``"rlsd"`` policy loss. The credit metrics leave as sums
    (``actor/rlsd_<name>_sum``) next to their token count, for :func:`credit_means`."""
    if TEACHER_KEY not in data.keys():
        raise ValueError(f"the batch has no {TEACHER_KEY!r}: train with RLSDRayPPOTrainer, which adds it")
    teacher = data.select(TEACHER_KEY).to_padded_tensor()[TEACHER_KEY]
    tokens = (_TEACHER.set(teacher), _STEP.set(tu.get_non_tensor_data(data, "global_steps", None)))
    try:
        loss, metrics = ppo_loss(config, model_output, data, dp_group)
    finally:
        _TEACHER.reset(tokens[0])
        _STEP.reset(tokens[1])
    # verl averages each metric over micro-batches and ranks with equal weights, but each credit mean is
    # over its own number of credit tokens (none at all where every advantage is 0): sums and the count
    # reduce exactly (SUM), and credit_means divides them once per step.
    count = metrics.pop(CREDIT_COUNT).values[0]
    for name in CREDIT_METRICS:
        mean = metrics.pop(f"actor/rlsd_{name}").values[0] if count > 0 else 0.0
        metrics[f"actor/rlsd_{name}_sum"] = Metric(AggregationType.SUM, mean * count)
    metrics[CREDIT_COUNT] = Metric(AggregationType.SUM, count)
    return loss, metrics


def credit_means(metrics: dict) -> dict:
    """The actor's metrics as verl returns them from ``update_actor`` (per key a ``Metric`` or a list
    over mini-batches), with the credit sums of :func:`rlsd_ppo_loss` replaced by
    ``actor/rlsd_<name>`` means over the step's credit tokens; left out when the step had none."""
    if CREDIT_COUNT not in metrics:
        return metrics
    keys = [CREDIT_COUNT] + [f"actor/rlsd_{name}_sum" for name in CREDIT_METRICS]
    # Both reductions verl may leave (Metric.aggregate, or the trainer's mean over mini-batches) are
    # linear and the same for every key, so the ratios are exact.
    totals = {k: v.aggregate() if isinstance(v, Metric) else float(np.mean(v))
              for k, v in ((k, metrics.pop(k)) for k in keys)}
    if totals[CREDIT_COUNT] > 0:
        for name in CREDIT_METRICS:
            metrics[f"actor/rlsd_{name}"] = [totals[f"actor/rlsd_{name}_sum"] / totals[CREDIT_COUNT]]
    return metrics


def _contexts(batch: DataProto, context_key: str) -> list:
    """Per row, the non-tensor value at the dotted ``context_key`` (e.g. ``extra_info.solution``);
    None for a row that lacks it. A key that no row of the batch has is a KeyError (a typo would
    otherwise give the teacher the student's input)."""
    first, *rest = context_key.split(".")
    if first not in batch.non_tensor_batch:
        raise KeyError(f"context_key {context_key!r}: the batch has no {first!r}; its non-tensor keys are "
                       f"{sorted(batch.non_tensor_batch)}")
    values, path = list(batch.non_tensor_batch[first]), first
    for part in rest:
        present = {str(k) for v in values if isinstance(v, Mapping) for k in v}
        if part not in present:
            raise KeyError(f"context_key {context_key!r}: no row's {path!r} has {part!r}; its keys are "
                           f"{sorted(present)}")
        values, path = [v.get(part) if isinstance(v, Mapping) else None for v in values], f"{path}.{part}"
    return values


def teacher_batch(batch: DataProto, tokenizer, *, context_key="extra_info.solution", template=DEFAULT_TEMPLATE,
                  max_context_tokens=DEFAULT_MAX_CONTEXT_TOKENS, chat_template_kwargs=None) -> DataProto:
    """The teacher's batch in verl's left/right-padded layout (``prompts``, ``responses``,
    ``input_ids``, ``attention_mask``, ``position_ids``, ``response_mask``): the teacher prompt from
    ``raw_prompt`` (``data.return_raw_chat=True``), rendered with ``chat_template_kwargs`` (verl's
    ``data.apply_chat_template_kwargs``), and the context at ``context_key`` (dotted path in the
    non-tensor batch), with the same responses at the same positions from the end. The batch's
    ``meta_info`` goes with it (the sampling temperature, read by verl's engine), the token count
    ``global_token_num`` recounted."""
    key = PROMPT_KEY if PROMPT_KEY in batch.non_tensor_batch else "raw_prompt"
    if key not in batch.non_tensor_batch:
        raise ValueError("the batch has no raw_prompt: set data.return_raw_chat=True")
    contexts = _contexts(batch, context_key)
    responses, response_mask = batch.batch["responses"], batch.batch["response_mask"]
    # The teacher attends to the response tokens the student attended to. In a multi-turn or tool
    # rollout the response mask also clears tool outputs (attended, not trained on): as attention it
    # would hide them from the teacher and shift every later token's log-prob when verl drops the
    # padding. The response mask only chooses the tokens the loss reads.
    attended = batch.batch["attention_mask"][:, -responses.shape[1]:]
    built = build_teacher_inputs(tokenizer, list(batch.non_tensor_batch[key]), contexts, responses,
                                 attended, template=template, max_context_tokens=max_context_tokens,
                                 chat_template_kwargs=chat_template_kwargs)
    input_ids, attention_mask = built["input_ids"], built["attention_mask"]
    positions = position_ids(attention_mask)
    meta_info = dict(batch.meta_info)
    if "global_token_num" in meta_info:
        meta_info["global_token_num"] = attention_mask.sum(-1).tolist()
    return DataProto.from_dict(tensors={
        "prompts": input_ids[:, :-responses.shape[1]], "responses": responses, "input_ids": input_ids,
        "attention_mask": attention_mask, "position_ids": positions, "response_mask": response_mask,
    }, meta_info=meta_info)


def teacher_log_prob(batch: DataProto, tokenizer, compute_log_prob, *, no_lora_adapter=False,
                     **options) -> DataProto:
    """``DataProto({"teacher_log_prob": [B, R]})`` for ``batch``: builds :func:`teacher_batch`, runs
    ``compute_log_prob`` (a worker group's ``compute_log_prob`` or ``compute_ref_log_prob``) on its
    no-padding form, and pads the result back, as verl does for the reference log-probs;
    ``no_lora_adapter`` scores with the base weights of a LoRA actor (verl's reference in the actor)."""
    td = left_right_2_no_padding(teacher_batch(batch, tokenizer, **options).to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=False)
    if no_lora_adapter:
        tu.assign_non_tensor(td, no_lora_adapter=True)
    output = compute_log_prob(td)
    lp = no_padding_2_padding(tu.get(output, "log_probs"), td)
    return DataProto.from_tensordict(tu.get_tensordict({TEACHER_KEY: lp.float()}))


class RLSDRayPPOTrainer(RayPPOTrainer):
    """``RayPPOTrainer`` that adds ``teacher_log_prob`` to each batch with the old log-probs, keeps
    the raw prompts in the batch for it, and hands the step to the loss (``global_steps``)."""

    def _get_gen_batch(self, batch: DataProto) -> DataProto:
        raw = batch.non_tensor_batch.get("raw_prompt")
        gen_batch = super()._get_gen_batch(batch)
        if raw is not None:
            batch.non_tensor_batch[PROMPT_KEY] = raw
        return gen_batch

    def _update_actor(self, batch: DataProto) -> DataProto:
        batch.meta_info["global_steps"] = self.global_steps
        output = super()._update_actor(batch)
        credit_means(output.meta_info["metrics"])
        return output

    def _compute_old_log_prob(self, batch: DataProto):
        old_log_prob, mfu = super()._compute_old_log_prob(batch)
        policy = rlsd_policy(self.config.actor_rollout_ref.actor.policy_loss)
        if policy.teacher_policy == "frozen":
            if not self.use_reference_policy:
                raise ValueError("teacher_policy='frozen' uses the reference worker: enable use_kl_loss")
            # With LoRA verl keeps the reference in the actor: its weights without the adapter.
            base = getattr(self, "ref_in_actor", False)
            run = self.actor_rollout_wg.compute_log_prob if base else self.ref_policy_wg.compute_ref_log_prob
        else:
            base, run = False, self.actor_rollout_wg.compute_log_prob
        # The student's prompts were rendered with these (verl's dataset and agent loop).
        kwargs = self.config.get("data", {}).get("apply_chat_template_kwargs") or {}
        kwargs = OmegaConf.to_container(kwargs, resolve=True) if isinstance(kwargs, DictConfig) else dict(kwargs)
        teacher = teacher_log_prob(batch, self.tokenizer, run, context_key=policy.context_key,
                                   template=policy.teacher_template, max_context_tokens=policy.max_context_tokens,
                                   chat_template_kwargs=kwargs, no_lora_adapter=base)
        return old_log_prob.union(teacher), mfu


class RLSDActorRolloutRefWorker(ActorRolloutRefWorker):
    """``ActorRolloutRefWorker`` whose actor trains with :func:`rlsd_ppo_loss`."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        super().init_model()
        if "actor" in self.role:
            if getattr(self.loss_fn, "func", None) is not ppo_loss:
                raise ValueError("the RLSD worker replaces verl's ppo_loss; distillation losses are not combined")
            self.loss_fn = partial(rlsd_ppo_loss, config=self.loss_fn.keywords["config"])
            self.actor.set_loss_fn(self.loss_fn)


class RLSDTaskRunner(main_ppo_v0.TaskRunner.__ray_actor_class__):
    """verl's ``main_ppo_v0`` task runner with :class:`RLSDActorRolloutRefWorker` and
    :class:`RLSDRayPPOTrainer`; start it with ``run_ppo(config, ray.remote(num_cpus=1)(RLSDTaskRunner))``."""

    def add_actor_rollout_worker(self, config):
        _, group_cls = super().add_actor_rollout_worker(config)
        for role in list(self.role_worker_mapping):
            self.role_worker_mapping[role] = ray.remote(RLSDActorRolloutRefWorker)
        return RLSDActorRolloutRefWorker, group_cls

    def run(self, config):
        # The runner is its own Ray actor process: the trainer class is swapped there only.
        main_ppo_v0.RayPPOTrainer = RLSDRayPPOTrainer
        return super().run(config)
