"""The WRN paper's Figure 4, re-run: thin deep vs wide shallow ResNets, one training step, stock vs fused.

    python -m benchmarks.wrn_fig4 [--out DIR] [--quick] [--device cuda|cpu] [--networks ...]
                             [--deadline S] [--reps N] [--no-compile]

Question: Zagoruyko & Komodakis ("Wide Residual Networks", 2016, Figure 4) timed one training step
of thin and wide ResNets at batch 32 on CIFAR-size input (cuDNN v5, Titan X) and found the wide
ones faster at equal or better accuracy: WRN-28-10 1.6x faster than ResNet-1001 (512 / 312 ms),
WRN-40-4 about 8x (512 / 68 ms). Do those ratios hold on today's GPU and cuDNN, and with our fused
training blocks? Goal: the fused networks (triton, cuda; auto judged beside them) take a step at
least 1.3x faster than eager on every network (a miss is reported: log, markdown, JSON
``"ratios"["goal"]``).

Networks (GPU: 3x32x32, batch 32, 10 classes): ``resnet164``, ``resnet1001`` (pre-activation
bottleneck ResNets, 1.7M / 10.2M weights), ``wrn40-4``, ``wrn16-10``, ``wrn28-10`` (8.95M, 17.12M,
36.48M parameters); every row carries the paper's Titan X time (``paper_ms``). Providers,
precision, checks and timing: :func:`benchmarks.models.run_case`'s training step (eager, triton,
cuda, auto, then compile; fp32 = TF32 convs, the paper's precision; fp16 = AMP with a static loss
scale; channels_last; every provider's step judged against a float64 / float32 reference first).
GPU ``--quick`` (~2 min on an H100, an estimate): the five networks in fp16 with every early
provider, eager alone in fp32, compile for WRN-28-10 and WRN-40-4 only, ResNet-1001 with 10 timed
steps, no provider started after 110 s (``--deadline``). CPU (CI, ~20 s on 2 cores, nearly all the
interpreter): tiny stand-ins ``preact11`` (plays ResNet-1001) and ``wrn10-1``, 3x8x8, batch 2, fp32;
triton through the interpreter (needs ``TRITON_INTERPRET=1``), cuda (C++ kernels), auto on wrn10-1
only unless named; their times say nothing about the paper (``paper_ms`` null).

Output: ``<date>_<device>_<commit>_wrn.{json,csv,md}``, rows ``common.row_keys("layout",
"compile_s", "paper_ms")``, bench ``"wrn"``; JSON ``skipped``, ``paper`` (the table and claims),
``ratios`` (:func:`ratios_summary`: thin / wide ratios beside the paper's, speedups over eager, the
goal), ``dispatch``. Pending: no GPU numbers yet.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import resnet_fused
from resnet_fused.models import reference

from . import common, settings
from .models import Bench, Case, run_case, summary_table

BENCH = "wrn"
KEYS = common.row_keys("layout", "compile_s", "paper_ms")
PROVIDERS = ("eager", "triton", "cuda", "auto", "compile", "torch")
GOAL_PROVIDERS = ("triton", "cuda", "auto")
GOAL = 1.3
QUICK_DEADLINE_S, QUICK_COMPILE, QUICK_REPS_RESNET1001, DEFAULT_REPS = 110.0, ("wrn28-10", "wrn40-4"), 10, 20
_T0 = time.monotonic()
# Figure 4 (cuDNN v5, Titan X, batch 32, CIFAR input, forward + backward + update), CIFAR-10 test error
# in percent, millions of parameters as built here (the pre-activation ResNets without BN, as He et al. count)
PAPER: Dict[str, dict] = {
    "resnet164": {"ms": 85.0, "cifar10_err_pct": 5.46, "params_m": 1.7, "kind": "thin"},
    "resnet1001": {"ms": 512.0, "cifar10_err_pct": 4.64, "params_m": 10.2, "kind": "thin"},
    "wrn40-4": {"ms": 68.0, "cifar10_err_pct": 4.66, "params_m": 8.9, "kind": "wide"},
    "wrn16-10": {"ms": 164.0, "cifar10_err_pct": 4.56, "params_m": 17.1, "kind": "wide"},
    "wrn28-10": {"ms": 312.0, "cifar10_err_pct": 4.38, "params_m": 36.5, "kind": "wide"},
}
GPU_PAIRS = (("resnet1001", "wrn28-10"), ("resnet1001", "wrn40-4"))  # (thin, wide): the paper's claims
CPU_PAIRS = (("preact11", "wrn10-1"),)
CPU_AUTO_NETWORKS = ("wrn10-1",)  # one network proves auto's path; a second would only add CI time
COMPILE_ORDER = ("wrn28-10", "wrn40-4", "wrn16-10", "resnet164", "resnet1001")  # ResNet-1001's compile: last


def paper_ratio(thin: str, wide: str) -> Optional[float]:
    """The paper's thin / wide time ratio (None for networks it did not time)."""
    return PAPER[thin]["ms"] / PAPER[wide]["ms"] if thin in PAPER and wide in PAPER else None


