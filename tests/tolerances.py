"""The one tolerance table: kernel outputs against the float64 reference on the same inputs.

Per-token values (log-probs, losses, weights) are computed in float32 whatever the logits dtype, so
they share float32 tolerances. Gradients are written in the logits' dtype: their tolerance is that
dtype's rounding (the interpreter rounds float32 to bfloat16 toward zero, up to one ulp more).
"""

import torch

FP32 = dict(rtol=2e-5, atol=2e-6)
GRAD = {
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}

# Per-token values at H = 4096 against float64 logits (the fused linear form at real sizes): a
# float32-output matmul over K = 4096 errs by about sqrt(K) * 2**-24 * |z| ~ 1e-5 per logit, and so
# do the log-probs. Measured on CPU (the chunked PyTorch path, 48 rows of bf16 hidden states,
# H = 4096, V = 151,936, temperature 0.9): the OPSD per-token losses within 2.5e-6 of the largest
# float64 value and 1.4e-5 of their own (the sampled-token loss D * lp_S carries |lp_S| ~ 12 times
# the matmul's error of D). The CPU cases, at H = 12, meet FP32.
MATMUL_FP32 = dict(rtol=1e-4, atol=1e-5)
# At V = 151,936 (bf16, 12 rows under the interpreter) the OPSD per-token losses were within 3.7e-6
# of the float64 reference relative to themselves (the KLs, the JSD), and the sampled-token loss
# D * lp_S within 1.6e-6 of the largest (it carries the float32 rounding of lp_S ~ -14 times |lp_S|),
# and the entropy of a 151,936-wide bf16 row sums as many float32 terms: close to FP32's 2e-6, so the
# real-size checks allow 1e-5 of the largest and 1e-4 of each value.
REAL_SIZE_FP32 = dict(rtol=1e-4, atol=1e-5)
# Two float32 gradients of the same loss, neither exact: the divergences' gradients take differences
# such as (log S - log M) - KL(S || M) of O(0.1) from log-probs of O(4), and dW and db add the tokens'
# gradients of both signs under a random upstream. Measured (jsd, beta = 0.3, "none"): each within
# 4.8e-6 of the largest float64 value (db), 3.2e-6 of it apart (dW).
PAIR_GRAD = dict(rtol=2e-5, atol=1e-5)

# The OPSD losses' float32 gradients against float64 on the slab schedule
# (tests/test_linear_slab_opsd.py), whose slabs' statistics are combined as vocabulary shards are
# (collectives.combine), each combine adding the rounding of a float32 log-sum. The sampled-token
# surrogate's coefficient D = lp_S - lp_T is a difference of log-probs of O(4-9), and dW and db add
# the tokens' gradients of both signs. Measured on tests/test_opsd_linear.py's case layout="packed",
# chunk_size=7, mask="float", 4 slabs: db within 2.1e-6 of the largest value on slabs, and within
# 1.9e-6 on the chunk schedule's Triton path (0.4e-6 on its PyTorch path); dH and dW closer. The
# reverse KL's gradient s * ((log S - log T) - KL) cancels against the combined KL: at 17 slabs of
# one column (vocab=17, bias=False, chunk_size=4) its dW was within 1.31e-6 of the largest value on
# the PyTorch path and 1.12e-6 under the interpreter (7e-8 on the chunk schedule), measured on an
# AVX-512 CPU (the float32 matmul's summation order differs between CPUs); the JSD's dH within 5.1e-7.
SLAB_GRAD = dict(rtol=2e-5, atol=5e-6)

# Float32 gradients formed from a stored logsumexp (the PyTorch path over several chunks, the
# separate backward kernel): each p carries a relative error of about |lse| * 2**-24 (README:
# Precision), which the reverse KL's s * ((log S - log T) - KL) carries into the difference. Measured
# (tests/test_torch_path_scratch.py, logits of standard deviation 3 at temperature 0.7): within 1.6e-6
# of the largest float64 value.
STORED_LSE_GRAD = dict(rtol=2e-5, atol=4e-6)

