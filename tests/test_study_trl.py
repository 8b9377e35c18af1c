"""The study's ``--trainer trl`` loop (``trl_trainer.train_trl``): a few steps through the TRL
``RLSDTrainer`` on a tiny model, rows like the native loop's, with the trainer's credit metric."""

import math

import pytest

pytest.importorskip("trl")

from python.rlsd_study import (
    tasks,  # noqa: E402
    trl_trainer,  # noqa: E402
)
from python.rlsd_study.methods import parse_method  # noqa: E402
from python.rlsd_study.model import CharTokenizer, make_config, make_model  # noqa: E402
from python.rlsd_study.train import RLConfig  # noqa: E402


@pytest.mark.parametrize("spec", ["grpo", "rlsd:lam=1:eps_w=0.8"])
def test_trl_study_rows(spec, monkeypatch):
    # Rewards by the parity of the completion's length: mixed groups from an untrained model, so
    # that the advantages are not all 0 and the credit weight has tokens to act on.
    monkeypatch.setattr(trl_trainer, "verify", lambda problem, completion: len(completion) % 2 == 0)
    tok = CharTokenizer()
    split = tasks.make_split(tasks.make_task("add3"), 64, 8)
    policy = make_model(make_config(tok.vocab_size, hidden=32, layers=1, heads=2), seed=0)
    cfg = RLConfig(steps=2, prompts_per_step=2, group=4, eval_every=1, num_eval=8, eval_sampled=False)
    rows = trl_trainer.train_trl(policy, tok, split, parse_method(spec), cfg, seed=0)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    credit = [r["credit_weight_nonzero"] for r in rows[1:]]
    if spec == "grpo":
        assert all(math.isnan(c) for c in credit)
    else:
        # A step whose groups are all equal has no credit token (NaN); the clip keeps w in [0.2, 1.8].
        assert any(not math.isnan(c) for c in credit)
        assert all(math.isnan(c) or 0.2 <= c <= 1.8 for c in credit)