def paper_extra() -> dict:
    return {"source": "Zagoruyko & Komodakis, Wide Residual Networks (2016), Figure 4: cuDNN v5, Titan X, batch 32, "
                 "CIFAR input, forward + backward + update",
            "networks": {k: dict(v) for k, v in PAPER.items()},
            "claims": {f"{t}/{w}": common.sig(paper_ratio(t, w), 4) for t, w in GPU_PAIRS}}


# ---------------------------------------------------------------------------------------- networks
@dataclass(frozen=True)
class Network:
    """A network of the figure (or a CPU stand-in): family "preact" | "wrn", depth, widening k."""

    name: str
    family: str
    depth: int
    k: int
    size: int

    @property
    def paper_ms(self) -> Optional[float]:
        return PAPER.get(self.name, {}).get("ms")

    def case(self, seed: int) -> Case:
        if self.family == "preact":
            return preact_case(self.depth, self.size, seed, name=self.name)
        return wrn_case(self.depth, self.k, self.size, seed)


GPU_NETWORKS = tuple(Network(n, f, d, k, 32) for n, f, d, k in (
    ("resnet164", "preact", 164, 1), ("resnet1001", "preact", 1001, 1), ("wrn40-4", "wrn", 40, 4),
    ("wrn16-10", "wrn", 16, 10), ("wrn28-10", "wrn", 28, 10)))
CPU_NETWORKS = (Network("preact11", "preact", 11, 1, 8), Network("wrn10-1", "wrn", 10, 1, 8))


def wrn_case(depth: int, k: int, size: int, seed: int) -> Case:
    n = (depth - 4) // 6  # blocks per group; bn.running_mean: the next BN of a pre-activation net hides a scale error
    return Case(f"wrn{depth}-{k}", (3, size, size), lambda: reference.ref_wrn(depth, k),
                lambda b: resnet_fused.models.wrn(depth, k, backend=b),
                ("conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer2.0.shortcut.weight",
                 f"layer3.{n - 1}.conv2.weight", "bn.weight", "fc.weight"),
                ("layer1.0.bn1.running_mean", "layer1.0.bn2.running_var", f"layer3.{n - 1}.bn2.running_var",
                 "bn.running_mean"), 10, seed)


def preact_case(depth: int, size: int, seed: int, name: Optional[str] = None) -> Case:
    n = (depth - 2) // 9  # units per stage
    return Case(name or f"preact{depth}", (3, size, size), lambda: reference.ref_preact_resnet(depth),
                lambda b: resnet_fused.models.preact_resnet(depth, backend=b),
                ("conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.downsample.weight",
                 "layer2.0.downsample.weight", f"layer3.{n - 1}.bn2.weight", f"layer3.{n - 1}.conv3.weight",
                 "bn.weight", "fc.weight"),
                ("layer1.0.bn1.running_mean", "layer2.0.bn2.running_var", f"layer3.{n - 1}.bn3.running_var",
                 "bn.running_mean"), 10, seed)


@dataclass(frozen=True)
class Task:
    net: Network
    dtype: str
    providers: Tuple[str, ...]
    reps: int


def plan(networks: Sequence[Network], providers: Sequence[str], dtypes: Sequence[str], *, quick: bool,
         reps: Optional[int], dtypes_given: bool, cpu_auto: Optional[Sequence[str]] = None) -> List[Task]:
    """Every (network, dtype) with its providers in run order: early providers network by network,
    then compile's tasks in :data:`COMPILE_ORDER`. ``quick`` (without ``--dtypes``): fp32 eager only,
    compile for :data:`QUICK_COMPILE` only, ResNet-1001 with 10 timed steps unless ``reps``.
    ``cpu_auto``: the only networks auto runs on (None: all)."""
    early = [p for p in providers if p != "compile"]
    tasks, late = [], []
    for net in networks:
        n_reps = reps or (QUICK_REPS_RESNET1001 if quick and net.name == "resnet1001" else DEFAULT_REPS)
        for dtype in dtypes:
            eager_only = quick and not dtypes_given and dtype == "fp32"
            provs = tuple(p for p in early if p != "auto" or cpu_auto is None or net.name in cpu_auto)
            tasks.append(Task(net, dtype, ("eager",) if eager_only else provs, n_reps))
            if "compile" in providers and not eager_only and (not quick or net.name in QUICK_COMPILE):
                late.append(Task(net, dtype, ("compile",), n_reps))
    rank = {n: i for i, n in enumerate(COMPILE_ORDER)}
    return tasks + sorted(late, key=lambda t: rank.get(t.net.name, len(rank)))  # stable: dtype order kept


