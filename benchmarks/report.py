"""Result files into tables and plots: the suite's combined file, markdown, PNG charts, the README.

    python -m benchmarks.report RESULT.json [--readme README.md]

A benchmark's rows (schema :data:`benchmarks.common.ROW_KEYS` + optional
:data:`benchmarks.common.EXTRA_KEYS`) are drawn by :func:`plot_bench`, one chart per benchmark:

- ``wrn`` (the WRN paper's Figure 4 re-run): grouped bars of ms per training step for each network,
  the paper's Titan X time first, then each (provider, dtype) measured;
- ``models``: images/s per model, one panel per (mode, dtype, batch), a bar per provider (and
  compile variant);
- ``layers``: the fraction of the measured matmul peak per conv geometry (``frac_of_peak``), and
  the fraction of the measured copy bandwidth per memory-bound op (``frac_of_copy``);
- anything else: median ms per case, a bar per provider.

:func:`combine` writes the suite's one file per run, ``<date>_<gpu>_<commit>.json`` (``env``,
``suite`` facts, ``rows``: every benchmark's rows with all of ROW_KEYS + EXTRA_KEYS, null where a
benchmark has no such column), the same rows as a long-format CSV, a markdown summary and the PNGs
beside it. :func:`update_readme` replaces the README's results section (between
``<!-- results:begin -->`` and ``<!-- results:end -->``) with the markdown of a combined file.

Plots need matplotlib (``pip install matplotlib``, in the ``bench`` and ``test`` extras); without
it :func:`plot_bench` returns None and says why once: the JSON / CSV / markdown do not need it.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import common

ALL_KEYS = common.ROW_KEYS + common.EXTRA_KEYS
README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"
PROVIDER_ORDER = ("eager", "compile", "triton", "cuda", "cudnn_fused", "auto", "torch")
_warned: List[str] = []


# ----------------------------------------------------------------------------------------- helpers
def _timed(rows: Sequence[dict]) -> List[dict]:
    return [r for r in rows if r.get("correct") and r.get("median_ms") is not None]


def _label(r: dict) -> str:
    """A bar's name: provider, compile variant, dtype (``compile max-autotune+freezing fp16``)."""
    variant = r.get("variant") or ""
    parts = [r["provider"]] + ([variant] if variant and r["provider"] == "compile" else []) + [r["dtype"]]
    return " ".join(parts)


def _order_key(label: str) -> tuple:
    prov = label.split(" ")[0]
    return (PROVIDER_ORDER.index(prov) if prov in PROVIDER_ORDER else len(PROVIDER_ORDER), label)


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with one note on stderr) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # ImportError, or a broken install
        if not _warned:
            _warned.append("matplotlib")
            print(f"note: no plots: matplotlib unavailable ({type(exc).__name__}: {exc}); "
                  f"`pip install matplotlib`, then `python -m benchmarks.report RESULT.json`", file=sys.stderr)
        return None
    return plt