# The same computation by two routes (a module wrapper and the function it calls).
EXACT = dict(rtol=0, atol=0)
# The float64 reference against closed forms written by hand in float64: the same operations in
# another order, a few ulps apart.
FLOAT64_FORMULA = dict(rtol=1e-9, atol=1e-12)
# Float64 gradients of the divergences against central differences of the hand formulas.
FLOAT64_DIFFERENCES = dict(rtol=1e-8, atol=1e-9)
# Float64 losses of verl's "vanilla" and the reference's terms at lam = 0: the same formula.
FLOAT64_SAME = dict(rtol=1e-12, atol=1e-12)
# Two float32 computations of one value by different routes (the Triton kernels and the PyTorch
# path; a trainer's own loss and ours): each within FP32 of the exact value.
TWO_ROUTES_FP32 = dict(rtol=1e-5, atol=1e-6)
TRAINER_LOSS = dict(rtol=2e-5, atol=1e-6)
# Parameter gradients of a two-layer model through two float32 routes: the backward through the
# layers sums the tokens' contributions in another order.
TRAINER_GRAD = dict(rtol=1e-4, atol=1e-6)
# Teacher log-probs from hidden states in chunks against a float32 log_softmax of the full logits:
# two float32 matmul orders.
CHUNKED_LOGPROBS = dict(rtol=1e-5, atol=1e-5)

# Metrics of random cases: means of float32 per-token values that cancel (delta, of both signs) or
# sit near zero (the entropy of a peaked row) carry an absolute float32 rounding, not one relative to
# the mean (seen: 1.9e-7 at an entropy mean of 9e-4, 1.3e-7 at a delta mean of -5e-3). The atol here
# is absolute: compare with torch.testing.assert_close.
MEAN_ABS = dict(rtol=2e-5, atol=1e-6)

# A divergence formed in float32 from log-probs of magnitude up to L = max|z| / tau errs by a few units
# in the last place of L, whatever its own size: a reverse KL of 1.1e-5 between close rows of logits
# up to 18 came out 8.4e-7 off under the interpreter (1.2 units; the float32 reference 0.1). The
# sampled-token surrogate D * lp_S carries L times that. Measured over 648 random draws on both
# backends (tests/test_random_inputs_opsd.py): at most 2.7 units per token. The policy loss's random
# cases (tests/test_random_inputs.py) allow the same units for an entropy term near 0 and for the
# token's gradient entry (1 - p_y) * c of a confident token; 648 draws pass on both backends.
DIVERGENCE_ULPS = 4


def assert_close(actual, expected, *, rtol, atol, what="", scale=None, floor=0.0):
    """Elementwise closeness, with ``atol`` relative to ``scale``: by default the largest expected
    magnitude. A loss that sums terms of both signs is rounded term by term, so its error is relative
    to the terms, not to their sum (which may be 0): pass the same aggregation of their magnitudes.
    ``floor``: an absolute allowance more, elementwise (float32's own floor where it is known)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in the result"
    if scale is None:
        scale = expected.abs().max() if expected.numel() else torch.tensor(1.0)
    scale = torch.as_tensor(scale, dtype=torch.float64).clamp(min=1e-30)
    floor = torch.as_tensor(floor, dtype=torch.float64).cpu()
    if bool((floor != 0).any()):
        # Non-finite expected values must be met exactly; the rest within the tolerance and the floor.
        finite = expected.isfinite()
        assert torch.equal(actual[~finite], expected[~finite]), f"{what}: non-finite values differ"
        excess = torch.where(finite, (actual - expected).abs() - (atol * float(scale) + rtol * expected.abs() + floor),
                             0.0)
        i = int(excess.argmax()) if excess.numel() else 0
        assert not (excess > 0).any(), (f"{what}: {int((excess > 0).sum())} of {excess.numel()} beyond the tolerance "
                                        f"and floor; worst at flat index {i}: {float(actual.flatten()[i])} against "
                                        f"{float(expected.flatten()[i])}")
        return
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * float(scale), msg=lambda m: f"{what}: {m}")


def assert_grad_close(actual, expected, dtype, what="grad"):
    assert_close(actual, expected, what=what, **GRAD[dtype])


def assert_within_float32_error(actual, expected, float32, *, rtol, atol, what="", factor=2.0, floor=0.0):
    """``assert_close`` allowing ``factor`` times the error of ``float32`` (the float32 reference on the
    same inputs) from ``expected`` (the float64 reference) more, besides ``floor``: for values that
    cancel, such as a KL divergence between two close distributions (a sum of terms of order |log p|
    whose total is 1e-5), where float32 itself cannot give the tolerance's relative precision."""
    error = (float32.detach().double().cpu() - expected.detach().double().cpu()).abs().nan_to_num(0.0, 0.0, 0.0)
    assert_close(actual, expected, rtol=rtol, atol=atol, what=f"{what} (float32 reference's error x {factor} allowed)",
                 floor=factor * error + torch.as_tensor(floor, dtype=torch.float64).cpu())
