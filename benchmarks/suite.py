"""One command for a GPU session: build, precompile, smoke-test, then the decisive benchmarks.

    python -m benchmarks.suite --out DIR [--quick | --full] [--device cuda|cpu] [--steps ...]
                               [--deadline SECONDS] [--skip STEP ...] [--parts DIR] [--pack]

Steps, in this order, each a child process under a time cap (progress is echoed line by line,
prefixed with the suite's elapsed time and the step's name; every log also lands in a file). The
default GPU mode (``--quick``) runs them in the order of what their numbers are worth, within one
8-minute device call (``--deadline``, default 470 s; the estimate is grounded in
benchmarks/README.md and has not been checked on a GPU yet):

==========  ===============================================================  =========  ===========
step        what                                                            quick cap  CPU
==========  ===============================================================  =========  ===========
env         GPU / driver / torch / triton / CUDA / cuDNN, free memory       20 s       yes
build       ``python -m resnet_fused.build`` for this GPU's architecture     150 s      yes (C++)
            only, on every core (``RESNET_FUSED_CUDA_ARCHS``, ``MAX_JOBS``)
precompile  ``python -m resnet_fused.aot --precompile``: every Triton        120 s      recording
            variant the benchmarks below reach, compiled in parallel                    only
            processes into Triton's cache, so the benchmarks' first calls
            load kernels instead of compiling them one at a time
smoke       :mod:`benchmarks.smoke`: every kernel path once (triton, cuda,   90 s       tiny
            cudnn_fused, auto; eval, train; bf16, TF32, fp16) vs float64
models      :mod:`benchmarks.models`: ResNet-50  inference b256 fp16    150 s      tiny
            channels_last, then the training step b256 AMP (eager, fused,
            auto, then torch.compile)
wrn         :mod:`benchmarks.wrn_fig4` (the WRN paper's Figure 4 re-run)     100 s      tiny
peaks       copy bandwidth and matmul peaks (:mod:`benchmarks.peaks`)        20 s       yes
layers      :mod:`benchmarks.layers` (every conv shape and memory-bound op   70 s       tiny
            against the measured ceilings)
tests       the ``gpu`` tests (``pytest -m gpu tests``), four pytest       (call)     no GPU:
            processes side by side: not in the default run; its own call                skipped
            (``--steps tests``), sharded to fit
==========  ===============================================================  =========  ===========

``--full`` runs every step (the tests too) at full size with no caps, and adds ``memory``
(:mod:`benchmarks.memory`, saved activations) and the package's own demo (``main``); it takes far longer than one device call (use ``--steps`` to split it). On CPU
(no CUDA, or ``--device cpu``) the same steps run at tiny sizes: CI runs that, so the harness never
rots; CPU numbers describe the CI machine and nothing else.

Outputs in ``DIR`` (default ``benchmarks/results``), rewritten after every step, so a run cut off at
its limit still leaves what it measured: ``<date>_<gpu>_<commit>.json`` (``env``; ``suite``: mode,
steps with status / seconds / test counts, the measured peaks, each benchmark's own facts such as
its goals, skipped providers and auto's decisions; ``rows``: every benchmark's rows in the shared
schema, :data:`benchmarks.common.ROW_KEYS` + :data:`benchmarks.common.EXTRA_KEYS`), the same rows
as a long-format CSV, a markdown summary and one PNG chart per benchmark
(:mod:`benchmarks.report`). The steps' logs, junit XML and per-benchmark files go into ``--parts``
(default ``DIR/<date>_<gpu>_<commit>_parts/``); ``--pack`` also packs that folder into
``DIR/<stem>_parts.tar.gz`` after every step (the device machine returns at most 8 files:
``run_gpu.sh`` keeps the parts outside ``$OUT`` and packs them). The exit code is 1 if any step
failed or timed out, or any benchmark row is wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import common
from .children import Proc, StepResult, _last_line, elapsed, junit_counts, say, status_of  # noqa: F401

# every step, in the order it runs
ALL_STEPS = ("env", "build", "precompile", "tests", "smoke", "models", "wrn", "peaks", "layers", "memory", "main")
QUICK_STEPS = ("env", "build", "precompile", "smoke", "models", "wrn", "peaks", "layers")
FULL_STEPS = ALL_STEPS
# quick-mode caps (seconds); --full has none. "tests" asked for explicitly gets what is left.
QUICK_CAPS = {"env": 20, "build": 150, "precompile": 120, "smoke": 90, "models": 150, "wrn": 100, "peaks": 20,
              "layers": 70}
QUICK_DEADLINE_S = 470.0
# what the precompile step records and compiles: the workloads of smoke, models and wrn (quick)
PRECOMPILE = (("--models", "resnet50", "--batch", "256", "1", "--dtypes", "fp16", "--layouts", "channels_last"),
              ("--models", "wrn28_10", "wrn40_4", "wrn16_10", "preact_resnet164", "preact_resnet1001", "--batch",
               "32", "--dtypes", "fp16", "--layouts", "channels_last"))
AOT_ARCH = {(9, 0): "sm_90a", (8, 0): "sm_80", (8, 6): "sm_86", (8, 9): "sm_89"}
BENCH_STEPS = {"models": "models", "wrn": "wrn_fig4", "layers": "layers", "memory": "memory"}  # step: module
# (a step's result files end in _<step>)
# exclusive and exhaustive: each test id matches exactly one expression
SHARDS = (("gpu-cifar+misc", "cifar or not (fp16 or bf16 or fp32)"), ("gpu-fp16", "fp16 and not cifar"),
          ("gpu-bf16", "bf16 and not (cifar or fp16)"), ("gpu-fp32", "fp32 and not (cifar or fp16 or bf16)"))
QUICK_SHARDS = ("gpu-cifar+misc", "gpu-fp16")
# ------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    device: str  # "cuda" | "cpu"
    mode: str  # "quick" | "full" | "cpu"
    steps: List[str]
    deadline: Optional[float]  # seconds after the start
    out: Path
    parts: Path
    python: str = sys.executable
    results: List[StepResult] = field(default_factory=list)
    bench_files: Dict[str, Path] = field(default_factory=dict)
    peaks_file: Optional[Path] = None
    pack: bool = False  # also pack ``parts`` into ``out/<stem>_parts.tar.gz`` after every step
    explicit: bool = False  # the steps were named (--steps): "tests" then runs every shard
    # kernels in Triton's cache after each step (GPU): growth after "precompile" = compiles it missed
    cache_counts: Dict[str, Optional[int]] = field(default_factory=dict)

    def rel(self, path: Path) -> str:
        """``path`` as the results name it: relative to ``out``, or ``parts/...`` (packed)."""
        try:
            return str(path.relative_to(self.out))
        except ValueError:
            return f"parts/{path.relative_to(self.parts)}"

    def left(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - elapsed()

    def cap(self, step: str) -> Optional[float]:
        """The step's time limit: its quick cap (none in full / CPU modes), cut to what is left."""
        cap = QUICK_CAPS.get(step) if self.mode == "quick" else None
        left = self.left()
        if left is not None:
            left -= 10  # the summary and the combined file need a few seconds
            cap = left if cap is None else min(cap, left)
        return cap


