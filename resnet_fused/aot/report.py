"""The codegen report: rules, per-variant rows, the summary, and the CSV / markdown / JSON files.

Rules (each failing row names the rules it breaks in ``fails``):

- ``compile``: the variant did not compile (or its resources could not be read);
- ``spill``: ptxas reports spill stores or loads (any byte);
- ``smem``: Triton's shared memory for the launch is over the target's per-block limit;
- ``no-hgmma``: on ``sm_90a``, a kernel with a tensor-core ``tt.dot`` (fp16/bf16 operands, or
  fp32 at TF32 precision) has no ``HGMMA`` instruction: it runs Hopper's tensor cores through the
  legacy ``mma.sync`` path (``HMMA``), at a fraction of their throughput. Kernels without dots
  (the elementwise and statistics kernels) and IEEE fp32 dots are exempt.

Files (in ``out``): ``triton_variants.csv`` (one row per variant x target, every column),
``triton_sites.csv`` (each kernel call of each workload and the variants it compiles),
``triton_report.md`` (summary and table), ``triton_summary.json``.
"""
from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .compile import TARGETS
from .record import Launch
from .sass import format_widths

RULES = ("compile", "spill", "smem", "no-hgmma")

COLUMNS = ["arch", "variant", "kernel", "config", "meta", "specialised", "unaligned", "types", "tensor_core", "status",
           "fails", "registers", "spill_stores", "spill_loads", "stack", "local", "shared", "smem_limit",
           "num_warps", "num_stages", "hgmma", "hmma", "ldgsts", "utmaldg", "utmastg", "ldl", "stl", "ldg_widths",
           "stg_widths", "ldgsts_widths", "instructions", "compile_s", "ptxas_s", "cached", "launches", "models",
           "dtypes", "layouts", "modules", "error"]

def _is_config_key(name: str) -> bool:
    """Tile meta-parameters by the Triton convention: ``BLOCK``, ``BLOCK_M``..., ``GROUP_M``."""
    return name.startswith("BLOCK") or name.startswith("GROUP")


def rule_failures(row: Dict[str, Any], arch: str) -> List[str]:
    """The rules ``row`` (a compile result) breaks on target ``arch``."""
    if row.get("status") != "ok":
        return ["compile"]
    fails = []
    if (row.get("spill_stores") or 0) > 0 or (row.get("spill_loads") or 0) > 0:
        fails.append("spill")
    if (row.get("shared") or 0) > TARGETS[arch].smem_limit:
        fails.append("smem")
    if TARGETS[arch].has_wgmma and (row.get("tc_dots") or 0) > 0 and not row.get("hgmma"):
        fails.append("no-hgmma")
    return fails


def launch_option(ln: Launch, name: str):
    """A compile option of the launch, or Triton's CUDA default when the launch left it out."""
    from triton.backends.nvidia.compiler import CUDAOptions

    return ln.options.get(name, CUDAOptions.__dataclass_fields__[name].default)


def config_of(ln: Launch) -> str:
    """``"128x64x32 g8 w4 s4"``-style launch configuration: block sizes, warps, stages."""
    c = ln.constexpr_values()
    blocks = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK"))
    group = "".join(f" g{v}" for k, v in c.items() if k.startswith("GROUP"))
    return f"{blocks}{group} w{launch_option(ln, 'num_warps')} s{launch_option(ln, 'num_stages')}"


def meta_of(ln: Launch) -> str:
    """The kernel's own meta-parameters (upper-case constexprs other than tiles), compactly: a True
    flag by name, a False one left out, others ``NAME=value`` (``KH=3 KW=3 HAS_BIAS RELU``)."""
    out = []
    for k, v in ln.constexpr_values().items():
        if not k.isupper() or _is_config_key(k) or v is False:
            continue
        out.append(k if v is True else f"{k}={v}")
    return " ".join(out)


def unaligned(ln: Launch) -> List[str]:
    """Pointer and integer arguments *without* ``tt.divisibility`` (usually the shorter list)."""
    aligned = set(ln.divisible())
    return [k for k, t in ln.signature.items() if (t.startswith("*") or t[:1] in "iu") and k not in aligned]


