"""The measuring layer every benchmark uses: environment, timing, checks, providers, result files.

- Timing: :func:`benchmark` (``triton.testing.do_bench`` / ``do_bench_cudagraph`` on a GPU,
  ``torch.utils.benchmark.Timer`` on CPU) gives a :class:`Timing`: median, 20th / 80th percentile.
- Correctness before timing: :func:`check_output` bounds the error against float64 by
  ``max(dtype floor, factor x eager PyTorch's error in the same dtype)``; :func:`check_then_time`
  times only what passed, and records a failing or wrong provider instead of raising.
- Providers: :func:`provider_unavailable` says why a backend cannot run here (recorded, never a
  crash); the ``dispatch_*`` helpers keep the ``auto`` provider off the user's decision file and
  put its decisions into the result file.
- Result files: :func:`make_row` (schema :data:`ROW_KEYS` + :data:`EXTRA_KEYS`, which other
  programs read), :func:`finish` writes ``<date>_<device>_<commit>_<bench>.json`` / ``.csv`` /
  ``.md`` / ``.png``.

Nothing here touches the GPU until called.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

ROW_KEYS = ("bench", "model", "shape", "batch", "dtype", "mode", "provider", "median_ms", "p20_ms", "p80_ms",
            "images_per_s", "peak_mem_mb", "correct")
# Optional columns a benchmark may append after ROW_KEYS (in this order; each benchmark always
# writes the same ones, null where a row has no value). Tools that read only ROW_KEYS ignore them.
#   variant       what tells apart rows of the same provider: "max-autotune+freezing" (compile),
#                 "conv_alone" (cuDNN's conv without BN/ReLU/add), the memory-bound op's name, ...
#   layout        "channels_last" | "nchw"
#   compile_s     torch.compile: wall time of the first call (compile + one call), seconds
#   tflops        useful arithmetic / median time; frac_of_peak = tflops / the measured matmul peak
#   gbps          bytes that must move / median time; frac_of_copy = gbps / the measured copy bandwidth
#   floor_ms      the roofline floor: max(flops / matmul peak, bytes / copy bandwidth)
#   paper_ms      the WRN paper's Titan X time for the same network (bench "wrn")
#   note          free text (kernel picked, why a row has no time, ...)
EXTRA_KEYS = ("variant", "layout", "compile_s", "tflops", "frac_of_peak", "gbps", "frac_of_copy", "floor_ms",
              "paper_ms", "note")
ENV_KEYS = ("gpu", "driver", "torch", "triton", "cuda", "git_commit", "timestamp")
MODES = ("infer", "train_step")
PROVIDERS = ("eager", "compile", "triton", "cuda", "torch", "auto", "cudnn_fused")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative-error floors: a few units of rounding of each format (the tests use the same values).
FLOOR = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2, "fp64": 1e-12}


# ------------------------------------------------------------------------------------ environment
def _driver_version() -> Optional[str]:
    """The NVIDIA driver's version (``nvidia-smi``), or None without one."""
    smi = shutil.which("nvidia-smi")
    if not torch.cuda.is_available() or smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(repo: Path = REPO_ROOT) -> Optional[str]:
    """``git rev-parse HEAD`` of ``repo`` plus ``-dirty`` if tracked files changed; None if no repo.

    Untracked files (new result files, say) do not make the tree dirty.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=20)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit + ("-dirty" if status.returncode == 0 and status.stdout.strip() else "")


def device_name(device: Optional[torch.device] = None) -> str:
    """``torch.cuda.get_device_name`` for a CUDA device, else ``"cpu: <model name>"``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from resnet_fused.dispatch.keys import device_fields

    return device_fields(device)["device"]  # "cpu: <model name>", as the dispatch's keys have it


def pick_device(name: Optional[str]) -> torch.device:
    """The ``--device`` a benchmark runs on: as given, else CUDA when there is one, else CPU."""
    dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return dev


