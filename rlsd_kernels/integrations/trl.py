"""RLSD in TRL: ``RLSDConfig`` and ``RLSDTrainer``, drop-in for ``GRPOConfig`` and ``GRPOTrainer``.

Pinned to TRL 1.16.0 (``pip install "rlsd-kernels[trl]"``): the trainer overrides the private
``_generate_and_score_completions`` (to add the teacher's log-probs to the batch) and
``_compute_loss`` (to compute the loss with the fused kernel), whose contracts change between TRL
minor versions.

Per batch: the dataset column ``context_column`` (default ``solution``) is the privileged context;
the teacher prompt is built from the student's prompt and that context
(:func:`rlsd_kernels.integrations.teacher.build_teacher_inputs`), the teacher's backbone runs once
without gradient and :func:`rlsd_kernels.token_logprobs_linear` scores the sampled tokens from its
last hidden states (no ``[N, V]`` teacher logits). The loss is :func:`rlsd_kernels.rlsd_linear_loss`
on the student's last hidden states and the lm_head weight, run inside the model's forward
(TRL's ``_ForwardRedirection``, so DDP/FSDP/ZeRO hooks fire) with the lm_head gathered under ZeRO-3
(``maybe_gather_lm_head_ctx``), or :func:`rlsd_kernels.rlsd_loss` on the logits with
``fused_linear=False``.

With ``lam=0`` and ``dual_clip=None`` the loss is TRL's own for every supported ``loss_type``. TRL
has no dual clip: with the default ``dual_clip=3.0`` a token with ``A < 0`` and ratio above 3 has
its loss capped at ``-3 * A`` (and no gradient), where TRL's grows with the ratio.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import maybe_gather_lm_head_ctx

import rlsd_kernels

from .teacher import (
    DEFAULT_MAX_CONTEXT_TOKENS,
    DEFAULT_TEMPLATE,
    backbone_and_head,
    build_teacher_inputs,
    check_template,
    teacher_logprobs,
)
from .teacher_weights import TEACHER_POLICIES, TeacherWeights
from .trl_metrics import MetricLog, clip_indicators

# What GRPOTrainer adds to a batch for a vision-language model; the fused loss runs the backbone on
# token ids alone, so such a batch is refused rather than scored without its images.
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "image_position_ids")
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo", "sapo")
LOSS_AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "luspo": "seq-mean-token-sum",
    "sapo": "seq-mean-token-mean",
}
TIS_LEVEL = {"token_truncate": "token", "sequence_truncate": "sequence"}
# CISPO keeps no lower bound on the ratio: 1 - CISPO_CLIP_LOW lies below exp(-20), the smallest ratio.
CISPO_CLIP_LOW = 1.0 - 1e-12
NO_CAP = 1e30


@dataclass
class RLSDConfig(GRPOConfig):
    """``GRPOConfig`` plus the RLSD fields, with the official recipe's defaults where GRPOConfig's
    differ (``epsilon_high=0.28``, ``vllm_importance_sampling_mode="token_truncate"``). ``epsilon`` /
    ``epsilon_high`` are the PPO clip range, ``beta`` the k3 KL to the reference model,
    ``temperature`` the sampling temperature, and TRL's vLLM importance-sampling correction applies
    as in GRPO (truncate modes)."""

    epsilon_high: float | None = field(default=0.28, metadata={"help": "PPO clip above: 1 + epsilon_high "
                                                                       "(official: 0.28); the ratio cap for cispo."})
    vllm_importance_sampling_mode: str = field(default="token_truncate", metadata={
        "help": "vLLM rollout correction: 'token_truncate' (official: min(exp(lp_old - lp_rollout), C) per "
                "token) or 'sequence_truncate'; GRPOConfig's default 'sequence_mask' is not supported."})
    lam: float | None = field(default=None, metadata={"help": "Constant credit mix in [0, 1]; None follows the "
                                                              "schedule lam_schedule(global_step + 1, ...)."})
    lam_start: float = field(default=0.5, metadata={"help": "Schedule start (official: 0.5)."})
    lam_end: float = field(default=0.0, metadata={"help": "Schedule end (official: 0)."})
    lam_decay_steps: int = field(default=60, metadata={"help": "Linear decay length in steps (official: 60)."})
    lam_warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up from 0 before the decay."})
    eps_w: float = field(default=0.2, metadata={"help": "Credit-weight clip: w in [1 - eps_w, 1 + eps_w]."})
    dual_clip: float | None = field(default=3.0, metadata={"help": "Dual-clip bound (> 1) for A < 0; None "
                                                                   "disables it (TRL has none)."})
    teacher_policy: str = field(default="snapshot", metadata={"help": "live, frozen, snapshot or ema."})
    teacher_refresh_steps: int = field(default=20, metadata={"help": "Snapshot refresh period in steps."})
    teacher_ema_decay: float = field(default=0.99, metadata={"help": "EMA teacher decay."})
    context_column: str = field(default="solution", metadata={"help": "Dataset column with the privileged context."})
    teacher_template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "Teacher prompt with {question} and "
                                                                              "{context}."})
    max_context_tokens: int | None = field(default=DEFAULT_MAX_CONTEXT_TOKENS,
                                           metadata={"help": "Token budget of the context (official: 12,000)."})
    fused_linear: bool = field(default=True, metadata={"help": "Loss from hidden states x lm_head (no [N, V] "
                                                               "logits); False computes the logits."})
    chunk_size: int | None = field(default=None, metadata={"help": "Token rows per chunk of the fused linear ops."})

    def __post_init__(self):
        super().__post_init__()
        check_config(self)


def check_config(args):
    """Raises ``ValueError`` for a setting the RLSD loss cannot express, naming the field."""
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"loss_type={args.loss_type!r} is not supported by RLSDTrainer; "
                         f"use one of {SUPPORTED_LOSS_TYPES}")
    unsupported = {
        "delta": args.delta is not None,
        "top_entropy_quantile": args.top_entropy_quantile < 1.0,
        "entropy_coef": args.entropy_coef != 0.0 or args.use_adaptive_entropy,
        "off_policy_mask_threshold": args.off_policy_mask_threshold is not None,
    }
    for name, bad in unsupported.items():
        if bad:
            raise ValueError(f"{name}={getattr(args, name)!r} is not supported by RLSDTrainer; leave it at its default")
    if args.beta != 0.0 and args.use_bias_correction_kl:
        raise ValueError("beta != 0 needs use_bias_correction_kl=False: the RLSD loss adds the plain k3 KL")
    if args.use_vllm and args.vllm_importance_sampling_correction:
        if args.vllm_importance_sampling_mode not in TIS_LEVEL:
            raise ValueError(f"vllm_importance_sampling_mode={args.vllm_importance_sampling_mode!r} is not "
                             f"supported by RLSDTrainer; use one of {tuple(TIS_LEVEL)}")
        if args.vllm_importance_sampling_clip_min is not None:
            raise ValueError("vllm_importance_sampling_clip_min must be None with RLSDTrainer (truncation caps "
                             "the weight from above only)")
    if args.lam is not None and not 0.0 <= args.lam <= 1.0:
        raise ValueError(f"lam must be None or in [0, 1], got {args.lam}")
    rlsd_kernels.lam_schedule(0, start=args.lam_start, end=args.lam_end, decay_steps=args.lam_decay_steps,
                              warmup_steps=args.lam_warmup_steps)
    if args.teacher_policy not in TEACHER_POLICIES:
        raise ValueError(f"teacher_policy must be one of {TEACHER_POLICIES}, got {args.teacher_policy!r}")
    if args.loss_type == "cispo" and (args.epsilon_high is None or args.epsilon_high < 1.0):
        raise ValueError(f"loss_type='cispo' takes epsilon_high as the ratio cap (>= 1, e.g. 5.0), "
                         f"got {args.epsilon_high}")
    _check_number(args, "eps_w", lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    _check_number(args, "dual_clip", lambda v: 1.0 < v < float("inf"), "None or a finite number > 1", none=True)
    _check_number(args, "teacher_ema_decay", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    _check_integer(args, "teacher_refresh_steps", 1)
    _check_integer(args, "max_context_tokens", 0, none=True)
    _check_integer(args, "chunk_size", 1, none=True)
    if not isinstance(args.context_column, str) or not args.context_column:
        raise ValueError(f"context_column must be a non-empty column name, got {args.context_column!r}")
    check_template(args.teacher_template, "teacher_template")


def _check_number(args, name, ok, what, none=False):
    value = getattr(args, name)
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _check_integer(args, name, low, none=False):
    value = getattr(args, name)
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be {'None or ' if none else ''}an integer >= {low}, got {value!r}")


class _TeacherRefresh(TrainerCallback):
    def __init__(self, teacher):
        self.teacher = teacher

    def on_step_end(self, args, state, control, **kwargs):
        self.teacher.on_step_end(state.global_step)


class RLSDTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the RLSD loss. Takes the same arguments, with ``args`` an ``RLSDConfig``.

    ``teacher`` holds the teacher's weights (:class:`TeacherWeights`); ``last_teacher_inputs`` the
    teacher batch of the latest generation (``input_ids``, ``attention_mask``, ``logits_to_keep``).
    Logged (:mod:`.trl_metrics`): ``rlsd/lam``; the credit metrics ``rlsd/credit_weight_mean``,
    ``rlsd/credit_clip_low_frac``, ``rlsd/credit_clip_high_frac`` and ``rlsd/delta_mean`` (means over
    the window's tokens with ``A != 0``, left out when it has none); ``rlsd/dual_clip_frac`` with the
    dual clip; and what ``GRPOTrainer`` logs for the same batch, with its meaning: ``entropy``,
    ``kl`` (``beta != 0``), ``clip_ratio/{low_mean,high_mean,region_mean,low_min,high_max}`` (clipped
    losses, per sequence with ``importance_sampling_level="sequence"``) or ``cispo_clip_ratio``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, RLSDConfig):
            raise TypeError(f"RLSDTrainer needs args=RLSDConfig(...), got {type(self.args).__name__}")
        model = self.accelerator.unwrap_model(self.model)
        _check_plain_head(model)
        if self.args.teacher_policy != "live":
            if hasattr(model, "get_base_model"):
                raise ValueError("a PEFT model needs teacher_policy='live' (a teacher copy of the adapters is not "
                                 "built)")
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError(f"teacher_policy={self.args.teacher_policy!r} keeps an unsharded teacher copy, "
                                 f"which DeepSpeed and FSDP runs do not support yet: use teacher_policy='live'")
        self.teacher = TeacherWeights(model, self.args.teacher_policy, refresh_steps=self.args.teacher_refresh_steps,
                                      ema_decay=self.args.teacher_ema_decay)
        self.add_callback(_TeacherRefresh(self.teacher))
        self._rlsd_redirect = _ForwardRedirection()
        self._rlsd_metrics = MetricLog(self.accelerator)
        self.last_teacher_inputs = None

    def current_lam(self) -> float:
        """``lam`` for the coming optimizer step."""
        a = self.args
        if a.lam is not None:
            return float(a.lam)
        return rlsd_kernels.lam_schedule(self.state.global_step + 1, start=a.lam_start, end=a.lam_end,
                                         decay_steps=a.lam_decay_steps, warmup_steps=a.lam_warmup_steps)

    def teacher_needed(self) -> bool:
        """Whether any optimizer step this generation batch can serve has ``lam > 0``. Otherwise the
        loss is GRPO's and the teacher pass is skipped: the official schedule reaches 0 at its decay
        step (60) and stays there. The same on every process (it depends on the step alone)."""
        a = self.args
        if a.lam is not None:
            return float(a.lam) != 0.0
        first = self.state.global_step + 1
        span = max(1, a.steps_per_generation * self.num_iterations)
        return any(rlsd_kernels.lam_schedule(step, start=a.lam_start, end=a.lam_end, decay_steps=a.lam_decay_steps,
                                             warmup_steps=a.lam_warmup_steps) != 0.0
                   for step in range(first, first + span))

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        images = sorted(k for k in IMAGE_KEYS if output.get(k) is not None)
        if images:
            raise ValueError(f"RLSDTrainer takes text-only models: this batch holds image inputs {images}, which "
                             "the fused loss and the teacher pass do not feed to the model")
        column = self.args.context_column
        if not any(column in x for x in inputs):
            raise KeyError(f"the dataset has no column {column!r} with the privileged context "
                           f"(set RLSDConfig.context_column)")
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        if len(inputs) != completion_ids.shape[0]:
            raise ValueError(f"{len(inputs)} examples for {completion_ids.shape[0]} completions")
        if not self.teacher_needed():
            output["teacher_per_token_logps"] = None
            return output
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        # TRL's own prompt tokenizer: special tokens for strings; for chat the tools, the
        # training chat template and chat_template_kwargs. An empty context gives the student's ids.
        batch = build_teacher_inputs(
            tokenizer, [x["prompt"] for x in inputs], [x.get(column) for x in inputs], completion_ids,
            completion_mask, template=self.args.teacher_template, max_context_tokens=self.args.max_context_tokens,
            tokenize_prompts=lambda prompts: self._tokenize_prompts(prompts)[0],
        )
        teacher = self.teacher.model
        if teacher is not self.teacher.source:
            teacher.to(completion_ids.device)
        with torch.no_grad(), self.accelerator.autocast():
            lp = teacher_logprobs(teacher, batch["input_ids"], batch["attention_mask"], completion_ids,
                                  completion_mask, temperature=self.temperature,
                                  batch_size=self.args.per_device_train_batch_size, chunk_size=self.args.chunk_size,
                                  gather_context=maybe_gather_lm_head_ctx)
        output["teacher_per_token_logps"] = lp
        self.last_teacher_inputs = batch
        return output

    def _compute_loss(self, model, inputs):
        unwrapped = self.accelerator.unwrap_model(model)
        lam = self.current_lam()
        loss, metrics, logprobs = self._rlsd_redirect(model, unwrapped, self._rlsd_forward, unwrapped, inputs, lam)
        mask = _loss_mask(inputs)
        clip = clip_indicators(self.loss_type, logprobs, inputs.get("old_per_token_logps"), inputs["advantages"],
                               mask, level=self.importance_sampling_level, epsilon_low=self.epsilon_low,
                               epsilon_high=self.epsilon_high)
        mode = "train" if self.model.training else "eval"
        self._rlsd_metrics.add(self._metrics[mode], mode, lam=lam, metrics=metrics, clip=clip, mask=mask,
                               dual_clip=self.loss_type not in ("cispo", "sapo") and self.args.dual_clip is not None,
                               kl=self.beta != 0.0)
        return loss

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        self._rlsd_metrics.flush(self._metrics[mode], mode)
        super().log(logs, start_time)

    def rlsd_options(self, inputs, mask, lam):
        """The keyword options of the RLSD loss for one micro-batch: TRL's ``loss_type`` as our
        ``loss_agg`` with TRL's denominator (gradient accumulation included) as ``normalizer``."""
        a, lt = self.args, self.loss_type
        train = self.model.training
        accumulation = self.current_gradient_accumulation_steps if train else 1.0
        rows = inputs["completion_ids"].shape[0]
        if lt in ("grpo", "luspo", "sapo"):
            normalizer = rows * accumulation
        elif lt == "bnpo":
            normalizer = mask.sum().clamp(min=1.0) * accumulation
        elif lt == "dr_grpo":
            normalizer = rows * self.max_completion_length * accumulation
        else:
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                normalizer = normalizer * accumulation / a.steps_per_generation
        options = dict(
            teacher_logprobs=inputs["teacher_per_token_logps"], old_logprobs=inputs.get("old_per_token_logps"),
            mask=mask, eps_w=a.eps_w, lam=lam, temperature=self.temperature, loss_agg=LOSS_AGG[lt],
            normalizer=normalizer, ratio_level=self.importance_sampling_level, return_metrics=True,
        )
        if lt == "cispo":
            options.update(surrogate="cispo", clip_low=CISPO_CLIP_LOW, clip_high=self.epsilon_high - 1.0)
        elif lt == "sapo":
            options.update(surrogate="sapo", sapo_tau_pos=a.sapo_temperature_pos, sapo_tau_neg=a.sapo_temperature_neg)
        else:
            options.update(clip_low=self.epsilon_low, clip_high=self.epsilon_high, dual_clip=a.dual_clip)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            old, sampled = inputs["old_per_token_logps"], inputs["sampling_per_token_logps"]
            cap = self.vllm_importance_sampling_clip_max
            options.update(rollout_logprobs=torch.where(torch.isnan(sampled), old, sampled),
                           tis_level=TIS_LEVEL[self.vllm_importance_sampling_mode],
                           tis_cap=NO_CAP if cap is None else cap)
        if self.beta != 0.0:
            options.update(ref_logprobs=inputs["ref_per_token_logps"], kl_coef=self.beta, kl_estimator="k3")
        return options

    def _rlsd_forward(self, unwrapped, inputs, lam):
        """``(loss, metrics, logprobs)``: ``logprobs`` are the student's (no gradient) for TRL's clip
        metrics, scored only when there are old log-probs (else the ratio is 1) and a clip to log."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = _loss_mask(inputs)
        t = completion_ids.shape[1]
        backbone, head = backbone_and_head(unwrapped)
        with self.accelerator.autocast():
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = hidden[:, -t - 1:-1]
        tokens = completion_ids.masked_fill(mask == 0, -100)
        options = self.rlsd_options(inputs, mask, lam)
        weight, bias = head.weight, head.bias
        with maybe_gather_lm_head_ctx(weight, bias):
            # Where the clip metrics need the student's log-probs, they come from the same hidden
            # states (cast once) or, unfused, from the logits already formed: no second matmul.
            score = inputs.get("old_per_token_logps") is not None and self.loss_type != "sapo"
            logprobs = None
            if self.args.fused_linear:
                h = hidden.to(weight.dtype)
                loss, metrics = rlsd_kernels.rlsd_linear_loss(h, weight, tokens, inputs["advantages"], bias=bias,
                                                              chunk_size=self.args.chunk_size, **options)
                if score:
                    with torch.no_grad():
                        logprobs = rlsd_kernels.token_logprobs_linear(
                            h.detach(), weight.detach(), tokens, bias=None if bias is None else bias.detach(),
                            temperature=self.temperature, chunk_size=self.args.chunk_size)
            else:
                logits = head(hidden)
                loss, metrics = rlsd_kernels.rlsd_loss(logits, None, tokens, inputs["advantages"], **options)
                if score:
                    with torch.no_grad():
                        logprobs = rlsd_kernels.token_logprobs(logits.detach(), tokens, temperature=self.temperature)
        return loss, metrics, logprobs


def _loss_mask(inputs):
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


def _check_plain_head(model):
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling"):
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(f"RLSDTrainer does not support models with {name}={value} (the fused loss reads "
                             f"plain lm_head logits)")
