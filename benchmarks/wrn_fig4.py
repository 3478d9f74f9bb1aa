"""The WRN paper's Figure 4, re-run: thin deep vs wide shallow ResNets, one training step, stock vs fused.

    python -m benchmarks.bench_wrn [--out DIR] [--quick] [--device cuda|cpu] [--networks ...]
                                   [--deadline S] [--reps N] [--no-compile]

Question: Zagoruyko & Komodakis ("Wide Residual Networks", 2016, Figure 4) timed one training
step (forward + backward + SGD update) of thin and wide ResNets on CIFAR-size input at batch 32
with cuDNN v5 on a Titan X, and found the wide ones faster at equal or better accuracy: WRN-28-10
1.6x faster than ResNet-1001 (512 / 312 ms), WRN-40-4 about 8x (512 / 68 ms). Do those ratios
still hold on today's GPU and cuDNN, and do they hold with our fused training blocks
(:mod:`resnet_fused.ops.block_train`)? The issue's goal for this benchmark: the fused networks take
a step at least 1.3x faster than eager on every network (a network that misses is reported as it
is, in the log, the markdown and the JSON's ``"ratios"["goal"]``).

Networks (GPU, 3x32x32 input, batch 32, 10 classes): ``resnet164`` and ``resnet1001``
(pre-activation bottleneck ResNets, :func:`resnet_fused.models.preact_resnet`, 1.7M and 10.2M
weights; reference :func:`resnet_fused.models.reference.ref_preact_resnet`), ``wrn40-4``,
``wrn16-10``, ``wrn28-10`` (:func:`resnet_fused.models.wrn`, 8.95M, 17.12M, 36.48M parameters;
reference ``ref_wrn``). Every row carries the paper's Titan X time for its network (``paper_ms``).

Providers, precision, correctness, timing: those of :mod:`benchmarks.bench_train`, whose step
harness (:func:`benchmarks.bench_train.run_job`) runs every case: ``eager`` (the plain reference
network: cuDNN convs, BN, ReLU, add as separate kernels), ``triton`` and ``cuda`` (our network with
the same state_dict, backend pinned: the fused training blocks), ``auto`` (the same network with
``backend="auto"``: the measured dispatch picks, per block shape, between the block's own modules
and the fused chains; what users get), ``compile`` (``torch.compile`` of the eager network, default
mode; ``--no-compile`` drops it). fp32 runs without autocast with
PyTorch's default TF32 convolutions (cuDNN's default on Ampere and later; the paper's Titan X ran
plain fp32, the precision its numbers are closest to); fp16 is AMP
(``torch.autocast`` float16, fp32 master weights, static loss scale 1024 with the learning rate
divided by it, no GradScaler). SGD momentum 0.9; channels_last (the harness's only layout: every row
says so in ``layout``); ``cudnn.benchmark`` on (``--no-cudnn-benchmark``). Before anything is
timed every provider takes one step from the same state on the same batch, checked against a
reference step (float64; float32 with TF32 off for fp16 runs on the GPU): output, loss, a few
parameter gradients and BN running statistics, each within max(dtype floor, 4 x eager's error);
a wrong or failing provider gets ``correct=false`` and no time. The log gives the number of fused
blocks per step (54 for ResNet-164, 333 for ResNet-1001, (depth - 4) / 2 for a WRN).
Timing: CUDA events per step after 7 untimed steps, 20 timed steps (``--reps``), median with the
20th / 80th percentiles. ``auto`` measures its candidates in its first step (the checked one,
untimed, on the timed batch's shape), so no timed step measures; the dispatch forgets its decisions
before each network's auto run (each case measures its own block shapes, as a fresh process would)
and reads and writes no decision file (``RESNET_FUSED_CACHE_DIR=""`` in this process).

Modes:

- GPU, full: the five networks, fp32 and fp16, providers eager, triton, cuda, auto, then compile after
  every other provider of every case (WRN-28-10 and WRN-40-4 first, ResNet-1001 last: compiling its
  1000-layer training graph may take minutes).
- GPU, ``--quick`` (a step of ``run_gpu.sh``; meant for about 2 minutes on an H100): the five
  networks in fp16 with eager, triton, cuda and auto; eager alone in fp32 (the stock thin / wide ratio in
  the paper's precision); compile in fp16 for WRN-28-10 and WRN-40-4 only; ResNet-1001 with 10
  timed steps instead of 20 (unless ``--reps`` is given); no provider starts later than 110 s
  after the start (``--deadline``). ``--dtypes`` replaces the dtypes, and then every dtype gets
  every provider.
- CPU (the default without CUDA; CI): honest tiny stand-ins, ``preact11`` (one bottleneck unit
  per stage; it plays ResNet-1001) and ``wrn10-1`` (plays the wide networks), 3x8x8 input, batch 2,
  fp32, providers eager, triton (the kernels through Triton's interpreter: needs
  ``TRITON_INTERPRET=1`` in the environment before Python starts, else triton is skipped with a
  note), cuda (the compiled library's C++ kernels, where it loads) and auto (on CPU tensors it
  measures the blocks' own modules against the C++ kernels; the interpreter is never a
  candidate; on wrn10-1 only unless ``--providers`` names it: one network proves the path, a
  second would only add CI time). It proves the script, its checks and its files; its times say nothing about the
  paper's claims (``paper_ms`` is null). About 20 s on 2 CPU cores, nearly all of it the
  interpreter (``tests/test_bench_wrn.py``).

Outputs (``--out``, default ``benchmarks/results``; rewritten after every case, so a run cut short
keeps what it measured): ``<date>_<device>_<commit>_wrn.{json,csv,md}``, rows
:func:`benchmarks.common.row_keys` ``("layout", "compile_s", "paper_ms")`` with ``bench="wrn"``,
``mode="train_step"``, ``compile_s`` = compile's first-step wall seconds (compile included; null
for the other providers). The JSON also has ``"skipped"``, ``"paper"`` (the paper's table: ms and
CIFAR-10 error per network, the claimed ratios) and ``"ratios"`` (:func:`ratios_summary`): per
measured (dtype, provider) the thin / wide time ratios ResNet-1001 / WRN-28-10 and ResNet-1001 /
WRN-40-4 beside the paper's 1.64 and 7.53, each non-eager provider's speedup over eager per
network, and the 1.3x goal per fused provider and for auto (how many networks meet it, the
worst); and ``"dispatch"`` (:func:`benchmarks.bench_train.dispatch_list`: per auto row, its
``model shape batch dtype mode layout variant``, the dispatch's ``env`` and ``decisions``, each
with ``op case chosen candidates source sites margin measure_ms``). The summary
table (stdout and markdown): one line per (network, dtype) with the paper's ms, eager's ms, each
provider's ms and eager / provider, compile seconds; then the thin / wide table and the goal lines.

Pending: no GPU numbers yet. Nothing here has run on a GPU; the ``--quick`` time is an estimate
(cold Triton compilation of the fused kernels for five networks and a cold ``torch.compile`` of two
WRN training graphs may not fit: the deadline then skips what is left, and says so).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import resnet_fused
from resnet_fused.models import reference

from . import bench_train, common
from .bench_blocks import randomize_bn
from .bench_train import Case, Config, Info, Job

BENCH = "wrn"
KEYS = common.row_keys("layout", "compile_s", "paper_ms")
LAYOUT = "channels_last"  # bench_train's harness runs every provider channels_last
WRN_PROVIDERS = ("eager", "triton", "cuda", "auto", "compile", "torch")
FUSED = ("triton", "cuda")
GOAL_PROVIDERS = FUSED + ("auto",)  # the goal judges each fused backend and auto (what users get)
GOAL = 1.3  # the issue: fused >= 1.3x eager on every network
GPU_BATCH, GPU_SIZE = 32, 32
CPU_BATCH, CPU_SIZE = 2, 8
QUICK_DEADLINE_S = 110.0
QUICK_COMPILE = ("wrn28-10", "wrn40-4")  # --quick: the only networks torch.compile runs on
QUICK_REPS_RESNET1001 = 10
DEFAULT_REPS = 20
_T0 = time.monotonic()

# The paper's Figure 4 (cuDNN v5, Titan X, batch 32, CIFAR input, forward + backward + update) and
# its CIFAR-10 test error in percent. params_m: millions of parameters of the networks built here
# (10 classes), rounded to 0.1M as the papers round; for the pre-activation ResNets without
# BatchNorm's scale and shift, as He et al.'s 1.7M and 10.2M count them.
PAPER: Dict[str, dict] = {
    "resnet164": {"ms": 85.0, "cifar10_err_pct": 5.46, "params_m": 1.7, "kind": "thin"},
    "resnet1001": {"ms": 512.0, "cifar10_err_pct": 4.64, "params_m": 10.2, "kind": "thin"},
    "wrn40-4": {"ms": 68.0, "cifar10_err_pct": 4.66, "params_m": 8.9, "kind": "wide"},
    "wrn16-10": {"ms": 164.0, "cifar10_err_pct": 4.56, "params_m": 17.1, "kind": "wide"},
    "wrn28-10": {"ms": 312.0, "cifar10_err_pct": 4.38, "params_m": 36.5, "kind": "wide"},
}
# (thin, wide): the paper's two claims, "the wide network is thin/wide times faster"
GPU_PAIRS: Tuple[Tuple[str, str], ...] = (("resnet1001", "wrn28-10"), ("resnet1001", "wrn40-4"))
CPU_PAIRS: Tuple[Tuple[str, str], ...] = (("preact11", "wrn10-1"),)  # stand-ins, no paper ratio


def paper_ratio(thin: str, wide: str) -> Optional[float]:
    """The paper's thin / wide time ratio (512 / 312 = 1.64, 512 / 68 = 7.53), None for networks
    the paper did not time."""
    if thin not in PAPER or wide not in PAPER:
        return None
    return PAPER[thin]["ms"] / PAPER[wide]["ms"]


def paper_extra() -> dict:
    """The JSON's ``"paper"``: the table and the claimed ratios."""
    return {
        "source": "Zagoruyko & Komodakis, Wide Residual Networks (2016), Figure 4: cuDNN v5, Titan X, batch 32, "
                  "CIFAR input, forward + backward + update",
        "networks": {k: dict(v) for k, v in PAPER.items()},
        "claims": {f"{t}/{w}": common.sig(paper_ratio(t, w), 4) for t, w in GPU_PAIRS},
    }