def env_info(device: Optional[torch.device] = None) -> Dict[str, Optional[str]]:
    """The environment a result was measured in (keys :data:`ENV_KEYS`)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device is None else torch.device(device)
    return {
        "gpu": device_name(dev),
        "driver": _driver_version() if dev.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Summary of per-call times in milliseconds (``n`` samples)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int


def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``, linear interpolation (``torch.quantile``)."""
    if not samples:
        raise ValueError("samples: expected at least one value, got none")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q: expected a value in [0, 1], got {q}")
    return torch.tensor(samples, dtype=torch.float64).quantile(q).item()


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median, 20th and 80th percentiles of ``samples_ms``."""
    return Timing(quantile(samples_ms, 0.5), quantile(samples_ms, 0.2), quantile(samples_ms, 0.8), len(samples_ms))


def rotation_copies(bytes_per_copy: int, cache_bytes: int, max_copies: int = 8) -> int:
    """How many input copies to rotate over so that together they exceed twice ``cache_bytes``."""
    if bytes_per_copy <= 0:
        return 1
    return int(max(1, min(max_copies, math.ceil(2 * cache_bytes / bytes_per_copy))))


def cache_bytes(device: torch.device) -> int:
    """The last-level cache to defeat: the GPU's L2, or a nominal 32 MiB on CPU."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * 2**20))
    return 32 * 2**20


