"""Trials: run each candidate on the real inputs, check it against the ``torch`` candidate, time it.

Checking. The ``torch`` candidate (PyTorch's own ops) runs first; every other candidate's outputs
are compared with its outputs as ``||a - b|| / ||b||`` over the elements where the reference is
finite, in float64. A candidate is excluded when it raises, when its non-finite pattern differs
from the reference's (NaN where PyTorch has a number, or a number where PyTorch has NaN/Inf), or
when the error passes the tolerance of its compute precision (:data:`TOLERANCE`). This is a guard
against gross failures on hardware the test suite never ran on (wrong indexing, a race, garbage
from an unsupported configuration: errors of order 1), not the equivalence proof — that is the test
suite's, against float64. The tolerances leave room for both sides' rounding: fp32 1e-4, TF32 and
fp16 1e-2, bf16 5e-2. Gradients of a training trial get more (:data:`GRAD_TOLERANCE`): an element
whose ReLU input lies within rounding of zero can fall on either side in two correct
implementations, and each such flip moves a gradient's relative error by about ``1/sqrt(n)``
(fp32 2e-2, TF32 and fp16 1e-1, bf16 2.5e-1).

Timing. :func:`default_timer` runs the candidates round-robin (so drift of a shared machine hits all
alike): on CUDA, one more warm-up each, then CUDA-event times of each run; on CPU, synchronous wall
clock (the checking run was the warm-up). It returns each candidate's samples in milliseconds.
Tests and experiments replace it with :func:`set_timer` (an injected clock).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

REFERENCE = "torch"
TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 5e-2}
GRAD_TOLERANCE = {"fp32": 2e-2, "tf32": 1e-1, "fp16": 1e-1, "bf16": 2.5e-1}
MIN_MARGIN = 0.02  # a candidate must beat torch by more than this and the measured noise
CUDA_REPS, CPU_REPS = 10, 3

Timer = Callable[[Dict[str, Callable[[], object]], torch.device], Dict[str, List[float]]]


def precision(dtype: Optional[str], tf32: bool) -> str:
    """The precision a trial's tolerance is judged by: "fp32", "tf32", "fp16" or "bf16"."""
    if dtype == "float16":
        return "fp16"
    if dtype == "bfloat16":
        return "bf16"
    return "tf32" if tf32 else "fp32"


# ------------------------------------------------------------------------------------- checking
def mismatch(out: Sequence[Optional[Tensor]], ref: Sequence[Optional[Tensor]], tol: float,
             grad_tol: Optional[float] = None, names: Sequence[str] = ()) -> Optional[str]:
    """None if every output matches the reference, else why not. ``out[0]`` is judged by ``tol``,
    the rest (gradients) by ``grad_tol`` (default ``tol``)."""
    if len(out) != len(ref):
        return f"returned {len(out)} outputs, expected {len(ref)}"
    for i, (a, b) in enumerate(zip(out, ref)):
        name = names[i] if i < len(names) else f"output {i}"
        if (a is None) != (b is None):
            return f"{name}: {'missing' if a is None else 'unexpected'}"
        if a is None:
            continue
        if not isinstance(a, Tensor):
            return f"{name}: expected a Tensor, got {type(a).__name__}"
        if a.shape != b.shape:
            return f"{name}: shape {list(a.shape)}, expected {list(b.shape)}"
        why = _compare(a, b, tol if i == 0 else (grad_tol if grad_tol is not None else tol))
        if why is not None:
            return f"{name}: {why}"
    return None


def _compare(a: Tensor, b: Tensor, tol: float) -> Optional[str]:
    a, b = a.detach().double(), b.detach().double()
    fin_b = torch.isfinite(b)
    fin_a = torch.isfinite(a)
    if not torch.equal(fin_a, fin_b):
        bad = int((fin_a != fin_b).sum())
        return f"{bad} element(s) non-finite where PyTorch's are finite, or the reverse"
    if not bool(fin_b.all()) and not torch.equal(torch.isnan(a), torch.isnan(b)):
        return "NaN pattern differs from PyTorch's"
    if not bool(fin_b.all()) and not torch.equal(a[~fin_b & ~torch.isnan(b)], b[~fin_b & ~torch.isnan(b)]):
        return "Inf signs differ from PyTorch's"
    d, r = a[fin_b], b[fin_b]
    if d.numel() == 0:
        return None
    err = ((d - r).norm() / r.norm().clamp_min(1e-30)).item()
    if not err <= tol:  # also catches NaN
        return f"relative error {err:.3g} > {tol:g}"
    return None


# --------------------------------------------------------------------------------------- timing
def default_timer(runs: Dict[str, Callable[[], object]], device: torch.device) -> Dict[str, List[float]]:
    """Per-candidate run times in milliseconds, the candidates run round-robin."""
    samples: Dict[str, List[float]] = {name: [] for name in runs}
    if device.type == "cuda":
        for run in runs.values():  # one more warm-up each (lazy initialisation after the check)
            run()
        pending = []
        for _ in range(CUDA_REPS):
            for name, run in runs.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                pending.append((name, start, end))
        torch.cuda.synchronize(device)
        for name, start, end in pending:
            samples[name].append(start.elapsed_time(end))
        return samples
    for _ in range(CPU_REPS):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


_timer: Timer = default_timer


def set_timer(timer: Optional[Timer]) -> Timer:
    """Replace the timer (None restores :func:`default_timer`); returns the previous one.

    A timer takes ``{candidate name: run}`` and the device and returns ``{name: [ms, ...]}``.
    """
    global _timer
    previous = _timer
    _timer = default_timer if timer is None else timer
    return previous


def get_timer() -> Timer:
    return _timer


# -------------------------------------------------------------------------------------- choosing
@dataclass
class Stats:
    median: float
    p20: float
    p80: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        s = sorted(float(v) for v in samples)
        return cls(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8))

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: the run-to-run noise of these samples."""
        return (self.p80 - self.p20) / self.median if self.median > 0 else math.inf


def _quantile(s: Sequence[float], q: float) -> float:
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def pick(timings: Dict[str, Stats]) -> tuple:
    """``(winner, margin)``: the fastest candidate if it beats ``torch`` by more than
    ``margin = max(MIN_MARGIN, both candidates' measured spread)``, else ``torch``."""
    ref = timings[REFERENCE]
    others = [(s.median, n) for n, s in timings.items() if n != REFERENCE]
    if not others:
        return REFERENCE, MIN_MARGIN
    best_ms, best = min(others)
    margin = max(MIN_MARGIN, ref.spread, timings[best].spread)
    return (best if best_ms < ref.median * (1.0 - margin) else REFERENCE), margin
