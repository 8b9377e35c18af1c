"""The study program: task verifiers, the sampler against the model's forward, the teacher's layout,
GRPO advantages, method parsing, and (slow) a small study in which GRPO and RLSD improve held-out
accuracy over the warm start.
"""

import csv
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import rlsd_kernels
from python.rlsd_study import data, report, sft, tasks
from python.rlsd_study.methods import method_loss, parse_method
from python.rlsd_study.model import BOS, EOS, PAD, CharTokenizer, make_config, make_model
from python.rlsd_study.sampler import response_mask, sample
from python.rlsd_study.train import credit_sums, grpo_advantages, window_means

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = make_model(make_config(tok.vocab_size, hidden=64, layers=2, heads=2), seed=0)
    # Larger weights than the initialisation, so that log-probs are far from uniform.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.eval()


def test_add3_solution_and_verifier():
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randrange(1000), rng.randrange(1000)
        p = tasks.Add3.make(a, b)
        assert int(p.answer) == a + b and len(p.answer) == 4
        assert len(p.solution) + 1 == 33
        # The worked columns: digits, carry in, two-digit sum, carry out feeding the next column.
        carry = 0
        for i, col in enumerate(p.solution.split(">")[0].rstrip(";").split(";")):
            lhs, s = col.split("=")
            da, db, c = map(int, lhs.split("+"))
            assert (da, db, c) == ((a // 10**i) % 10, (b // 10**i) % 10, carry)
            assert int(s) == da + db + c
            carry = int(s) // 10
        assert tasks.verify(p, p.solution)
        wrong = f"{(a + b + 1) % 10000:04d}"
        assert not tasks.verify(p, p.solution.split(">")[0] + ">" + wrong)
    assert tasks.verify(tasks.Add3.make(1, 2), ">0003")
    assert not tasks.verify(tasks.Add3.make(1, 2), "0003")  # no final-answer marker
    assert not tasks.verify(tasks.Add3.make(1, 2), ">00030")


def test_chain_solution_and_verifier():
    task = tasks.make_task("chain", steps=13)
    everything = task.all_problems()
    assert len(everything) == len({p.question for p in everything}) == 800
    for p in everything[::37]:
        assert len(p.solution) + 1 == 13 * 8 + 3 >= 100
        start, rest = p.question.split(":*")
        m, c = map(int, rest.rstrip("=").split("+"))
        x = int(start)
        for _ in range(13):
            x = (x * m + c) % 10
        assert p.answer == str(x)
        assert tasks.verify(p, p.solution)
        assert not tasks.verify(p, p.solution[:-1] + str((x + 1) % 10))
    with pytest.raises(ValueError, match="steps"):
        tasks.make_task("chain", steps=0)
    with pytest.raises(ValueError, match="task must be"):
        tasks.make_task("sudoku")


def test_fib_solution_and_verifier():
    task = tasks.make_task("fib", steps=13)
    everything = task.all_problems()
    assert len(everything) == len({p.question for p in everything}) == 1000
    for p in everything[::37]:
        assert len(p.solution) + 1 == 13 * 8 + 3 >= 100
        ab, c = p.question.rstrip("=").split("+")
        a, b, c = int(ab[0]), int(ab[1]), int(c)
        for _ in range(13):
            a, b = b, (a + b + c) % 10
        assert p.answer == str(b)
        assert p.solution.startswith(f"{ab[0]}+{ab[1]}+{c}=")
        assert tasks.verify(p, p.solution)
        assert not tasks.verify(p, p.solution[:-1] + str((b + 1) % 10))
    with pytest.raises(ValueError, match="steps"):
        tasks.make_task("fib", steps=0)


def _sum_columns(solution):
    """``[(total, n, [(d1, d2, carry, s), ...]), ...]`` of a sum task's worked solution."""
    out = []
    for block in solution.split(">")[0].split(";")[:-1]:
        if ":" in block:
            head, block = block.split(":")
            total, n = map(int, head.split("+"))
            out.append((total, n, []))
        lhs, s = block.split("=")
        out[-1][2].append((*map(int, lhs.split("+")), int(s)))
    return out


def test_sum_solution_and_verifier():
    task = tasks.make_task("sum", terms=4)
    rng = random.Random(0)
    for _ in range(300):
        p = task.sample(rng)
        numbers = list(map(int, p.question.rstrip("=").split("+")))
        assert len(numbers) == 4 and all(0 <= n < 100 for n in numbers)
        assert p.answer == f"{sum(numbers):03d}" and len(p.solution) + 1 == 3 * 34 + 5 >= 100
        assert tasks.verify(p, p.solution)
        # Each addition restates the running total and the next number, then works its columns.
        total = numbers[0]
        blocks = _sum_columns(p.solution)
        assert len(blocks) == 3
        for (t, n, cols), nxt in zip(blocks, numbers[1:], strict=True):
            assert (t, n) == (total, nxt)
            carry = 0
            for i, (dt, dn, c, s) in enumerate(cols):
                assert (dt, dn, c) == ((total // 10**i) % 10, (n // 10**i) % 10, carry)
                assert s == dt + dn + c
                carry = s // 10
            total += n
        assert total == int(p.answer)
        # One digit slipped in the first column, then every later step right from the slipped total.
        first = p.solution[:34]  # the first addition: restated operands and three columns
        u = int(first[14])  # the low digit of its units column
        slipped_total = numbers[0] + numbers[1] - u + (u + 1) % 10
        rest, final = tasks.RunningSum.work(slipped_total, numbers[2:])
        response = first[:14] + str((u + 1) % 10) + first[15:] + rest + f">{final:03d}"
        assert len(response) == len(p.solution) and final != int(p.answer)
        assert not tasks.verify(p, response)
        assert not tasks.verify(p, p.solution[:-1] + str((int(p.answer[-1]) + 1) % 10))
    assert tasks.RunningSum.make([99] * 10).answer == "990"
    assert tasks.verify(tasks.RunningSum.make([1, 2]), ">003")
    assert not tasks.verify(tasks.RunningSum.make([1, 2]), ">03")
    with pytest.raises(ValueError, match="terms"):
        tasks.make_task("sum", terms=11)
    with pytest.raises(ValueError, match="numbers"):
        tasks.RunningSum.make([100, 1])


@pytest.mark.parametrize("name", ["add3", "chain", "fib", "sum"])
def test_split_is_disjoint_and_fixed(name):
    task = tasks.make_task(name)
    a = tasks.make_split(task, 300, 50)
    b = tasks.make_split(task, 300, 50)
    assert [p.question for p in a.test] == [p.question for p in b.test]
    assert len(a.test) == 50 and len(a.train) == 300
    assert not {p.question for p in a.train} & {p.question for p in a.test}


def test_tokenizer_round_trip(tok):
    p = tasks.Add3.make(123, 987)
    ids = tok.response(p.solution)
    assert ids[-1] == EOS and tok.decode(ids) == p.solution
    assert tok.decode(tok.encode(p.teacher_question())) == p.teacher_question()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("x")


def test_decoded_pad_or_bos_does_not_verify(tok):
    """A pad or begin-of-sequence id inside a response shows in its text, so the answer is wrong."""
    p = tasks.Add3.make(123, 456)
    assert tasks.verify(p, tok.decode(tok.encode(">0579") + [EOS, PAD, PAD]))
    for ids in (tok.encode(">05") + [PAD] + tok.encode("79"), tok.encode(">0") + [BOS] + tok.encode("579")):
        text = tok.decode(ids + [EOS])
        assert ("<pad>" in text or "<s>" in text) and not tasks.verify(p, text)


def test_warm_start_reports_each_step(tok, monkeypatch):
    """The warm start counts its steps: into ``progress`` where given, else into its own tqdm bar."""
    split = tasks.make_split(tasks.make_task("add3"), 40, 4)
    kwargs = {"target": 2.0, "max_steps": 3, "batch": 4, "check_every": 100, "num_check": 2, "log": lambda s: None}

    class Bar:
        made = []

        def __init__(self, total=None, **_):
            self.total, self.n, self.closed = total, 0, False
            Bar.made.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            self.closed = True

    counter = Bar()
    m = make_model(make_config(tok.vocab_size, hidden=32, layers=1, heads=1), seed=0)
    assert sft.warm_start(m, tok, split, progress=counter, **kwargs)["sft_steps"] == 3 and counter.n == 3
    monkeypatch.setattr("tqdm.tqdm", Bar)
    Bar.made.clear()
    sft.warm_start(m, tok, split, **kwargs)
    assert [(b.total, b.n, b.closed) for b in Bar.made] == [(3, 3, True)]


FIELDS = ["task", "method", "seed", "rollout", "step", "accuracy", "rollout_s", "teacher_s", "update_s", "lam",
          "credit_weight_nonzero"]


def _write_run(out, method, seed, curve, text=None):
    """A run CSV of ``(step, accuracy[, lam, credit weight])`` rows (or ``text`` as is) under ``out/runs``."""
    path = out / "runs" / f"add3__{method}__seed{seed}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is not None:
        path.write_text(text)
        return path
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for step, acc, *credit in curve:
            lam, weight = credit or ("", "")
            w.writerow({"task": "add3", "method": method, "seed": seed, "rollout": "builtin", "step": step,
                        "accuracy": acc, "rollout_s": 0.1, "teacher_s": 0.1, "update_s": 0.1, "lam": lam,
                        "credit_weight_nonzero": weight})
    return path


def _summary(out, method):
    return next(s for s in report.summarize(report.load_runs(str(out))) if s["method"] == method)


def test_report_says_when_there_is_no_grpo_run(tmp_path):
    _write_run(tmp_path, "rlsd", 0, [(0, 0.5), (10, 0.6), (20, 0.7)])
    text = report.write_report(str(tmp_path))
    assert "| no GRPO run |" in text and "not reached" not in text


def test_report_final_is_taken_at_the_step_all_seeds_have(tmp_path, capsys):
    """Seeds of different lengths (a resume with another ``--steps``): every seed's final at the last
    step they share, never above the seed-mean peak, with a warning and a mark in the table."""
    _write_run(tmp_path, "grpo", 0, [(0, 0.5), (10, 0.6), (20, 0.7)])
    _write_run(tmp_path, "grpo", 1, [(0, 0.5), (10, 0.6), (20, 0.7), (30, 0.9), (40, 0.9)])
    s = _summary(tmp_path, "grpo")
    assert (s["final_acc"], s["last_step"], s["seed_last_steps"]) == (pytest.approx(0.65), 20, "20/40")
    assert s["final_acc"] <= s["peak_acc"]
    text = report.write_report(str(tmp_path))
    assert "0.650 ± 0.000 †" in text and "seeds end at steps 20/40" in text
    assert "add3 grpo: seeds end at steps 20/40" in capsys.readouterr().err


def test_report_final_leaves_out_the_warm_start(tmp_path):
    """With few evaluations the final is not pulled towards the step-0 value."""
    _write_run(tmp_path, "grpo", 0, [(0, 0.5), (40, 0.9)])
    _write_run(tmp_path, "rlsd", 0, [(0, 0.5), (20, 0.9), (40, 0.9)])
    for method, reach in (("grpo", 40), ("rlsd", 20)):
        s = _summary(tmp_path, method)
        assert (s["start_acc"], s["final_acc"], s["steps_to_grpo_final"]) == (0.5, pytest.approx(0.9), reach)


def test_report_credit_weight_only_where_lam_acts(tmp_path):
    """The credit weight is averaged over the windows with lam > 0; a window without a value is left out."""
    _write_run(tmp_path, "rlsd", 0, [(0, 0.5), (10, 0.6, 0.5, 1.2), (20, 0.6, 0.25, ""), (30, 0.6, 0.1, 1.1),
                                     (40, 0.7, 0.0, 1.01), (50, 0.7, 0.0, 1.01)])
    assert _summary(tmp_path, "rlsd")["credit_weight_nonzero"] == pytest.approx(1.15)


def test_window_credit_weight_counts_each_token_once():
    """A step without a token of non-zero advantage drops out of its window's credit weight (it once
    made the window's mean NaN); the others weigh by their token counts. Methods without credit: NaN."""
    def step(mean, count):
        metrics = {"credit_weight_nonzero": torch.tensor(mean), "credit_weight_mean": torch.tensor(mean),
                   "num_credit_tokens": torch.tensor(count)}
        return {"reward": 0.5, **credit_sums(metrics)}

    window = [step(1.2, 30), step(float("nan"), 0), step(1.0, 10)]
    means = window_means(window)
    assert means["credit_weight_nonzero"] == pytest.approx((1.2 * 30 + 1.0 * 10) / 40)
    assert means["reward"] == pytest.approx(0.5)
    assert math.isnan(window_means([step(float("nan"), 0)])["credit_weight_nonzero"])
    grpo = [{"reward": 1.0, **credit_sums({"policy_loss": torch.tensor(0.0)})}]
    assert math.isnan(window_means(grpo)["credit_weight_nonzero"]) and window_means([]) == {}


def test_report_skips_incomplete_runs_and_rejects_malformed_ones(tmp_path, capsys):
    good = _write_run(tmp_path, "grpo", 0, [(0, 0.5), (10, 0.6), (20, 0.7)]).read_text()
    lines = good.splitlines(keepends=True)
    for method, text, rows in (("cut", good[:-8], 2), ("empty", "", 0), ("header", lines[0], 0)):
        path = _write_run(tmp_path, method, 0, None, text=text)
        assert len(report.read_run(str(path))) == rows
        err = capsys.readouterr().err
        assert "warning" in err and str(path) in err
    assert report.read_run(str(tmp_path / "runs" / "add3__grpo__seed0.csv"))[-1]["step"] == 20
    bad = {
        "garbage": good.replace(",10,", ",1x,"),
        "nocolumn": "".join(",".join(c for i, c in enumerate(line.split(",")) if i != 2) for line in lines),
        "short": lines[0] + lines[1].split(",", 3)[0] + "\r\n" + "".join(lines[2:]),
        "halfstep": good.replace(",10,", ",10.5,"),
    }
    for method, text in bad.items():
        path = _write_run(tmp_path, method, 0, None, text=text)
        with pytest.raises(ValueError, match=str(path)):
            report.read_run(str(path))
        path.unlink()
    assert "| add3 | grpo | 1 |" in report.write_report(str(tmp_path))


def test_sampler_logprobs_match_forward(tok, model):
    """The KV-cache sampler's log-probs are the full forward pass's, token for token."""
    problems = tasks.make_split(tasks.make_task("add3"), 10, 6).train
    prompts = data.prompts(tok, problems).repeat(2, 1)
    for temperature in (1.0, 0.7):
        ro = sample(model, prompts, 12, temperature=temperature, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = data.response_logits(model, prompts, ro.tokens) / temperature
        lp = torch.log_softmax(logits.float(), -1).gather(-1, ro.tokens[..., None]).squeeze(-1)
        assert ro.mask.any()
        torch.testing.assert_close(ro.logprobs[ro.mask], lp[ro.mask], atol=1e-5, rtol=1e-5)
        assert (ro.logprobs[~ro.mask] == 0).all()
    greedy = sample(model, prompts, 12, greedy=True)
    with torch.no_grad():
        logits = data.response_logits(model, prompts, greedy.tokens)
    assert torch.equal(logits.argmax(-1)[greedy.mask], greedy.tokens[greedy.mask])


def test_response_mask_stops_after_eos():
    tokens = torch.tensor([[5, EOS, 0, 0], [5, 6, 7, 8], [EOS, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(response_mask(tokens), expected)


@pytest.mark.parametrize("teacher", [False, True])
def test_response_logits_align_with_prompt_end(tok, model, teacher):
    """Response token t is scored from the prefix ``prompt + response[:t]``, for either prompt."""
    problems = tasks.make_split(tasks.make_task("add3"), 4, 2).train
    prompts = data.prompts(tok, problems, teacher=teacher)
    response = data.references(tok, problems)[:, :6]
    with torch.no_grad():
        logits = data.response_logits(model, prompts, response)
        for t in range(response.shape[1]):
            prefix = torch.cat([prompts, response[:, :t]], 1)
            torch.testing.assert_close(logits[:, t], model(input_ids=prefix).logits[:, -1], atol=1e-5, rtol=1e-5)


def test_teacher_prompt_holds_question_then_reference(tok):
    p = tasks.Add3.make(405, 77)
    student = data.prompts(tok, [p])[0].tolist()
    teacher = data.prompts(tok, [p], teacher=True)[0].tolist()
    assert teacher[: len(student)] == student
    assert tok.decode(teacher).endswith(tasks.TEACHER_TAG + p.solution + "\n")


def test_grpo_advantages():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    adv = grpo_advantages(rewards, 4)
    assert adv[0] > 0 and (adv[1:4] < 0).all()
    assert torch.equal(adv[4:], torch.zeros(4))
    torch.testing.assert_close(adv[:4].sum(), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_parse_method():
    m = parse_method("rlsd:lam=1:eps_w=0.8")
    assert (m.base, m.lam, m.eps_w) == ("rlsd", 1.0, 0.8) and m.lam_at(500) == 1.0
    official = parse_method("rlsd")
    assert official.eps_w == 0.2 and official.lam_at(0) == 0.5 and official.lam_at(60) == 0.0
    assert parse_method("grpo").lam_at(0) == 0.0 and not parse_method("grpo").needs_teacher
    with pytest.raises(ValueError, match="method must start"):
        parse_method("ppo")
    with pytest.raises(ValueError, match="method option"):
        parse_method("rlsd:beta=2")


def test_method_eps_w_high_reaches_the_loss():
    """``eps_w_high`` widens the credit clip's upper side alone: the method's loss is ``rlsd_loss``
    with it, and differs from the symmetric clip's where a weight passes ``1 + eps_w``."""
    method = parse_method("rlsd:lam=1:eps_w=0.2:eps_w_high=4")
    assert (method.eps_w, method.eps_w_high, parse_method("rlsd").eps_w_high) == (0.2, 4.0, None)
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 11), torch.randn(6, 11) * 4
    tokens, adv = torch.randint(0, 11, (6,)), torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
    loss, metrics, _ = method_loss(method, 0, student, teacher, tokens, adv)
    wide = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, eps_w=0.2, eps_w_high=4.0, lam=1.0)
    narrow = rlsd_kernels.rlsd_loss(student, teacher, tokens, adv, eps_w=0.2, lam=1.0)
    torch.testing.assert_close(loss, wide)
    assert not torch.isclose(loss, narrow) and float(metrics["credit_weight_nonzero"]) > 1.2


@pytest.mark.slow
def test_small_study_improves_over_warm_start(tmp_path):
    """The ``ci`` preset end to end (CLI, warm start, RL, report): GRPO and RLSD beat the warm start."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "ci"
    proc = subprocess.run([sys.executable, "-m", "python.rlsd_study", "--preset", "ci", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "summary.csv") as f:
        summary = {row["method"]: row for row in csv.DictReader(f) if row["metric"] == "accuracy"}
    assert set(summary) == {"grpo", "rlsd"}
    for method, row in summary.items():
        start, final = float(row["start_acc"]), float(row["final_acc"])
        assert final >= start + 0.03, f"{method}: held-out accuracy {start:.3f} -> {final:.3f}"
    assert (out / "curves.png").stat().st_size > 0
    assert "| add3 | rlsd |" in proc.stdout
    # RLSD used the teacher's credit (lam > 0 in its first window, weights other than 1); GRPO had none.
    rlsd = report.read_run(str(out / "runs" / "add3__rlsd__seed0.csv"))
    assert rlsd[1]["lam"] > 0 and abs(rlsd[1]["credit_weight_nonzero"] - 1) > 1e-4
    grpo = report.read_run(str(out / "runs" / "add3__grpo__seed0.csv"))
    assert all(r["lam"] == 0 and r["credit_weight_nonzero"] != r["credit_weight_nonzero"] for r in grpo[1:])