def benchmark(fn: Callable, inputs: Sequence[tuple], device: torch.device, *, cuda_graph: bool = False,
              warmup_ms: float = 25.0, rep_ms: float = 100.0, warmup: int = 2, min_reps: int = 10,
              budget_s: float = 0.5) -> Timing:
    """Time ``fn(*inputs[i])``, ``i`` rotating over ``inputs`` (each a tuple of arguments); a
    :class:`Timing` in milliseconds per call.

    CUDA: ``triton.testing.do_bench`` (CUDA events per call, L2 flushed between calls;
    ``warmup_ms`` / ``rep_ms`` of warm-up and measurement, stretched so that at least
    ``min_reps`` calls are timed), or ``do_bench_cudagraph`` with ``cuda_graph`` (one graph of
    unrolled calls, replayed); ``rep_ms=0``: exactly ``min_reps`` calls, CUDA events around each
    (long training steps: do_bench's own five-call estimate would cost seconds). CPU: ``warmup``
    calls, ``torch.utils.benchmark.Timer.blocked_autorange`` for ``budget_s`` seconds at the
    process's thread count, topped up with single timed calls to ``min_reps`` samples.
    """
    if not inputs:
        raise ValueError("inputs: expected at least one tuple of arguments, got none")
    args = itertools.cycle(inputs)

    def call():
        return fn(*next(args))

    if torch.device(device).type == "cuda":
        import triton.testing

        call()  # compile / autotune / cuDNN heuristics stay out of do_bench's estimate
        torch.cuda.synchronize()
        if rep_ms <= 0:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(min_reps)]
            for start, end in events:
                start.record()
                call()
                end.record()
            torch.cuda.synchronize()
            return summarize([start.elapsed_time(end) for start, end in events])
        if cuda_graph:
            return summarize(triton.testing.do_bench_cudagraph(call, rep=rep_ms, return_mode="all"))
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        rep_ms = max(rep_ms, 1.2 * min_reps * (time.perf_counter() - t0) * 1e3)  # do_bench sizes by time
        return summarize(triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="all"))
    from torch.utils.benchmark import Timer

    for _ in range(warmup):
        call()
    timer = Timer("call()", globals={"call": call}, num_threads=torch.get_num_threads())
    samples = [t * 1e3 for t in timer.blocked_autorange(min_run_time=budget_s).times] if budget_s > 0 else []
    while len(samples) < min_reps:  # one call a sample (Timer.timeit would add two warm-up calls each)
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def benchmark_graph_or_plain(fn: Callable, inputs: Sequence[tuple], device: torch.device, cuda_graph: bool,
                             label: str, **opts) -> Tuple[Timing, bool]:
    """:func:`benchmark` with CUDA-graph replay when ``cuda_graph``, falling back to plain launches
    (with a note on stderr) where capture fails. Returns the timing and whether a graph was used."""
    try:
        return benchmark(fn, inputs, device, cuda_graph=cuda_graph, **opts), cuda_graph
    except Exception as exc:  # graph capture can fail where plain launches work
        if not cuda_graph:
            raise
        print(f"  {label}: CUDA graph failed ({type(exc).__name__}: {str(exc)[:200]}); timing plain launches",
              file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return benchmark(fn, inputs, device, cuda_graph=False, **opts), False


def peak_mem_mb(fn: Callable, args: tuple, device: torch.device) -> Optional[float]:
    """CUDA memory one warmed-up call of ``fn(*args)`` needs at its peak, over what was already
    allocated (activations, workspace, output), in MiB. None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(*args)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ------------------------------------------------------------------------------------- providers
def provider_unavailable(name: str, device: torch.device) -> Optional[str]:
    """Why provider ``name`` cannot run on ``device`` here, or None: ``triton`` (CPU tensors need
    the interpreter), ``cuda`` (the compiled library; asking may build it), ``cudnn_fused`` (CUDA
    only). ``auto`` always runs: the dispatch measures whichever of its candidates can."""
    from resnet_fused import backends

    device = torch.device(device)
    if name == "triton":
        err = backends.triton_import_error()
        if err is None and device.type == "cpu" and not backends.triton_interpreting():
            err = ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 in the environment before "
                   "Python starts")
        return err
    if name == "cuda":
        return backends.unavailable_reason("cuda", device)
    if name == "cudnn_fused":
        if device.type != "cuda":
            return "CUDA only (torch.ops.aten.cudnn_convolution_relu / cudnn_convolution_add_relu)"
        if not torch.backends.cudnn.is_available():
            return "cuDNN is not available"
    return None


def drop_unavailable(providers: Sequence[str], device: torch.device, skipped: Dict[str, str]) -> List[str]:
    """``providers`` without those that cannot run here; each dropped one's reason goes into
    ``skipped`` (provider -> reason), for the caller to print and record."""
    keep = []
    for p in providers:
        why = provider_unavailable(p, device)
        if why is None:
            keep.append(p)
        else:
            skipped[p] = why
    return keep


def order_providers(requested: Optional[Sequence[str]], default: Sequence[str], baseline: str) -> List[str]:
    """``--providers`` (or ``default``), without duplicates, with ``baseline`` first: the others are
    judged and compared against it, so it always runs."""
    chosen = list(dict.fromkeys(requested if requested else default))
    return [baseline] + [p for p in chosen if p != baseline]


def base_parser(prog: str, doc: str, *, quick_help: str, providers: Sequence[str],
                dtypes: Sequence[str] = tuple(DTYPES)) -> argparse.ArgumentParser:
    """The options every benchmark script has: ``--out``, ``--quick``, ``--device``,
    ``--providers``, ``--dtypes``, ``--no-write``; the description is the docstring's first
    paragraph. Scripts add their own options to the returned parser."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON / CSV / markdown results")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--providers", nargs="+", choices=tuple(providers), default=None,
                   help="override the providers (the baseline always runs first)")
    p.add_argument("--dtypes", nargs="+", choices=tuple(dtypes), default=None, help="override the dtypes")
    p.add_argument("--no-write", action="store_true", help="print only, write no result files")
    return p


