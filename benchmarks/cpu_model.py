"""Whole-model CPU comparison behind the README's CPU numbers: stock eager vs converted.

Runs ``python -m resnet_fused`` (which checks equivalence against a float64 run before it times
anything, and times stock and fused interleaved call by call) over a grid of batch sizes and
layouts, collects its rows and writes one result file (JSON + CSV, schema of ``benchmarks.common``)::

    python -m benchmarks.cpu_model [--out benchmarks/results] [--iters N] [--threads N]
                                         [--backends torch cuda] [--eval-only] [--batches 1 8 32]

The grid: batch 1, 8 and 32, NCHW and channels_last, each an eval forward (224x224) and a training
step (forward + backward + SGD at 112x112, the same batch).

``--backends``: the converted model's backend for each run (default ``auto``: the measured dispatch
picks per conv site between PyTorch's path and the compiled library's C++ kernels, and per training
block between the block's own modules and the fused chain; ``torch``: BatchNorm folded, PyTorch's
add/ReLU; ``cuda``: the compiled library's kernels everywhere). Each backend's fused row is timed
against its own interleaved eager run; the dispatch decisions of every ``auto`` run are saved in
the JSON (``"dispatch"``: per configuration, the main job's decision rows).

Each configuration is run ``--repeats`` times in fresh processes; every run's rows are kept, so the
spread between runs (this is a shared 2-vCPU VM: expect a few percent) is visible in the data.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import common

BATCHES = (1, 8, 32)


def run_config(batch: int, channels_last: bool, train: bool, iters: int, threads, model: str,
               backend: str = "auto", decisions: dict = None, size: int = 224) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "resnet_fused", model, "--device", "cpu", "--batch", str(batch),
               "--train-batch", str(batch), "--size", str(size), "--iters", str(iters), "--json", str(out),
               "--backend", backend]
        cmd += ["--channels-last"] if channels_last else []
        cmd += [] if train else ["--no-train"]
        cmd += ["--threads", str(threads)] if threads else []
        env = dict(os.environ, PYTHONPATH=str(common.REPO_ROOT))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("eval", "train step"))))
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
        data = json.loads(out.read_text())
        rows = data["rows"]
        if decisions is not None and backend == "auto":
            label = f"batch {batch} {'channels_last' if channels_last else 'NCHW'}"
            decisions.setdefault(label, []).append(data["summary"].get("dispatch", []))
    for row in rows:  # name the layout in the shape column: the schema has no layout field
        row["shape"] += "_cl" if channels_last else "_nchw"
        row["bench"] = "cpu_model"
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results"))
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed calls per row (default: 40 at batch 1, 16 at 8, 8 at 32 and above: a few seconds "
                    "of each model per row, so batch 1's 70-ms calls get enough samples for a median)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "torch", "cuda"])
    ap.add_argument("--eval-only", action="store_true", help="skip the training-step rows")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--size", type=int, default=224, help="eval input size (the train step uses min(size, 112))")
    args = ap.parse_args(argv)
    rows, decisions = [], {}
    for batch in args.batches:
        for cl in (False, True):
            for _ in range(args.repeats):
                for backend in args.backends:
                    iters = args.iters or (40 if batch < 8 else 16 if batch < 32 else 8)
                    rows += run_config(batch, cl, not args.eval_only, iters, args.threads, args.model,
                                       backend, decisions, args.size)
    env = common.env_info()
    paths = common.write_results(args.out, f"cpu_model_{args.model}", env, rows, extra={"dispatch": decisions})
    print("wrote", *paths)
    table = []
    for eager, fused in zip(rows[0::2], rows[1::2]):  # the main job writes each eager row, then its fused row
        assert eager["provider"] == "eager" and fused["mode"] == eager["mode"], (eager, fused)
        table.append((eager["mode"], eager["batch"], eager["shape"], fused["provider"], eager["median_ms"],
                      fused["median_ms"], f"{eager['median_ms'] / fused['median_ms']:.2f}x", fused["correct"]))
    print(common.format_table(["mode", "batch", "shape", "backend", "eager ms", "fused ms", "speedup", "correct"],
                              table,
                              title=f"{args.model} on {env['gpu']} (torch {env['torch']}, commit {env['git_commit']})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
