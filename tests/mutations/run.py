"""Mutation check of the test suite: small plausible changes to the library, one at a time, each in
the reference and the kernels alike where that applies, against a targeted fast subset of tests.

Each mutation copies the work tree to a temporary folder, replaces each of its code snippets (found
by searching every ``.py`` file under ``rlsd_kernels/``, so that it survives files moving; a
snippet must occur exactly once in each file that holds it, and in exactly as many files as the
mutation says), runs its subset with ``pytest -x``, and the table says whether a test failed
(killed) or every test passed (SURVIVED). See ``tests/mutations/README.md``.

    python tests/mutations/run.py                 # every mutation
    python tests/mutations/run.py --only k2_no_half,cispo_unclipped_ratio
    python tests/mutations/run.py --list          # names, files patched and subsets
    python tests/mutations/run.py --baseline      # first run every subset unmutated (must pass)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "rlsd_kernels"
F = "tests/test_formulas.py"
FO = "tests/test_formulas_opsd.py"
R = "tests/test_regimes.py"


@dataclass
class Mutation:
    name: str
    what: str
    # Each edit is (snippet, replacement, number of files that must hold the snippet), or a list of
    # such alternatives (the code as it was, as it is after a refactor): the first that matches applies.
    edits: list
    tests: list  # pytest arguments: paths and -k expressions


MUTATIONS = [
    Mutation("k2_no_half", "k2 = d^2 instead of d^2 / 2 (derivative to match)", [
        ("kl, d_kl = 0.5 * d * d, -dd", "kl, d_kl = d * d, -2.0 * dd", 1),
        ("kl = 0.5 * d * d\n            d_kl = -d", "kl = d * d\n            d_kl = -2.0 * d", 1),
    ], [F, "-k", "k2"]),
    Mutation("k3_sign_flipped", "k3 of -d: exp(-d) + d - 1", [
        ("kl, d_kl = torch.exp(d) - d - 1.0, 1.0 - torch.exp(dd)",
         "kl, d_kl = torch.exp(-d) + d - 1.0, torch.exp(-dd) - 1.0", 1),
        ("e = tl.exp(d)\n            kl = e - d - 1.0\n            d_kl = 1.0 - e",
         "e = tl.exp(-d)\n            kl = e + d - 1.0\n            d_kl = e - 1.0", 1),
    ], [F, "-k", "k3"]),
    Mutation("k1_sign_flipped", "k1 = d instead of -d", [
        ("kl, d_kl = -d, torch.ones_like(dd)", "kl, d_kl = d, -torch.ones_like(dd)", 1),
        ("kl = -d\n            d_kl = tl.full(lp_s.shape, 1.0, tl.float32)",
         "kl = d\n            d_kl = tl.full(lp_s.shape, -1.0, tl.float32)", 1),
    ], [F, "-k", "k1"]),
    Mutation("cispo_unclipped_ratio", "CISPO with the raw ratio", [
        ("factor = clipped_ratio.detach() * a_hat", "factor = ratio.detach() * a_hat", 1),
        ("factor = clipped_ratio * a_hat", "factor = ratio * a_hat", 1),
    ], [F, "-k", "cispo"]),
    Mutation("eps_w_low_high_swapped", "eps_w_low and eps_w_high swapped", [
        ("log_lo = math.log1p(-(eps_w if eps_w_low is None else eps_w_low))",
         "log_lo = math.log1p(-(eps_w if eps_w_high is None else eps_w_high))", 1),
        ("log_hi = math.log1p(eps_w if eps_w_high is None else eps_w_high)",
         "log_hi = math.log1p(eps_w if eps_w_low is None else eps_w_low)", 1),
        [("eps_w_low=float(eps_w if eps_w_low is None else eps_w_low),\n"
          "        eps_w_high=float(eps_w if eps_w_high is None else eps_w_high)",
          "eps_w_low=float(eps_w if eps_w_high is None else eps_w_high),\n"
          "        eps_w_high=float(eps_w if eps_w_low is None else eps_w_low)", 1),
         ("math.log1p(-options.eps_w_low), math.log1p(options.eps_w_high)",
          "math.log1p(-options.eps_w_high), math.log1p(options.eps_w_low)", 1)],
    ], [F, "-k", "asymmetric"]),
    Mutation("credit_base_old_ignored", "credit_base='old' uses the current log-prob", [
        ('delta = _log_diff(lp_teacher, old if credit_base == "old" else lp_s)',
         "delta = _log_diff(lp_teacher, lp_s)", 1),
        ("if CREDIT_OLD:\n        delta = log_diff(lp_t, lp_old)",
         "if CREDIT_OLD:\n        delta = log_diff(lp_t, lp_s)", 1),
    ], [F, "-k", "credit_base"]),
    Mutation("sequence_tis_mean", "sequence-level TIS as a mean of log-ratios instead of a sum", [
        ("log_seq_is = per_sequence(_log_diff(old_value, rollout), mean=False)",
         "log_seq_is = per_sequence(_log_diff(old_value, rollout), mean=True)", 1),
        [('return sequence_sums(x, inputs["seq_ids"], num_seqs)',
          'return sequence_sums(x, inputs["seq_ids"], num_seqs) / sequence_sums(valid.float(), inputs["seq_ids"], '
          "num_seqs).clamp(min=1)", 1),
         ("return sequence_sums(x, inputs.seq_ids, num_seqs)",
          "return sequence_sums(x, inputs.seq_ids, num_seqs) / sequence_sums(valid.float(), inputs.seq_ids, "
          "num_seqs).clamp(min=1)", 1)],
    ], [F, "-k", "sequence_tis"]),
    Mutation("sequence_ratio_sum", "GSPO ratio from a sum of log-ratios instead of a mean", [
        ("log_seq_ratio = per_sequence(_log_diff(lp_s.detach(), old_value), mean=True)",
         "log_seq_ratio = per_sequence(_log_diff(lp_s.detach(), old_value), mean=False)", 1),
        [('inputs["seq_ratio"] = sums / torch.where(counts != 0, counts, 1.0)', 'inputs["seq_ratio"] = sums', 1),
         ('changes["seq_ratio"] = sums / torch.where(counts != 0, counts, 1.0)', 'changes["seq_ratio"] = sums', 1)],
    ], [F, "-k", "sequence_ratio"]),
    Mutation("tis_uncapped", "truncated importance weight without its cap", [
        ("is_weight = torch.exp(log_is.clamp(max=math.log(tis_cap)))", "is_weight = torch.exp(log_is)", 1),
        [("is_weight = tl.exp(nan_min(log_is, log_tis_cap))", "is_weight = tl.exp(log_is)", 1),
         ("is_weight = tl.exp(tl.minimum(log_is, log_tis_cap))", "is_weight = tl.exp(log_is)", 1)],
    ], [F, "-k", "tis"]),
    Mutation("no_dual_clip", "the dual clip never binds", [
        ("dual = (a_hat < 0) & (loss_pg > bound)", "dual = (a_hat < 0) & (loss_pg > bound) & (a_hat > 0)", 1),
        ("dual = (a_hat < 0) & (loss > bound)", "dual = (a_hat < 0) & (loss > bound) & (a_hat > 0)", 1),
    ], [F, "-k", "ppo"]),
    Mutation("ppo_bounds_swapped", "PPO clip range [1 - clip_high, 1 + clip_low]", [
        ("clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)",
         "clipped_ratio = ratio.clamp(1.0 - clip_high, 1.0 + clip_low)", 1),
        [("clipped_ratio = nan_clamp(ratio, 1.0 - clip_lo, 1.0 + clip_hi)",
          "clipped_ratio = nan_clamp(ratio, 1.0 - clip_hi, 1.0 + clip_lo)", 1),
         ("clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - clip_lo), 1.0 + clip_hi)",
          "clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - clip_hi), 1.0 + clip_lo)", 1)],
    ], [F, "-k", "ppo"]),
    Mutation("lam_mix_swapped", "credit = lam + (1 - lam) * w", [
        ("credit = (1.0 - lam) + lam * weight", "credit = lam + (1.0 - lam) * weight", 2),
    ], [F, "-k", "lam"]),
    Mutation("credit_negative_only_ignored", "credit_negative_only reweights every token", [
        ("credit_on = credit_on & (adv < 0)", "credit_on = credit_on", 1),
        [('inputs["credit"] = credit * (inputs["adv"] < 0) if credit_negative_only else credit',
          'inputs["credit"] = credit', 1),
         ("credit = credit * (adv < 0) if options.credit_negative_only else credit", "credit = credit", 1)],
    ], [F, "-k", "negative_only"]),
    Mutation("entropy_bonus_sign", "the entropy term added instead of subtracted (loss only)", [
        ("loss = loss - entropy_coef * entropy", "loss = loss + entropy_coef * entropy", 2),
    ], [F, "-k", "entropy"]),
    Mutation("chunk_restarts_at_row_start", "the PyTorch path reads every chunk from the row start", [
        ("views = [x[b, t0:t1] if x.dim() == 3 else x[t0:t1] for x in tensors]",
         "views = [x[b, 0:t1 - t0] if x.dim() == 3 else x[0:t1 - t0] for x in tensors]", 1),
    ], [R, "-k", "torch and every_regime"]),
    Mutation("student_row_off_by_one", "every student row read from one column late (both kernels)", [
        ("s_row = S + b * stride_sb + t * stride_st\n        t_row = T + b * stride_tb + t * stride_tt\n"
         "        wt = tl.load(weight + row)",
         "s_row = S + b * stride_sb + t * stride_st + 1\n        t_row = T + b * stride_tb + t * stride_tt\n"
         "        wt = tl.load(weight + row)", 2),
    ], [R, "-k", "triton and every_regime and ppo or triton and opsd_with_finite and reverse"]),
    Mutation("student_mask_over_read", "the student block mask reads one column past the row", [
        ('zs_next = tl.load(s_row + cols, mask=cols < read_end, other=float("-inf"), eviction_policy="evict_last")',
         'zs_next = tl.load(s_row + cols, mask=cols <= read_end, other=float("-inf"), eviction_policy="evict_last")',
         1),
    ], [R, "-k", "triton"]),
    Mutation("token_clip_ignored", "full-vocabulary token_clip never clips", [
        ("clipped = d.detach() > token_clip if token_clip is not None",
         "clipped = d.detach() > 1e30 if token_clip is not None", 1),
        ("return div.clamp(max=clip), torch.where(clipped, 0.0, 1.0), clipped",
         "return div, torch.ones_like(div), clipped & False", 1),
        [("opsd = nan_min(div, token_clip)\n            d_div = tl.where(clipped, 0.0, 1.0)",
          "opsd = div\n            d_div = tl.where(clipped, 1.0, 1.0)", 1),
         ("opsd = tl.minimum(div, token_clip)\n            d_div = tl.where(clipped, 0.0, 1.0)",
          "opsd = div\n            d_div = tl.where(clipped, 1.0, 1.0)", 1)],
    ], [FO, "-k", "divergence and True"]),
    Mutation("jsd_mixture_weights_swapped", "M = (1 - beta) T + beta S (reference and PyTorch path)", [
        ("torch.stack([b0 + math.log(beta), a0 + math.log1p(-beta)])",
         "torch.stack([b0 + math.log1p(-beta), a0 + math.log(beta)])", 1),
        ("torch.logaddexp(b + math.log(beta), a + math.log1p(-beta))",
         "torch.logaddexp(b + math.log1p(-beta), a + math.log(beta))", 1),
    ], [FO, "-k", "jsd-0.2 or jsd-0.9"]),
    Mutation("reverse_kl_grad_no_baseline", "reverse-KL gradient S * (a - b) without the - KL term (kernels)", [
        [("diff = torch.where((b == -math.inf) & (k[:, None] == math.inf), math.inf, (a - b) - k[:, None])",
          "diff = torch.where((b == -math.inf) & (k[:, None] == math.inf), math.inf, (a - b))", 1),
         ("return torch.where(s == 0, 0.0, s * ((a - b) - k[:, None]))",
          "return torch.where(s == 0, 0.0, s * (a - b))", 1)],
        [("diff = (a2 - b2) * LN2 - k\n", "diff = (a2 - b2) * LN2\n", 1),
         ("g = tl.where(s == 0.0, 0.0, s * ((a2 - b2) * LN2 - k))",
          "g = tl.where(s == 0.0, 0.0, s * ((a2 - b2) * LN2))", 1)],
    ], [FO, "-k", "reverse_kl"]),
    Mutation("sum_norm_without_length", "seq-mean-token-sum-norm divides by S instead of S * L", [
        ('denominator = num_seqs * max_len if loss_agg == "seq-mean-token-sum-norm" else num_seqs',
         "denominator = num_seqs", 1),
        ("return mask / _denominator(num_seqs * max_len, normalizer, mask)",
         "return mask / _denominator(num_seqs, normalizer, mask)", 1),
    ], [FO, "-k", "aggregation and sum-norm"]),
]


def apply(mutation: Mutation, tree: Path):
    """Patches the copy ``tree``; raises if a snippet is missing, repeated in a file, or held by
    another number of files than the mutation says (for every alternative of an edit)."""
    sources = sorted((tree / PACKAGE).rglob("*.py"))
    for edit in mutation.edits:
        alternatives = edit if isinstance(edit, list) else [edit]
        found, chosen = [], None
        for alternative in alternatives:
            snippet, n_files = alternative[0], alternative[2]
            holders = [p for p in sources if snippet in p.read_text()]
            found.append(f"{len(holders)} files (expected {n_files}) for:\n{snippet}\n"
                         f"  {[str(p.relative_to(tree)) for p in holders]}")
            if len(holders) == n_files:
                chosen = alternative
                break
        if chosen is None:
            raise SystemExit(f"{mutation.name}: no alternative of an edit matches:\n" + "\n".join(found))
        snippet, replacement, _ = chosen
        for path in holders:
            text = path.read_text()
            if text.count(snippet) != 1:
                raise SystemExit(f"{mutation.name}: snippet occurs {text.count(snippet)} times in "
                                 f"{path.relative_to(tree)}\n{snippet}")
            path.write_text(text.replace(snippet, replacement))


def copy_tree(dest: Path):
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "bench",
                                    "*.egg-info", "build", "dist")
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def run_tests(tree: Path, args: list, timeout: float):
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", time.time() - t0, ""
    last = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    # pytest: 0 all passed, 1 a test failed, 5 nothing collected, others an internal/usage error.
    verdict = {0: "SURVIVED", 1: "killed", 5: "NO TESTS"}.get(proc.returncode, f"ERROR rc={proc.returncode}")
    return verdict, time.time() - t0, last[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--baseline", action="store_true", help="run each subset unmutated first")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per subset (default 300)")
    args = parser.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {m.name for m in MUTATIONS}
        if unknown:
            raise SystemExit(f"unknown mutations: {sorted(unknown)}")
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.what}\n{'':32s} tests: {' '.join(m.tests)}")
        return 0
    rows, survived = [], 0
    with tempfile.TemporaryDirectory(prefix="rlsd-mutants-") as tmp:
        clean = Path(tmp) / "clean"
        copy_tree(clean)
        # Every snippet must be found before anything runs.
        for m in chosen:
            probe = Path(tmp) / "probe"
            shutil.copytree(clean / PACKAGE, probe / PACKAGE)
            apply(m, probe)
            shutil.rmtree(probe)
        if args.baseline:
            for subset in {tuple(m.tests) for m in chosen}:
                verdict, seconds, last = run_tests(clean, list(subset), args.timeout)
                print(f"baseline {' '.join(subset)}: {last} ({seconds:.0f} s)", flush=True)
                if verdict != "SURVIVED":
                    raise SystemExit("the unmutated tree fails a subset: fix that first")
        for m in chosen:
            tree = Path(tmp) / m.name
            copy_tree(tree)
            apply(m, tree)
            verdict, seconds, last = run_tests(tree, m.tests, args.timeout)
            shutil.rmtree(tree)
            survived += verdict != "killed"
            rows.append((m.name, verdict, seconds, last))
            print(f"{m.name:32s} {verdict:9s} {seconds:5.0f} s  {last}", flush=True)
    print("\n| mutation | result | seconds |\n|---|---|---|")
    for name, verdict, seconds, _ in rows:
        print(f"| {name} | {verdict} | {seconds:.0f} |")
    print(f"\n{len(rows) - survived} of {len(rows)} mutations killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
