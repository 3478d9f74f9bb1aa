"""Measured dispatch: at the first call with a new key, try every candidate, keep the fastest right one.

For a key (:mod:`.keys`) seen for the first time in a process:

1. **cache** — a decision stored by an earlier run (:mod:`.cache`) is used as is (``source="cache"``);
2. **measure** — otherwise each candidate that supports the case runs on the real inputs, into its
   own outputs (a training trial runs on a deep copy of the block, so no running statistic,
   ``num_batches_tracked`` or parameter ``.grad`` of the user's moves, and uses its own random
   generator), the ``torch`` candidate first as the reference; every other candidate is checked
   against it (:func:`.measure.mismatch`) and excluded — with one warning naming it, the key and
   the error — if it raises (an out-of-memory error included), returns non-finite values where
   PyTorch has none, or mismatches. The survivors are timed (:func:`.measure.default_timer`) and
   the fastest wins only if it beats ``torch`` by more than the measured noise (at least 2%);
   otherwise ``torch`` runs (``source="measured"``). The decision is kept in memory and written to
   the cache file;
3. **static** — where measuring is not allowed (``RESNET_FUSED_TUNE=0``; while torch.compile,
   torch.export or torch.jit trace; during CUDA graph capture; on fake or meta tensors; training
   with SyncBatchNorm, whose trials would need every rank to measure in step), the cached decision
   if there is one, else the static default, ``torch`` (``source="static"``; remembered for that
   reason only, so the key is measured at its first call where measuring is allowed).

Thread-safe: decisions are made under one lock (a second thread with the same key waits and uses
the first one's decision); a decided key costs a tuple build and one dict lookup per call.
"""
from __future__ import annotations

import copy
import datetime as _dt
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Union

import torch
from torch import Tensor

from . import candidates as cands
from . import keys, measure
from .cache import DecisionFile

TUNE_ENV = "RESNET_FUSED_TUNE"


@dataclass
class Decision:
    """One key's decision: what runs, why, and what the alternatives measured."""
    op: str
    key: str
    chosen: str
    candidates: Dict[str, Union[float, str]]  # name -> median ms, or why it was not timed
    source: str  # "measured" | "cache" | "static"
    sites: Set[str] = field(default_factory=set)
    margin: Optional[float] = None  # the noise margin a candidate had to beat torch by
    measure_ms: Optional[float] = None  # what measuring cost (checks, warm-up and timing)
    fields: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"op": self.op, "key": self.key, "chosen": self.chosen, "candidates": dict(self.candidates),
                "source": self.source, "sites": sorted(self.sites), "margin": self.margin,
                "measure_ms": self.measure_ms, "fields": dict(self.fields)}


_lock = threading.RLock()
_memo: Dict[tuple, Decision] = {}
epoch = 0  # bumped by forget(): a call site may remember a settled choice while it is unchanged
_static_memo: Dict[tuple, Decision] = {}
epoch = 0  # bumped by forget(): a call site may remember a settled choice while it is unchanged  # (memo key, why not measured) -> the static decision
_rows: Dict[str, Decision] = {}  # every decision of this process, by key, in order of first use
_file = DecisionFile()


def _memo_key(case: tuple, device: torch.device) -> tuple:
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return (case, device, threads, cands.generation[case[0]])


def forget() -> None:
    """Drop this process's decisions and report rows (the cache file stays)."""
    global epoch
    with _lock:
        epoch += 1  # call sites' own memos (see is_settled) start over too
        _memo.clear()
        _static_memo.clear()
        _rows.clear()
        _file.forget()


def is_settled(case: tuple, device: torch.device) -> bool:
    """Whether this case's choice is fixed for the rest of the process (measured, or read from the
    cache file) until :func:`forget` or a candidate (un)registration: a call site may then keep it
    and skip building the key on later calls. A static choice is not settled: it is re-examined
    on every call, since the reason not to measure (``RESNET_FUSED_TUNE=0``, a capture) can end."""
    return _memo_key(case, device) in _memo