# ---------------------------------------------------------------------------------------- networks
@dataclass(frozen=True)
class Network:
    """One network of the figure (or a tiny CPU stand-in): the row's ``model`` name, the family
    ("preact" | "wrn"), depth, widening factor (1 for the pre-activation ResNets), input size."""

    name: str
    family: str
    depth: int
    k: int
    size: int

    @property
    def paper_ms(self) -> Optional[float]:
        return PAPER[self.name]["ms"] if self.name in PAPER else None

    def case(self, seed: int) -> Case:
        if self.family == "preact":
            return preact_case(self.depth, self.size, seed, name=self.name)
        return bench_train.wrn_case(self.depth, self.k, self.size, seed)


GPU_NETWORKS = (Network("resnet164", "preact", 164, 1, GPU_SIZE), Network("resnet1001", "preact", 1001, 1, GPU_SIZE),
                Network("wrn40-4", "wrn", 40, 4, GPU_SIZE), Network("wrn16-10", "wrn", 16, 10, GPU_SIZE),
                Network("wrn28-10", "wrn", 28, 10, GPU_SIZE))
CPU_NETWORKS = (Network("preact11", "preact", 11, 1, CPU_SIZE), Network("wrn10-1", "wrn", 10, 1, CPU_SIZE))
# auto's CPU default (CI): one network proves its path (measured in the checked step, decisions in
# the JSON); a second would only add CI time. --providers naming auto runs it on both.
CPU_AUTO_NETWORKS = ("wrn10-1",)
# compile's order: the headline pair first, ResNet-1001 (minutes of compile) last
COMPILE_ORDER = ("wrn28-10", "wrn40-4", "wrn16-10", "resnet164", "resnet1001")


