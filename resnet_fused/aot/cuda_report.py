"""Resource report of the C++/CUDA kernels from ``nvcc -Xptxas -v`` (``python -m resnet_fused.build --check``).

One row per kernel (and per non-inlined device function) and architecture: registers, stack frame,
spill store/load bytes, static shared memory, barriers. A spill in a kernel of a conv or BatchNorm
source (``csrc/cuda/conv_*.cu``, ``csrc/cuda/bn_*.cu``: every kernel the library has today) fails
the check. A stack frame alone does not: CUTLASS device functions and kernels that take
arguments by reference may keep a frame without spilling; the spill columns are what ptxas counts
as register spills.

The library is built for ``sm_80`` and ``sm_90`` (``RESNET_FUSED_CUDA_ARCHS``), not ``sm_90a``:
Hopper's wgmma and TMA need ``sm_90a``, so the CUTLASS 2.x conv runs legacy ``mma.sync`` on
Hopper whatever this report says about its registers.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .sass import format_widths, parse_ptxas_log, sass_counts, split_functions

GATED = re.compile(r"^(conv|bn)_[^/]*\.cu$")  # sources whose kernels must not spill
COLUMNS = ["source", "arch", "kernel", "entry", "registers", "stack", "spill_stores", "spill_loads", "smem",
           "barriers", "hgmma", "hmma", "ldgsts", "utmaldg", "ldl", "stl", "ldg_widths", "stg_widths", "gated",
           "fails", "mangled"]


def demangle(names: Iterable[str]) -> Dict[str, str]:
    """``{mangled: demangled}`` through ``cu++filt`` or ``c++filt`` (names unchanged without either)."""
    names = sorted(set(names))
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    out = proc.stdout.splitlines()
    if proc.returncode != 0 or len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out))


def _strip_args(name: str) -> str:
    """Drop a trailing ``(parameter list)`` (at bracket depth 0)."""
    depth = 0
    for i, ch in enumerate(name):
        if ch in "<(":
            if ch == "(" and depth == 0 and i > 0:
                return name[:i]
            depth += 1
        elif ch in ">)":
            depth -= 1
    return name


def _mangled_ids(prefix: str) -> List[str]:
    """The length-prefixed identifiers of an Itanium-mangled name prefix (``6Kernel`` -> Kernel)."""
    ids, i = [], 0
    while i < len(prefix):
        m = re.match(r"\d+", prefix[i:])
        if not m:
            i += 1
            continue
        n, j = int(m.group()), i + len(m.group())
        ids.append(prefix[j:j + n])
        i = j + n
    return ids


def short_name(demangled: str, mangled: str) -> str:
    """A readable kernel name: namespaces and parameters dropped. A CUTLASS kernel (too long to
    read, and too deep for c++filt) as its class, threadblock tile and operand type, plus a digest
    of the full name."""
    if not demangled.startswith("_Z"):
        name = _strip_args(demangled.replace("(anonymous namespace)::", ""))
        name = re.sub(r"^void |\b(?:rf::cuda::|cutlass::)", "", name)
        if len(name) <= 80:
            return name
    cut = mangled.find("INS_")
    ids = _mangled_ids(mangled[3:cut] if mangled.startswith("_ZN") and cut > 0 else "")
    tile = re.search(r"GemmShapeILi(\d+)ELi(\d+)ELi(\d+)E", mangled)
    elem = re.search(r"(tfloat32_t|bfloat16_t|half_t)", mangled)
    parts = [ids[-1] if ids else mangled[:40]]
    if tile:
        parts.append("tile " + "x".join(tile.groups()))
    if elem:
        parts.append(elem.group(1))
    return " ".join(parts) + " #" + hashlib.sha1(mangled.encode()).hexdigest()[:6]


def resource_rows(logs: Sequence[Tuple[str, str]], sass: Optional[Dict[str, str]] = None) -> List[Dict]:
    """Rows from ``(source file name, ptxas -v log)`` pairs; ``sass``: source file name ->
    ``cuobjdump -sass`` of its object, for the instruction counts (left empty without)."""
    parsed = [(src, parse_ptxas_log(log)) for src, log in logs]
    names = demangle(n for _, funcs in parsed for (_, n) in funcs)
    rows = []
    for src, funcs in parsed:
        code = split_functions((sass or {}).get(src, ""))
        for (arch, mangled), f in sorted(funcs.items()):
            gated = bool(GATED.match(src))
            row = {"source": src, "arch": arch, "kernel": short_name(names.get(mangled, mangled), mangled),
                   "entry": f.entry, "registers": f.registers, "stack": f.stack, "spill_stores": f.spill_stores,
                   "spill_loads": f.spill_loads, "smem": f.smem, "barriers": f.barriers, "gated": gated,
                   "fails": "spill" if gated and f.spills else "", "mangled": mangled}
            if (arch, mangled) in code:
                c = sass_counts(code[(arch, mangled)])
                row.update({k.lower(): c[k] for k in ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDL", "STL")},
                           ldg_widths=format_widths(c["ldg"]), stg_widths=format_widths(c["stg"]))
            rows.append(row)
    return rows


def summary_lines(rows: Sequence[Dict]) -> List[str]:
    """Per source and architecture: kernels, registers range, spills, largest stack frame."""
    lines = []
    for key in sorted({(r["source"], r["arch"]) for r in rows}):
        mine = [r for r in rows if (r["source"], r["arch"]) == key]
        regs = [r["registers"] for r in mine if r["registers"] is not None]
        spilling = [r for r in mine if r["spill_stores"] or r["spill_loads"]]
        mma = [f"{k.upper()} in {n}" for k in ("hgmma", "hmma") if (n := sum(bool(r.get(k)) for r in mine))]
        lines.append(f"{key[0]} {key[1]}: {sum(r['entry'] for r in mine)} kernels, registers "
                     f"{min(regs, default=0)}-{max(regs, default=0)}, {len(spilling)} spilling"
                     f"{' (FAIL)' if any(r['fails'] for r in mine) else ''}, max stack "
                     f"{max((r['stack'] for r in mine), default=0)} B" + (f", {', '.join(mma)}" if mma else ""))
    return lines


def write(out: Path, rows: Sequence[Dict], header: Dict[str, str]) -> List[Path]:
    """``cuda_resources.csv`` (every column) and ``cuda_report.md`` into ``out``."""
    from .report import write_csv

    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "cuda_resources.csv", out / "cuda_report.md"
    ordered = sorted(rows, key=lambda r: (r["source"], r["arch"], r["kernel"]))
    write_csv(csv_path, ordered, COLUMNS)
    failed = any(r["fails"] for r in rows)
    lines = ["# CUDA kernel resources (nvcc -Xptxas -v)", ""] + [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", f"**Verdict: {'FAIL' if failed else 'PASS'}** (a spill in a conv_*.cu / bn_*.cu kernel fails). "
              "Built for sm_90, not sm_90a: no wgmma/TMA, the CUTLASS conv uses legacy mma.sync on Hopper.", ""]
    lines += [f"- {s}" for s in summary_lines(rows)]
    lines += ["", "| source | arch | kernel | regs | stack B | spill st B | spill ld B | smem B | HGMMA | HMMA | "
              "LDGSTS | LDG widths | STG widths | fails |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ordered:
        cells = [r.get(k) for k in ("hgmma", "hmma", "ldgsts", "ldg_widths", "stg_widths")]
        lines.append(f"| {r['source']} | {r['arch']} | `{r['kernel']}`{'' if r['entry'] else ' (device fn)'} | "
                     f"{'' if r['registers'] is None else r['registers']} | {r['stack']} | {r['spill_stores']} | "
                     f"{r['spill_loads']} | {r['smem']} | " + " | ".join("" if c is None else str(c) for c in cells)
                     + f" | {r['fails']} |")
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]