# ------------------------------------------------------------------------------------------ ratios
def _times(rows: Sequence[dict]) -> Dict[Tuple[str, str, str], float]:
    return {(r["model"], r["dtype"], r["provider"]): r["median_ms"] for r in rows
            if r["correct"] and r["median_ms"] is not None}


def thin_wide_ratios(rows: Sequence[dict], pairs: Sequence[Tuple[str, str]] = GPU_PAIRS) -> List[dict]:
    """Per measured (dtype, provider) and (thin, wide) pair with both times: thin ms / wide ms (how
    many times faster the wide network takes a step), beside the paper's ratio."""
    t, out = _times(rows), []
    for dtype, prov in dict.fromkeys((r["dtype"], r["provider"]) for r in rows):
        for thin, wide in pairs:
            a, b = t.get((thin, dtype, prov)), t.get((wide, dtype, prov))
            if a is not None and b:
                out.append({"dtype": dtype, "provider": prov, "thin": thin, "wide": wide, "thin_ms": a, "wide_ms": b,
                       "ratio": common.sig(a / b, 4), "paper_ratio": common.sig(paper_ratio(thin, wide), 4)})
    return out


def speedups(rows: Sequence[dict]) -> List[dict]:
    """Every correct, timed non-eager row against eager's time for the same network and dtype."""
    t = _times(rows)
    return [{"model": m, "dtype": d, "provider": p, "eager_ms": t[(m, d, "eager")], "ms": ms,
             "speedup": common.sig(t[(m, d, "eager")] / ms, 4)}
            for (m, d, p), ms in t.items() if p != "eager" and (m, d, "eager") in t]


def goal_verdict(rows: Sequence[dict], target: float = GOAL) -> List[dict]:
    """Per (dtype, provider of :data:`GOAL_PROVIDERS`): of the networks it ran on, how many ran
    correctly at >= ``target`` x eager, and the worst (a wrong or failed run is a miss, null speedup)."""
    sp = {(s["model"], s["dtype"], s["provider"]): s["speedup"] for s in speedups(rows)}
    out = []
    for dtype, prov in dict.fromkeys((r["dtype"], r["provider"]) for r in rows if r["provider"] in GOAL_PROVIDERS):
        vals = {r["model"]: sp.get((r["model"], dtype, prov)) for r in rows
                if r["dtype"] == dtype and r["provider"] == prov}
        met = sum(v is not None and v >= target for v in vals.values())
        worst = min(vals, key=lambda m: -math.inf if vals[m] is None else vals[m])
        out.append({"dtype": dtype, "provider": prov, "target": target, "met": met, "of": len(vals),
                    "worst_model": worst, "worst_speedup": vals[worst], "all_met": met == len(vals)})
    return out


def ratios_summary(rows: Sequence[dict], pairs: Sequence[Tuple[str, str]] = GPU_PAIRS) -> dict:
    return {"paper": {f"{t}/{w}": common.sig(paper_ratio(t, w), 4) for t, w in pairs},
            "thin_wide": thin_wide_ratios(rows, pairs), "speedup_vs_eager": speedups(rows),
            "goal": goal_verdict(rows)}


def ratio_table(summary: dict) -> Tuple[List[str], List[list]]:
    headers = ["dtype", "provider", "thin / wide", "thin ms", "wide ms", "ours", "paper"]
    return headers, [[r["dtype"], r["provider"], f"{r['thin']} / {r['wide']}", common.fmt_ms(r["thin_ms"]),
                 common.fmt_ms(r["wide_ms"]), f"{r['ratio']:.2f}x",
                 "-" if r["paper_ratio"] is None else f"{r['paper_ratio']:.2f}x"] for r in summary["thin_wide"]]


def goal_lines(summary: dict) -> List[str]:
    worst = lambda g: "-" if g["worst_speedup"] is None else f"{g['worst_speedup']:.3g}x"
    return [f"goal (fused >= {g['target']:g}x eager) {g['dtype']} {g['provider']}: {g['met']} of {g['of']} networks"
            f"{' (met on every network)' if g['all_met'] else ''}; worst {g['worst_model']} {worst(g)}"
            for g in summary["goal"]]


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None):
    p = common.base_parser("python -m benchmarks.wrn_fig4", __doc__, providers=PROVIDERS, dtypes=("fp32", "fp16"),
                      quick_help="GPU: the five networks fp16 + eager fp32, compile for WRN-28-10 and WRN-40-4 "
                                 "only, deadline 110 s")
    p.add_argument("--networks", nargs="+", default=None, help="only these networks (names as in the table)")
    p.add_argument("--no-compile", action="store_true", help="GPU: leave out torch.compile")
    p.add_argument("--reps", type=int, default=None, help=f"GPU: timed steps per provider (default {DEFAULT_REPS})")
    p.add_argument("--deadline", type=float, default=None, help="seconds after start past which no provider starts")
    return p.parse_args(argv)


