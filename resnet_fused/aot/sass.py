"""Reading compiled GPU code without a GPU: ptxas ``-v`` logs, ``cuobjdump -res-usage`` and SASS.

Pure text parsers (no subprocess here), so they are tested on fixed samples:

- :func:`parse_ptxas_log`: per function and architecture, registers, stack frame, spill store and
  load bytes, static shared memory, as ``ptxas -v`` (or ``nvcc -Xptxas -v``) prints them.
- :func:`parse_res_usage`: per function, ``REG``/``STACK``/``SHARED``/``LOCAL`` from
  ``cuobjdump -res-usage``.
- :func:`sass_counts`: instruction counts from ``cuobjdump -sass`` / ``nvdisasm`` output: the
  tensor-core MMAs (``HGMMA`` = Hopper's wgmma, ``HMMA`` = mma.sync), asynchronous copies
  (``LDGSTS`` = cp.async, ``UTMALDG`` = a TMA load), local-memory traffic (``LDL``/``STL``: spills
  or local arrays) and the widths of global loads and stores (``LDG.E.128`` = 128-bit, no width
  suffix = 32-bit, ``.U16`` = 16-bit...).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

# opcodes counted by name (the first dot-separated part of the SASS mnemonic)
COUNTED = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "UTMASTG", "LDL", "STL")
# width suffixes of LDG/STG/LDGSTS in bits; no suffix means 32
_WIDTHS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8, "256": 256}

_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


@dataclass
class PtxasFunction:
    """One function in a ptxas ``-v`` log. ``entry``: a kernel (has a register count); device
    functions ptxas did not inline only report their frame. Sizes in bytes."""
    name: str
    arch: str
    entry: bool = False
    registers: Optional[int] = None
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0  # static shared memory (Triton kernels use dynamic shared memory: 0 here)
    barriers: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_BARRIERS = re.compile(r"used (\d+) barriers")
_ARCH_HINT = re.compile(r"for '(sm_\w+)'")


def parse_ptxas_log(text: str) -> Dict[Tuple[str, str], PtxasFunction]:
    """``{(arch, function name): PtxasFunction}`` from a ptxas ``-v`` log (several functions and
    architectures may be interleaved, as one nvcc call with several ``-gencode`` prints them)."""
    out: Dict[Tuple[str, str], PtxasFunction] = {}
    arch = "?"
    entry: Optional[PtxasFunction] = None  # the kernel whose "Used N registers" line comes next
    props: Optional[PtxasFunction] = None  # the function whose frame line comes next

    def get(name: str) -> PtxasFunction:
        if (arch, name) not in out:
            out[(arch, name)] = PtxasFunction(name, arch)
        return out[(arch, name)]

    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            arch = m.group(2)
            entry = get(m.group(1))
            entry.entry = True
            continue
        m = _ARCH_HINT.search(line)  # "Compiling ... for 'sm_90'" lines of non-entry functions
        if m and "Function properties" not in line:
            arch = m.group(1)
        m = _PROPS.search(line)
        if m:
            props = get(m.group(1))
            continue
        m = _FRAME.search(line)
        if m and props is not None:
            props.stack, props.spill_stores, props.spill_loads = (int(g) for g in m.groups())
            props = None
            continue
        m = _USED.search(line)
        if m and entry is not None:
            entry.registers = int(m.group(1))
            s = _SMEM.search(line)
            entry.smem = int(s.group(1)) if s else 0
            b = _BARRIERS.search(line)
            entry.barriers = int(b.group(1)) if b else 0
            entry = None
    return out


def parse_res_usage(text: str) -> Dict[str, Dict[str, int]]:
    """``{function: {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n, ...}}`` from
    ``cuobjdump -res-usage``."""
    out: Dict[str, Dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name is not None and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return out


def opcodes(sass: str) -> Counter:
    """Count of each full SASS mnemonic (``LDG.E.128.CONSTANT``, ``HGMMA.64x128x16.F32``...)."""
    return Counter(m.group(1) for m in map(_SASS_LINE.match, sass.splitlines()) if m)


def _width(mnemonic: str) -> int:
    for part in mnemonic.split(".")[1:]:
        if part in _WIDTHS:
            return _WIDTHS[part]
    return 32


def sass_counts(sass: str) -> Dict[str, object]:
    """Counts of the :data:`COUNTED` opcodes, plus ``ldg``/``stg``/``ldgsts`` width histograms
    (``{bits: count}``) and ``instructions`` (all SASS instructions)."""
    ops = opcodes(sass)
    counts: Dict[str, object] = {name: 0 for name in COUNTED}
    widths = {"ldg": Counter(), "stg": Counter(), "ldgsts": Counter()}
    for mnemonic, n in ops.items():
        head = mnemonic.split(".")[0]
        if head in counts:
            counts[head] += n
        if head in ("LDG", "STG", "LDGSTS"):
            widths[head.lower()][_width(mnemonic)] += n
    counts.update({k: dict(sorted(v.items(), reverse=True)) for k, v in widths.items()})
    counts["instructions"] = sum(ops.values())
    return counts


def split_functions(sass: str) -> Dict[Tuple[str, str], str]:
    """``{(arch, function): its SASS}`` from ``cuobjdump -sass`` of an object or fatbinary with
    several kernels and architectures (``arch = sm_90`` and ``Function : name`` headers)."""
    out: Dict[Tuple[str, str], List[str]] = {}
    arch, current = "?", None
    for line in sass.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch, current = m.group(1), None
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = out.setdefault((arch, m.group(1)), [])
            continue
        if current is not None:
            current.append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def format_widths(hist: Dict[int, int]) -> str:
    """``{128: 4, 32: 2}`` -> ``"128b:4 32b:2"`` (widest first); ``""`` for none."""
    return " ".join(f"{bits}b:{n}" for bits, n in sorted(hist.items(), reverse=True))


_PRECISION = re.compile(r"inputPrecision\s*=\s*(\w+)")
_OPERAND = re.compile(r":\s*tensor<[0-9x]+x(\w+)>")
# fp32 dot precisions that run on tensor cores (TF32 or bf16 pieces); IEEE fp32 runs on FMA units
_TC_FP32 = ("tf32", "tf32x3", "bf16x3", "bf16x6")


def tensor_core_dots(ttir: str) -> Tuple[int, int]:
    """``(dots, tensor-core dots)`` among the ``tt.dot`` ops of Triton IR: a dot is a
    tensor-core dot when its operands are fp16/bf16/fp8, or fp32 at a TF32 (or bf16-split)
    precision. Triton omits ``inputPrecision`` from the IR when it is IEEE."""
    dots = tc = 0
    for line in ttir.splitlines():
        if not re.search(r"=\s*tt\.dot\s", line):
            continue
        dots += 1
        m, p = _OPERAND.search(line), _PRECISION.search(line)
        elem, precision = (m.group(1) if m else ""), (p.group(1) if p else "ieee")
        if elem in ("f16", "bf16") or elem.startswith("f8") or (elem == "f32" and precision in _TC_FP32):
            tc += 1
    return dots, tc
