"""``--trainer trl``: the same RL through TRL's loop with this library's ``RLSDTrainer`` (GRPO is
``lam=0``), so the drop-in is shown to train. Needs ``rlsd_kernels.integrations.trl`` and the
``trl`` extra.

Differences from the native loop, all TRL's own behaviour: generation by ``model.generate``,
AdamW with TRL's gradient clipping (norm 1), advantages scaled by TRL's group std, the teacher
prompt built by the integration from the student's prompt and the dataset's ``solution`` column
with this program's template (question, ``\\nref:``, reference). Held-out accuracy is measured by
a callback with this program's sampler; the time per step is not split into phases.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

from .data import accuracy, response_length
from .model import BOS, EOS, PAD, model_device
from .tasks import TEACHER_TAG, verify


def hf_tokenizer(tok):
    """A ``PreTrainedTokenizerFast`` with the ids of ``CharTokenizer`` (one token per character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={s: i for i, s in enumerate(tok.itos)}, unk_token=tok.itos[PAD]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=tok.itos[PAD], bos_token=tok.itos[BOS],
                                 eos_token=tok.itos[EOS])
    hf.padding_side = "left"
    return hf


def _import_trainer():
    try:
        from rlsd_kernels.integrations.trl import RLSDConfig, RLSDTrainer
    except ImportError as e:
        raise RuntimeError("--trainer trl needs rlsd_kernels.integrations.trl and the trl extra "
                           f"(pip install 'rlsd-kernels[trl]'): {e}") from e
    return RLSDConfig, RLSDTrainer


def train_trl(policy, tok, split, method, cfg, *, seed: int, progress=None, log=None):
    """Trains ``policy`` in place with ``RLSDTrainer``; returns rows like ``train.train``'s."""
    from datasets import Dataset
    from transformers import TrainerCallback

    if method.base not in ("grpo", "rlsd"):
        raise ValueError(f"--trainer trl runs grpo and rlsd methods, got {method.label!r}")
    if method.eps_w_high is not None:
        raise ValueError(f"--trainer trl takes eps_w alone (RLSDConfig's symmetric clip), got {method.label!r}")
    RLSDConfig, RLSDTrainer = _import_trainer()
    hf = hf_tokenizer(tok)
    bos = tok.itos[BOS]
    rows_in = [{"prompt": bos + p.question, "solution": p.solution, "answer": p.answer} for p in split.train]
    by_answer = {bos + p.question: p for p in split.train}
    rows, t0 = [], time.perf_counter()

    def reward(prompts, completions, **_):
        return [float(verify(by_answer[p], c)) for p, c in zip(prompts, completions, strict=True)]

    def evaluate(step, state=None):
        acc = accuracy(policy, tok, split.test[: cfg.num_eval])
        logs = [h for h in (state.log_history if state else []) if "reward" in h]
        last = logs[-1] if logs else {}
        rows.append({"step": step, "accuracy": acc, "reward": last.get("reward", math.nan),
                     "lam": last.get("rlsd/lam", math.nan),
                     # The trainer's own credit metric: a mean over the logged window's tokens with A != 0.
                     "credit_weight_nonzero": last.get("rlsd/credit_weight_mean", math.nan),
                     "rollout_s": math.nan, "teacher_s": math.nan,
                     "update_s": (time.perf_counter() - t0) / max(step, 1)})
        if log:
            log(f"trl {method.label} seed {seed} step {step}: accuracy {acc:.3f}")

    class Eval(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None:
                progress.update(1)
            if state.global_step % cfg.eval_every == 0 or state.global_step == cfg.steps:
                evaluate(state.global_step, state)

    evaluate(0)
    on_cpu = model_device(policy).type == "cpu"
    # flash-attn takes half precision only: the Trainer's bfloat16 autocast, as the native loop's.
    flash = policy.config._attn_implementation == "flash_attention_2"
    with tempfile.TemporaryDirectory() as out:
        args = RLSDConfig(
            output_dir=os.path.join(out, "trl"), per_device_train_batch_size=cfg.prompts_per_step * cfg.group,
            num_generations=cfg.group, max_completion_length=response_length(split.train) + 4,
            max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="constant", weight_decay=0.0,
            temperature=cfg.temperature, beta=0.0, loss_type="dapo", logging_steps=1, report_to=[],
            save_strategy="no", use_cpu=on_cpu, seed=seed, bf16=flash, dataloader_num_workers=0,
            lam=0.0 if method.base == "grpo" else method.lam, lam_start=method.lam0, lam_decay_steps=method.decay,
            eps_w=method.eps_w, teacher_refresh_steps=cfg.teacher_every, context_column="solution",
            teacher_template="{question}" + TEACHER_TAG + "{context}\n", max_context_tokens=None,
            disable_tqdm=True,
        )
        trainer = RLSDTrainer(model=policy, reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_list(rows_in), processing_class=hf, callbacks=[Eval()])
        trainer.train()
    return rows