def pointer_types(ln: Launch) -> str:
    """Pointer arguments grouped by element type: ``"fp16: x w out; fp32: bias"`` (``_ptr`` dropped)."""
    groups: Dict[str, List[str]] = defaultdict(list)
    for k, t in ln.signature.items():
        if t.startswith("*"):
            groups[t.lstrip("*k")].append(k[:-4] if k.endswith("_ptr") else k)
    return "; ".join(f"{t}: {' '.join(names)}" for t, names in groups.items())


def _widths(hist: Optional[Dict]) -> str:
    return format_widths({int(k): v for k, v in (hist or {}).items()})


class Variants:
    """Distinct variants of a list of launches, with what maps to each (sites, models, dtypes...)."""

    def __init__(self, launches: Sequence[Launch]) -> None:
        self.launches = list(launches)
        self.first: Dict[str, Launch] = {}
        self.sites: Dict[str, List[Launch]] = defaultdict(list)
        for ln in self.launches:
            self.first.setdefault(ln.variant, ln)
            self.sites[ln.variant].append(ln)

    def __len__(self) -> int:
        return len(self.first)

    def for_arch(self, arch: str) -> List[Launch]:
        """The variants recorded for target ``arch`` (one launch each)."""
        return [self.first[v] for v, sites in self.sites.items() if any(s.site.get("arch") == arch for s in sites)]

    def where(self, variant: str, arch: Optional[str] = None) -> Dict[str, str]:
        sites = [s for s in self.sites[variant] if arch is None or s.site.get("arch") == arch]
        models = sorted({f"{s.site.get('model')}:{s.site.get('mode')}" for s in sites})
        modules = sorted({f"{s.site.get('module')}({s.site.get('phase', '')[:3]})" for s in sites})
        return {"launches": len(sites), "models": " ".join(models),
                "dtypes": " ".join(sorted({str(s.site.get("dtype")) for s in sites})),
                "layouts": " ".join(sorted({str(s.site.get("layout")) for s in sites})),
                "modules": " ".join(modules[:4]) + (f" +{len(modules) - 4} more" if len(modules) > 4 else "")}


