"""Measured, self-verifying dispatch: what ``backend="auto"`` (the default) does.

At the first call with a new key — the op, every shape and geometry field, dtype, memory format,
TF32 setting, residual/ReLU flags, the device and the library/torch/triton versions
(:mod:`.keys`) — each candidate implementation of the op runs on the real inputs, is checked
against PyTorch's own result, and is timed; the fastest correct one runs from then on, but only if
it beats PyTorch by more than the measured noise (:mod:`.dispatcher`, :mod:`.measure`). Decisions
are kept in memory and in a JSON file under the user cache directory (:mod:`.cache`), so a second
run of a program measures nothing.

Switches (environment):

- ``RESNET_FUSED_TUNE=0``: never measure; use the cached decision, else the static default
  ``torch`` (PyTorch's path, BatchNorm folded in eval) on every device.
- ``RESNET_FUSED_CACHE_DIR``: where the decision file lives (default ``~/.cache/resnet_fused``,
  or ``$XDG_CACHE_HOME/resnet_fused``); empty turns persistence off.

No measuring happens while torch.compile / torch.export / torch.jit trace, during CUDA graph
capture, or for SyncBatchNorm training: there the cached decision or the static default runs.

Public API: :func:`dispatch_report`, :func:`register_candidate`, :func:`unregister_candidate`,
:func:`forget`; :func:`set_timer` replaces the clock (tests, experiments).
"""
from __future__ import annotations

from typing import List

from .candidates import OPS, register_candidate, unregister_candidate
from .dispatcher import TUNE_ENV, Decision, forget, rows
from .measure import set_timer
from .cache import ENV_DIR as CACHE_DIR_ENV, cache_path


class DispatchReport(list):
    """The decisions of this process: one :class:`Decision` per key (``op``, ``key``, ``chosen``,
    ``candidates`` — name to median ms, or why it was not timed —, ``source`` — ``"measured"``,
    ``"cache"`` or ``"static"`` —, ``sites``, ``margin``, ``measure_ms``). ``str()`` is a table."""

    def as_dicts(self) -> List[dict]:
        return [d.as_dict() for d in self]

    def __str__(self) -> str:
        if not self:
            return "resnet_fused dispatch: no decisions yet (nothing ran with backend 'auto')"
        lines = [f"resnet_fused dispatch: {len(self)} key(s)"]
        head = ("op", "chosen", "source", "case", "candidates (median ms or why not)")
        table = [head]
        for d in self:
            case = _case_summary(d)
            cands = ", ".join(f"{n} {v:.3f}" if isinstance(v, (int, float)) else f"{n}: {v}"
                              for n, v in d.candidates.items())
            table.append((d.op, d.chosen, d.source, case, cands))
        widths = [max(len(str(r[i])) for r in table) for i in range(4)]
        for r in table:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r[:4], widths)) + "  " + str(r[4]))
        return "\n".join(lines)


def _case_summary(d: Decision) -> str:
    f = d.fields
    if not f:
        return d.key.split("|device=")[0]
    if d.op == "conv_bias_act":
        w = f.get("weight") or []
        x = f.get("x") or []
        k = f"{w[2]}x{w[3]}" if len(w) == 4 else "?"
        return (f"{'x'.join(map(str, x))} {f.get('layout')} -> {w[0] if w else '?'}ch k{k} s{(f.get('stride') or ['?'])[0]} "
                f"{f.get('dtype')}{' +res' if f.get('residual') else ''}{' relu' if f.get('relu') else ''}")
    if d.op == "bn_act":
        return f"{'x'.join(map(str, f.get('x') or []))} {f.get('layout')} {f.get('dtype')}"
    return f"{f.get('block')} {'x'.join(map(str, f.get('x') or []))} {f.get('layout')} {f.get('dtype')}"


def dispatch_report() -> DispatchReport:
    """This process's dispatch decisions (see :class:`DispatchReport`)."""
    return DispatchReport(rows())


__all__ = ["OPS", "Decision", "DispatchReport", "dispatch_report", "register_candidate", "unregister_candidate",
           "forget", "set_timer", "TUNE_ENV", "CACHE_DIR_ENV", "cache_path"]
