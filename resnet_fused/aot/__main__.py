"""``python -m resnet_fused.aot``: the Triton codegen report (see :mod:`resnet_fused.aot`).

    python -m resnet_fused.aot [--arch sm_90a sm_80] [--models resnet50 wrn28_10] [--out DIR]
                               [--modes eval train] [--dtypes fp16 bf16 fp32] [--layouts channels_last nchw]
                               [--batch N] [--no-tf32] [--jobs N] [--cache DIR] [--shard I/N] [--record-only]
                               [--precompile]

Exit status: 0 when every variant passes the rules, 1 when one fails (compile error, spill, shared
memory over the limit, a tensor-core variant without HGMMA on sm_90a), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import compile as aot_compile
from . import drive, report


def _shard(text: str):
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 1/4), got {text!r}") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"expected 1 <= I <= N, got {text!r}")
    return i, n


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m resnet_fused.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["sm_90a", "sm_80"], choices=list(aot_compile.TARGETS))
    ap.add_argument("--models", nargs="+", default=["resnet50", "wrn28_10"],
                    help="resnet18..152, wide_resnet50_2, wide_resnet101_2, wrn<depth>_<k>, preact_resnet<depth>")
    ap.add_argument("--modes", nargs="+", default=list(drive.MODES), choices=drive.MODES)
    ap.add_argument("--dtypes", nargs="+", default=list(drive.DTYPES), choices=list(drive.DTYPES))
    ap.add_argument("--layouts", nargs="+", default=list(drive.LAYOUTS), choices=list(drive.LAYOUTS))
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch(es) of every model (default: "
                    "256 for the ImageNet ResNets, 128 for the CIFAR networks)")
    ap.add_argument("--no-tf32", dest="tf32", action="store_false",
                    help="fp32 convolutions in IEEE fp32 (default: TF32, a CUDA build's default)")
    ap.add_argument("--out", type=Path, default=None, help="write the report files here")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    ap.add_argument("--cache", default=os.environ.get("RESNET_FUSED_AOT_CACHE") or None,
                    help="keep compile results here and reuse them, keyed by Triton's compile key: only changed "
                    "variants compile again (default: $RESNET_FUSED_AOT_CACHE, else no cache)")
    ap.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                    help="compile only the I-th of N parts of the variants (split CI jobs; a later "
                    "unsharded run with the same --cache assembles the full report)")
    ap.add_argument("--record-only", action="store_true",
                    help="record and count the variants, compile nothing")
    ap.add_argument("--precompile", action="store_true",
                    help="compile into this machine's Triton cache (TRITON_CACHE_DIR, else ~/.triton/cache) "
                    "instead of a private one, so the JIT finds every recorded variant compiled: the device "
                    "run's step 2, with --arch naming the GPU's own target; --cache is ignored (every variant "
                    "must really be compiled into the cache)")
    args = ap.parse_args(argv)
    if args.batch is not None and min(args.batch) < 1:
        ap.error(f"--batch: expected positive ints, got {args.batch}")
    if args.jobs < 1:
        ap.error(f"--jobs: expected a positive int, got {args.jobs}")
    for m in args.models:
        try:
            drive.model_spec(m)
        except ValueError as exc:
            ap.error(str(exc))
    return args


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, str]:
    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    specs = [drive.model_spec(m) for m in args.models]
    return {
        "command": "python -m resnet_fused.aot " + " ".join(argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": _git_commit(),
        "triton": triton.__version__, "ptxas": get_ptxas_version().strip().splitlines()[-1],
        "torch": torch.__version__,
        "workloads": ", ".join(f"{s.name} 3x{s.size}x{s.size} batch {' '.join(map(str, args.batch or [s.batch]))}"
                               for s in specs)
        + f"; modes {' '.join(args.modes)}; dtypes {' '.join(args.dtypes)} (fp16/bf16 training: model in that "
          f"dtype, see resnet_fused/aot/drive.py); layouts {' '.join(args.layouts)}; fp32 convs "
          f"{'TF32' if args.tf32 else 'IEEE'}",
        "targets": ", ".join(f"{a} (smem limit {aot_compile.TARGETS[a].smem_limit} B)" for a in args.arch),
        "shard": "all variants" if args.shard is None else f"part {args.shard[0]} of {args.shard[1]}",
    }


def _progress():
    start = time.time()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.time()
        if done == total or now - last[0] > 15:
            last[0] = now
            el = now - start
            eta = el / done * (total - done)
            print(f"[aot] {done}/{total} compiled, {el:.0f} s, about {eta:.0f} s left", file=sys.stderr, flush=True)
    return show


def print_summary(summary: Dict, out=sys.stdout) -> None:
    print(report.recorded_sentence(summary), file=out)
    if summary["same_for_all_archs"] and len(summary["recorded"]) > 1:
        print("every target recorded the same launches; one target's counts:", file=out)
    for w in report.shown_workloads(summary):
        print(f"  {w['arch']} {w['model']:>10} {w['mode']:>5} {w['dtype']:>4} {w['layout']:>13} batch {w['batch']}: "
              f"{w['calls']} kernel calls, {w['launches']} launches, {w['autotune_keys']} autotune keys "
              f"({w['autotune_trials']} trials), {w['compilations']} distinct Triton compilations", file=out)
    shown = {w["arch"] for w in report.shown_workloads(summary)}
    for k, v in summary["per_model_mode"].items():
        if k.split()[0] not in shown:
            continue
        print(f"  {k}: {v['compilations']} distinct compilations over all dtypes/layouts "
              f"({v['launches']} launches recorded)", file=out)
    for h in report.headline(summary):
        print(h, file=out)
    for arch, t in summary["targets"].items():
        print(f"{arch}: {t['variants']} variants, {t['failing_variants']} failing {t['failures_by_rule']}; "
              f"{t['spilling']} spill (max {t['max_spill_store_bytes']} B stored); tensor-core {t['tensor_core_variants']}, "
              f"with HGMMA {t['with_hgmma']}, LDGSTS {t['with_ldgsts']}, UTMALDG {t['with_utmaldg']}; "
              f"max regs {t['max_registers']}, max smem {t['max_shared']} B; "
              f"compile {t['compile_s_total']} s ({t['cached']} cached)", file=out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t0 = time.time()
    launches = drive.record_models(args.models, args.dtypes, args.layouts, args.modes, args.batch, args.tf32,
                                   archs=args.arch)
    variants = report.Variants(launches)
    print(f"[aot] recorded {len(launches)} launches, {len(variants)} variants in {time.time() - t0:.1f} s",
          file=sys.stderr)
    tasks = []
    for arch in args.arch:
        chosen = variants.for_arch(arch)
        if args.shard is not None:
            i, n = args.shard
            chosen = [v for v in chosen if int(v.variant, 16) % n == i - 1]
        tasks += aot_compile.tasks_for(chosen, [arch])
    rows: List[Dict] = []
    if not args.record_only:
        triton_cache = None
        if args.precompile:
            from triton import knobs

            triton_cache = knobs.cache.dir  # TRITON_CACHE_DIR or Triton's default, as the JIT will read it
            print(f"[aot] precompiling into the Triton cache {triton_cache}", file=sys.stderr)
        results = aot_compile.compile_all(tasks, args.jobs, None if args.precompile else args.cache, _progress(),
                                          triton_cache=triton_cache)
        rows = report.rows_for(variants, results)
    summary = report.summarize(launches, rows, [] if args.record_only else args.arch)
    print_summary(summary)
    if args.out is not None:
        for p in report.write_all(args.out, summary, rows, launches, header(args, argv)):
            print(f"wrote {p}")
    verdict = "recorded only" if args.record_only else ("FAIL" if summary["failed"] else "pass")
    print(f"[aot] done in {time.time() - t0:.0f} s: {verdict}", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