def preact_case(depth: int, size: int, seed: int, name: Optional[str] = None) -> Case:
    """The pre-activation bottleneck ResNet-``depth`` (reference vs ``preact_resnet``), random BN
    state, 10 classes; named ``name`` (default ``preact<depth>``)."""
    n = (depth - 2) // 9  # units per stage

    def build_ref():
        torch.manual_seed(seed)
        model = reference.ref_preact_resnet(depth)
        randomize_bn(model, torch.Generator().manual_seed(seed))
        return model

    return Case(name or f"preact{depth}", "model", (3, size, size), build_ref,
                lambda b: resnet_fused.models.preact_resnet(depth, backend=b),
                ("conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.downsample.weight",
                 "layer2.0.downsample.weight", f"layer3.{n - 1}.bn2.weight", f"layer3.{n - 1}.conv3.weight",
                 "bn.weight", "fc.weight"),
                ("layer1.0.bn1.running_mean", "layer2.0.bn2.running_var", f"layer3.{n - 1}.bn3.running_var",
                 "bn.running_mean"),
                num_classes=10)


# ------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Task:
    """A job (network, batch, dtype), the providers it times, and its timed steps on a GPU."""

    net: Network
    job: Job
    providers: Tuple[str, ...]
    reps: int


def plan(networks: Sequence[Network], providers: Sequence[str], dtypes: Sequence[str], *, quick: bool,
         cpu: bool, reps: Optional[int], dtypes_given: bool,
         cpu_auto: Optional[Sequence[str]] = CPU_AUTO_NETWORKS) -> List[Task]:
    """Every (network, dtype) with its providers, in run order (early providers: network by
    network, fp16 before fp32; compile's tasks after all of them, :data:`COMPILE_ORDER`).

    ``--quick`` (without ``--dtypes``): fp32 runs eager only; compile only for
    :data:`QUICK_COMPILE` in fp16; ResNet-1001 gets :data:`QUICK_REPS_RESNET1001` timed steps
    unless ``reps`` was given. CPU: auto on the networks of ``cpu_auto`` only (None: all)."""
    batch = CPU_BATCH if cpu else GPU_BATCH
    early = [p for p in providers if p not in bench_train.LATE_PROVIDERS]
    late = [p for p in providers if p in bench_train.LATE_PROVIDERS]
    tasks: List[Task] = []
    late_tasks: List[Task] = []
    for net in networks:
        case = net.case(seed=sum(map(ord, net.name)))
        n_reps = reps if reps is not None else (
            QUICK_REPS_RESNET1001 if quick and net.name == "resnet1001" else DEFAULT_REPS)
        for dtype in dtypes:
            job = Job(case, batch, dtype)
            eager_only = quick and not dtypes_given and dtype == "fp32"
            provs = tuple(p for p in early if not (cpu and p == "auto" and cpu_auto is not None
                                                   and net.name not in cpu_auto))
            tasks.append(Task(net, job, ("eager",) if eager_only else provs, n_reps))
            if late and not eager_only and (not quick or net.name in QUICK_COMPILE):
                late_tasks.append(Task(net, job, tuple(late), n_reps))
    rank = {n: i for i, n in enumerate(COMPILE_ORDER)}
    late_tasks.sort(key=lambda t: rank.get(t.net.name, len(rank)))  # stable: dtype order kept
    return tasks + late_tasks