# ----------------------------------------------------------------------------------- correctness
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; ``inf`` if shapes differ or ``out`` has NaN/Inf
    where ``ref`` is finite."""
    a, r = out.detach().double(), ref.detach().double().to(out.device)
    if a.shape != r.shape:
        return math.inf
    finite = torch.isfinite(r)
    if not bool(torch.isfinite(a[finite]).all()):
        return math.inf
    denom = r[finite].norm().item()
    num = (a[finite] - r[finite]).norm().item()
    return num / denom if denom > 0 else num


@dataclass(frozen=True)
class Check:
    """Result of :func:`check_output`: errors vs float64, the bound, and the verdict."""

    err: float
    eager_err: float
    bound: float
    ok: bool


def check_output(out: torch.Tensor, ref64: torch.Tensor, eager_out, dtype: str, factor: float = 4.0) -> Check:
    """Judge ``out`` against float64 ``ref64``: error <= max(FLOOR[dtype], factor x eager's error).

    ``eager_out``: eager PyTorch's output in the same dtype (None: the floor alone bounds), or a
    sequence of eager outputs computed in different ways (memory layouts, say): eager's error is
    then the largest (one sample can be far below eager's typical error where a few ReLU inputs
    within rounding of 0 dominate it).
    """
    err = rel_err(out, ref64)
    eagers = [] if eager_out is None else ([eager_out] if isinstance(eager_out, torch.Tensor) else
                                           [e for e in eager_out if e is not None])
    eager_err = max((rel_err(e, ref64) for e in eagers), default=math.nan)
    bound = FLOOR[dtype]
    if eagers and math.isfinite(eager_err):
        bound = max(bound, factor * eager_err)
    return Check(err, eager_err, bound, bool(math.isfinite(err) and err <= bound))


@dataclass
class Measured:
    """What :func:`check_then_time` found: the check (None if the call failed), the timing (None
    unless correct and timed), peak memory, and a note for the row ("" when all went as planned)."""

    check: Optional[Check]
    timing: Optional[Timing]
    peak_mb: Optional[float]
    note: str

    @property
    def ok(self) -> bool:
        return self.check is not None and self.check.ok


def check_then_time(build: Callable[[], Callable], inputs: Sequence[tuple], judge: Callable[[torch.Tensor], Check],
                    device: torch.device, *, cuda_graph: bool, label: str, timing: dict,
                    measure_mem: bool = False) -> Measured:
    """The single-op benchmarks' rule: ``fn = build()``, run ``fn(*inputs[0])`` under
    ``no_grad``, ``judge`` its output, and only if correct time it over ``inputs``
    (:func:`benchmark_graph_or_plain`; with ``measure_mem`` also :func:`peak_mem_mb`). A provider
    that fails to build or run, or is wrong, is reported on stderr and measured as untimed, never
    raised."""
    try:
        fn = build()

        def timed(*args):
            with torch.no_grad():
                return fn(*args)

        chk = judge(timed(*inputs[0]))
        if not chk.ok:
            print(f"  WRONG {label}: err {chk.err:.3e} > bound {chk.bound:.3e} (eager {chk.eager_err:.1e}); "
                  f"not timed", file=sys.stderr)
            return Measured(chk, None, None, "wrong: not timed")
        t, graph = benchmark_graph_or_plain(timed, inputs, device, cuda_graph, label, **timing)
        mem = peak_mem_mb(timed, inputs[0], device) if measure_mem else None
        note = "plain launches (graph capture failed)" if torch.device(device).type == "cuda" and not graph else ""
        return Measured(chk, t, mem, note)
    except Exception as exc:
        print(f"  FAILED {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc(limit=3)
        return Measured(None, None, None, f"failed: {type(exc).__name__}: {str(exc)[:200]}")


# ---------------------------------------------------------------------------------- result files
def make_row(*, bench: str, model: str, shape: str, batch: int, dtype: str, mode: str, provider: str,
             timing: Optional[Timing], peak_mem_mb: Optional[float], correct: bool,
             extra: Optional[Dict[str, object]] = None) -> dict:
    """One result row with exactly :data:`ROW_KEYS`, then ``extra``'s columns (names from
    :data:`EXTRA_KEYS`, put in that order). ``timing=None`` (not timed) gives null times."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if provider not in PROVIDERS:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    unknown = sorted(set(extra or {}) - set(EXTRA_KEYS))
    if unknown:
        raise ValueError(f"extra: unknown columns {unknown}; expected names from {EXTRA_KEYS}")
    med = None if timing is None else round(timing.median_ms, 6)
    row = {
        "bench": bench, "model": model, "shape": shape, "batch": int(batch), "dtype": dtype, "mode": mode,
        "provider": provider, "median_ms": med,
        "p20_ms": None if timing is None else round(timing.p20_ms, 6),
        "p80_ms": None if timing is None else round(timing.p80_ms, 6),
        "images_per_s": None if not med else round(batch * 1e3 / timing.median_ms, 3),
        "peak_mem_mb": None if peak_mem_mb is None else round(peak_mem_mb, 3),
        "correct": bool(correct),
    }
    for k in EXTRA_KEYS:
        if extra is not None and k in extra:
            v = extra[k]
            row[k] = sig(v) if isinstance(v, float) else v
    return row


