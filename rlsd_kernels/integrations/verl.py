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
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import ray
import torch
from verl import DataProto
from verl.single_controller.base.decorator import Dispatch, register
from verl.trainer import main_ppo_v0
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.utils import tensordict_utils as tu
from verl.utils.torch_functional import masked_mean
from verl.workers.config.actor import PolicyLossConfig
from verl.workers.engine_workers import ActorRolloutRefWorker
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

import rlsd_kernels
from rlsd_kernels import reference

from .teacher import DEFAULT_MAX_CONTEXT_TOKENS, DEFAULT_TEMPLATE, build_teacher_inputs

TEACHER_KEY = "teacher_log_prob"
PROMPT_KEY = "rlsd_raw_prompt"  # the raw prompts, kept in the batch when verl moves them to generation
_TEACHER = contextvars.ContextVar("rlsd_teacher_log_prob", default=None)
_STEP = contextvars.ContextVar("rlsd_global_step", default=None)


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
    ``clip_ratio_c`` as for ``"vanilla"``, ``policy_loss`` an :class:`RLSDPolicyLossConfig` (or a
    mapping with ``lam`` and ``eps_w``)."""
    if config is None:
        raise ValueError("the rlsd policy loss needs the actor config")
    teacher = teacher_log_prob if teacher_log_prob is not None else _TEACHER.get()
    if teacher is None:
        raise ValueError(f"the rlsd policy loss needs {TEACHER_KEY!r} in the batch (RLSDRayPPOTrainer adds it)")
    if teacher.shape != log_prob.shape:
        raise ValueError(f"{TEACHER_KEY} has shape {tuple(teacher.shape)}, expected {tuple(log_prob.shape)}")
    policy = config.policy_loss
    lam = policy.lam_at(_STEP.get()) if hasattr(policy, "lam_at") else float(policy.get("lam") or 0.0)
    low, high, dual = _clip_ranges(config)
    if not dual > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1, got {dual}")
    sapo = {}
    if policy.get("surrogate", "ppo") == "sapo":
        sapo = dict(surrogate="sapo", sapo_tau_pos=config.tau_pos, sapo_tau_neg=config.tau_neg)
    terms = reference.rlsd_token_terms(
        log_prob, teacher.to(log_prob.dtype), advantages, lp_old=old_log_prob, eps_w=policy.get("eps_w", 0.2),
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
    for name, value in reference.rlsd_metrics(dict(terms, advantage=advantages), mask).items():
        if name in ("credit_weight_mean", "credit_clip_low_frac", "credit_clip_high_frac", "delta_mean"):
            metrics[f"actor/rlsd_{name}"] = value.item()
    return pg_loss, metrics


def rlsd_ppo_loss(config, model_output, data, dp_group=None):
    """verl's ``ppo_loss`` with the batch's ``teacher_log_prob`` (padded ``[B, R]``) and
    ``global_steps`` handed to the ``"rlsd"`` policy loss."""
    if TEACHER_KEY not in data.keys():
        raise ValueError(f"the batch has no {TEACHER_KEY!r}: train with RLSDRayPPOTrainer, which adds it")
    teacher = data.select(TEACHER_KEY).to_padded_tensor()[TEACHER_KEY]
    tokens = (_TEACHER.set(teacher), _STEP.set(tu.get_non_tensor_data(data, "global_steps", None)))
    try:
        return ppo_loss(config, model_output, data, dp_group)
    finally:
        _TEACHER.reset(tokens[0])
        _STEP.reset(tokens[1])


def _context(batch: DataProto, key: str, row: int):
    """The non-tensor value at the dotted ``key`` (e.g. ``extra_info.solution``) of one row, or None."""
    first, *rest = key.split(".")
    column = batch.non_tensor_batch.get(first)
    value: Any = None if column is None else column[row]
    for part in rest:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def teacher_batch(batch: DataProto, tokenizer, *, context_key="extra_info.solution", template=DEFAULT_TEMPLATE,
                  max_context_tokens=DEFAULT_MAX_CONTEXT_TOKENS) -> DataProto:
    """The teacher's batch in verl's left/right-padded layout (``prompts``, ``responses``,
    ``input_ids``, ``attention_mask``, ``position_ids``, ``response_mask``): the teacher prompt from
    ``raw_prompt`` (``data.return_raw_chat=True``) and the context at ``context_key`` (dotted path in
    the non-tensor batch), with the same responses at the same positions from the end."""
    key = PROMPT_KEY if PROMPT_KEY in batch.non_tensor_batch else "raw_prompt"
    if key not in batch.non_tensor_batch:
        raise ValueError("the batch has no raw_prompt: set data.return_raw_chat=True")
    contexts = [_context(batch, context_key, i) for i in range(len(batch))]
    responses, response_mask = batch.batch["responses"], batch.batch["response_mask"]
    built = build_teacher_inputs(tokenizer, list(batch.non_tensor_batch[key]), contexts, responses,
                                 response_mask, template=template, max_context_tokens=max_context_tokens)
    input_ids, attention_mask = built["input_ids"], built["attention_mask"]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return DataProto.from_dict(tensors={
        "prompts": input_ids[:, :-responses.shape[1]], "responses": responses, "input_ids": input_ids,
        "attention_mask": attention_mask, "position_ids": position_ids, "response_mask": response_mask,
    })


def teacher_log_prob(batch: DataProto, tokenizer, compute_log_prob, **options) -> DataProto:
    """``DataProto({"teacher_log_prob": [B, R]})`` for ``batch``: builds :func:`teacher_batch`, runs
    ``compute_log_prob`` (a worker group's ``compute_log_prob`` or ``compute_ref_log_prob``) on its
    no-padding form, and pads the result back, as verl does for the reference log-probs."""
    td = left_right_2_no_padding(teacher_batch(batch, tokenizer, **options).to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=False)
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
        return super()._update_actor(batch)

    def _compute_old_log_prob(self, batch: DataProto):
        old_log_prob, mfu = super()._compute_old_log_prob(batch)
        policy = self.config.actor_rollout_ref.actor.policy_loss
        if policy.get("teacher_policy", "live") == "frozen":
            if not self.use_reference_policy:
                raise ValueError("teacher_policy='frozen' uses the reference worker: enable use_kl_loss")
            run = self.ref_policy_wg.compute_ref_log_prob
        else:
            run = self.actor_rollout_wg.compute_log_prob
        teacher = teacher_log_prob(batch, self.tokenizer, run, context_key=policy.get("context_key",
                                                                                     "extra_info.solution"),
                                   template=policy.get("teacher_template", DEFAULT_TEMPLATE),
                                   max_context_tokens=policy.get("max_context_tokens", DEFAULT_MAX_CONTEXT_TOKENS))
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