def _bars(ax, groups: Sequence[str], series: "OrderedDict[str, Dict[str, float]]", ylabel: str,
          annotate: bool = True, fmt: str = "{:.3g}") -> None:
    """Grouped bars: one group per ``groups`` entry, one bar per series (name -> {group: value})."""
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get(g, math.nan) for g in groups]
        bars = ax.bar(xs, ys, width, label=name)
        if annotate:
            for b, y in zip(bars, ys):
                if math.isfinite(y):
                    ax.annotate(fmt.format(y), (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom",
                                fontsize=6, rotation=90, xytext=(0, 2), textcoords="offset points")
    finite = [v for values in series.values() for v in values.values() if v is not None and math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 50:  # spans orders of magnitude: a log axis keeps all readable
        ax.set_yscale("log")
    lo, hi = ax.get_ylim()  # headroom for the value labels above the tallest bar
    ax.set_ylim(lo, hi * (4.0 if ax.get_yscale() == "log" else 1.15))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(axis="y", alpha=0.3)


# ------------------------------------------------------------------------------------------ charts
def _plot_wrn(plt, rows: Sequence[dict], title: str):
    timed = _timed(rows)
    nets = list(OrderedDict.fromkeys(r["model"] for r in rows))
    series: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
    paper = {r["model"]: r["paper_ms"] for r in rows if r.get("paper_ms") is not None}
    if paper:
        series["paper: Titan X, cuDNN v5 (fp32)"] = paper
    for label in sorted({_label(r) for r in timed}, key=_order_key):
        series[label] = {r["model"]: r["median_ms"] for r in timed if _label(r) == label}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(nets) + 2), 4.5))
    _bars(ax, nets, series, "ms per step (forward + backward + SGD update)", fmt="{:.0f}" if paper else "{:.3g}")
    batch = sorted({r["batch"] for r in rows})
    ax.set_title(f"{title}\nWRN Figure 4 re-run: batch {', '.join(map(str, batch))}, CIFAR-size input", fontsize=9)
    return fig


def _plot_models(plt, rows: Sequence[dict], title: str):
    timed = _timed(rows)
    panels = list(OrderedDict.fromkeys((r["mode"], r["dtype"], r["batch"]) for r in timed))
    cols = min(2, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 3.8 * nrows), squeeze=False)
    for ax, (mode, dtype, batch) in zip(axes.flat, panels):
        sub = [r for r in timed if (r["mode"], r["dtype"], r["batch"]) == (mode, dtype, batch)]
        models = list(OrderedDict.fromkeys(r["model"] for r in sub))
        series: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
        for label in sorted({_label(r) for r in sub}, key=_order_key):
            series[label] = {r["model"]: r["images_per_s"] for r in sub if _label(r) == label}
        _bars(ax, models, series, "images/s", fmt="{:.0f}")
        ax.set_title(f"{mode} {dtype} batch {batch}", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return fig


def _plot_layers(plt, rows: Sequence[dict], title: str):
    timed = _timed(rows)
    conv = [r for r in timed if r.get("frac_of_peak") is not None]
    mem = [r for r in timed if r.get("frac_of_copy") is not None and r.get("frac_of_peak") is None]
    panels = [(conv, "frac_of_peak", "fraction of measured matmul peak"),
              (mem, "frac_of_copy", "fraction of measured copy bandwidth")]
    panels = [p for p in panels if p[0]]
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(12, 4.2 * max(1, len(panels))), squeeze=False)
    for ax, (sub, key, ylabel) in zip(axes.flat, panels):
        groups = list(OrderedDict.fromkeys(_case(r) for r in sub))
        series: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
        labels = sorted({_layer_label(r) for r in sub}, key=_order_key)
        for label in labels:
            series[label] = {_case(r): r[key] for r in sub if _layer_label(r) == label}
        _bars(ax, groups, series, ylabel, annotate=len(groups) * len(labels) <= 60, fmt="{:.2f}")
    fig.suptitle(title, fontsize=9)
    return fig


def _layer_label(r: dict) -> str:
    v = r.get("variant") or ""
    return f"{r['provider']} {v}".strip() if r.get("frac_of_peak") is not None else r["provider"]


def _case(r: dict) -> str:
    v = r.get("variant") or ""
    what = f"{v} " if r.get("frac_of_peak") is None and v else ""
    return f"{r['model']} {what}{r['shape']} b{r['batch']} {r['dtype']}"


def _plot_generic(plt, rows: Sequence[dict], title: str):
    timed = _timed(rows)
    groups = list(OrderedDict.fromkeys(_case(r) for r in timed))
    series: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
    for p in sorted({r["provider"] for r in timed}, key=_order_key):
        series[p] = {_case(r): r["median_ms"] for r in timed if r["provider"] == p}
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups) + 3), 4.2))
    _bars(ax, groups, series, "median ms", annotate=len(groups) * len(series) <= 60)
    ax.set_title(title, fontsize=9)
    return fig


