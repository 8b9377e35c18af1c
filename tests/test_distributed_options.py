"""``process_group`` with the options the other vocabulary-parallel tests leave out: packed inputs
with ``cu_seqlens``, ``normalizer``, CISPO, rollout log-probs (token and sequence level), the credit
options and half precision, for ``rlsd_loss``, ``grpo_opsd_loss`` and ``opsd_loss``: loss, metrics
and the gradient slice of a 2-rank gloo run equal the unsharded op's (PyTorch path, itself tested
against the reference), through both backends for the sharded op."""

import torch
from mp_harness import finish_rank, spawn, start_rank
from tolerances import FP32, GRAD, assert_close

VOCAB = 29
SPLIT = (13, 16)
N = 11
CU_SEQLENS = [0, 4, 5, 11]


def test_sharded_options_equal_unsharded(tmp_path):
    spawn(_worker, 2, tmp_path)


def _inputs(dtype):
    g = torch.Generator().manual_seed(77)
    tokens = torch.randint(0, VOCAB, (N,), generator=g)
    tokens[:4] = torch.tensor([1, 12, 13, 27])  # both shards, both sides of the boundary
    student = (torch.randn(N, VOCAB, generator=g) * 2).to(dtype)
    teacher = (student.float() + 0.8 * torch.randn(N, VOCAB, generator=g)).to(dtype)
    lp = torch.log_softmax(student.double(), -1).gather(-1, tokens[:, None]).squeeze(-1).float()
    ratio = torch.tensor([0.5, 0.9, 1.0, 1.2, 1.6, 3.5, 0.75, 1.1, 1.05, 0.95, 2.0])
    old = lp - ratio.log()
    kwargs = dict(old_logprobs=old, rollout_logprobs=old + 0.4 * torch.randn(N, generator=g),
                  mask=torch.rand(N, generator=g) > 0.2, cu_seqlens=torch.tensor(CU_SEQLENS),
                  adv=torch.randn(N, generator=g))
    return student, teacher, tokens, kwargs


CASES = [
    dict(loss_agg="seq-mean-token-mean", surrogate="cispo", normalizer=6.0),
    dict(loss_agg="token-mean", tis_level="sequence", ratio_level="sequence", eps_w_low=0.1, eps_w_high=0.4,
         credit_base="old", credit_negative_only=True, lam=0.6),
    dict(loss_agg="seq-mean-token-sum-norm", credit_mask=True, dtype=torch.bfloat16, normalizer=9.0),
    dict(loss_agg="none", dtype=torch.float16, tis_cap=1.5, entropy_coef=0.03),
]


def _worker(rank, world, init):
    start_rank(rank, world, init)

    from rlsd_kernels.launch import tuning

    lo = sum(SPLIT[:rank])
    with tuning.force_row_config(tuning.RowConfig(16, 1)):
        for i, case in enumerate(CASES):
            _check_case(i, dict(case), lo, lo + SPLIT[rank])
    finish_rank()


def _check_case(i, case, lo, hi):

    import rlsd_kernels
    from rlsd_kernels.launch import common as _utils

    dtype = case.pop("dtype", torch.float32)
    student, teacher, tokens, kw = _inputs(dtype)
    adv = kw.pop("adv")
    if case.pop("credit_mask", False):
        case["credit_mask"] = torch.arange(N) % 3 != 0
    kw.update(case)
    opsd_kw = {k: kw[k] for k in ("mask", "cu_seqlens", "loss_agg", "normalizer") if k in kw}
    ops = {
        "rlsd_loss": lambda s, t, **k: rlsd_kernels.rlsd_loss(s, t, tokens, adv, **k),
        "grpo_opsd_loss": lambda s, t, **k: rlsd_kernels.grpo_opsd_loss(s, t, tokens, adv, alpha=0.5,
                                                                        divergence="jsd", **k),
        "opsd_loss": lambda s, t, **k: rlsd_kernels.opsd_loss(
            s, t, tokens, divergence="reverse_kl", **opsd_kw,
            **{x: k[x] for x in ("process_group", "return_metrics") if x in k}),
    }
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(i)) if kw["loss_agg"] == "none" \
        else torch.tensor(1.3)
    for name, op in ops.items():
        full = student.clone().requires_grad_()
        with _utils.backend("torch"):
            loss, metrics = op(full, teacher, return_metrics=True, **kw)
            (loss * upstream).sum().backward()
        for backend in ("torch", "triton"):
            what = f"{name} {case} {backend}"
            part = student[:, lo:hi].clone().requires_grad_()
            with _utils.backend(backend):
                s_loss, s_metrics = op(part, teacher[:, lo:hi], process_group=torch.distributed.group.WORLD,
                                       return_metrics=True, **kw)
            assert_close(s_loss, loss, what=f"{what} loss", **FP32)
            assert s_metrics.keys() == metrics.keys()
            for key, value in metrics.items():
                assert_close(s_metrics[key], value, what=f"{what} metrics[{key}]", **FP32)
            (s_loss * upstream).sum().backward()
            assert_close(part.grad, full.grad[:, lo:hi], what=f"{what} grad", **GRAD[dtype])
