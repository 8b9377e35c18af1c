"""What every public loss does after its own checks: describe the call, pick the input form (wrapped
when sharded), run one of the autograd Functions and gather the metrics."""

from __future__ import annotations

import torch

from ..autograd.functions import LogprobsFunction, ScalarLossFunction, TokenLossFunction
from ..call.inputs import check_loss_agg, check_tokens, prepare
from ..call.losses import DistillLoss, PolicyLoss, empty_outputs
from ..call.options import DistillOptions, PolicyOptions
from ..flags import LOWEST_ERROR
from ..forms.linear import LinearForm, default_chunk_size, schedule_for
from ..forms.logits import LogitsForm, slice_of_base
from ..forms.sharded import ShardedForm
from ..forms.slab import default_chunk_size as slab_chunk_size
from ..launch.common import as_rows, check_tensor, raise_on_error_flags, same_rows, unpack_outputs

PER_TOKEN_KEYWORDS = ("teacher_logprobs", "old_logprobs", "mask", "credit_mask", "rollout_logprobs", "ref_logprobs",
                      "is_weights", "normalizer", "cu_seqlens")


POLICY_KEYWORDS = tuple(PolicyOptions.keywords())
_PLAIN = frozenset((float, int, bool, str, type(None)))
_OPTIONS: dict = {}


def policy_options(kwargs, want_entropy):
    """``PolicyOptions.pick``, kept by value for keywords that are plain Python values (a trainer
    repeats the same ones every step): the checks run once per distinct set. Eager only."""
    if torch.compiler.is_compiling():
        return PolicyOptions.pick(kwargs, want_entropy=want_entropy)
    values = tuple(map(kwargs.get, POLICY_KEYWORDS))
    types = tuple(map(type, values))
    if not _PLAIN.issuperset(types):
        return PolicyOptions.pick(kwargs, want_entropy=want_entropy)
    # The types are part of the key: True, 1 and 1.0 are equal but not checked alike.
    key = (tuple(map(kwargs.__contains__, POLICY_KEYWORDS)), values, types, bool(want_entropy))
    options = _OPTIONS.get(key)
    if options is None:
        options = PolicyOptions.pick(kwargs, want_entropy=want_entropy)
        if len(_OPTIONS) >= 256:
            _OPTIONS.clear()
        _OPTIONS[key] = options
    return options


def describe(kwargs, token_shape, device, tokens, advantages, *, distill=None, grpo=False, want_entropy=False,
             no_teacher=False):
    """``(loss, call)`` from a public function's keywords (its ``locals()``); ``no_teacher`` for GRPO
    without a teacher (``check_teacher``)."""
    check_validate(kwargs["validate"])
    options = policy_options(kwargs, want_entropy)
    per_token = {k: kwargs.get(k) for k in PER_TOKEN_KEYWORDS}
    has_teacher = not no_teacher
    if no_teacher:
        # lam = 0 (GRPO): the credit weight does not enter the loss; the kernels score a zero teacher.
        per_token["teacher_logprobs"] = torch.zeros(tuple(token_shape), dtype=torch.float32, device=device)
    call = prepare(token_shape, device, tokens, advantages, options, loss_agg=kwargs["loss_agg"],
                   validate=kwargs["validate"] and not is_deferred(kwargs["validate"]), **per_token)
    if distill is None:
        return PolicyLoss(call.options, has_teacher), call
    return DistillLoss(call.options, DistillOptions.pick(distill, grpo=grpo)), call


def check_teacher(teacher, teacher_logprobs, loss, teacher_name, lam=None):
    """Exactly one teacher source; none at all only for the policy loss with ``lam = 0`` (GRPO),
    returned as ``True`` (no teacher)."""
    if isinstance(loss, DistillLoss) and loss.pairs_teacher and (teacher is None or teacher_logprobs is not None):
        raise ValueError(f"the full-vocabulary divergences need {teacher_name} (teacher_logprobs is for "
                         "divergence='sampled_token' only)")
    if teacher is not None and teacher_logprobs is not None:
        raise ValueError(f"give exactly one of {teacher_name} and teacher_logprobs")
    if teacher is None and teacher_logprobs is None:
        if isinstance(loss, DistillLoss):
            raise ValueError(f"give {teacher_name} or teacher_logprobs: the divergence needs the teacher")
        if lam is None or PolicyOptions(lam=lam).lam != 0:
            raise ValueError(f"give {teacher_name} or teacher_logprobs: the credit weight (lam > 0) needs the "
                             "teacher (with lam=0, plain GRPO, neither is needed)")
        return True
    return False


def check_eager(form, what):
    if torch.compiler.is_compiling() and form.eager_only:
        raise ValueError(f"{what} is not supported under torch.compile (eager mode only)")


