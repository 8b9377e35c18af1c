"""Host-side helpers of the launchers: the backend switch, allocation, row layouts by strides, tensor
checks that name the argument, and the error bits of the kernels' flags turned into one exception."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import MutableMapping
from typing import NamedTuple

import torch

from ..flags import ERRORS, LOWEST_ERROR, Flag
from ..reference import IGNORE_INDEX

# The one environment-dependent switch: under TRITON_INTERPRET=1 the Triton kernels also run on
# CPU tensors (that is how the test suite checks them without a GPU).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_backend: str | None = None


@contextlib.contextmanager
def backend(name: str):
    """Force ``"triton"`` or ``"torch"`` for ops called inside the block (tests, debugging).

    By default CUDA tensors go to the Triton kernels and CPU tensors to the chunked PyTorch path.
    """
    global _backend
    if name not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def use_triton(x: torch.Tensor) -> bool:
    """The one backend dispatcher: whether the launchers take ``x`` to the Triton kernels."""
    if _backend == "torch":
        return False
    if _backend == "triton":
        if not (x.is_cuda or INTERPRET):
            raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before import")
        return True
    return x.is_cuda


def empty(shape, *, dtype, device) -> torch.Tensor:
    """Every output the ops allocate comes from here, so tests can fill them with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


class Outputs(MutableMapping):
    """Per-token float32 outputs by name, the rows of one allocation ``packed`` (``[k, N]``), made
    into tensors only when read. Storing an entry detaches the mapping from ``packed`` (None):
    ``pack_outputs`` then stacks the entries."""

    __slots__ = ("packed", "_base", "_index", "_rows")

    def __init__(self, packed, names):
        self.packed = self._base = packed
        self._index = _row_index(tuple(names))
        self._rows = {}

    def __getitem__(self, key):
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = self._base[self._index[key]]
        return row

    def __setitem__(self, key, value):
        self.packed = None
        if key not in self._index:
            self._index = {**self._index, key: None}
        self._rows[key] = value

    def __delitem__(self, key):
        raise TypeError("per-token outputs are not removed")

    def __iter__(self):
        return iter(self._index)

    def __len__(self):
        return len(self._index)


@functools.cache
def _row_index(names):
    return {k: i for i, k in enumerate(names)}


def outputs(names, n, device) -> tuple[Outputs, torch.Tensor]:
    """``(out, flags)``: the per-token float32 outputs ``names`` of ``n`` tokens, rows of one
    allocation, and their int32 flags."""
    packed = empty((len(names), n), dtype=torch.float32, device=device)
    return Outputs(packed, names), empty((n,), dtype=torch.int32, device=device)


def unpack_outputs(packed, names) -> Outputs:
    """The outputs ``names`` held in the rows of ``packed`` (made into tensors when read)."""
    return Outputs(packed, names)


def pack_outputs(out, names) -> torch.Tensor:
    """One ``[len(names), N]`` float32 tensor of the outputs ``names``: the allocation they are rows
    of (``outputs``), or a copy of them stacked."""
    packed = getattr(out, "packed", None)
    if packed is not None and packed.shape[0] == len(names) and (out._index is _row_index(tuple(names))
                                                                 or tuple(out) == tuple(names)):
        return packed
    return torch.stack([out[k] for k in names])


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


class Rows(NamedTuple):
    """A ``[B, T, V]`` or packed ``[N, V]`` logits tensor addressed as rows, without copying."""

    tensor: torch.Tensor
    batch: int
    seqlen: int
    vocab: int
    stride_b: int
    stride_t: int

    @property
    def n(self) -> int:
        return self.batch * self.seqlen


_KINDS = {
    "logits": lambda d: d in LOGIT_DTYPES,
    "float": lambda d: d.is_floating_point,
    "int": lambda d: not d.is_floating_point and not d.is_complex and d != torch.bool,
    "bool": lambda d: d == torch.bool,
}


@functools.cache
def _kind_ok(kinds, dtype) -> bool:
    return any(_KINDS[k](dtype) for k in kinds)


def check_tensor(x, name, *, kinds, dims=None, device=None):
    """Type, dtype kind, rank and device checks with errors that name the tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    dtype = x.dtype
    if not _kind_ok(kinds, dtype):
        raise TypeError(f"{name} must have a dtype of kind {' or '.join(kinds)}, got {dtype}")
    if dims is not None and x.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (where the logits are)")


def as_rows(logits: torch.Tensor, name: str) -> Rows:
    """Checks a logits tensor and describes its rows by strides (views such as ``x[:, :-1]`` stay views)."""
    check_tensor(logits, name, kinds=("logits",), dims=(2, 3))
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension")
    if logits.stride(-1) != 1:
        warnings.warn(
            f"{name} has vocabulary stride {logits.stride(-1)}; copying it to a contiguous tensor",
            stacklevel=4,
        )
        logits = logits.contiguous()
    return _rows(logits, logits.shape, logits.stride())


def rows_of(x: torch.Tensor) -> Rows:
    """``as_rows`` without its checks, for the launchers: their tensors come checked from an entry
    point (a vocabulary stride other than 1 still goes through ``as_rows``, which copies: a launcher
    reads ``Rows.tensor``, never the tensor it was given, so that pointer and strides agree)."""
    shape, strides = x.shape, x.stride()
    if strides[-1] != 1:
        return as_rows(x, "logits")
    return _rows(x, shape, strides)


def unit_stride(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` itself where its vocabulary stride is 1 (or it is None), else ``rows_of``'s copy."""
    return x if x is None or x.stride(-1) == 1 else rows_of(x).tensor


def _rows(x, shape, strides):
    if len(shape) == 3:
        return Rows(x, shape[0], shape[1], shape[2], strides[0], strides[1])
    return Rows(x, 1, shape[0], shape[1], 0, strides[0])


def same_rows(rows: Rows, other: torch.Tensor, name: str, student_name: str) -> Rows:
    other_rows = as_rows(other, name)
    if other.shape != rows.tensor.shape:
        raise ValueError(f"{name} has shape {tuple(other.shape)}, {student_name} has {tuple(rows.tensor.shape)}")
    if other.device != rows.tensor.device:
        raise ValueError(f"{name} is on {other.device}, {student_name} on {rows.tensor.device}")
    return other_rows


def raise_on_error_flags(flags, tokens, vocab, names):
    """Turns the error bits of the kernels' per-token flags into one clear exception (one sync)."""
    # The error bits are the highest in use (``flags.LOWEST_ERROR``): one reduction and one read.
    if flags.numel() == 0 or int(flags.max()) < LOWEST_ERROR:
        return
    errors = flags & int(ERRORS)
    messages = []
    bad = (errors & int(Flag.BAD_TOKEN)) != 0
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        messages.append(
            f"{names['tokens']}: {int(bad.sum())} token ids outside [0, {vocab}) at unmasked positions "
            f"(first at flat position {first}: id {int(tokens[first])}; use {IGNORE_INDEX} or the mask "
            "for padding)"
        )
    for bit, key in ((Flag.NONFINITE_STUDENT, "student"), (Flag.NONFINITE_TEACHER, "teacher")):
        hit = (errors & int(bit)) != 0
        if bool(hit.any()):
            first = int(hit.nonzero()[0, 0])
            messages.append(
                f"{names[key]}: {int(hit.sum())} unmasked rows hold NaN or +inf, or no finite value "
                f"(first at flat position {first}); -inf alone is allowed (padded vocabulary)"
            )
    raise ValueError("; ".join(messages))
