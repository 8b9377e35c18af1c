"""Launch configurations for the row kernels, and the small autotuner that picks one per problem.

Triton's ``autotune`` re-runs a kernel on its real arguments, which is wrong for kernels that write
a gradient into their own input (``inplace_backward``) and costly to undo. The launchers instead
hand this tuner a trial that runs a candidate on a prefix of the rows with scratch outputs; the
winner is cached per key. Under the Triton interpreter, on CPU tensors, or with
``RLSD_KERNELS_AUTOTUNE=0`` a single heuristic configuration is used; while a CUDA graph is being
captured nothing is timed (``capturing``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton

from .common import INTERPRET, num_sms

TRIAL_ROWS = 1024


class RowConfig(NamedTuple):
    block_v: int
    num_warps: int
    # Programs per multiprocessor of a persistent grid; 0 launches one program per row.
    programs_per_sm: int = 0

    def grid(self, n_rows: int, device: torch.device) -> tuple[int]:
        if self.programs_per_sm == 0:
            return (max(n_rows, 1),)
        return (max(1, min(n_rows, self.programs_per_sm * num_sms(device))),)


_forced: RowConfig | None = None
_forced_choice: str | None = None
_cache: dict = {}


@contextlib.contextmanager
def force_row_config(config: RowConfig):
    """Use ``config`` for every row kernel launched inside the block (tests force block edges)."""
    global _forced
    previous, _forced = _forced, config
    try:
        yield
    finally:
        _forced = previous


@contextlib.contextmanager
def force_choice(name: str):
    """Take option ``name`` wherever ``pick_choice`` would time options (tests cover each path)."""
    global _forced_choice
    previous, _forced_choice = _forced_choice, name
    try:
        yield
    finally:
        _forced_choice = previous


def state() -> tuple:
    """The forced configuration and choice: part of the key of anything that keeps a tuned choice."""
    return (_forced, _forced_choice)


@functools.cache
def _heuristic(vocab: int) -> RowConfig:
    block = min(triton.next_power_of_2(vocab), 8192 if not INTERPRET else 1024)
    return RowConfig(block_v=max(block, 16), num_warps=8 if block >= 4096 else 4)


def _candidates(vocab: int, itemsize: int = 2) -> list[RowConfig]:
    """What the tuner times; ``bench/kernel_resources.py`` checks that none of them spills.

    One program per row throughout: on an H200 (N = 8192, V = 151,936, bf16) persistent grids of one
    or two programs per multiprocessor streamed the rows 1.5-2.5x slower than these."""
    if vocab <= 4096:
        block = max(triton.next_power_of_2(vocab), 128)
        return [RowConfig(block, w) for w in (4, 8)]
    large = 8192 if itemsize <= 2 else 4096
    configs = [RowConfig(large, 16), RowConfig(large, 8), RowConfig(4096, 16), RowConfig(4096, 8),
               RowConfig(2048, 8), RowConfig(2048, 4)]
    return list(dict.fromkeys(configs))


def autotune_enabled() -> bool:
    return os.environ.get("RLSD_KERNELS_AUTOTUNE", "1") != "0"


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream: nothing is timed then (a timing
    run would be captured, and its synchronisation is illegal there), an untimed choice takes its
    default and is not kept."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def known_choice(key: tuple, device: torch.device, names, default):
    """What ``pick_choice`` returns for ``key`` without timing anything, or None where it would time:
    the forced choice (one of ``names``), ``default`` off CUDA, with ``RLSD_KERNELS_AUTOTUNE=0`` or
    during a capture, else the cached pick."""
    if _forced_choice is not None and _forced_choice in names:
        return _forced_choice
    if device.type != "cuda" or not autotune_enabled():
        return default
    cached = _cache.get((device.index,) + tuple(key))
    if cached is None and capturing(device):
        return default
    return cached


def pick_choice(key: tuple, device: torch.device, options: dict, default):
    """Times each ``options[name]()`` once per ``key`` on CUDA and returns the fastest name (cached).

    Off CUDA, or with ``RLSD_KERNELS_AUTOTUNE=0``, returns ``default`` (or the forced choice)."""
    known = known_choice(key, device, options, default)
    if known is not None:
        return known
    key = (device.index,) + tuple(key)
    if key not in _cache:
        from triton.testing import do_bench

        timings = {}
        for name, run in options.items():
            try:
                timings[name] = do_bench(run, warmup=5, rep=20, return_mode="median")
            except Exception:  # a candidate that fails to compile (resources) is skipped
                continue
        _cache[key] = min(timings, key=timings.get) if timings else default
    return _cache[key]


def pick_row_config(key: tuple, vocab: int, device: torch.device, trial, itemsize: int = 2) -> RowConfig:
    """The configuration for a row kernel; ``trial(config)`` runs one candidate on scratch outputs."""
    if _forced is not None:
        return _forced
    if device.type != "cuda" or not autotune_enabled():
        return _heuristic(vocab)
    cached = _cache.get((device.index, vocab) + tuple(key))
    if cached is not None:
        return cached
    if capturing(device):
        return _heuristic(vocab)
    options = {config: (lambda c=config: trial(c)) for config in _candidates(vocab, itemsize)}
    return pick_choice((vocab,) + tuple(key), device, options, _heuristic(vocab))


def fixed_row_config(vocab: int, device: torch.device, default: RowConfig) -> RowConfig:
    """The configuration of a kernel the tuner does not time: the forced one, else ``default`` on CUDA
    (with its block at most the vocabulary's power of two) and the heuristic elsewhere."""
    if _forced is not None:
        return _forced
    if device.type != "cuda":
        return _heuristic(vocab)
    return default._replace(block_v=max(16, min(default.block_v, triton.next_power_of_2(vocab))))


def tuned_configs() -> dict:
    """What the tuner picked so far, by key (benchmarks print it)."""
    return dict(_cache)