# --------------------------------------------------------------------------------------- ratios
def _times(rows: Sequence[dict]) -> Dict[Tuple[str, str, str], float]:
    """(model, dtype, provider) -> median ms of the correct, timed rows."""
    return {(r["model"], r["dtype"], r["provider"]): r["median_ms"] for r in rows
            if r["correct"] and r["median_ms"] is not None}


def thin_wide_ratios(rows: Sequence[dict], pairs: Sequence[Tuple[str, str]] = GPU_PAIRS) -> List[dict]:
    """For every measured (dtype, provider) and (thin, wide) pair with both times: thin's ms /
    wide's ms (how many times faster the wide network takes a step), beside the paper's ratio
    (None for the CPU stand-ins)."""
    t = _times(rows)
    out = []
    groups = list(dict.fromkeys((r["dtype"], r["provider"]) for r in rows))
    for dtype, prov in groups:
        for thin, wide in pairs:
            a, b = t.get((thin, dtype, prov)), t.get((wide, dtype, prov))
            if a is None or b is None or b <= 0:
                continue
            pr = paper_ratio(thin, wide)
            out.append({"dtype": dtype, "provider": prov, "thin": thin, "wide": wide, "thin_ms": a, "wide_ms": b,
                        "ratio": common.sig(a / b, 4), "paper_ratio": common.sig(pr, 4)})
    return out


