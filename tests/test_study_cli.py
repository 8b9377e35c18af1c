"""The study program's command line and resume logic: flags and method specs checked before any work,
kept runs and warm starts reused only with the settings that made them, losses scored at the rollout
temperature. Fast: no warm start."""

import csv
import json
import os

import pytest
import torch

from python.rlsd_study import data, study, tasks
from python.rlsd_study import train as train_mod
from python.rlsd_study.__main__ import main, parse_args
from python.rlsd_study.methods import method_loss, parse_method
from python.rlsd_study.model import CharTokenizer, make_config, make_model
from python.rlsd_study.sampler import sample
from python.rlsd_study.train import RLConfig

TINY = ["--steps", "2", "--prompts", "2", "--group", "2", "--num-eval", "8", "--num-test", "16",
        "--num-train", "64", "--methods", "grpo"]


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse_args(TINY + argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_defaults_and_presets_parse():
    for preset in ("default", "ci", "study"):
        assert parse_args(["--preset", preset])[0] == preset
    _, a = parse_args(TINY + ["--tasks", "chain,sum", "--methods", "rlsd:lam=1:eps_w=0.8,grpo+opsd:alpha=0.5:div=jsd"])
    assert a["group"] == 2 and a["methods"].endswith("div=jsd")


@pytest.mark.parametrize("argv, flag", [
    (["--teacher-every", "0"], "--teacher-every"),
    (["--eval-every", "0"], "--eval-every"),
    (["--num-eval", "0"], "--num-eval"),
    (["--num-test", "0"], "--num-test"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--prompts", "0"], "--prompts"),
    (["--prompts", "-1"], "--prompts"),
    (["--group", "0"], "--group"),
    (["--group", "1"], "--group"),
    (["--warm-check-every", "0"], "--warm-check-every"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "-2"], "--seeds"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--warm-lr-end=-0.001"], "--warm-lr-end"),
    (["--warm-target", "0"], "--warm-target"),
    (["--warm-target", "1.5"], "--warm-target"),
    (["--tasks", "nope"], "--tasks"),
    (["--tasks", "add3,add3"], "--tasks"),
    (["--num-eval", "100"], "--num-eval"),
    (["--tasks", "sum", "--sum-terms", "2", "--num-train", "20000"], "--sum-terms 2"),
    (["--tasks", "chain", "--num-train", "1"], "--prompts"),
    (["--device", "tpu"], "--device"),
    (["--attention", "flash_attention_2", "--device", "cpu"], "--attention"),
])
def test_bad_flags_fail_at_parse_time_naming_the_flag(capsys, argv, flag):
    assert flag in _error(capsys, argv)


@pytest.mark.parametrize("spec, option", [
    ("rlsd:eps_w=abc", "eps_w"), ("rlsd:decay=1.5", "decay"), ("rlsd:lam=2", "lam"), ("rlsd:eps_w=-1", "eps_w"),
    ("rlsd:lam0=3", "lam0"), ("rlsd:lam=nan", "lam"), ("rlsd:decay=-5", "decay"), ("opsd:div=bogus", "div"),
    ("grpo:lam=1", "lam"), ("opsd:eps_w=5", "eps_w"), ("rlsd:div=bogus", "div"), ("rlsd:lam=1:lam=0.5", "lam"),
    ("rlsd:lam=1:decay=10", "decay"), ("grpo+opsd:alpha=-1", "alpha"),
])
def test_bad_method_specs_fail_naming_spec_and_option(capsys, spec, option):
    with pytest.raises(ValueError, match=option) as e:
        parse_method(spec)
    assert spec in str(e.value)
    err = _error(capsys, ["--methods", spec])
    assert "--methods" in err and spec in err and "rlsd: eps_w, eps_w_high, lam, lam0, decay" in err


def test_method_options_parse():
    m = parse_method("rlsd:lam0=0.8:decay=30:eps_w_high=2")
    assert (m.lam0, m.decay, m.eps_w_high, m.lam) == (0.8, 30, 2.0, None)
    assert parse_method("grpo+opsd:alpha=0.5:div=forward_kl").div == "forward_kl"


@pytest.mark.parametrize("methods", ["grpo,grpo", "rlsd:lam=1,rlsd:lam=1.0", "rlsd:eps_w=0.2,rlsd"])
def test_duplicate_methods_are_refused(capsys, methods):
    err = _error(capsys, ["--methods", methods])
    assert "same run" in err or "given twice" in err


@pytest.mark.parametrize("argv, words", [
    (["--trainer", "trl", "--methods", "opsd"], "--trainer trl"),
    (["--trainer", "trl", "--methods", "rlsd:eps_w_high=1"], "--trainer trl"),
    (["--trainer", "trl", "--rollout", "vllm"], "--rollout vllm"),
])
def test_unsupported_combinations_are_refused(capsys, argv, words):
    assert words in _error(capsys, argv)


def _cfg(out, **rl):
    return study.StudyConfig(tasks=["add3"], methods=["grpo"], seeds=[0], rl=RLConfig(steps=2, **rl), out=str(out))


def _write_run(cfg, rows, settings=True):
    path = study._run_path(cfg, "add3", "grpo", 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["task", "method", "seed", "rollout", "step", "accuracy", "wall_s"])
        w.writeheader()
        for step in rows:
            w.writerow({"task": "add3", "method": "grpo", "seed": 0, "rollout": "builtin", "step": step,
                        "accuracy": 0.5, "wall_s": 1.0})
    if settings:
        with open(path[: -len(".csv")] + ".settings.json", "w") as f:
            json.dump({"settings": study.run_settings(cfg, "add3", "grpo", 0)}, f)
    return path


def test_run_done_needs_a_complete_csv(tmp_path):
    cfg = _cfg(tmp_path)
    path = _write_run(cfg, [0, 1, 2])
    assert study.run_done(path, 2) and not study.run_done(path, 3)
    text = open(path).read()
    for broken in ["", text.splitlines()[0] + "\n", text[:-12], text.replace(",2,0.5", ",2x,0.5")]:
        with open(path, "w") as f:
            f.write(broken)
        assert not study.run_done(path, 2), broken
    assert not study.run_done(str(tmp_path / "missing.csv"), 2)


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "a.csv")
    study._write_atomic(path, lambda f: f.write("old"))

    def fail(f):
        f.write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        study._write_atomic(path, fail)
    assert open(path).read() == "old"


def test_resume_keeps_runs_with_the_same_settings_only(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    _write_run(cfg, [0, 1, 2])
    study.check_kept(cfg)  # same settings: kept
    with pytest.raises(study.SettingsMismatch, match=r"rl\.lr: kept 0\.0001, now 0\.001"):
        study.check_kept(_cfg(tmp_path, lr=1e-3))
    longer = _cfg(tmp_path)
    longer.rl.steps = 3
    with pytest.raises(study.SettingsMismatch, match=r"rl\.steps: kept 2, now 3"):
        study.check_kept(longer)
    _write_run(cfg, [0, 1, 2], settings=False)
    os.remove(str(tmp_path / "runs" / "add3__grpo__seed0.settings.json"))
    study.check_kept(cfg)  # made before settings were recorded (the committed study): kept, with a warning
    assert "add3__grpo__seed0.csv" in capsys.readouterr().err


def test_resume_refuses_a_warm_start_made_with_other_settings(tmp_path):
    cfg = _cfg(tmp_path)
    os.makedirs(tmp_path / "warm")
    with open(tmp_path / "warm" / "add3-seed0.json", "w") as f:
        json.dump({"task": "add3", "settings": study.warm_settings(cfg, "add3", 0)}, f)
    study.check_kept(cfg)
    cfg.warm_lr = 1e-2
    with pytest.raises(study.SettingsMismatch, match="warm_lr"):
        study.check_kept(cfg, warm_only=True)


def _tiny_policy():
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = make_model(make_config(tok.vocab_size, hidden=32, layers=1, heads=1), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return tok, model


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_losses_score_at_the_sampling_temperature(temperature):
    """The built-in sampler's log-probs (after the temperature) as the rollout's: on-policy, weight 1."""
    tok, model = _tiny_policy()
    problems = tasks.make_split(tasks.make_task("add3"), 8, 2).train
    prompt_ids = data.prompts(tok, problems)
    ro = sample(model, prompt_ids, 12, temperature=temperature, generator=torch.Generator().manual_seed(0))
    logits = data.response_logits(model, prompt_ids, ro.tokens)[ro.mask]
    adv = torch.linspace(-1, 1, len(problems))[:, None].expand_as(ro.tokens)[ro.mask]
    _, metrics, _ = method_loss(parse_method("grpo"), 0, logits, None, ro.tokens[ro.mask], adv,
                                ro.logprobs[ro.mask], temperature=temperature)
    assert float(metrics["is_weight_mean"]) == pytest.approx(1.0, abs=1e-4)


def test_train_passes_the_rollout_temperature(monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("temperature"))
        return method_loss(*args, **kwargs)

    monkeypatch.setattr(train_mod, "method_loss", spy)
    tok, model = _tiny_policy()
    split = tasks.make_split(tasks.make_task("add3"), 8, 2)
    cfg = RLConfig(steps=1, prompts_per_step=2, group=2, temperature=0.7, num_eval=2, eval_sampled=False)
    train_mod.train(model, tok, split, parse_method("grpo"), cfg, seed=0)
    assert seen == [0.7]


def test_report_only_names_a_bad_folder_without_a_traceback(tmp_path, capsys):
    """``--report-only`` on a folder without runs, or with a malformed run CSV, ended in a traceback."""
    with pytest.raises(SystemExit, match="error: no run CSVs"):
        main(["--out", str(tmp_path), "--report-only"])
    runs = tmp_path / "runs"
    runs.mkdir()
    rows = "task,method,seed,step,accuracy\nadd3,grpo,0,x,0.5\nadd3,grpo,0,1,0.5\n"
    (runs / "add3__grpo__seed0.csv").write_text(rows)
    with pytest.raises(SystemExit, match="error: .*add3__grpo__seed0.csv"):
        main(["--out", str(tmp_path), "--report-only"])