def child_env(plan: Plan, step: str = "") -> Dict[str, str]:
    env = dict(os.environ)
    root = str(common.REPO_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if plan.device == "cuda":
        env.pop("TRITON_INTERPRET", None)  # real kernels, compiled for the GPU
        env.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # later processes reuse earlier tuning
        # this GPU's architecture only (a 2-arch build takes twice as long), in every step: the
        # architectures are part of the build's flags, so a step with others would build again
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        env.setdefault("RESNET_FUSED_CUDA_ARCHS", f"{major}{minor}")
    if step == "build":  # on every core
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    return env


def aot_arch(plan: Plan) -> Optional[str]:
    """The codegen target of this GPU (``sm_90a`` on Hopper), or None (CPU, or no target for it)."""
    if plan.device != "cuda":
        return None
    import torch

    return AOT_ARCH.get(torch.cuda.get_device_capability(0))


def precompile_argv(plan: Plan) -> List[str]:
    """One process running ``resnet_fused.aot`` for each workload of :data:`PRECOMPILE`: on a GPU
    ``--precompile`` for its own target; on CPU ``--record-only`` (the recording and the counts,
    exercised by CI; nothing to compile for)."""
    arch = aot_arch(plan)
    mode = ["--arch", arch, "--precompile"] if arch else ["--arch", "sm_90a", "--record-only"]
    runs = [list(w) + mode + ["--out", str(plan.parts / f"precompile_{i}")] for i, w in enumerate(PRECOMPILE)]
    code = ("import sys\nfrom resnet_fused.aot.__main__ import main\n"
            "if __name__ == '__main__':\n"
            f"    sys.exit(max(main(a) for a in {runs!r}))\n")
    return [plan.python, "-c", code]


def bench_argv(plan: Plan, step: str, cap: Optional[float]) -> List[str]:
    argv = [plan.python, "-m", f"benchmarks.{BENCH_STEPS[step]}", "--out", str(plan.parts)]
    if step == "memory":
        return argv  # saved activations, counted under FakeTensorMode: no device options
    argv += ["--device", plan.device]
    if plan.mode == "quick":
        argv.append("--quick")
    if cap is not None and step in ("wrn", "models", "layers"):
        # the benchmark starts nothing after this (its own deadline), so it ends inside the cap
        argv += ["--deadline", f"{max(5.0, 0.8 * cap):.0f}"]
    if step == "layers" and plan.peaks_file is not None:
        argv += ["--peaks", str(plan.peaks_file)]
    return argv


# ------------------------------------------------------------------------------------------ steps
ENV_SCRIPT = r"""
import platform, subprocess, shutil, torch
print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
try:
    import triton; print(f"triton {triton.__version__}")
except Exception as exc:
    print(f"triton: import failed ({type(exc).__name__}: {exc})")
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,"
                          "clocks.max.sm", "--format=csv"], capture_output=True, text=True).stdout.strip())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    print(f"GPU 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
else:
    print("no CUDA device: the benchmarks run their CPU modes")
"""

BUILD_SCRIPT = r"""
import sys
from resnet_fused import _ext, build
rc = build.main([])
err = _ext.cuda_error() if "{device}" == "cuda" else _ext.load_error()
print("library: " + ("ready" if err is None else "NOT READY: " + str(err)))
sys.exit(1 if (rc or err) else 0)
"""


def run_simple(plan: Plan, step: str, argv: List[str], note: str = "") -> StepResult:
    cap = plan.cap(step)
    if cap is not None and cap < 5:
        return StepResult(step, "SKIPPED", 0.0, "no time left before the deadline")
    say(f"== {step}: {' '.join(argv[1:])[:200]}" + (f" (limit {cap:.0f} s)" if cap is not None else ""))
    proc = Proc(step, argv, plan.parts / f"{step}.log", cap).start(child_env(plan, step), common.REPO_ROOT)
    proc.wait()
    return StepResult(step, status_of(proc), proc.seconds, note or plan.rel(proc.log))


def run_tests(plan: Plan) -> List[StepResult]:
    if plan.device != "cuda":
        return [StepResult("tests", "SKIPPED", 0.0, "no CUDA device: the gpu tests would all skip "
                                                   "(the CPU suite is `python -m pytest`)")]
    cap = plan.cap("tests")
    if cap is not None and cap < 20:
        return [StepResult("tests", "SKIPPED", 0.0, "no time left before the deadline")]
    shards = [s for s in SHARDS if plan.mode != "quick" or plan.explicit or s[0] in QUICK_SHARDS]
    say(f"== tests: every test marked gpu (-m gpu) as {len(shards)} processes side by side"
        + (f" (limit {cap:.0f} s)" if cap is not None else ""))
    procs = []
    for name, expr in shards:
        xml = plan.parts / f"test_{name}.xml"
        argv = [plan.python, "-m", "pytest", "-q", "-m", "gpu", "tests", "-k", expr, f"--junitxml={xml}",
                "-p", "no:cacheprovider", "-rfE", "--durations=10"]
        # only the first shard echoes its lines: four interleaved pytest outputs would be unreadable
        procs.append(Proc(name, argv, plan.parts / f"test_{name}.log", cap, echo=not procs))
    env = child_env(plan)
    for p in procs:
        p.start(env, common.REPO_ROOT)
    results = []
    for p in procs:
        p.wait()
        counts = junit_counts(plan.parts / f"test_{p.name}.xml")
        tail = _last_line(p.log)
        say(f"tests {p.name}: {status_of(p)} in {p.seconds:.0f} s: {tail}")
        for line in p.log.read_text().splitlines():
            if line.startswith(("FAILED ", "ERROR ")):
                say(f"  {line[:200]}")
        results.append(StepResult(f"tests {p.name}", status_of(p), p.seconds, tail, counts))
    return results


def run_peaks(plan: Plan) -> StepResult:
    path = plan.parts / "peaks.json"
    code = ("import json, sys; from benchmarks import peaks; "
            f"p = peaks.measure({plan.device!r}, quick={plan.mode != 'full'}); print(peaks.describe(p)); "
            f"open({str(path)!r}, 'w').write(json.dumps(p.as_dict(), indent=1))")
    res = run_simple(plan, "peaks", [plan.python, "-c", code])
    if res.status == "PASS" and path.exists():
        plan.peaks_file = path
    return res


def run_bench(plan: Plan, step: str) -> StepResult:
    t_start = time.time()
    res = run_simple(plan, step, bench_argv(plan, step, plan.cap(step)))
    if res.status == "SKIPPED":
        return res
    fresh = [p for p in plan.parts.glob(f"*_{step}.json") if p.stat().st_mtime >= t_start - 1]
    if fresh:
        plan.bench_files[step] = max(fresh, key=lambda p: p.stat().st_mtime)
    else:
        res.note = (res.note + "; " if res.note else "") + "wrote no result file"
    return res


def run_smoke(plan: Plan) -> StepResult:
    t_start = time.time()
    res = run_simple(plan, "smoke", [plan.python, "-m", "benchmarks.smoke", "--device", plan.device,
                                     "--out", str(plan.parts)])
    fresh = [p for p in plan.parts.glob("*_smoke.json") if p.stat().st_mtime >= t_start - 1]
    if fresh:
        data = json.loads(max(fresh, key=lambda p: p.stat().st_mtime).read_text())
        sm = data.get("summary", {})
        res.tests = {k: sm.get(k, 0) for k in ("passed", "failed", "skipped")}
        res.note = f"{sm.get('passed', 0)} of {sm.get('ran', 0)} checks passed" + "".join(
            f"; {f}" for f in sm.get("failures", [])[:3])
    return res


def run_precompile(plan: Plan) -> StepResult:
    """The Triton variants of the run compiled up front; the note says how many and how long."""
    res = run_simple(plan, "precompile", precompile_argv(plan))
    variants, seconds = 0, 0.0
    for i in range(len(PRECOMPILE)):
        path = plan.parts / f"precompile_{i}" / "triton_summary.json"
        if path.exists():
            summ = json.loads(path.read_text())
            variants += summ.get("variants", 0)
            seconds += sum(t.get("compile_s_total", 0) or 0 for t in summ.get("targets", {}).values())
    if variants:
        what = "compiled" if aot_arch(plan) else "recorded (CPU: nothing to compile)"
        res.note = f"{variants} variants {what}" + (f", {seconds:.0f} compile-s" if seconds else "") + \
            f"; {res.note}"
    return res


def triton_cache_entries() -> Optional[int]:
    """Kernels in Triton's cache (the JIT's compiles since the precompile step show as growth)."""
    try:
        from triton import knobs

        return sum(1 for p in Path(knobs.cache.dir).iterdir() if p.is_dir())  # one directory per compiled kernel
    except Exception:  # no triton, no cache yet
        return None


def run_main_demo(plan: Plan) -> StepResult:
    argv = [plan.python, "-m", "resnet_fused", "--device", plan.device, "--json", str(plan.parts / "main.json")]
    if plan.device == "cuda":
        argv += ["--dtype", "fp16", "--channels-last", "--batch", "256"]
    return run_simple(plan, "main", argv)


# ---------------------------------------------------------------------------------------- combine
def collect(plan: Plan) -> tuple:
    """(rows in the shared schema, {bench: its JSON's other facts}) from this run's result files."""
    rows: List[dict] = []
    facts: Dict[str, dict] = {}
    for step, path in plan.bench_files.items():
        data = json.loads(path.read_text())
        shared = [r for r in data.get("rows", []) if common.is_timing_row(r)]
        rows += shared
        facts[step] = {k: v for k, v in data.items() if k not in ("env", "rows")}
        facts[step]["file"] = plan.rel(path)
        if len(shared) != len(data.get("rows", [])):
            facts[step]["rows_in_own_schema"] = len(data["rows"]) - len(shared)
    return rows, facts


def goal_lines(facts: Dict[str, dict]) -> List[str]:
    """The benchmarks' goal verdicts, as they wrote them (a string, or a list / dict of strings)."""
    out = []
    for step, f in facts.items():
        # top level, or one level down (wrn_fig4 keeps its goal under "ratios")
        places = [f] + [v for v in f.values() if isinstance(v, dict)]
        for key, g in ((k, p.get(k)) for p in places for k in ("goal", "goals")):
            if g is None:
                continue
            if isinstance(g, str):
                out.append(f"{step}: {g}")
            elif isinstance(g, list):
                out += [f"{step}: {_goal_text(x)}" for x in g]
            elif isinstance(g, dict):
                out += [f"{step}: {k}: {_goal_text(v)}" for k, v in g.items()]
    return out


def _goal_text(g) -> str:
    """A goal entry as text: strings as they are; a dict's own "text"; wrn_fig4's {dtype, provider, target, met, of,
    worst_*} as a sentence; anything else as compact JSON."""
    if isinstance(g, str):
        return g
    if isinstance(g, dict) and isinstance(g.get("text"), str):  # models' entries carry their sentence
        return g["text"]
    if isinstance(g, dict) and {"met", "of", "target"} <= set(g):
        who = " ".join(str(g[k]) for k in ("dtype", "provider") if k in g)
        worst = f"; worst {g.get('worst_model')} {g.get('worst_speedup')}x" if g.get("worst_model") else ""
        return f"{who}: {g['met']} of {g['of']} >= {g['target']}x{worst}"
    return json.dumps(g)


# -------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="where the results go (default benchmarks/results)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--quick", action="store_true", help="the < 8 min GPU mode (default on a GPU)")
    m.add_argument("--full", action="store_true", help="every shard and benchmark, full sizes, no caps")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--steps", nargs="+", choices=ALL_STEPS, default=None, help="only these steps (in suite order)")
    p.add_argument("--skip", nargs="+", choices=ALL_STEPS, default=(), help="leave these steps out")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds for the whole suite (quick default {QUICK_DEADLINE_S:.0f}; none otherwise)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG charts")
    p.add_argument("--parts", default=None, help="folder for the logs and per-benchmark files "
                   "(default OUT/<date>_<gpu>_<commit>_parts)")
    p.add_argument("--pack", action="store_true", help="after every step, pack the parts folder into "
                   "OUT/<stem>_parts.tar.gz (run_gpu.sh: the device machine returns at most 8 files)")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    mode = "full" if args.full else ("quick" if device == "cuda" else "cpu")
    default = FULL_STEPS if args.full else QUICK_STEPS
    steps = [s for s in ALL_STEPS if s in (args.steps or default) and s not in args.skip]
    deadline = args.deadline if args.deadline is not None else (QUICK_DEADLINE_S if mode == "quick" else None)
    out = Path(args.out).resolve()
    env = common.env_info(torch.device(device))
    stem = common.result_stem(env, "x")[:-2]
    parts = Path(args.parts).resolve() if args.parts else out / f"{stem}_parts"
    return Plan(device, mode, steps, deadline, out, parts, pack=args.pack, explicit=args.steps is not None)


def checkpoint(plan: Plan, env: dict, plots: bool) -> Dict[str, Path]:
    """Write the combined files (and the packed parts) from what has finished so far."""
    from . import report

    rows, facts = collect(plan)
    suite = {"mode": plan.mode, "device": plan.device, "steps": [r.as_dict() for r in plan.results],
             "seconds": round(elapsed(), 1), "benchmarks": facts, "goals": goal_lines(facts),
             "triton_cache_entries": plan.cache_counts}
    if plan.peaks_file is not None:
        suite["peaks"] = json.loads(plan.peaks_file.read_text())
    paths = report.combine(plan.out, env, rows, suite, plots=plots)
    if plan.pack:
        paths["parts"] = pack_parts(plan, report.combined_stem(env))
    return paths


def pack_parts(plan: Plan, stem: str) -> Path:
    """``out/<stem>_parts.tar.gz`` of the parts folder, replaced atomically."""
    import tarfile

    dest = plan.out / f"{stem}_parts.tar.gz"
    tmp = dest.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(plan.parts, arcname=f"{stem}_parts")
    tmp.replace(dest)
    return dest


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    plan.parts.mkdir(parents=True, exist_ok=True)
    import torch

    env = common.env_info(torch.device(plan.device))
    say(common.banner(f"suite ({plan.mode})", env))
    say(f"steps {plan.steps}; out {plan.out}; parts {plan.parts}"
        + (f"; deadline {plan.deadline:.0f} s" if plan.deadline is not None else ""))
    paths: Dict[str, Path] = {}
    for step in plan.steps:
        if step == "env":
            plan.results.append(run_simple(plan, "env", [plan.python, "-c", ENV_SCRIPT]))
        elif step == "build":
            plan.results.append(run_simple(plan, "build", [plan.python, "-c",
                                                           BUILD_SCRIPT.replace("{device}", plan.device)]))
        elif step == "precompile":
            plan.results.append(run_precompile(plan))
        elif step == "smoke":
            plan.results.append(run_smoke(plan))
        elif step == "tests":
            plan.results += run_tests(plan)
        elif step == "peaks":
            plan.results.append(run_peaks(plan))
        elif step == "main":
            plan.results.append(run_main_demo(plan))
        else:
            plan.results.append(run_bench(plan, step))
        if plan.device == "cuda":
            plan.cache_counts[step] = triton_cache_entries()
        paths = checkpoint(plan, env, plots=not args.no_plots)  # a run cut off later keeps this much
    if not paths:
        paths = checkpoint(plan, env, plots=not args.no_plots)
    rows, facts = collect(plan)
    wrong = [r for r in rows if not r["correct"]]
    failed = [r for r in plan.results if r.status not in ("PASS", "SKIPPED")]
    print()
    print(common.format_table(["step", "status", "seconds", "note"],
                              [[r.step, r.status, f"{r.seconds:.0f}", r.note[:100]] for r in plan.results],
                              title=f"suite ({plan.mode}) on {env['gpu']}: {elapsed():.0f} s"))
    for g in goal_lines(facts):
        print(f"goal: {g}")
    for k, p in paths.items():
        print(f"wrote {p}")
    if wrong:
        print(f"{len(wrong)} benchmark row(s) wrong or failed", file=sys.stderr)
    verdict = "ALL STEPS PASSED" if not failed and not wrong else "SOME STEPS FAILED"
    print(verdict)
    return 0 if verdict == "ALL STEPS PASSED" else 1


if __name__ == "__main__":
    sys.exit(main())
