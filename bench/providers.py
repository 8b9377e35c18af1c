"""What the benchmarks put side by side, for both forms of the RLSD loss, and the correctness gate.

Two forms, each with inputs built here and the same list of providers:

- ``logits``: student logits ``[B, T+1, V]`` (a leaf with grad, as a causal LM head returns them;
  position ``T`` has no target) and teacher logits of the same shape, no grad.
- ``linear``: student hidden states ``[N, H]`` (grad), teacher hidden states (no grad) and the LM
  head weight ``[V, H]`` (grad); ``N = B * T`` tokens.

Providers are what a user can run today (the compositions of ``shared/anchors/peers_bench.py``)
and ours. A provider's ``make(inputs, backward)`` returns a function that runs the loss once, with
``torch.autograd.grad`` of the inputs it differentiates when ``backward`` (forward + backward), or
under ``torch.no_grad()`` otherwise (forward only), and returns ``(loss, grads)``. ``gate.py``
checks each against the float64 reference before anything is timed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
from common import Unavailable

import rlsd_kernels

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# The official RLSD recipe (rlsd_loss's defaults), spelled out for the naive compositions.
EPS_W, CLIP_LOW, CLIP_HIGH, DUAL_CLIP = 0.2, 0.2, 0.28, 3.0
# Rows per chunk where inputs are built with naive log-probs (a float32 [rows, V] block at a time).
CHUNK_ROWS = 4096


def naive_token_logprobs(logits, tokens):
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def rlsd_from_logprobs(lp_s, lp_t, old, adv_tok, mask, lam=1.0):
    """The RLSD loss from per-token log-probs, as a user writes it: weights, clipped PG, dual clip, token-mean."""
    with torch.no_grad():
        w = torch.exp(torch.sign(adv_tok) * (lp_t - lp_s.detach())).clamp(1 - EPS_W, 1 + EPS_W)
        a = adv_tok * ((1 - lam) + lam * w)
    ratio = torch.exp(lp_s - old)
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH) * a)
    pg = torch.where((a < 0) & (pg > -DUAL_CLIP * a), -DUAL_CLIP * a, pg)
    return (pg * mask).sum() / mask.sum()


def naive_rlsd(student, teacher, tokens, old, adv_tok, mask):
    """The anchors' naive loss: fp32 log-softmax + gather of both models, then the loss."""
    lp_s = naive_token_logprobs(student, tokens)
    with torch.no_grad():
        lp_t = naive_token_logprobs(teacher, tokens)
    return rlsd_from_logprobs(lp_s, lp_t, old, adv_tok, mask)


def naive_linear_rlsd(hidden, teacher_hidden, weight, tokens, old, adv_tok, mask):
    """Materialised logits of both models (the teacher's without grad), then the naive loss."""
    with torch.no_grad():
        teacher = teacher_hidden @ weight.T
    return naive_rlsd(hidden @ weight.T, teacher, tokens, old, adv_tok, mask)


@functools.cache
def compiled(fn):
    """``torch.compile`` of a naive loss, once per process; dynamic shapes, as a sweep over sizes gets them."""
    return torch.compile(fn, dynamic=True)


@dataclass
class LogitsInputs:
    student: torch.Tensor  # [B, T+1, V], leaf with grad
    teacher: torch.Tensor  # [B, T+1, V]
    tokens: torch.Tensor  # [B, T]
    adv: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, T] float
    old: torch.Tensor  # [B, T]
    form = "logits"

    @property
    def batch(self):
        return self.tokens.shape[0]

    @property
    def seqlen(self):
        return self.tokens.shape[1]

    @property
    def n(self):
        return self.tokens.numel()

    @property
    def vocab(self):
        return self.student.shape[-1]

    @property
    def hidden(self):
        return None

    @property
    def adv_tok(self):
        return self.adv[:, None].expand(self.batch, self.seqlen)

    def head(self, batch, seqlen) -> LogitsInputs:
        """The first ``batch`` sequences' first ``seqlen`` tokens, as contiguous copies (for the gate)."""
        b, t = min(batch, self.batch), min(seqlen, self.seqlen)
        return LogitsInputs(
            self.student.detach()[:b, : t + 1].clone().requires_grad_(), self.teacher[:b, : t + 1].clone(),
            self.tokens[:b, :t].clone(), self.adv[:b].clone(), self.mask[:b, :t].clone(), self.old[:b, :t].clone(),
        )

    def clone(self) -> LogitsInputs:
        return dataclasses.replace(self, student=self.student.detach().clone().requires_grad_())