def logits_form(student_logits, teacher_logits, *, inplace, temporary, process_group, scalar):
    """``(form, tensors)`` for given logits; a scalar loss writes a ``logits[:, :-1]`` view's gradient
    for its base where nothing could tell (``logits.slice_of_base``)."""
    check_switch(inplace, "inplace_backward")
    rows = as_rows(student_logits, "student_logits")
    if teacher_logits is not None:
        # The checked rows' tensor: a copy where the vocabulary stride is not 1 (with a warning).
        teacher_logits = same_rows(rows, teacher_logits, "teacher_logits", "student_logits").tensor
        teacher_logits = teacher_logits.detach() if teacher_logits.requires_grad else teacher_logits
    if inplace and torch.compiler.is_compiling():
        raise ValueError("inplace_backward=True is not supported under torch.compile")
    if inplace and rows.tensor.requires_grad and _overlaps(rows.tensor):
        raise ValueError("inplace_backward=True needs student_logits whose rows do not share storage "
                         "(an expanded or overlapping tensor); pass a contiguous copy or inplace_backward=False")
    if process_group is not None:
        form = ShardedForm(LogitsForm(teacher_logits, inplace=inplace), process_group)
        check_eager(form, "process_group")
        return form, (rows.tensor,)
    if scalar and rows.tensor.requires_grad and torch.is_grad_enabled():
        sliced = slice_of_base(rows.tensor, temporary)
        if sliced is not None:
            base, start = sliced
            return LogitsForm(teacher_logits, start=start, length=rows.seqlen, inplace=inplace), (base,)
    return LogitsForm(teacher_logits, inplace=inplace), (rows.tensor,)


def _overlaps(x):
    """Whether distinct rows of ``x`` (``[..., V]``, unit vocabulary stride) share memory (an empty
    ``x`` has none to share, whatever its strides)."""
    if x.numel() == 0:
        return False
    sizes, strides = x.shape[:-1], x.stride()[:-1]
    dims = sorted((s, n) for s, n in zip(strides, sizes, strict=True) if n > 1)
    extent = x.shape[-1]
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * size
    return False