# ----------------------------------------------------------------------------------- choosing
def decide(case: tuple, device: torch.device, trial: Callable[[cands.Candidate], Callable[[], List]],
           site: Optional[str] = None, no_measuring: Optional[str] = None) -> str:
    """The name of the candidate that runs this case.

    ``trial(candidate)`` returns a function that runs the candidate once on the call's inputs (in
    isolation: see the module docstring) and returns the outputs to compare (the first judged by
    the output tolerance, the rest by the gradient tolerance). ``no_measuring``: a reason this call
    must not measure (the caller knows one the dispatcher cannot see).
    """
    if torch.compiler.is_compiling():
        return _traced_choice(shape_free(case), str(device))
    memo_key = _memo_key(case, device)
    hit = _memo.get(memo_key)
    if hit is not None:
        if site is not None and site not in hit.sites:
            hit.sites.add(site)
        return hit.chosen
    with _lock:
        hit = _memo.get(memo_key)
        if hit is not None:  # another thread decided while this one waited
            if site is not None:
                hit.sites.add(site)
            return hit.chosen
        why_not = no_measuring or measuring_blocked(device)
        hit = None if why_not is None else _static_memo.get((memo_key, why_not))
        if hit is not None:  # decided statically for this reason before (no cache entry then)
            if site is not None:
                hit.sites.add(site)
            return hit.chosen
        d = _lookup(case, device, site)
        if d is not None:
            _memo[memo_key] = d
            return d.chosen
        if why_not is not None:
            d = _static_memo[(memo_key, why_not)] = _static(case, device, site, why_not)
            return d.chosen
        d = _measure(case, device, trial, site)
        if d.source == "measured":
            _memo[memo_key] = d
        return d.chosen


def _available(case: tuple, device: torch.device):
    """(candidates that support the case, {name: why not} for the others)."""
    f = keys.facts(case, device)
    ok, skipped = [], {}
    for c in cands.candidates(case[0]):
        why = c.unsupported(f)
        if why is None:
            ok.append(c)
        else:
            skipped[c.name] = f"unsupported: {why}"
    return ok, skipped


def _record(d: Decision, site: Optional[str]) -> Decision:
    if site is not None:
        d.sites.add(site)
    old = _rows.get(d.key)
    if old is not None and old.source == d.source == "static":
        old.sites |= d.sites
        return old
    _rows[d.key] = d
    return d


def _lookup(case: tuple, device: torch.device, site: Optional[str]) -> Optional[Decision]:
    ok, skipped = _available(case, device)
    key = keys.key_string(case, device, [c.name for c in ok])
    entry = _file.lookup(key)
    if entry is None or entry["chosen"] not in [c.name for c in ok]:
        return None
    return _record(Decision(case[0], key, entry["chosen"], {**entry["candidates"], **skipped}, "cache",
                            margin=entry.get("margin"), fields=entry.get("fields", {})), site)


def _static(case: tuple, device: torch.device, site: Optional[str], why: str) -> Decision:
    ok, skipped = _available(case, device)
    key = keys.key_string(case, device, [c.name for c in ok])
    timings = {c.name: f"not measured: {why}" for c in ok}
    return _record(Decision(case[0], key, measure.REFERENCE, {**timings, **skipped}, "static",
                            fields={**keys.case_fields(case), **keys.env_fields(device, [c.name for c in ok])}), site)


def shape_free(case: tuple) -> tuple:
    """The case without the input's shape ("x"): what a traced region knows for sure (under dynamic
    shapes the sizes are symbols, which no constant lookup can take)."""
    names = keys.CASE_FIELDS[case[0]]
    return tuple("*" if i and names[i - 1] == "x" else v for i, v in enumerate(case))


@torch.compiler.assume_constant_result
def _traced_choice(signature: tuple, device: str) -> str:
    """Inside a traced region (torch.compile / export): the decision this site was given outside,
    else the static default. Runs outside the trace (a constant to the compiler): no measuring, no
    graph break. Input sizes may be symbolic there, so the site is matched without them: the
    remembered and cached decisions of this site on this device (any input size) are used when they
    all agree, else ``torch``."""
    dev = torch.device(device)
    with _lock:
        chosen = {d.chosen for (case, d_dev, _, gen), d in _memo.items()
                  if d_dev == dev and gen == cands.generation[case[0]] and shape_free(case) == signature}
        if not chosen:
            f = keys.facts(signature, dev)
            names = [c.name for c in cands.candidates(signature[0]) if c.unsupported(f) is None]
            want = {**{k: v for k, v in keys.case_fields(signature).items() if k != "x"},
                    **keys.env_fields(dev, names)}
            chosen = {e["chosen"] for e in _file.entries().values()
                      if {k: v for k, v in e.get("fields", {}).items() if k != "x"} == want}
        if len(chosen) == 1:
            return chosen.pop()
        why = "traced (torch.compile / export)" + ("; this site's decisions differ by input size" if chosen else "")
        return _static(signature, dev, None, why).chosen