@dataclass
class LinearInputs:
    hidden_states: torch.Tensor  # [N, H], leaf with grad
    teacher_hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H], leaf with grad
    tokens: torch.Tensor  # [N]
    adv: torch.Tensor  # [B], one advantage per sequence of ``seqlen`` tokens
    mask: torch.Tensor  # [N] float
    old: torch.Tensor  # [N]
    seqlen: int
    form = "linear"

    @property
    def batch(self):
        return self.adv.shape[0]

    @property
    def n(self):
        return self.tokens.numel()

    @property
    def vocab(self):
        return self.weight.shape[0]

    @property
    def hidden(self):
        return self.weight.shape[1]

    @property
    def student(self):
        return self.hidden_states

    @property
    def adv_tok(self):
        return self.adv.repeat_interleave(self.seqlen)

    def head(self, batch, seqlen) -> LinearInputs:
        """The first ``batch`` sequences' first ``seqlen`` tokens (the weight is shared, not copied)."""
        b, t = min(batch, self.batch), min(seqlen, self.seqlen)
        rows = (torch.arange(b, device=self.tokens.device)[:, None] * self.seqlen
                + torch.arange(t, device=self.tokens.device)).reshape(-1)
        return LinearInputs(
            self.hidden_states.detach()[rows].requires_grad_(), self.teacher_hidden[rows], self.weight,
            self.tokens[rows], self.adv[:b].clone(), self.mask[rows], self.old[rows], t,
        )

    def clone(self) -> LinearInputs:
        return dataclasses.replace(self, hidden_states=self.hidden_states.detach().clone().requires_grad_())


def _near(lp):
    """Behaviour-policy log-probs near the student's: its own plus a little noise (ratios near 1)."""
    return lp + 0.01 * torch.randn(lp.shape, device=lp.device, generator=_generator(lp.device, 1))


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def make_logits_inputs(batch, seqlen, vocab, dtype, device, seed=0) -> LogitsInputs:
    """Logits of std 2 in ``dtype`` (drawn in ``dtype``: no float32 copy of ``[B, T+1, V]``)."""
    g = _generator(device, seed)
    shape = (batch, seqlen + 1, vocab)
    student = torch.randn(shape, device=device, dtype=dtype, generator=g).mul_(2).requires_grad_()
    teacher = torch.randn(shape, device=device, dtype=dtype, generator=g).mul_(2)
    tokens = torch.randint(0, vocab, (batch, seqlen), device=device, generator=g)
    adv = torch.randn(batch, device=device, generator=g)
    mask = (torch.rand(batch, seqlen, device=device, generator=g) > 0.1).float()
    old = torch.empty(batch, seqlen, device=device)
    with torch.no_grad():
        rows = student[:, :-1]
        for i in range(batch):
            for t in range(0, seqlen, CHUNK_ROWS):
                chunk = slice(t, t + CHUNK_ROWS)
                old[i, chunk] = naive_token_logprobs(rows[i, chunk], tokens[i, chunk])
    return LogitsInputs(student, teacher, tokens, adv, mask, _near(old))


def make_linear_inputs(batch, seqlen, vocab, hidden, dtype, device, seed=0) -> LinearInputs:
    """Hidden states of std 1 and a head weight of std ``H ** -0.5``: logits of std about 1."""
    g = _generator(device, seed)
    n = batch * seqlen
    h = torch.randn(n, hidden, device=device, dtype=dtype, generator=g).requires_grad_()
    ht = torch.randn(n, hidden, device=device, dtype=dtype, generator=g)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=g).mul_(hidden**-0.5).requires_grad_()
    tokens = torch.randint(0, vocab, (n,), device=device, generator=g)
    adv = torch.randn(batch, device=device, generator=g)
    mask = (torch.rand(n, device=device, generator=g) > 0.1).float()
    old = torch.empty(n, device=device)
    with torch.no_grad():
        for t in range(0, n, CHUNK_ROWS):
            chunk = slice(t, t + CHUNK_ROWS)
            old[chunk] = naive_token_logprobs(h[chunk] @ w.T, tokens[chunk])
    return LinearInputs(h, ht, w, tokens, adv, mask, _near(old), seqlen)