def rows_for(variants: Variants, results: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One report row per compile result (variant x target), with the variant's description."""
    rows = []
    for res in results:
        ln = variants.first[res["variant"]]
        arch = res["arch"]
        consts = " ".join(f"{k}={v}" for k, v in ln.constexpr_values().items() if not k.isupper())
        row = {**{k: res.get(k) for k in COLUMNS if k in res},
               "arch": arch, "variant": ln.variant, "kernel": ln.name, "config": config_of(ln), "meta": meta_of(ln),
               "specialised": consts, "unaligned": " ".join(unaligned(ln)), "types": pointer_types(ln),
               "tensor_core": bool(res.get("tc_dots")) if res.get("status") == "ok" else None,
               "smem_limit": TARGETS[arch].smem_limit, "num_stages": launch_option(ln, "num_stages"),
               "ldg_widths": _widths(res.get("ldg")), "stg_widths": _widths(res.get("stg")),
               "ldgsts": res.get("ldgsts") if isinstance(res.get("ldgsts"), int) else sum((res.get("ldgsts") or {}).values()),
               "ldgsts_widths": _widths(res.get("ldgsts")) if isinstance(res.get("ldgsts"), dict) else "",
               **variants.where(ln.variant, arch)}
        row["fails"] = " ".join(rule_failures(res, arch))
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------- summary
def workload_counts(launches: Sequence[Launch]) -> List[Dict[str, Any]]:
    """Per (target, model, mode, dtype, layout): kernel calls; ``launches`` recorded (an autotuned call
    records one per configuration that survives pruning: the sites before dedupe); autotune keys and
    ``autotune_trials`` (configurations compiled and timed over the distinct keys: what the autotuner
    runs in a fresh process); and ``compilations``, the distinct variants a fresh GPU process compiles."""
    groups: Dict[tuple, List[Launch]] = defaultdict(list)
    for ln in launches:
        s = ln.site
        groups[(s.get("arch"), s.get("model"), s.get("mode"), s.get("dtype"), s.get("layout"), s.get("batch"))].append(ln)
    out = []
    for (arch, model, mode, dtype, layout, batch), lns in groups.items():
        out.append({"arch": arch, "model": model, "mode": mode, "dtype": dtype, "layout": layout, "batch": batch,
                    "calls": sum(1 for ln in lns if ln.autotune is None or ln.autotune[2] == 0),
                    "launches": len(lns),
                    "autotune_keys": len({(ln.kernel, ln.autotune[0]) for ln in lns if ln.autotune}),
                    "autotune_trials": len({(ln.kernel, ln.autotune[0], ln.autotune[2]) for ln in lns if ln.autotune}),
                    "compilations": len({ln.variant for ln in lns})})
    return out


def headline(summary: Dict[str, Any], dtype: str = "fp16", layout: str = "channels_last") -> List[str]:
    """One sentence per model and batch: distinct compilations of an eval forward and of a training
    step in the production setting (fp16, channels_last), when those were recorded."""
    out = []
    shown = shown_workloads(summary)
    for arch, model, batch in dict.fromkeys((w["arch"], w["model"], w["batch"]) for w in shown):
        got = {w["mode"]: w for w in shown
               if (w["arch"], w["model"], w["batch"], w["dtype"], w["layout"]) == (arch, model, batch, dtype, layout)}
        if got:
            both = summary["both_modes"].get(f"{arch} {model} {dtype} {layout} {batch}")
            out.append(f"{model} on {arch} ({dtype}, {layout}, batch {batch}): " + "; ".join(
                f"{'eval forward' if m == 'eval' else 'training step (forward + backward)'} {w['compilations']} "
                f"distinct Triton compilations ({w['calls']} kernel calls, {w['autotune_keys']} autotune keys)"
                for m, w in got.items()) + (f"; both in one process {both}" if both and len(got) > 1 else ""))
    return out


def shown_workloads(summary: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The workload rows worth printing: one target's when every target recorded the same launches."""
    first = summary["workloads"][0]["arch"] if summary["workloads"] else None
    return [w for w in summary["workloads"] if not summary["same_for_all_archs"] or w["arch"] == first]


def summarize(launches: Sequence[Launch], rows: Sequence[Dict[str, Any]], archs: Sequence[str]) -> Dict[str, Any]:
    """Everything the report's head says, as data (also written as JSON)."""
    variants = Variants(launches)
    per_model: Dict[str, Dict[str, Any]] = {}
    for key in sorted({(ln.site.get("arch"), ln.site.get("model"), ln.site.get("mode")) for ln in launches}):
        lns = [ln for ln in launches if (ln.site.get("arch"), ln.site.get("model"), ln.site.get("mode")) == key]
        per_model[f"{key[0]} {key[1]}:{key[2]}"] = {"launches": len(lns), "compilations": len({ln.variant for ln in lns})}
    by_arch: Dict[str, List[Launch]] = defaultdict(list)
    for ln in launches:
        by_arch[ln.site.get("arch")].append(ln)
    recorded = {a: {"launches": len(lns), "calls": sum(1 for ln in lns if ln.autotune is None or ln.autotune[2] == 0),
                    "variants": len({ln.variant for ln in lns})} for a, lns in by_arch.items()}
    same = len({tuple(ln.variant for ln in lns) for lns in by_arch.values()}) <= 1
    targets = {}
    for arch in archs:
        mine = [r for r in rows if r["arch"] == arch]
        fails = Counter(f for r in mine for f in r["fails"].split())
        spilling = [r for r in mine if "spill" in r["fails"].split()]
        spill_by_config = Counter(r["config"] for r in spilling)
        targets[arch] = {
            "variants": len(mine), "ok": sum(r["status"] == "ok" for r in mine),
            "failing_variants": sum(bool(r["fails"]) for r in mine), "failures_by_rule": dict(fails),
            "spilling": len(spilling), "max_spill_store_bytes": max((r["spill_stores"] or 0 for r in mine), default=0),
            "spilling_by_config": dict(spill_by_config.most_common()),
            "no_hgmma_by_config": dict(Counter(r["config"] for r in mine if "no-hgmma" in r["fails"].split())),
            "max_registers": max((r["registers"] or 0 for r in mine), default=0),
            "max_shared": max((r["shared"] or 0 for r in mine), default=0), "smem_limit": TARGETS[arch].smem_limit,
            "tensor_core_variants": sum(bool(r["tensor_core"]) for r in mine),
            "with_hgmma": sum(bool(r.get("hgmma")) for r in mine),
            "with_utmaldg": sum(bool(r.get("utmaldg")) for r in mine),
            "with_ldgsts": sum(bool(r.get("ldgsts")) for r in mine),
            "compile_s_total": round(sum(r.get("compile_s") or 0 for r in mine), 1),
            "cached": sum(bool(r.get("cached")) for r in mine),
        }
    both: Dict[str, set] = defaultdict(set)
    for ln in launches:
        s = ln.site
        both[f"{s.get('arch')} {s.get('model')} {s.get('dtype')} {s.get('layout')} {s.get('batch')}"].add(ln.variant)
    return {"both_modes": {k: len(v) for k, v in both.items()}, "recorded": recorded, "same_for_all_archs": same,
            "variants": len(variants), "variants_by_kernel": dict(Counter(ln.name for ln in variants.first.values())),
            "per_model_mode": per_model, "workloads": workload_counts(launches), "targets": targets,
            "failed": any(r["fails"] for r in rows)}


# -------------------------------------------------------------------------------------- writing
def write_csv(path: Path, rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def site_rows(launches: Sequence[Launch]) -> List[Dict[str, Any]]:
    """Each kernel call (an autotuned call once, with all its candidate variants); ``call`` is its
    position among the calls of that kernel in that module and phase. Calls that differ only in
    the module (repeated blocks) share a row listing the modules."""
    calls: List[Dict[str, Any]] = []
    ordinal: Counter = Counter()
    for ln in launches:
        if ln.autotune is None or ln.autotune[2] == 0:
            s = ln.site
            where = (s.get("arch"), s.get("model"), s.get("mode"), s.get("dtype"), s.get("layout"), s.get("phase"),
                     s.get("module"), ln.name)
            calls.append({"arch": s.get("arch"), "model": s.get("model"), "mode": s.get("mode"), "dtype": s.get("dtype"),
                          "layout": s.get("layout"), "phase": s.get("phase"), "module": s.get("module"),
                          "kernel": ln.name, "call": ordinal[where], "variants": []})
            ordinal[where] += 1
        calls[-1]["variants"].append(ln.variant)
    merged: Dict[tuple, Dict[str, Any]] = {}
    for c in calls:
        key = tuple(v for k, v in c.items() if k not in ("module", "variants")) + tuple(sorted(c["variants"]))
        if key in merged:
            merged[key]["modules"].append(c["module"])
        else:
            merged[key] = {**c, "modules": [c["module"]], "variants": " ".join(sorted(c["variants"]))}
    return [{**r, "modules": " ".join(r["modules"]), "calls": len(r["modules"])} for r in merged.values()]


SITE_COLUMNS = ["arch", "model", "mode", "dtype", "layout", "phase", "kernel", "call", "calls", "modules", "variants"]
_MD_COLUMNS = [("arch", "arch"), ("kernel", "kernel"), ("variant", "variant"), ("config", "config"),
               ("dtypes", "dtype"), ("layouts", "layout"), ("meta", "meta-parameters"), ("registers", "regs"), ("spill_stores", "spill st B"),
               ("spill_loads", "spill ld B"), ("shared", "smem B"), ("hgmma", "HGMMA"), ("hmma", "HMMA"),
               ("ldgsts", "LDGSTS"), ("utmaldg", "UTMALDG"), ("ldg_widths", "LDG widths"),
               ("stg_widths", "STG widths"), ("compile_s", "compile s"), ("launches", "sites"), ("fails", "fails")]


def recorded_sentence(summary: Dict[str, Any]) -> str:
    per = "; ".join(f"{a}: {r['launches']} launches (one per autotune candidate) from {r['calls']} kernel calls, "
                    f"{r['variants']} distinct variants" for a, r in summary["recorded"].items())
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary["variants_by_kernel"].items()))
    return f"Recorded {per}. {summary['variants']} distinct variants in all: {kinds}."


def markdown(summary: Dict[str, Any], rows: Sequence[Dict[str, Any]], header: Dict[str, Any]) -> str:
    lines = ["# Triton codegen report", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", f"**Verdict: {'FAIL' if summary['failed'] else 'PASS'}** (rules: {', '.join(RULES)}; "
              "see `resnet_fused/aot/report.py`).", "",
              recorded_sentence(summary), ""]
    lines += [f"- {h}" for h in headline(summary)] + [""]
    lines += ["## Per target", "", "| | " + " | ".join(summary["targets"]) + " |",
              "|---|" + "---|" * len(summary["targets"])]
    keys = ["variants", "ok", "failing_variants", "failures_by_rule", "spilling", "max_spill_store_bytes",
            "spilling_by_config", "no_hgmma_by_config", "tensor_core_variants", "with_hgmma", "with_ldgsts",
            "with_utmaldg", "max_registers", "max_shared", "smem_limit", "compile_s_total", "cached"]
    for k in keys:
        vals = [summary["targets"][a][k] for a in summary["targets"]]
        fmt = [", ".join(f"{kk}: {vv}" for kk, vv in v.items()) or "-" if isinstance(v, dict) else str(v) for v in vals]
        lines.append(f"| {k} | " + " | ".join(fmt) + " |")
    lines += ["", "## Triton compilations per workload (a fresh GPU process; each autotune config counts)", ""]
    if summary["same_for_all_archs"] and len(summary["recorded"]) > 1:
        lines += ["Every target recorded the same launches; one target's rows shown.", ""]
    lines += ["| target | model | mode | dtype | layout | batch | kernel calls | launches recorded | autotune keys | "
              "autotune trials | distinct compilations |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in shown_workloads(summary):
        lines.append(f"| {w['arch']} | {w['model']} | {w['mode']} | {w['dtype']} | {w['layout']} | {w['batch']} | {w['calls']} | "
                     f"{w['launches']} | {w['autotune_keys']} | {w['autotune_trials']} | {w['compilations']} |")
    shown = {w["arch"] for w in shown_workloads(summary)}
    lines += ["", "Over all dtypes and layouts: " + "; ".join(
        f"{k} {v['compilations']} distinct ({v['launches']} launches recorded)"
        for k, v in summary["per_model_mode"].items() if k.split()[0] in shown) + ".", ""]
    lines += ["## Variants x targets (failing first)", "",
              "| " + " | ".join(h for _, h in _MD_COLUMNS) + " |", "|" + "---|" * len(_MD_COLUMNS)]
    for r in sorted(rows, key=lambda r: (not r["fails"], r["arch"], r["kernel"], r["config"], r["variant"])):
        cells = ["" if r.get(k) is None else str(r.get(k)) for k, _ in _MD_COLUMNS]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_all(out: Path, summary: Dict[str, Any], rows: Sequence[Dict[str, Any]], launches: Sequence[Launch],
              header: Dict[str, Any]) -> List[Path]:
    """Write the four report files into ``out`` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows, key=lambda r: (r["arch"], r["kernel"], r["config"], r["variant"]))
    paths = [out / "triton_variants.csv", out / "triton_sites.csv", out / "triton_report.md",
             out / "triton_summary.json"]
    write_csv(paths[0], ordered, COLUMNS)
    shown = {w["arch"] for w in shown_workloads(summary)}  # one target's sites when all recorded the same
    write_csv(paths[1], site_rows([ln for ln in launches if ln.site.get("arch") in shown]), SITE_COLUMNS)
    paths[2].write_text(markdown(summary, ordered, header))
    paths[3].write_text(json.dumps({"header": header, **summary}, indent=1, sort_keys=True, default=str) + "\n")
    return paths
