"""How a benchmark run is set up: the ``auto`` provider (``backend="auto"``, the measured dispatch,
what users get), cuDNN's autotuner, and the settings line a run prints.

A benchmark runs ``auto`` inside :func:`dispatch_isolated` (no decision file read or written),
calls :func:`dispatch_fresh` before each case (its checked first call then measures every key, as
a user's first call does), and after it records :func:`dispatch_record` into the result file's
``"dispatch"`` list (:func:`dispatch_entry`); :func:`auto_note` says in words what ``auto`` ran.
:func:`cudnn_benchmark` sets ``torch.backends.cudnn.benchmark`` for a CUDA run;
:func:`settings_suffix` ends the settings line.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional, Sequence

import torch

# The dispatch's environment fields (the same for every decision of a run on one device): left out
# of each decision's "case" in a result file, given once per entry under "env".
DISPATCH_ENV_FIELDS = ("device", "capability", "threads", "resnet_fused", "torch", "triton")
DISPATCH_CASE_KEYS = ("model", "shape", "batch", "dtype", "mode", "layout", "variant")
DECISION_KEYS = ("op", "case", "chosen", "candidates", "source", "sites", "margin", "measure_ms")


@contextlib.contextmanager
def dispatch_isolated():
    """While open: ``RESNET_FUSED_CACHE_DIR=""``, so the ``auto`` provider neither reads the
    user's decision file (a decision made on another day, by another build or under other load
    would not be measured here) nor writes it; restored after, whatever happens inside."""
    from resnet_fused.dispatch import CACHE_DIR_ENV

    saved = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(CACHE_DIR_ENV, None)
        else:
            os.environ[CACHE_DIR_ENV] = saved


def dispatch_fresh() -> None:
    """Forget this process's dispatch decisions (``resnet_fused.dispatch.forget``) before an
    ``auto`` run: its warm-up then measures every key of the case, as a user's first call does,
    and :func:`dispatch_record` after it is that case's complete record."""
    from resnet_fused.dispatch import forget

    forget()


def dispatch_record() -> dict:
    """This process's dispatch decisions (taken after a case's ``auto`` run), compact:
    ``{"env": {...}, "decisions": [...]}``: the dispatch's environment fields once
    (:data:`DISPATCH_ENV_FIELDS`), then per decision :data:`DECISION_KEYS` (``case``: the key's
    other fields; ``candidates``: name -> median ms, or why it was not timed; ``source``:
    measured | cache | static)."""
    from resnet_fused.dispatch import dispatch_report

    env: Dict[str, object] = {}
    decisions = []
    for d in dispatch_report().as_dicts():
        fields = d["fields"]
        env = env or {k: fields[k] for k in DISPATCH_ENV_FIELDS if k in fields}
        case = {k: v for k, v in fields.items() if k != "op" and k not in DISPATCH_ENV_FIELDS}
        decisions.append({"op": d["op"], "case": case, "chosen": d["chosen"], "candidates": d["candidates"],
                          "source": d["source"], "sites": d["sites"], "margin": d["margin"],
                          "measure_ms": d["measure_ms"]})
    return {"env": env, "decisions": decisions}


def dispatch_entry(case: Dict[str, object], record: dict) -> dict:
    """One entry of a result file's ``"dispatch"`` list: the case's :data:`DISPATCH_CASE_KEYS`
    as its ``auto`` row has them (a reader joins on them; ``variant`` "" where the rows have no
    such column), then :func:`dispatch_record`'s ``env`` and ``decisions``."""
    return {**{k: case.get(k, "") for k in DISPATCH_CASE_KEYS}, **record}


def dispatch_late(warm: dict, record: dict) -> Optional[str]:
    """None if ``record`` (taken after timing) has no key that ``warm`` (taken right after the
    warm-up call) lacks, else a note saying how many keys were first measured inside the timed
    region (their measuring inflated the time): the warm-up must call with exactly the timed
    shapes."""
    late = len(record["decisions"]) - len(warm["decisions"])
    if late <= 0:
        return None
    return f"auto: {late} dispatch key(s) first seen after the warm-up: measured inside the timed region"


def auto_note(decisions: Sequence[dict]) -> str:
    """What ``auto`` ran, for a log line or a row's ``note``: one decision as ``auto chose cuda
    (torch 0.412 ms, cuda 0.380 ms; triton excluded)``; several as counts per op, ``auto:
    conv_bias_act cuda 12, torch 9; block_train torch 7``."""
    if not decisions:
        return "auto: no dispatch decision"
    if len(decisions) == 1:
        d = decisions[0]
        timed = [f"{n} {v:.4g} ms" for n, v in d["candidates"].items() if isinstance(v, (int, float))]
        excluded = [n for n, v in d["candidates"].items() if isinstance(v, str) and v.startswith("excluded")]
        parts = ", ".join(timed) + (f"; {', '.join(excluded)} excluded" if excluded else "")
        return f"auto chose {d['chosen']} ({d['source']}{': ' + parts if parts else ''})"
    per_op: Dict[str, Dict[str, int]] = {}
    for d in decisions:
        counts = per_op.setdefault(d["op"], {})
        counts[d["chosen"]] = counts.get(d["chosen"], 0) + 1
    return "auto: " + "; ".join(op + " " + ", ".join(f"{n} {k}" for n, k in sorted(c.items(), key=lambda x: -x[1]))
                                for op, c in per_op.items())


@contextlib.contextmanager
def cudnn_benchmark(device: torch.device, on: bool):
    """``torch.backends.cudnn.benchmark`` set to ``on`` for a CUDA run (left as it is on CPU) while
    the context is open, restored after, whatever happens inside."""
    saved = torch.backends.cudnn.benchmark
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def settings_suffix(device: torch.device, cudnn_bench: Optional[bool], deadline: Optional[float],
                    t0: float) -> str:
    """The end of a benchmark's settings line: ``; cudnn.benchmark True; deadline 110 s`` (each
    part only where it applies: a CUDA run, a deadline given as ``time.monotonic()`` after ``t0``)."""
    out = ""
    if cudnn_bench is not None and torch.device(device).type == "cuda":
        out += f"; cudnn.benchmark {cudnn_bench}"
    if deadline:
        out += f"; deadline {deadline - t0:.0f} s"
    return out