def make_plan(args) -> Tuple[Bench, List[Task], Tuple[Tuple[str, str], ...]]:
    dev = common.pick_device(args.device)
    cpu = dev.type != "cuda"
    networks = CPU_NETWORKS if cpu else GPU_NETWORKS
    unknown = [n for n in args.networks or () if n not in [x.name for x in networks]]
    if unknown:
        raise SystemExit(f"--networks: unknown {unknown}; this mode has {[x.name for x in networks]}")
    if args.reps is not None and args.reps < 1:
        raise SystemExit(f"--reps: expected at least 1, got {args.reps}")
    networks = tuple(n for n in networks if not args.networks or n.name in args.networks)
    default = ["eager", "triton", "cuda", "auto"] + ([] if cpu else ["compile"])
    skipped: Dict[str, str] = {}
    providers = common.drop_unavailable([p for p in common.order_providers(args.providers, default, "eager")
                                    if not (args.no_compile and p == "compile")], dev, skipped)
    auto_named = "auto" in (args.providers or ())
    notes = [f"auto on CPU: {', '.join(CPU_AUTO_NETWORKS)} only (name auto in --providers for both)"] \
        if cpu and "auto" in providers and not auto_named else []
    tasks = plan(networks, providers, args.dtypes or (["fp32"] if cpu else ["fp16", "fp32"]),
                 quick=args.quick and not cpu, reps=args.reps, dtypes_given=bool(args.dtypes),
                 cpu_auto=CPU_AUTO_NETWORKS if cpu and not auto_named else None)
    deadline = args.deadline if args.deadline is not None else (QUICK_DEADLINE_S if args.quick else None)
    b = Bench(dev, providers, bench=BENCH, keys=KEYS, reps=args.reps or DEFAULT_REPS, notes=notes, skipped=skipped,
              deadline=None if deadline is None else _T0 + deadline, paper_ms=lambda m: PAPER.get(m, {}).get("ms"))
    return b, tasks, CPU_PAIRS if cpu else GPU_PAIRS


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    b, tasks, pairs = make_plan(args)
    env = common.env_info(b.device)
    print(common.banner("wrn_fig4", env))
    print(f"providers {b.providers}; tasks {[f'{t.net.name} {t.dtype} ' + '/'.join(t.providers) for t in tasks]}; "
          f"channels_last; fp16 = AMP, fp32 = TF32" + settings.settings_suffix(b.device, True, b.deadline, _T0),
          flush=True)
    common.print_skipped(b.skipped)
    print("".join(f"note: {n}\n" for n in b.notes), end="")
    extras = lambda: {"paper": paper_extra(), "ratios": ratios_summary(b.rows, pairs), "dispatch": b.dispatch()}
    with settings.dispatch_isolated(), settings.cudnn_benchmark(b.device, True):
        for t in tasks:
            b.reps = t.reps
            run_case(b, t.net.case(seed=sum(map(ord, t.net.name))), "train_step", 2 if b.device.type != "cuda" else 32,
                     t.dtype, [(p, "") for p in t.providers])
            if not args.no_write and b.rows:  # after every case: a run cut short keeps what it measured
                common.write_results(args.out, BENCH, env, b.rows, keys=KEYS, extra={"skipped": b.skipped, **extras()})
    paper = lambda r: "-" if r["paper_ms"] is None else f"{r['paper_ms']:.0f}"
    headers, lines = summary_table(b.rows, b.infos, group=("model", "dtype"), lead=(("paper ms", paper),))
    summary = ratios_summary(b.rows, pairs)
    r_headers, r_lines = ratio_table(summary)
    print(common.format_table(headers, lines))
    if r_lines:
        print(common.format_table(r_headers, r_lines, title="thin vs wide: thin ms / wide ms (paper: Titan X)"))
    print("\n".join(goal_lines(summary) + [f"note: {n}" for n in b.notes]))
    write = not args.no_write and bool(b.rows)
    rc = common.finish(b.rows, args.out, BENCH, env, write=write, keys=KEYS, skipped=b.skipped, extra=extras(),
                  markdown=(f"wrn_fig4: WRN Figure 4 re-run (training step), {env['gpu']}", headers, lines),
                  notes=list(b.notes))
    if write:  # the thin / wide table and the goal lines under the summary table
        text = ["", "### Thin vs wide: the thin network's time / the wide network's", "",
                common.markdown_table(r_headers, r_lines) if r_lines else "(no pair with both times)", ""]
        with open(Path(args.out) / f"{common.result_stem(env, BENCH)}.md", "a") as f:
            f.write("\n".join(text + [f"- {g}" for g in goal_lines(summary)]) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