def check_linear(hidden, weight, bias, teacher, chunk_size, name="student_hidden"):
    """Checks the hidden states (``name``), weight, bias and chunk size."""
    check_tensor(hidden, name, kinds=("logits",), dims=(2, 3))
    check_tensor(weight, "weight", kinds=("logits",), dims=(2,), device=hidden.device)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype}, {name} has {hidden.dtype}; they must match")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden size mismatch: {name} has {hidden.shape[-1]} features, weight has shape "
                         f"{tuple(weight.shape)} ([V, H])")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    if weight.shape[1] == 0:
        raise ValueError(f"{name} and weight have an empty hidden dimension (H = 0): the logits would be the "
                         "bias alone")
    if teacher is not None:
        check_tensor(teacher, "teacher_hidden", kinds=("logits",), device=hidden.device)
        if teacher.dtype != hidden.dtype:
            raise TypeError(f"teacher_hidden has dtype {teacher.dtype}, {name} has {hidden.dtype}; they must match")
        if teacher.shape != hidden.shape:
            raise ValueError(f"teacher_hidden has shape {tuple(teacher.shape)}, {name} has {tuple(hidden.shape)}; "
                             "they must match")
    if bias is not None:
        check_tensor(bias, "bias", kinds=("logits",), dims=(1,), device=hidden.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, weight has {weight.shape[0]} rows")
    check_chunk_size(chunk_size)


def check_chunk_size(chunk_size):
    valid_chunk = isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0
    if chunk_size is not None and not valid_chunk:
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def linear_form(hidden, weight, bias, teacher_hidden, *, chunk_size, process_group, paired, loss=False,
                name="student_hidden"):
    """``(form, tensors)`` for hidden states and the lm_head weight (and bias); ``loss`` for the losses,
    which run on the slab schedule where that is chosen (``linear.schedule_for``), with its own
    default chunk size (the log-probs' forward keeps the chunk schedule)."""
    teacher = None if teacher_hidden is None else teacher_hidden.detach()
    vocab, device, dtype = weight.shape[0], hidden.device, weight.dtype
    if chunk_size is not None:
        chunk = chunk_size
    elif loss and schedule_for(device) == "slab":
        chunk = slab_chunk_size(vocab, device, dtype)
    else:
        chunk = default_chunk_size(vocab, device, dtype, paired and teacher is not None)
    form = LinearForm(chunk, teacher, student_name=name)
    if process_group is not None:
        form = ShardedForm(form, process_group)
    check_eager(form, "the fused linear form" if process_group is None else "process_group")
    return form, (hidden, weight, bias)


def empty_loss(tensors):
    """A zero that gives every differentiable input a zero gradient (no tokens)."""
    return sum(t.sum(dtype=torch.float32) for t in tensors if t is not None) * 0.0


DEFERRED = "deferred"
# Deferred checks of earlier calls, oldest first: (ready event or None, host flag, flags, tokens,
# vocabulary, argument names).
_pending: list = []
MAX_PENDING = 64


def is_deferred(validate):
    return isinstance(validate, str) and validate == DEFERRED


def check_validate(validate):
    """``validate`` is ``True``, ``False`` or ``"deferred"``: anything else (``None``, ``"false"``) once
    switched the checks off or on silently."""
    if validate is not True and validate is not False and not is_deferred(validate):
        raise ValueError(f"validate must be True, False or {DEFERRED!r}, got {validate!r}")


def check_switch(value, name):
    """An on/off keyword is ``True`` or ``False``: a truthy string such as ``"false"`` once switched it on."""
    if value is not True and value is not False:
        raise ValueError(f"{name} must be True or False, got {value!r}")


SWITCHES = ("inplace_backward", "return_metrics")


def check_options(options):
    """The checks of a policy loss's keywords that need no tensor (the policy options, ``loss_agg``,
    ``validate``, the on/off keywords, ``chunk_size``), each error naming its keyword: for options
    fixed ahead of the calls, such as a module's, so that a bad one fails where it is set."""
    PolicyOptions.pick(options)
    if "loss_agg" in options:
        check_loss_agg(options["loss_agg"])
    if "validate" in options:
        check_validate(options["validate"])
    for name in SWITCHES:
        if name in options:
            check_switch(options[name], name)
    check_chunk_size(options.get("chunk_size"))


def check_deferred(wait=True, keep=0):
    """Raises the first error found by an earlier call made with ``validate="deferred"``, naming the
    argument and the flat position, as ``validate=True`` would have in that call. With ``wait`` it
    waits for the pending checks (one sync); without it, it reads only the checks whose result has
    already reached the host, and never blocks. The newest ``keep`` checks (a non-negative int) are
    left pending."""
    check_switch(wait, "wait")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be a non-negative int, got {keep!r}")
    while len(_pending) > keep:
        event, found, flags, tokens, vocab, names = _pending[0]
        if event is not None:
            if not wait and not event.query():
                return
            event.synchronize()
        _pending.pop(0)
        if bool(found):
            try:
                raise_on_error_flags(flags, tokens, vocab, names)
            except ValueError as e:
                raise ValueError(f"an earlier call with validate='deferred' found bad input: {e}") from None


def defer_check(flags, tokens, vocab, names):
    """Starts the check of a call's error bits without waiting for it: one reduction on the device
    and a non-blocking copy of its one byte to pinned host memory, read by ``check_deferred``. Off
    CUDA there is nothing to overlap: the check is made at once."""
    if not flags.is_cuda:
        raise_on_error_flags(flags, tokens, vocab, names)
        return
    found = flags.max() >= LOWEST_ERROR
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(found, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _pending.append((event, host, flags, tokens, vocab, names))
    if len(_pending) > MAX_PENDING:
        check_deferred(wait=True, keep=MAX_PENDING)


def run_loss(form, tensors, loss, call, *, return_metrics, validate):
    """The loss (and its metrics) of a described call over ``form``. ``validate="deferred"`` runs it
    unchecked and checks its error bits at the next such call (``check_deferred``); under
    torch.compile and for a sharded form it is ``True``."""
    check_switch(return_metrics, "return_metrics")
    deferred = is_deferred(validate) and not torch.compiler.is_compiling() and not isinstance(form, ShardedForm)
    validate = False if deferred else bool(validate)
    if deferred:
        check_deferred(wait=False)
    inputs, _, mask, token_shape, loss_agg = call
    if mask.numel() == 0:
        value = empty_loss(tensors)
        value = value.expand(token_shape) if loss_agg == "none" else value
        if not return_metrics:
            return value
        return value, loss.metrics(empty_outputs(loss, mask), mask.int(), mask, inputs)
    function = TokenLossFunction if loss_agg == "none" else ScalarLossFunction
    value, packed, flags = function.apply(form, loss, inputs, torch.is_grad_enabled(), validate, *tensors)
    if deferred:
        defer_check(flags, inputs.tokens, form.vocab(tensors), form.names)
    if loss_agg == "none":
        value = value.view(token_shape)
    if not return_metrics:
        return value
    return value, loss.metrics(unpack_outputs(packed, loss.outputs), flags, mask, inputs)


def run_logprobs(form, tensors, tokens, token_shape, *, temperature, return_entropy, validate):
    """Token log-probs over ``form``; ``validate="deferred"`` is ``True`` here (no flags come back)."""
    check_validate(validate)
    check_switch(return_entropy, "return_entropy")
    validate = bool(validate)
    check_tokens(tokens, token_shape, tensors[0].device)
    temperature = PolicyOptions(temperature=temperature).temperature
    if tokens.numel() == 0:
        lp = empty_loss(tensors).expand(tokens.shape)
        return (lp, lp.clone()) if return_entropy else lp
    lp, ent = LogprobsFunction.apply(form, tokens.reshape(-1), temperature, return_entropy, validate, *tensors)
    lp = lp.view(tokens.shape)
    return (lp, ent.view(tokens.shape)) if return_entropy else lp
