"""Where the study runs: the device and attention flags, bfloat16 autocast for flash-attn, and (marked
``gpu``) a short study end to end on a GPU, through the Triton kernels."""

import contextlib
import csv
import importlib.util
import math

import pytest
import torch

from python.rlsd_study import __main__ as cli
from python.rlsd_study import model as M
from python.rlsd_study import train as train_module
from python.rlsd_study.methods import parse_method
from python.rlsd_study.study import StudyConfig, run_study
from python.rlsd_study.tasks import make_split, make_task
from python.rlsd_study.train import RLConfig, train


@pytest.mark.parametrize("cuda", [False, True])
def test_device_auto_follows_cuda(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert M.resolve_device("auto") == torch.device("cuda" if cuda else "cpu")
    assert M.resolve_device("cpu") == torch.device("cpu")


def test_device_errors_name_the_device(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda'.*no CUDA device"):
        M.resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be .*'gpu0'"):
        M.resolve_device("gpu0")
    # The command line fails before any work starts, as a usage error naming the flag.
    out = tmp_path / "unused"
    with pytest.raises(SystemExit):
        cli.main(["--device", "cuda:0", "--out", str(out)])
    assert "--device cuda:0" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("flash", [False, True])
def test_attention_auto_is_flash_attn_on_a_gpu_where_installed(monkeypatch, flash):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if flash else None) if name == "flash_attn" else real(name, *a))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert M.resolve_attention("auto", cuda) == ("flash_attention_2" if flash else "sdpa")
    assert M.resolve_attention("auto", cpu) == "sdpa"
    assert M.resolve_attention("eager", cpu) == "eager"
    with pytest.raises(ValueError, match="flash_attention_2.*CUDA device"):
        M.resolve_attention("flash_attention_2", cpu)
    if flash:
        assert M.resolve_attention("flash_attention_2", cuda) == "flash_attention_2"
    else:
        with pytest.raises(ValueError, match="not installed"):
            M.resolve_attention("flash_attention_2", cuda)
    with pytest.raises(ValueError, match="attention must be one of"):
        M.resolve_attention("flash", cpu)


def _tiny_model(attention="sdpa", device="cpu"):
    tok = M.CharTokenizer()
    return tok, M.make_model(M.make_config(tok.vocab_size, hidden=64, layers=1, heads=1), seed=0,
                             attn_implementation=attention, device=device)


def test_autocast_only_where_the_attention_needs_half_precision():
    _, model = _tiny_model()
    assert isinstance(M.autocast(model), contextlib.nullcontext)
    model.config._attn_implementation = "flash_attention_2"
    with M.autocast(model):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def _short_run(tok, model, method, steps=2):
    split = make_split(make_task("add3"), 64, 8)
    cfg = RLConfig(steps=steps, prompts_per_step=2, group=4, eval_every=steps, num_eval=4, eval_sampled=False)
    before = [p.detach().clone() for p in model.parameters()]
    rows = train(model, tok, split, parse_method(method), cfg, seed=0)
    moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    return rows, moved


@pytest.mark.parametrize("method", ["rlsd", "opsd"])
def test_training_under_bfloat16_autocast(monkeypatch, method):
    """The flash-attn path's precision on the CPU: bfloat16 logits from every forward pass (sampler,
    teacher, student) reach the fused losses; the loss stays finite and the weights move."""
    tok, model = _tiny_model()
    seen = []
    real_forward = model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        seen.append(out.logits.dtype)
        return out

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(M, "autocast", lambda m: torch.autocast("cpu", dtype=torch.bfloat16))
    # An untrained model is never right: reward responses by length parity, so groups have advantages.
    monkeypatch.setattr(train_module, "verify", lambda problem, text: len(text) % 2 == 0)
    rows, moved = _short_run(tok, model, method)
    assert seen and set(seen) == {torch.bfloat16}
    assert moved and math.isfinite(rows[-1]["loss"])


@pytest.mark.gpu
def test_short_study_on_a_gpu(tmp_path):
    """Warm start, the four methods and the report on CUDA: the losses run the Triton kernels."""
    cfg = StudyConfig(tasks=["add3"], methods=["grpo", "rlsd", "opsd", "grpo+opsd"], seeds=[0],
                      rl=RLConfig(steps=4, prompts_per_step=4, group=4, eval_every=2, num_eval=16),
                      out=str(tmp_path), num_train=256, num_test=16, warm_max_steps=20, warm_check_every=10,
                      device="cuda")
    paths, warm = run_study(cfg)
    assert len(paths) == 4 and 10 <= warm[0]["sft_steps"] <= 20
    for path in paths:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        assert [int(float(r["step"])) for r in rows] == [0, 2, 4]
        assert all(math.isfinite(float(r["loss"])) for r in rows[1:]), path


@pytest.mark.gpu
def test_training_on_a_gpu_keeps_every_tensor_there():
    tok, model = _tiny_model(device="cuda")
    rows, moved = _short_run(tok, model, "rlsd")
    assert next(model.parameters()).is_cuda and moved and math.isfinite(rows[-1]["loss"])