def row_keys(*extras: str) -> Tuple[str, ...]:
    """The schema of a benchmark whose rows carry ``extras``: :data:`ROW_KEYS`, then those of
    :data:`EXTRA_KEYS` named, in EXTRA_KEYS' order (what :func:`make_row` produces)."""
    unknown = sorted(set(extras) - set(EXTRA_KEYS))
    if unknown:
        raise ValueError(f"extras: unknown columns {unknown}; expected names from {EXTRA_KEYS}")
    return ROW_KEYS + tuple(k for k in EXTRA_KEYS if k in extras)


def is_timing_row(row: dict) -> bool:
    """True if ``row`` follows the shared schema: ROW_KEYS first, then only EXTRA_KEYS columns."""
    keys = tuple(row)
    return keys[:len(ROW_KEYS)] == ROW_KEYS and set(keys[len(ROW_KEYS):]) <= set(EXTRA_KEYS)


def slug(text: str) -> str:
    """Lower-case, alphanumerics and single dashes: ``"cpu: AMD EPYC 7B13"`` -> ``"cpu-amd-epyc-7b13"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def result_stem(env: dict, bench: str) -> str:
    """``<YYYY-MM-DD>_<gpu-slug>_<shortcommit>_<bench>`` (``nogit`` without a commit)."""
    date = (env.get("timestamp") or _dt.datetime.now(_dt.timezone.utc).isoformat())[:10]
    commit = env.get("git_commit")
    short = "nogit" if not commit else commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")
    return f"{date}_{slug(env.get('gpu') or 'unknown')}_{short}_{slug(bench)}"


def write_results(out_dir, bench: str, env: dict, rows: List[dict], keys: Sequence[str] = ROW_KEYS,
                  extra: Optional[dict] = None) -> Tuple[Path, Path]:
    """Write ``{"env": env, **extra, "rows": rows}`` as JSON and the rows (schema ``keys``, in
    order) as CSV; return both paths."""
    missing = [k for k in ENV_KEYS if k not in env]
    if missing:
        raise ValueError(f"env: missing keys {missing} (build it with env_info())")
    for i, row in enumerate(rows):
        if tuple(row) != tuple(keys):
            raise ValueError(f"rows[{i}]: expected keys {tuple(keys)} in order, got {tuple(row)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(env, bench)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    with open(json_path, "w") as f:
        json.dump({"env": {k: env[k] for k in ENV_KEYS}, **(extra or {}), "rows": rows}, f, indent=1)
        f.write("\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keys))
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def finish(rows: List[dict], out_dir, bench: str, env: dict, write: bool = True, *,
           keys: Sequence[str] = ROW_KEYS, skipped: Optional[Dict[str, str]] = None,
           extra: Optional[dict] = None, markdown: Optional[Tuple[str, Sequence[str], Sequence[Sequence]]] = None,
           notes: Sequence[str] = ()) -> int:
    """A benchmark's last step: write the results (when ``write``), say how many provider results
    were wrong; the process exit code (1 if any was).

    ``skipped``: provider -> why it did not run here (the JSON's ``"skipped"``; None omits it).
    ``markdown``: (title, headers, rows), written as ``<stem>.md`` with ``notes`` under it. Rows in
    the shared schema also get a chart, ``<stem>.png`` (none without matplotlib).
    """
    if write:
        more = {} if skipped is None else {"skipped": dict(skipped)}
        more.update(extra or {})
        json_path, csv_path = write_results(out_dir, bench, env, rows, keys=keys, extra=more or None)
        print(f"wrote {json_path}\nwrote {csv_path}")
        if markdown is not None:
            title, headers, lines = markdown
            notes = list(notes) + [f"{p} skipped: {why}" for p, why in (skipped or {}).items()]
            print(f"wrote {write_markdown(out_dir, bench, env, title, headers, lines, notes)}")
        if rows and all(is_timing_row(r) for r in rows):  # a chart beside them (benchmarks.report)
            from .report import plot_bench

            png = plot_bench(bench, rows, Path(out_dir) / f"{result_stem(env, bench)}.png",
                             title=f"{bench}: {env['gpu']}, commit {(env.get('git_commit') or 'nogit')[:12]}")
            if png is not None:
                print(f"wrote {png}")
    wrong = [r for r in rows if not r["correct"]]
    if wrong:
        print(f"{len(wrong)} provider result(s) wrong or failed", file=sys.stderr)
    return 1 if wrong else 0


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-style markdown table (``None`` cells empty)."""
    def cell(c) -> str:
        return "" if c is None else str(c).replace("|", "\\|")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_markdown(out_dir, bench: str, env: dict, title: str, headers: Sequence[str], rows: Sequence[Sequence],
                   notes: Sequence[str] = ()) -> Path:
    """``<stem>.md`` beside the JSON/CSV: a title, the environment line, the table, notes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result_stem(env, bench)}.md"
    envline = ", ".join(f"{k} {env.get(k)}" for k in ENV_KEYS)
    text = [f"## {title}", "", envline, "", markdown_table(headers, rows)]
    if notes:
        text += [""] + [f"- {n}" for n in notes]
    path.write_text("\n".join(text) + "\n")
    return path


def banner(bench: str, env: dict) -> str:
    """The first line every benchmark prints: what ran where, at which commit."""
    return (f"{bench} on {env['gpu']} | torch {env['torch']} | triton {env['triton']} | cuda {env['cuda']} | "
            f"commit {env['git_commit']}")


def print_skipped(skipped: Dict[str, str]) -> None:
    for p, why in skipped.items():
        print(f"note: {p} skipped: {why}")


def op_timing(device: torch.device, quick: bool) -> dict:
    """``benchmark()`` keyword arguments for single-op benchmarks: CUDA event windows on a GPU
    (shorter with --quick), a few tiny repetitions on CPU (the CPU modes only prove the scripts)."""
    if device.type == "cuda":
        return dict(warmup_ms=10.0, rep_ms=40.0) if quick else dict(warmup_ms=25.0, rep_ms=100.0)
    return dict(warmup=1, min_reps=10, budget_s=0.05)


def provider_timing(device: torch.device, provider: str, default: dict) -> dict:
    """``default``, except for Triton on the CPU (its interpreter): a few calls say enough."""
    if device.type == "cpu" and provider == "triton":
        return dict(warmup=0, min_reps=3, budget_s=0.0)
    return default


def sig(v: Optional[float], digits: int = 6) -> Optional[float]:
    """``v`` to ``digits`` significant digits for a result file (None for None, NaN or Inf: JSON
    has no such numbers)."""
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def fmt_ms(v: Optional[float]) -> str:
    """Milliseconds for a table cell ("-" for no time)."""
    return "-" if v is None else f"{v:.3f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence], title: Optional[str] = None) -> str:
    """A plain-text table, columns right-aligned except the first."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    return "\n".join(out)