def make_inputs(form, batch, seqlen, vocab, hidden, dtype, device, seed=0):
    if form == "logits":
        return make_logits_inputs(batch, seqlen, vocab, dtype, device, seed)
    return make_linear_inputs(batch, seqlen, vocab, hidden, dtype, device, seed)


def input_gb(form, batch, seqlen, vocab, hidden, elem_bytes) -> float:
    """Bytes the inputs hold (the logits, or the hidden states and the weight), in GB."""
    if form == "logits":
        return 2 * batch * (seqlen + 1) * vocab * elem_bytes / 1e9
    return (2 * batch * seqlen * hidden + vocab * hidden) * elem_bytes / 1e9


def work(form, mode, n, vocab, hidden, elem_bytes) -> dict:
    """The explicit byte (logits form) or FLOP (linear form) count behind every rate reported.

    Logits, forward + backward: read S, read T, write dS = ``3 N V`` elements (the three-pass
    floor); forward only: read S and T. Linear, forward + backward: ``8 N H V`` FLOP (student and
    teacher logits, then the gradients of the hidden states and of the weight); forward: ``4 N H V``.
    """
    if form == "logits":
        return {"bytes": (3 if mode == "fwd_bwd" else 2) * n * vocab * elem_bytes}
    return {"flop": (8 if mode == "fwd_bwd" else 4) * n * hidden * vocab}


def rates(form, mode, n, vocab, hidden, elem_bytes, ms, ceil) -> dict:
    """Achieved rate and its fraction of the card's measured copy bandwidth or matmul rate."""
    w = work(form, mode, n, vocab, hidden, elem_bytes)
    if ms is None or ms <= 0:
        return w
    if form == "logits":
        gbps = w["bytes"] / (ms * 1e-3) / 1e9
        return {**w, "gb_per_s": gbps, "frac_of_ceiling": gbps / (ceil["copy_tbps"] * 1e3)}
    tflops = w["flop"] / (ms * 1e-3) / 1e12
    return {**w, "tflop_per_s": tflops, "frac_of_ceiling": tflops / ceil["matmul_tflops"]}


def floor_ms(form, mode, n, vocab, hidden, elem_bytes, ceil) -> float:
    w = work(form, mode, n, vocab, hidden, elem_bytes)
    if form == "logits":
        return w["bytes"] / (ceil["copy_tbps"] * 1e12) * 1e3
    return w["flop"] / (ceil["matmul_tflops"] * 1e12) * 1e3


def _run(backward, loss_fn, wrt_fn):
    if not backward:
        with torch.no_grad():
            return loss_fn(), ()
    loss = loss_fn()
    return loss, torch.autograd.grad(loss, wrt_fn())


def _triton_runs_here(x):
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise Unavailable("its Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)")


def _liger_logits_ops():
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as e:
        raise Unavailable(f"liger-kernel is not installed ({e})") from None
    return fused_selective_log_softmax, triton_grpo_loss


@functools.cache
def _liger_linear_grpo():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        raise Unavailable(f"liger-kernel is not installed ({e})") from None
    return LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH,
                                    loss_type="dapo")