def speedups(rows: Sequence[dict]) -> List[dict]:
    """Every correct, timed non-eager row against eager's time for the same network and dtype:
    eager ms / provider ms."""
    t = _times(rows)
    out = []
    for r in rows:
        key = (r["model"], r["dtype"], r["provider"])
        if r["provider"] == "eager" or key not in t:
            continue
        e = t.get((r["model"], r["dtype"], "eager"))
        if e is None:
            continue
        out.append({"model": r["model"], "dtype": r["dtype"], "provider": r["provider"], "eager_ms": e,
                    "ms": t[key], "speedup": common.sig(e / t[key], 4)})
    return out


def goal_verdict(rows: Sequence[dict], target: float = GOAL) -> List[dict]:
    """Per (dtype, provider of :data:`GOAL_PROVIDERS`: triton, cuda, auto): of the networks it ran
    on, how many networks it ran correctly at >= ``target`` x eager (``met`` of ``of``), and the
    worst. A network where the provider ran but
    was wrong or failed (or eager had no time) counts as missed, with a null speedup."""
    sp = {(s["model"], s["dtype"], s["provider"]): s["speedup"] for s in speedups(rows)}
    out = []
    groups = list(dict.fromkeys((r["dtype"], r["provider"]) for r in rows if r["provider"] in GOAL_PROVIDERS))
    for dtype, prov in groups:
        nets = list(dict.fromkeys(r["model"] for r in rows if r["dtype"] == dtype and r["provider"] == prov))
        vals = {m: sp.get((m, dtype, prov)) for m in nets}
        met = [m for m, v in vals.items() if v is not None and v >= target]
        worst = min(nets, key=lambda m: -math.inf if vals[m] is None else vals[m])
        out.append({"dtype": dtype, "provider": prov, "target": target, "met": len(met), "of": len(nets),
                    "worst_model": worst, "worst_speedup": vals[worst], "all_met": len(met) == len(nets)})
    return out


def ratios_summary(rows: Sequence[dict], pairs: Sequence[Tuple[str, str]] = GPU_PAIRS) -> dict:
    """The JSON's ``"ratios"``: the paper's claimed ratios, ours (thin / wide), the speedups over
    eager, and the goal."""
    claimed = {f"{t}/{w}": paper_ratio(t, w) for t, w in pairs}
    return {"paper": {k: common.sig(v, 4) for k, v in claimed.items()},
            "thin_wide": thin_wide_ratios(rows, pairs), "speedup_vs_eager": speedups(rows),
            "goal": goal_verdict(rows)}


# ----------------------------------------------------------------------------------------- tables
def summary_table(rows: Sequence[dict], infos: Dict, providers: Sequence[str]) -> Tuple[List[str], List[list]]:
    """(headers, lines): one line per (network, dtype): the paper's ms, eager's ms, each provider's
    ms and eager / provider, compile's first-step seconds."""
    others = [p for p in providers if p != "eager"]
    headers = ["network", "dtype", "paper ms", "eager ms"]
    for p in others:
        headers += [f"{p} ms", f"eager/{p}"]
    if "compile" in others:
        headers.append("compile s")
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["model"], r["dtype"], r["batch"]), {})[r["provider"]] = r
    lines = []
    for (model, dtype, batch), prov in by_key.items():
        e = prov.get("eager", {})
        e_ms = e.get("median_ms")
        paper = next((r["paper_ms"] for r in prov.values() if r["paper_ms"] is not None), None)
        line = [model, dtype, "-" if paper is None else f"{paper:.0f}",
                common.fmt_ms(e_ms) if e.get("correct", True) else "WRONG"]
        for p in others:
            r = prov.get(p)
            if r is None:
                line += ["", ""]
            elif not r["correct"]:
                info = infos.get((model, batch, dtype, p))
                line += ["-", "WRONG" if info is not None and info.verdict is not None else "FAILED"]
            else:
                ratio = e_ms / r["median_ms"] if e_ms and r["median_ms"] else None
                line += [common.fmt_ms(r["median_ms"]), "" if ratio is None else f"{ratio:.2f}x"]
        if "compile" in others:
            c = prov.get("compile")
            line.append("-" if c is None or c["compile_s"] is None else f"{c['compile_s']:.1f}")
        lines.append(line)
    return headers, lines