def measuring_blocked(device: torch.device) -> Optional[str]:
    """Why measuring is not allowed right now, or None."""
    if os.environ.get(TUNE_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return f"{TUNE_ENV}=0"
    if device.type not in ("cuda", "cpu"):
        return f"tensors on {device.type} (fake or meta) cannot be timed"
    if torch.jit.is_tracing():
        return "traced (torch.jit.trace)"
    if capturing():
        return "CUDA graph capture"
    return None


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False on a CPU-only build)."""
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except (RuntimeError, AssertionError):  # a CPU-only torch cannot capture
        return False


# ---------------------------------------------------------------------------------- measuring
def _measure(case: tuple, device: torch.device, trial, site: Optional[str]) -> Decision:
    op = case[0]
    ok, skipped = _available(case, device)
    key = keys.key_string(case, device, [c.name for c in ok])
    f = keys.facts(case, device)
    tf32 = dict(zip(keys.CASE_FIELDS[op], case[1:])).get("tf32", False)
    prec = measure.precision(keys.dtype_name(f.cdt), tf32)
    tol, gtol = measure.TOLERANCE[prec], measure.GRAD_TOLERANCE[prec]
    t0 = time.perf_counter()
    results: Dict[str, Union[float, str]] = dict(skipped)
    runs: Dict[str, Callable] = {}
    failed: Dict[str, str] = {}
    ref = None
    for c in ok:
        try:
            run = trial(c)
            out = run()
            if c.name == measure.REFERENCE:
                ref = [None if t is None else t.detach() for t in out]
            else:
                why = measure.mismatch(out, ref, tol, gtol)
                if why is not None:
                    raise _Mismatch(why)
            del out
            runs[c.name] = _guarded(run, c.name, failed, device)
        except Exception as exc:  # noqa: BLE001 - any failure of a candidate only excludes it
            why = _describe(exc)
            if c.name == measure.REFERENCE:
                # PyTorch's own path failed: nothing to check against. Run it for real (it raises
                # for the user exactly as PyTorch would); decide nothing.
                return _static(case, device, site, f"the torch reference raised: {why}")
            failed[c.name] = why
            _free(device)
    ref = None
    timings: Dict[str, measure.Stats] = {}
    if runs:
        samples = measure.get_timer()(runs, device)
        for name in runs:
            if name in failed:
                continue
            timings[name] = measure.Stats.of(samples[name])
    for name, why in failed.items():
        results[name] = f"excluded: {why}"
        warnings.warn(f"resnet_fused: candidate {name!r} of {op} excluded for key {key}: {why}",
                      RuntimeWarning, stacklevel=5)
    if measure.REFERENCE not in timings:  # the reference failed while being timed
        return _static(case, device, site, f"the torch reference raised: {failed.get(measure.REFERENCE)}")
    chosen, margin = measure.pick(timings)
    results.update({n: round(s.median, 5) for n, s in timings.items()})
    d = Decision(op, key, chosen, results, "measured", margin=round(margin, 4),
                 measure_ms=round((time.perf_counter() - t0) * 1e3, 3),
                 fields={**keys.case_fields(case), **keys.env_fields(device, [c.name for c in ok])})
    _record(d, site)
    _file.store(key, {"op": op, "chosen": chosen, "candidates": results, "margin": d.margin,
                      "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      "fields": d.fields})
    return d


class _Mismatch(Exception):
    pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _Mismatch):
        return str(exc)
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg[:300]}" if msg else type(exc).__name__


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _guarded(run: Callable, name: str, failed: Dict[str, str], device: torch.device) -> Callable:
    """``run`` for the timer: an exception (out of memory, say) excludes the candidate instead of
    failing the user's call."""
    def go():
        if name in failed:
            return None
        try:
            return run()
        except Exception as exc:  # noqa: BLE001
            failed[name] = _describe(exc)
            _free(device)
            return None
    return go


# ------------------------------------------------------------------------------------- report
def rows() -> List[Decision]:
    with _lock:
        return list(_rows.values())