PLOTTERS = {"wrn": _plot_wrn, "models": _plot_models, "layers": _plot_layers}


def plot_bench(bench: str, rows: Sequence[dict], path, title: str = "") -> Optional[Path]:
    """Draw ``bench``'s rows (see the module docstring) into ``path`` (PNG); the path, or None when
    nothing was timed or matplotlib is unavailable."""
    rows = [r for r in rows if common.is_timing_row(r)]
    if not _timed(rows):
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig = PLOTTERS.get(bench, _plot_generic)(plt, rows, title or bench)
    try:
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- markdown
def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def summary_markdown(bench: str, rows: Sequence[dict]) -> str:
    """One table per benchmark: a line per case, each provider's median ms and eager/provider."""
    rows = [r for r in rows if common.is_timing_row(r)]
    case_keys = ("model", "shape", "batch", "dtype", "mode")
    labels = sorted({(r["provider"] + (f" {r['variant']}" if r.get("variant") and r["provider"] == "compile" else ""))
                     for r in rows}, key=_order_key)
    cases: "OrderedDict[tuple, dict]" = OrderedDict()
    for r in rows:
        variant = r.get("variant") or ""
        sub = variant if r["provider"] != "compile" else ""  # layer variants (conv_alone, ops) are cases
        key = tuple(r[k] for k in case_keys) + (sub,)
        label = r["provider"] + (f" {variant}" if variant and r["provider"] == "compile" else "")
        cases.setdefault(key, {})[label] = r
    paper = any(r.get("paper_ms") is not None for r in rows)
    headers = list(case_keys) + ["variant"] + (["paper ms"] if paper else [])
    for lab in labels:
        headers += [f"{lab} ms"] + ([f"eager/{lab}"] if lab != "eager" else [])
    lines = []
    for key, by in cases.items():
        eager = by.get("eager", {}).get("median_ms")
        line = list(key)
        if paper:
            line.append(next((r["paper_ms"] for r in by.values() if r.get("paper_ms") is not None), None))
        for lab in labels:
            r = by.get(lab)
            if r is None:
                cell = ""
            elif not r["correct"]:
                cell = "WRONG"
            else:
                cell = common.fmt_ms(r["median_ms"])
            line.append(cell)
            if lab != "eager":
                line.append(_ratio(eager, r["median_ms"]) if r is not None and r["correct"] else "")
        lines.append(line)
    return common.markdown_table(headers, lines)


# ----------------------------------------------------------------------------------------- combine
def normalize(row: dict) -> dict:
    """``row`` with every column of ROW_KEYS + EXTRA_KEYS, in that order (null where absent)."""
    return {k: row.get(k) for k in ALL_KEYS}


def combined_stem(env: dict) -> str:
    """``<YYYY-MM-DD>_<gpu-slug>_<shortcommit>``: the suite's one result file per run."""
    return common.result_stem(env, "x")[: -len("_x")]


def combine(out_dir, env: dict, rows: Sequence[dict], suite: dict, plots: bool = True) -> Dict[str, Path]:
    """Write the suite's combined JSON / CSV / markdown (+ PNGs, one per benchmark) into ``out_dir``."""
    missing = [k for k in common.ENV_KEYS if k not in env]
    if missing:
        raise ValueError(f"env: missing keys {missing}")
    bad = [i for i, r in enumerate(rows) if not common.is_timing_row(r)]
    if bad:
        raise ValueError(f"rows{bad[:5]}: not in the shared schema (ROW_KEYS, then EXTRA_KEYS columns)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = combined_stem(env)
    norm = [normalize(r) for r in rows]
    paths = {"json": out_dir / f"{stem}.json", "csv": out_dir / f"{stem}.csv", "md": out_dir / f"{stem}.md"}
    data = {"env": {k: env[k] for k in common.ENV_KEYS}, "suite": suite, "rows": norm}
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ALL_KEYS))
        w.writeheader()
        w.writerows(norm)
    pngs = plot_all(data, paths["json"]) if plots else {}
    paths.update({f"png_{bench}": png for bench, png in pngs.items()})
    paths["md"].write_text(render_markdown(data, {bench: png.name for bench, png in pngs.items()}))
    return paths