def _cce(device):
    """CCE's ``linear_cross_entropy`` and its implementation: its Triton kernels on CUDA; on CPU
    (dry runs only) its ``torch_compile`` implementation, since its kernels do not run under the interpreter."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Unavailable(f"cut-cross-entropy is not installed ({e})") from None
    return functools.partial(linear_cross_entropy, impl="cce" if device.type == "cuda" else "torch_compile")


def logits_naive_eager(inp, backward):
    s, t = inp.student, inp.teacher
    return lambda: _run(backward, lambda: naive_rlsd(s[:, :-1], t[:, :-1], inp.tokens, inp.old, inp.adv_tok,
                                                     inp.mask), lambda: [s])


def logits_naive_compile(inp, backward):
    fn = compiled(naive_rlsd)
    s, t = inp.student, inp.teacher
    return lambda: _run(backward, lambda: fn(s[:, :-1], t[:, :-1], inp.tokens, inp.old, inp.adv_tok, inp.mask),
                        lambda: [s])


def logits_liger(inp, backward):
    _triton_runs_here(inp.student)
    selective_log_softmax, grpo_loss = _liger_logits_ops()
    s = inp.student

    def loss_fn():
        # Liger takes the [B, T+1, V] logits and drops the last position itself.
        with torch.no_grad():
            selective_log_softmax(inp.teacher, inp.tokens, temperature=1.0, mask=inp.mask)
        loss, _ = grpo_loss(s, inp.old, None, inp.tokens, inp.adv, inp.mask, temperature=1.0, beta=0.0,
                            eps_low=CLIP_LOW, eps_high=CLIP_HIGH, inplace=False, loss_type="dapo", reduce=True)
        return loss

    return lambda: _run(backward, loss_fn, lambda: [s])


def logits_ours(inp, backward):
    s, t = inp.student, inp.teacher
    return lambda: _run(backward, lambda: rlsd_kernels.rlsd_loss(s[:, :-1], t[:, :-1], inp.tokens, inp.adv,
                                                                 old_logprobs=inp.old, mask=inp.mask),
                        lambda: [s])


def _rows_leaf(inp):
    # The [B, T, V] rows the loss reads, as a leaf sharing the logits' storage: the gradient
    # returned is exactly those rows', with no zero-filled [B, T+1, V] buffer around it.
    return inp.student.detach()[:, :-1].requires_grad_()


def logits_ours_rows(inp, backward):
    x = _rows_leaf(inp)
    return lambda: _run(backward, lambda: rlsd_kernels.rlsd_loss(x, inp.teacher[:, :-1], inp.tokens, inp.adv,
                                                                 old_logprobs=inp.old, mask=inp.mask),
                        lambda: [x])


def logits_ours_nosync(inp, backward):
    # validate=False: no device-to-host sync for the input checks, so host work overlaps the GPU's.
    x = _rows_leaf(inp)
    return lambda: _run(backward, lambda: rlsd_kernels.rlsd_loss(x, inp.teacher[:, :-1], inp.tokens, inp.adv,
                                                                 old_logprobs=inp.old, mask=inp.mask, validate=False),
                        lambda: [x])


def logits_ours_inplace(inp, backward):
    # Each call overwrites the logits with their gradient, which the next call reads as logits: the
    # work and the bytes moved are the same, only the values differ (so it runs after the others).
    x = _rows_leaf(inp)
    return lambda: _run(backward, lambda: rlsd_kernels.rlsd_loss(
        x, inp.teacher[:, :-1], inp.tokens, inp.adv, old_logprobs=inp.old, mask=inp.mask, inplace_backward=True),
        lambda: [x])


def linear_naive_eager(inp, backward):
    h, w = inp.hidden_states, inp.weight
    return lambda: _run(backward, lambda: naive_linear_rlsd(h, inp.teacher_hidden, w, inp.tokens, inp.old,
                                                            inp.adv_tok, inp.mask), lambda: [h, w])


def linear_naive_compile(inp, backward):
    fn = compiled(naive_linear_rlsd)
    h, w = inp.hidden_states, inp.weight
    return lambda: _run(backward, lambda: fn(h, inp.teacher_hidden, w, inp.tokens, inp.old, inp.adv_tok, inp.mask),
                        lambda: [h, w])


def linear_cce(inp, backward):
    lce = _cce(inp.weight.device)
    h, w = inp.hidden_states, inp.weight
    adv_tok = inp.adv_tok

    def loss_fn():
        lp_s = -lce(h, w, inp.tokens, reduction="none")
        with torch.no_grad():
            lp_t = -lce(inp.teacher_hidden, w, inp.tokens, reduction="none")
        return rlsd_from_logprobs(lp_s.float(), lp_t.float(), inp.old, adv_tok, inp.mask)

    return lambda: _run(backward, loss_fn, lambda: [h, w])


def linear_liger(inp, backward):
    lce = _cce(inp.weight.device)
    grpo = _liger_linear_grpo()
    h, w = inp.hidden_states, inp.weight
    b, t = inp.batch, inp.seqlen

    def loss_fn():
        out = grpo(h.view(b, t, -1), w, inp.tokens.view(b, t), inp.mask.view(b, t), inp.adv,
                   old_per_token_logps=inp.old.view(b, t))
        with torch.no_grad():
            lce(inp.teacher_hidden, w, inp.tokens, reduction="none")
        return out[0] if isinstance(out, tuple) else out

    return lambda: _run(backward, loss_fn, lambda: [h, w])


def linear_ours(inp, backward):
    fn = getattr(rlsd_kernels, "rlsd_linear_loss", None)
    if fn is None:
        raise Unavailable("rlsd_kernels.rlsd_linear_loss is not in this version")
    h, w = inp.hidden_states, inp.weight
    adv_tok = inp.adv_tok
    return lambda: _run(backward, lambda: fn(h, w, inp.tokens, adv_tok, teacher_hidden=inp.teacher_hidden,
                                             old_logprobs=inp.old, mask=inp.mask), lambda: [h, w])


@dataclass(frozen=True)
class Provider:
    name: str
    form: str
    make: object
    what: str
    ours: bool = False
    target: str = "rlsd"  # the gate's reference: "rlsd", or "grpo" (lam=0, no dual clip) for Liger's GRPO
    exact: bool = True  # False: logits rounded to the input dtype or a filtered backward (looser gate)
    modes: tuple = ("fwd_bwd", "fwd")
    clobbers: bool = False  # overwrites the student logits: measured last


PROVIDERS = [
    Provider("naive_eager", "logits", logits_naive_eager, "fp32 log_softmax + gather of both, weights, clipped PG"),
    Provider("naive_compile", "logits", logits_naive_compile, "the naive loss under torch.compile (dynamic shapes)"),
    Provider("liger", "logits", logits_liger, "Liger selective log-softmax of the teacher (no grad) + Liger "
             "triton_grpo_loss of the student: GRPO, no credit weights", target="grpo"),
    Provider("rlsd_kernels", "logits", logits_ours, "fused, on logits[:, :-1] views; gradient of the [B, T+1, V] "
             "logits, as the peers return it", ours=True),
    Provider("rlsd_kernels_rows", "logits", logits_ours_rows, "fused; gradient of the [B, T, V] rows the loss "
             "reads (no zero-filled [B, T+1, V] buffer)", ours=True, modes=("fwd_bwd",)),
    Provider("rlsd_kernels_nosync", "logits", logits_ours_nosync, "as rlsd_kernels_rows, with validate=False "
             "(no device-to-host sync for the input checks)", ours=True),
    Provider("rlsd_kernels_inplace", "logits", logits_ours_inplace, "fused; gradient written into the logits "
             "(inplace_backward=True)", ours=True, modes=("fwd_bwd",), clobbers=True),
    Provider("naive_eager", "linear", linear_naive_eager, "materialised logits of both, then the naive loss",
             exact=False),
    Provider("naive_compile", "linear", linear_naive_compile, "the same under torch.compile (dynamic shapes)",
             exact=False),
    Provider("cce", "linear", linear_cce, "Cut Cross-Entropy per-token log-probs of both + the RLSD terms "
             "in PyTorch", exact=False),
    Provider("liger", "linear", linear_liger, "Liger fused linear GRPO of the student (no credit weights) + CCE "
             "log-probs of the teacher", target="grpo", exact=False),
    Provider("rlsd_kernels", "linear", linear_ours, "rlsd_linear_loss, fused over the vocabulary", ours=True),
]


def providers(form, names=None) -> list[Provider]:
    """The providers of a form, ``names`` (if given) filtering them; those that clobber inputs last."""
    chosen = [p for p in PROVIDERS if p.form == form and (names is None or p.name in names)]
    return sorted(chosen, key=lambda p: p.clobbers)


def provider_names() -> list[str]:
    return sorted({p.name for p in PROVIDERS})


def unusable(forms, modes, names) -> str | None:
    """Why a choice of providers (``names``, None: all) measures nothing in some chosen form, or
    names one that runs in none of the forms and modes; None when every name and form has work."""
    if names is None:
        return None
    runs = {(p.name, p.form) for p in PROVIDERS if any(m in p.modes for m in modes)}
    for name in names:
        if not any((name, form) in runs for form in forms):
            where = sorted({p.form for p in PROVIDERS if p.name == name})
            return (f"provider {name} does not run the form {'/'.join(forms)} in mode {'/'.join(modes)} "
                    f"(it runs: {', '.join(where)}; modes {', '.join(_modes(name))})")
    for form in forms:
        if not any((name, form) in runs for name in names):
            able = sorted({p.name for p in PROVIDERS if p.form == form})
            return f"none of --providers {','.join(names)} runs the {form} form (its providers: {', '.join(able)})"
    return None


def _modes(name) -> list[str]:
    return sorted({m for p in PROVIDERS if p.name == name for m in p.modes})
