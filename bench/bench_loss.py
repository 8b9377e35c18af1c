#!/usr/bin/env python3
"""The fused RLSD loss from logits against the naive PyTorch loss and the peers, forward + backward.

First a correctness gate: the fused loss and student-logit gradient against the float64 reference
(on a sample of rows at GPU sizes). Then time (median and quantiles) and peak extra memory of each
provider on the same inputs, the bandwidth floors from the measured copy bandwidth, a table, and a
CSV under ``bench/results/<card>/``.

Defaults: on a GPU N = 8 x 1024 = 8192 tokens, V = 151,936 (Qwen), bf16, as in ``../shared/anchors``;
on CPU a small size through the chunked PyTorch path. ``TRITON_INTERPRET=1 ... --check-only`` checks
the Triton kernels themselves on CPU.

    python bench/bench_loss.py [--batch 8 --seqlen 1024 --vocab 151936] [--out DIR] [--check-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import rlsd_kernels  # noqa: E402
from rlsd_kernels import reference  # noqa: E402


def naive_token_logprobs(logits, tokens):
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def naive_rlsd(student, teacher, tokens, old, adv_tok, mask, eps_w=0.2, lam=1.0, clip_low=0.2, clip_high=0.28):
    """What a user writes today (the anchors' naive loss): fp32 log-softmax of both, weights, clipped PG."""
    lp_s = naive_token_logprobs(student, tokens)
    with torch.no_grad():
        lp_t = naive_token_logprobs(teacher, tokens)
        w = torch.exp(torch.sign(adv_tok) * (lp_t - lp_s.detach())).clamp(1 - eps_w, 1 + eps_w)
        a = adv_tok * ((1 - lam) + lam * w)
    ratio = torch.exp(lp_s - old)
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    pg = torch.where((a < 0) & (pg > -3.0 * a), -3.0 * a, pg)
    return (pg * mask).sum() / mask.sum()


def make_inputs(batch, seqlen, vocab, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    s_full = (torch.randn(batch, seqlen + 1, vocab, device=device, generator=g) * 2).to(dtype)
    t_full = (torch.randn(batch, seqlen + 1, vocab, device=device, generator=g) * 2).to(dtype)
    tokens = torch.randint(0, vocab, (batch, seqlen), device=device, generator=g)
    adv = torch.randn(batch, device=device, generator=g)
    mask = (torch.rand(batch, seqlen, device=device, generator=g) > 0.1).float()
    with torch.no_grad():
        old = rlsd_kernels.token_logprobs(s_full[:, :-1], tokens)
        old += 0.01 * torch.randn(batch, seqlen, device=device, generator=g)
    return s_full, t_full, tokens, adv, mask, old


def check(s_full, t_full, tokens, adv, mask, old, rows=64) -> dict:
    """Loss and gradient of the fused op against the float64 reference on a sample of sequences."""
    b = min(s_full.shape[0], 2)
    t = min(s_full.shape[1] - 1, rows)
    s = s_full[:b, : t + 1].detach()
    x = s.clone().requires_grad_()
    loss = rlsd_kernels.rlsd_loss(x[:, :-1], t_full[:b, :-1][:, :t], tokens[:b, :t], adv[:b],
                                  old_logprobs=old[:b, :t], mask=mask[:b, :t])
    loss.backward()
    y = s.double().requires_grad_()
    ref = reference.rlsd_loss(y[:, :-1], t_full[:b, :-1][:, :t].double(), tokens[:b, :t], adv[:b].double(),
                              old_logprobs=old[:b, :t].double(), mask=mask[:b, :t])
    ref.backward()
    loss_err = abs(float(loss.detach()) - float(ref.detach())) / max(abs(float(ref.detach())), 1e-12)
    grad_err = float((x.grad.double() - y.grad).norm() / y.grad.norm().clamp(min=1e-30))
    limit = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[s.dtype]
    ok = loss_err < 1e-4 and grad_err < limit
    return {"loss_rel_err": loss_err, "grad_rel_err": grad_err, "ok": ok}


def providers(s_full, t_full, tokens, adv, mask, old, *, compile_naive=True):
    """name -> (function running forward + backward, description)."""
    batch, seqlen = tokens.shape
    vocab = s_full.shape[-1]
    adv_tok = adv[:, None].expand(batch, seqlen)
    out = {}

    def naive():
        loss = naive_rlsd(s_full[:, :-1], t_full[:, :-1], tokens, old, adv_tok, mask)
        return torch.autograd.grad(loss, [s_full])

    out["naive_eager"] = (naive, "fp32 log_softmax + gather of both models, then the loss")
    if compile_naive:
        compiled = torch.compile(naive_rlsd)

        def naive_compiled():
            loss = compiled(s_full[:, :-1], t_full[:, :-1], tokens, old, adv_tok, mask)
            return torch.autograd.grad(loss, [s_full])

        out["naive_compile"] = (naive_compiled, "the naive loss under torch.compile")

    def ours_view():
        loss = rlsd_kernels.rlsd_loss(s_full[:, :-1], t_full[:, :-1], tokens, adv, old_logprobs=old, mask=mask)
        return torch.autograd.grad(loss, [s_full])

    out["rlsd_kernels"] = (ours_view, "fused, logits[:, :-1] views as the peers get them")

    # Packed [N, V] logits with the gradient returned to the caller: what the memory targets are about
    # (a [:, :-1] view makes autograd allocate a zero-filled [B, T+1, V] gradient outside the op).
    s_packed = s_full[:, :-1].reshape(-1, vocab).detach().clone().requires_grad_()
    t_packed = t_full[:, :-1].reshape(-1, vocab)
    flat = dict(old_logprobs=old.reshape(-1), mask=mask.reshape(-1))

    def ours_packed():
        loss = rlsd_kernels.rlsd_loss(s_packed, t_packed, tokens.reshape(-1), adv_tok.reshape(-1), **flat)
        return torch.autograd.grad(loss, [s_packed])

    out["rlsd_kernels_packed"] = (ours_packed, "fused, packed [N, V], gradient returned")
    if s_full.is_cuda:
        scratch = s_packed.detach().clone()

        def ours_inplace():
            # Each call overwrites the logits with their gradient, which the next call then reads as
            # logits: the work and the bytes moved are the same, only the values differ.
            x = scratch.requires_grad_()
            loss = rlsd_kernels.rlsd_loss(x, t_packed, tokens.reshape(-1), adv_tok.reshape(-1),
                                          inplace_backward=True, **flat)
            return torch.autograd.grad(loss, [x])

        out["rlsd_kernels_inplace"] = (ours_inplace, "fused, packed, gradient written into the logits")
    return out


def liger_providers(s_full, t_full, tokens, adv, mask, old):
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as e:
        print(f"liger-kernel not importable ({e}); skipping its rows")
        return {}

    def liger_grpo():
        loss, _ = triton_grpo_loss(s_full, old, None, tokens, adv, mask, temperature=1.0, beta=0.0, eps_low=0.2,
                                   eps_high=0.28, inplace=False, loss_type="dapo", reduce=True)
        return torch.autograd.grad(loss, [s_full])

    def liger_teacher():
        with torch.no_grad():
            return fused_selective_log_softmax(t_full, tokens, temperature=1.0, mask=mask)

    return {
        "liger_grpo_student_only": (liger_grpo, "Liger triton_grpo_loss, student only: no teacher, no RLSD"),
        "liger_teacher_logprobs": (liger_teacher, "Liger selective log-softmax of the teacher, no grad"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, default=8 if gpu else 4)
    parser.add_argument("--seqlen", type=int, default=1024 if gpu else 256)
    parser.add_argument("--vocab", type=int, default=151936 if gpu else 8192)
    parser.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--out", default=None, help="folder for the CSV (default bench/results/<card>/)")
    parser.add_argument("--check-only", action="store_true", help="only the correctness gate")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the naive loss")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device("cuda" if gpu else "cpu")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    path = "Triton kernels" + (" (interpreter)" if interpret else "") if gpu or interpret else "CPU path"
    info = common.device_info()
    n = args.batch * args.seqlen
    print(f"rlsd_loss, logits form: N = {n}, V = {args.vocab}, {args.dtype}, on {info['device']} ({path})")

    inputs = make_inputs(args.batch, args.seqlen, args.vocab, dtype, device)
    if interpret and not gpu:
        from rlsd_kernels._utils import backend

        with backend("triton"):
            gate = check(*inputs, rows=16)
    else:
        gate = check(*inputs)
    print(f"correctness gate vs float64 reference: loss rel err {gate['loss_rel_err']:.2e}, "
          f"grad rel err {gate['grad_rel_err']:.2e} -> {'ok' if gate['ok'] else 'FAILED'}")
    if not gate["ok"]:
        raise SystemExit("correctness gate failed: nothing timed")
    if args.check_only:
        return

    s_full = inputs[0].requires_grad_()
    table = providers(s_full, *inputs[1:], compile_naive=not args.no_compile)
    rows = []
    bytes_logits = n * args.vocab * s_full.element_size()
    floor = {}
    if gpu:
        table.update(liger_providers(s_full, *inputs[1:]))
        bw = common.copy_bandwidth_tbps()
        floor = {f"floor_{k}pass": k * bytes_logits / (bw * 1e12) * 1e3 for k in (3, 4)}
        print(f"copy bandwidth {bw:.2f} TB/s; floors: 3 passes {floor['floor_3pass']:.3f} ms, "
              f"4 passes {floor['floor_4pass']:.3f} ms")
    for name, (fn, what) in table.items():
        try:
            fn()  # warm-up: compilation and tuning stay out of the figures
            if gpu:
                timing = common.cuda_time_ms(fn)
                peak = common.peak_extra_gb(fn)
            else:
                timing = common.cpu_time_ms(fn, reps=3)
                peak = common.cpu_peak_extra_gb(fn)
            row = {"provider": name, "what": what, "n": n, "vocab": args.vocab, "dtype": args.dtype, **timing,
                   "peak_extra_gb": peak}
            if floor:
                row["x_floor_3pass"] = timing["ms"] / floor["floor_3pass"]
            rows.append(row)
        except Exception as e:  # one provider failing must not cost the others
            traceback.print_exc()
            rows.append({"provider": name, "what": f"FAILED: {type(e).__name__}: {str(e)[:200]}"})
        torch.cuda.empty_cache() if gpu else None
    for key, value in floor.items():
        rows.append({"provider": key, "what": "bytes over measured copy bandwidth", "n": n, "vocab": args.vocab,
                     "dtype": args.dtype, "ms": value})
    csv_path = common.write_csv(rows, "loss_logits", args.out)
    common.print_table(rows, ["provider", "ms", "ms_q20", "ms_q80", "peak_extra_gb", "x_floor_3pass"],
                       title=f"forward + backward, N = {n}, V = {args.vocab}, {args.dtype}, {info['device']}")
    print(f"\nwritten: {csv_path}")


if __name__ == "__main__":
    main()