def plot_all(data: dict, json_path: Path) -> Dict[str, Path]:
    """One chart per benchmark of a combined file, ``<stem>_<bench>.png`` beside ``json_path``."""
    env, pngs = data["env"], {}
    for bench in OrderedDict.fromkeys(r["bench"] for r in data["rows"]):
        png = plot_bench(bench, [r for r in data["rows"] if r["bench"] == bench],
                         json_path.with_name(f"{json_path.stem}_{bench}.png"),
                         title=f"{bench}: {env['gpu']}, commit {(env.get('git_commit') or 'nogit')[:12]}")
        if png is not None:
            pngs[bench] = png
    return pngs


def render_markdown(data: dict, pngs: Optional[Dict[str, str]] = None) -> str:
    """The combined file as markdown: where and when it was measured, the suite's steps, a table
    (and a chart, where ``pngs`` names one) per benchmark."""
    env, suite = data["env"], data.get("suite", {})
    out = [f"Measured on **{env['gpu']}** at commit `{env.get('git_commit')}` ({env.get('timestamp')}; torch "
           f"{env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver')})."]
    if suite.get("mode"):
        out.append(f"Suite mode: {suite['mode']}.")
    if suite.get("peaks"):
        from .peaks import Peaks, describe

        out.append("Ceilings " + describe(Peaks.from_dict(suite["peaks"])) + ".")
    steps = suite.get("steps") or []
    if steps:
        out += ["", common.markdown_table(["step", "status", "seconds", "note"],
                                          [[s.get("step"), s.get("status"), s.get("seconds"), s.get("note", "")]
                                           for s in steps])]
    for goal in suite.get("goals", []):
        out.append(f"- {goal}")
    rows = data["rows"]
    for bench in OrderedDict.fromkeys(r["bench"] for r in rows):
        out += ["", f"### {bench}", "", summary_markdown(bench, [r for r in rows if r["bench"] == bench])]
        if pngs and bench in pngs:
            out += ["", f"![{bench}]({pngs[bench]})"]
    return "\n".join(out) + "\n"


def update_readme(readme, result_json, link_dir: Optional[str] = None) -> None:
    """Replace the text between README_BEGIN and README_END in ``readme`` with the markdown of the
    combined result ``result_json`` (charts linked from ``link_dir``, relative to the README)."""
    readme, result_json = Path(readme), Path(result_json)
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_BEGIN} ... {README_END} section to replace")
    data = json.loads(result_json.read_text())
    rel = link_dir if link_dir is not None else str(result_json.parent.relative_to(readme.parent.resolve())
                                                    if result_json.is_absolute() else result_json.parent)
    pngs = {p.name[len(result_json.stem) + 1: -4]: f"{rel}/{p.name}"
            for p in sorted(result_json.parent.glob(f"{result_json.stem}_*.png"))}
    body = render_markdown(data, pngs)
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_BEGIN + "\n" + body + README_END + tail)


# --------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("result", help="a combined result JSON written by benchmarks.suite")
    p.add_argument("--readme", default=None, help="also rewrite this README's results section")
    args = p.parse_args(argv)
    path = Path(args.result)
    data = json.loads(path.read_text())
    pngs = plot_all(data, path)
    print("".join(f"wrote {png}\n" for png in pngs.values()), end="")
    path.with_suffix(".md").write_text(render_markdown(data, {bench: png.name for bench, png in pngs.items()}))
    print(f"wrote {path.with_suffix('.md')}")
    if args.readme:
        update_readme(args.readme, path)
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