def ratio_table(summary: dict) -> Tuple[List[str], List[list]]:
    """(headers, lines): one line per (dtype, provider) and thin / wide pair."""
    headers = ["dtype", "provider", "thin / wide", "thin ms", "wide ms", "ours", "paper"]
    lines = [[r["dtype"], r["provider"], f"{r['thin']} / {r['wide']}", common.fmt_ms(r["thin_ms"]),
              common.fmt_ms(r["wide_ms"]), f"{r['ratio']:.2f}x",
              "-" if r["paper_ratio"] is None else f"{r['paper_ratio']:.2f}x"] for r in summary["thin_wide"]]
    return headers, lines


def goal_lines(summary: dict) -> List[str]:
    out = []
    for g in summary["goal"]:
        worst = "-" if g["worst_speedup"] is None else f"{g['worst_speedup']:.3g}x"
        out.append(f"goal (fused >= {g['target']:g}x eager) {g['dtype']} {g['provider']}: {g['met']} of {g['of']} "
                   f"networks{' (met on every network)' if g['all_met'] else ''}; worst {g['worst_model']} {worst}")
    return out


def append_ratio_markdown(out_dir, env: dict, summary: dict) -> Optional[Path]:
    """Add the thin / wide table and the goal lines under the summary table of ``<stem>.md``."""
    path = Path(out_dir) / f"{common.result_stem(env, BENCH)}.md"
    if not path.exists():
        return None
    headers, lines = ratio_table(summary)
    text = ["", "### Thin vs wide: the thin network's time / the wide network's", ""]
    text += [common.markdown_table(headers, lines) if lines else "(no pair with both times)"]
    goals = goal_lines(summary)
    if goals:
        text += [""] + [f"- {g}" for g in goals]
    with open(path, "a") as f:
        f.write("\n".join(text) + "\n")
    return path


# -------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = common.base_parser("python -m benchmarks.bench_wrn", __doc__, providers=WRN_PROVIDERS,
                           dtypes=("fp32", "fp16"),
                           quick_help="GPU: the five networks fp16 (eager, triton, cuda, auto) + eager fp32, compile "
                                      "for WRN-28-10 and WRN-40-4 only, deadline 110 s (meant for ~2 min on an H100)")
    p.add_argument("--networks", nargs="+", default=None, help="only these networks (names as in the table)")
    p.add_argument("--no-compile", action="store_true", help="GPU: leave out torch.compile")
    p.add_argument("--reps", type=int, default=None,
                   help=f"GPU: timed steps per provider (default {DEFAULT_REPS}; --quick: "
                        f"{QUICK_REPS_RESNET1001} for ResNet-1001)")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds after start past which no provider starts (--quick: {QUICK_DEADLINE_S:.0f})")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="GPU: leave torch.backends.cudnn.benchmark off")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Tuple[Config, List[Task], Tuple[Tuple[str, str], ...]]:
    """The harness's Config (device, providers, deadline, notes, skipped), the tasks, the thin /
    wide pairs of this mode."""
    dev = common.pick_device(args.device)
    cpu = dev.type != "cuda"
    networks = CPU_NETWORKS if cpu else GPU_NETWORKS
    pairs = CPU_PAIRS if cpu else GPU_PAIRS
    if args.networks:
        names = [n.name for n in networks]
        unknown = [n for n in args.networks if n not in names]
        if unknown:
            raise SystemExit(f"--networks: unknown {unknown}; this mode has {names}")
        networks = tuple(n for n in networks if n.name in args.networks)
    default = ["eager", "triton", "cuda", "auto"] + ([] if cpu or args.no_compile else ["compile"])
    providers = common.order_providers(args.providers, default, "eager")
    if args.no_compile and "compile" in providers:
        providers.remove("compile")
    skipped: Dict[str, str] = {}
    providers = common.drop_unavailable(providers, dev, skipped)
    notes = [f"{p} skipped: {why}" for p, why in skipped.items()]  # printed; finish lists them itself
    dtypes = list(dict.fromkeys(args.dtypes)) if args.dtypes else (["fp32"] if cpu else ["fp16", "fp32"])
    if args.reps is not None and args.reps < 1:
        raise SystemExit(f"--reps: expected at least 1, got {args.reps}")
    auto_named = bool(args.providers and "auto" in args.providers)
    tasks = plan(networks, providers, dtypes, quick=args.quick and not cpu, cpu=cpu, reps=args.reps,
                 dtypes_given=bool(args.dtypes), cpu_auto=None if auto_named else CPU_AUTO_NETWORKS)
    if cpu and "auto" in providers and not auto_named:
        notes.append(f"auto on CPU: {', '.join(CPU_AUTO_NETWORKS)} only (name auto in --providers for both)")
    deadline_s = args.deadline if args.deadline is not None else (QUICK_DEADLINE_S if args.quick else None)
    deadline = None if deadline_s is None else _T0 + deadline_s
    cfg = Config(dev, [t.job for t in tasks], providers, args.reps or DEFAULT_REPS, deadline, notes, skipped)
    return cfg, tasks, pairs


