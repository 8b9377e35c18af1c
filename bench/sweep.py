"""The loop the throughput and memory benchmarks share: one shape at a time, gate first, OOM-safe.

For each shape: inputs are built once (or the shape is recorded as not fitting); the first shape of
each form and vocabulary gates every provider against the float64 reference on a slice of those
inputs; then each provider is measured in each mode. A provider that runs out of memory, fails, or
whose call took longer than ``max_call_s``, is not tried at larger ``N`` for that form, mode and
vocabulary; past the deadline nothing new starts. Every outcome is a row: ``ok``, ``OOM``,
``unavailable: ...``, ``skipped: ...``, ``not timed: ...`` or ``error: ...``.
"""

from __future__ import annotations

import time

import common
import gate as G
import providers as P


class Sweep:
    def __init__(self, device, dtype, ceil, *, timing=True, max_call_s=None, gate_batch=2, gate_seqlen=64,
                 measure_kw=None, progress=None, extra=None):
        self.device, self.dtype, self.ceil = device, dtype, ceil
        self.timing, self.max_call_s = timing, max_call_s
        self.gate_batch, self.gate_seqlen = gate_batch, gate_seqlen
        self.measure_kw = measure_kw or {}
        self.progress = progress or common.Progress(0, "", enabled=False)
        self.extra = extra or {}
        self.rows: list[dict] = []
        self.gate_rows: list[dict] = []
        self._gate: dict = {}
        self._gated: set = set()
        self._stop: dict = {}

    @property
    def ours_failed(self) -> bool:
        """Whether one of ours failed its gate (wrong numbers or an error; not merely unavailable)."""
        return any(r["status"] == "FAILED" or r["status"].startswith("error") for r in self.gate_rows
                   if r["provider"].startswith("rlsd_kernels"))

    @staticmethod
    def tasks(chosen, modes):
        """(mode, provider) pairs of one shape, in order: those that overwrite the logits last."""
        pairs = [(m, p) for m in modes for p in chosen if m in p.modes]
        return [t for t in pairs if not t[1].clobbers] + [t for t in pairs if t[1].clobbers]

    def shape(self, form, chosen, modes, *, batch, seqlen, vocab, hidden, deadline=None, gate_modes=None):
        """Measures ``modes`` of ``chosen`` at one shape; the gate (first shape of a form and
        vocabulary) covers ``gate_modes`` (default ``modes``)."""
        elem = self.dtype.itemsize
        n = batch * seqlen
        base = {**self.extra, "form": form, "n": n, "batch": batch, "seqlen": seqlen, "vocab": vocab,
                "hidden": hidden if form == "linear" else None, "dtype": P.DTYPE_NAMES[self.dtype]}
        tasks = self.tasks(chosen, modes)
        late = deadline is not None and time.monotonic() > deadline
        need = P.input_gb(form, batch, seqlen, vocab, hidden, elem)
        free = common.device_free_gb(self.device)
        inputs, status = None, "ok"
        if late:
            status = "skipped: time budget"
        elif free is not None and need > 0.95 * free:
            status = f"inputs do not fit ({need:.1f} GB, {free:.1f} GB free)"
        else:
            inputs, status = common.guarded(lambda: P.make_inputs(form, batch, seqlen, vocab, hidden, self.dtype,
                                                                  self.device), self.device)
            if status != "ok":
                status = f"inputs: {status}"
        if inputs is None:
            for mode, p in tasks:
                self._add(base, mode, p, status=status)
            return
        if (form, vocab) not in self._gated:
            self._gated.add((form, vocab))
            self._run_gate(form, chosen, gate_modes or modes, inputs, vocab)
        for mode, p in tasks:
            self._one(base, mode, p, inputs, deadline)
        if self.timing:
            for mode in modes:
                ms = P.floor_ms(form, mode, n, vocab, hidden, elem, self.ceil)
                what = "bytes over the copy bandwidth" if form == "logits" else "FLOP over the matmul rate"
                self.rows.append({**base, "mode": mode, "provider": "floor", "what": what, "status": "model",
                                  "ms": ms, **P.rates(form, mode, n, vocab, hidden, elem, ms, self.ceil),
                                  **self.ceil})
        del inputs
        common.free_memory(self.device)

    def _run_gate(self, form, chosen, modes, inputs, vocab):
        head = inputs.head(self.gate_batch, self.gate_seqlen)
        rows = G.gate(chosen, head, modes, self.device)
        del head
        common.free_memory(self.device)
        for r in rows:
            self._gate[form, vocab, r["mode"], r["provider"]] = r["status"]
            self.progress.write(f"gate {form:6s} {r['mode']:7s} V={vocab:<6d} {r['provider']:22s} {r['status']}"
                                + (f" (loss err {r['loss_err']:.1e}, grad err {r['grad_err'] or 0:.1e})"
                                   if "loss_err" in r else ""))
        self.gate_rows += [{**self.extra, **r} for r in rows]

    def _one(self, base, mode, p, inputs, deadline):
        key = (base["form"], mode, base["vocab"], p.name)
        gate = self._gate.get((base["form"], base["vocab"], mode, p.name), "not gated")
        if gate != "ok" and (p.ours or gate != "FAILED"):
            # Ours are timed only when right; a peer that is unavailable or errs would do so again.
            return self._add(base, mode, p, status=gate if gate != "FAILED" else "not timed: gate FAILED",
                             gate=gate)
        if key in self._stop:
            return self._add(base, mode, p, status=self._stop[key], gate=gate)
        if deadline is not None and time.monotonic() > deadline:
            return self._add(base, mode, p, status="skipped: time budget", gate=gate)
        backward = mode == "fwd_bwd"
        made, status = common.guarded(lambda: p.make(inputs, backward), self.device)
        result = None
        if status == "ok":
            result, status = common.guarded(
                lambda: common.measure(made, self.device, timing=self.timing, **self.measure_kw), self.device)
        made = None  # frees what the provider holds before the next one runs
        common.free_memory(self.device)
        n = base["n"]
        if status == "OOM":
            self._stop[key] = f"skipped: OOM at N={n}"
        elif status.startswith("error"):
            self._stop[key] = f"skipped: error at N={n}"
        result = result or {}
        if self.max_call_s and result.get("ms") and result["ms"] > 1e3 * self.max_call_s:
            self._stop[key] = f"skipped: {result['ms'] / 1e3:.1f} s per call at N={n}"
        if not self.timing and result:
            result["ms_one_call"] = result.pop("ms")
            for k in ("ms_q20", "ms_q80", "reps"):
                result.pop(k, None)
        self._add(base, mode, p, status=status, gate=gate, **result)

    def _add(self, base, mode, p, **fields):
        row = {**base, "mode": mode, "provider": p.name, "what": p.what, "ours": int(p.ours), **fields}
        if self.timing and row.get("ms") is not None:
            row.update(P.rates(base["form"], mode, base["n"], base["vocab"], base["hidden"], self.dtype.itemsize,
                               row["ms"], self.ceil))
        row.update(self.ceil)
        self.rows.append(row)
        self.progress.update()
        self.progress.write(_line(row))


def _line(r) -> str:
    shape = f"N={r['n']:<6d} V={r['vocab']:<6d}"
    head = f"{r['form']:6s} {r['mode']:7s} {shape} {r['provider']:22s}"
    if r["status"] != "ok":
        return f"{head} {r['status']}"
    if "ms_one_call" in r:
        return f"{head} peak +{r['peak_extra_gb']:.2f} GB, one call {r['ms_one_call']:.2f} ms"
    rate = (f"{r['gb_per_s']:.0f} GB/s" if "gb_per_s" in r else
            f"{r['tflop_per_s']:.1f} TFLOP/s" if "tflop_per_s" in r else "")
    frac = f" ({100 * r['frac_of_ceiling']:.0f}%)" if "frac_of_ceiling" in r else ""
    gate = "" if r.get("gate") == "ok" else f" [gate {r.get('gate')}]"
    return (f"{head} {r['ms']:.3f} ms [{r['ms_q20']:.3f}, {r['ms_q80']:.3f}] {rate}{frac} "
            f"peak +{r['peak_extra_gb']:.2f} GB, first call {r['first_call_s']:.1f} s{gate}")