def row_extra(job: Job, prov: str, info: Info) -> dict:
    net = next((n for n in GPU_NETWORKS + CPU_NETWORKS if n.name == job.case.name), None)
    return {"layout": LAYOUT, "compile_s": info.first_s if prov == "compile" else None,
            "paper_ms": None if net is None else net.paper_ms}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg, tasks, pairs = make_plan(args)
    dev = cfg.device
    env = common.env_info(dev)
    print(common.banner("bench_wrn", env))
    print(f"providers {list(cfg.providers)}; "
          f"tasks {[t.job.label() + ' ' + '/'.join(t.providers) for t in tasks]}; {LAYOUT}; "
          f"fp16 = autocast + static loss scale {bench_train.FP16_LOSS_SCALE:g}; fp32 = TF32 (cuDNN's default); "
          f"SGD momentum {bench_train.MOMENTUM}; "
          f"{'timed steps ' + str(sorted({t.reps for t in tasks})) if dev.type == 'cuda' else 'CPU'}"
          + common.settings_suffix(dev, not args.no_cudnn_benchmark, cfg.deadline, _T0), flush=True)
    for note in cfg.notes:
        print(f"note: {note}")
    rows: List[dict] = []
    infos: Dict = {}

    def extras() -> dict:
        return {"paper": paper_extra(), "ratios": ratios_summary(rows, pairs),
                "dispatch": bench_train.dispatch_list(rows, infos)}

    def save() -> None:
        if not args.no_write and rows:
            common.write_results(args.out, BENCH, env, rows, keys=KEYS, extra={"skipped": cfg.skipped, **extras()})

    with common.dispatch_isolated(), common.cudnn_benchmark(dev, not args.no_cudnn_benchmark):
        for task in tasks:
            run_cfg = dataclasses.replace(cfg, reps=task.reps)  # shares notes, skipped, deadline
            bench_train.run_job(task.job, task.providers, run_cfg, rows, infos, bench=BENCH, row_extra=row_extra)
            save()  # after every case: a run cut short keeps what it measured
    headers, lines = summary_table(rows, infos, cfg.providers)
    print(common.format_table(headers, lines))
    summary = ratios_summary(rows, pairs)
    r_headers, r_lines = ratio_table(summary)
    if r_lines:
        print(common.format_table(r_headers, r_lines, title="thin vs wide: thin ms / wide ms (paper: Titan X)"))
    for g in goal_lines(summary):
        print(g)
    for note in cfg.notes:
        print(f"note: {note}")
    write = not args.no_write and bool(rows)
    skip_notes = {f"{p} skipped: {why}" for p, why in cfg.skipped.items()}
    batch = tasks[0].job.batch if tasks else "-"
    title = f"bench_wrn: WRN Figure 4 re-run (training step, batch {batch}), {env['gpu']}"
    rc = common.finish(rows, args.out, BENCH, env, write=write, keys=KEYS, skipped=cfg.skipped, extra=extras(),
                       markdown=(title, headers, lines),
                       notes=[n for n in cfg.notes if n not in skip_notes])
    if write:
        append_ratio_markdown(args.out, env, summary)
    return rc


if __name__ == "__main__":
    sys.exit(main())
