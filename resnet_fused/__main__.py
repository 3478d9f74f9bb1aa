"""``python -m resnet_fused``: convert a ResNet, prove it computes the same function, time it.

    python -m resnet_fused [model] [--batch B] [--size S] [--device D] [--dtype fp32|fp16|bf16]
                           [--channels-last] [--backend B] [--iters N] [--json PATH]

1. Builds ``model`` (default ``resnet50``; any torchvision ResNet name: from torchvision when it is
   importable, else from :mod:`resnet_fused.models.reference`), random weights with BatchNorm
   running statistics measured on one random batch and random BN affine parameters (so folding BN
   is far from an identity), eval mode.
2. Converts a deep copy with :func:`resnet_fused.convert` and prints how many modules it swapped.
3. Equivalence: relative error ``||y - y64|| / ||y64||`` of the stock model in the chosen dtype and
   of the fused model, both against a float64 run of the stock model. PASS when
   ``fused <= 4 x stock + floor`` (floor: fp32 1e-5, fp16 2e-3, bf16 1.6e-2); the training-mode
   forward is judged the same way.
4. Times an eval forward (stock vs fused, interleaved, median of ``--iters`` after a warm-up) and
   a training step (forward + backward + SGD step in train mode, under autocast for fp16/bf16) at
   a small batch; the goal there is a ratio of at least 0.9x.
5. With ``--backend auto`` (the default) prints the measured dispatch's decisions for the model:
   per key, the chosen candidate, each candidate's median time or why it was not timed, and
   whether the decision was measured now, read from the cache or is the static default.

Exits 1 if an equivalence check fails. Defaults depend on the device: CUDA batch 64 at 224, fp16,
50 iterations; CPU batch 8 at 224, fp32, 5 iterations (under a minute on 2 cores).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from resnet_fused import backends
from resnet_fused.models import reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}
FACTOR = 4.0
TRAIN_GOAL = 0.9


# ----------------------------------------------------------------------------------------- model
def build_stock(name: str) -> Tuple[nn.Module, str]:
    """(model, where it came from): torchvision's ``name`` if importable, else our reference copy."""
    try:
        import torchvision.models as tvm
    except Exception:
        tvm = None
    if tvm is not None:
        ctor = getattr(tvm, name, None)
        if callable(ctor):
            return ctor(weights=None), f"torchvision {getattr(sys.modules.get('torchvision'), '__version__', '')}"
    return reference.build(name), "resnet_fused.models.reference"


def _bns(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def calibrate_bn(model: nn.Module, size: int, gen: torch.Generator, batch: int = 4) -> None:
    """Random BN affine parameters, and running statistics taken from one random train batch.

    Random running statistics in a deep network make activations explode (fp16 overflows);
    statistics measured on data keep them O(1) while still being far from mean 0 / var 1.
    """
    with torch.no_grad():
        for m in (m for m in _bns(model) if m.weight is not None):
            m.weight.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    saved = [(m, m.momentum) for m in _bns(model)]
    for m, _ in saved:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size, generator=gen))
    for m, mom in saved:
        m.momentum = mom
    model.eval()


def num_classes(model: nn.Module) -> int:
    """Number of output classes (the last Linear's out_features; 1000 if there is none)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 1000


# -------------------------------------------------------------------------------------- measures
def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64; inf if y has NaN/Inf where ref is finite."""
    a, r = y.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(torch.isfinite(a[torch.isfinite(r)]).all()):
        return math.inf
    fin = torch.isfinite(r)
    return ((a[fin] - r[fin]).norm() / r[fin].norm().clamp_min(1e-300)).item()


def judge(stock_err: float, fused_err: float, dtype: str) -> bool:
    return math.isfinite(fused_err) and fused_err <= FACTOR * stock_err + FLOOR[dtype]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(fns: Sequence[Callable[[], object]], device: torch.device, iters: int, warmup: int) -> List[List[float]]:
    """Per-call milliseconds of each of ``fns``, interleaved call by call (drift hits all alike)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    samples: List[List[float]] = [[] for _ in fns]
    for _ in range(iters):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[i].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples[i].append((time.perf_counter() - t0) * 1e3)
    return samples


def _quantile(s: Sequence[float], q: float) -> float:
    s = sorted(s)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------- records
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return "cpu: " + (platform.processor() or platform.machine())


def env_record(device: torch.device) -> dict:
    """The keys benchmarks/common.py's env_info writes (driver left None: no GPU query here)."""
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    commit = None
    try:
        root = Path(__file__).resolve().parent.parent
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=20)
        if r.returncode == 0:
            d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=20)
            commit = r.stdout.strip() + ("-dirty" if d.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"gpu": device_name(device), "driver": None, "torch": torch.__version__, "triton": tv,
            "cuda": torch.version.cuda, "git_commit": commit,
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _row(model, size, batch, dtype, mode, provider, samples, correct) -> dict:
    med = statistics.median(samples)
    return {"bench": "main", "model": model, "shape": f"3x{size}x{size}", "batch": batch, "dtype": dtype,
            "mode": mode, "provider": provider, "median_ms": round(med, 4), "p20_ms": round(_quantile(samples, 0.2), 4),
            "p80_ms": round(_quantile(samples, 0.8), 4), "images_per_s": round(batch * 1e3 / med, 3),
            "peak_mem_mb": None, "correct": bool(correct)}


# ------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m resnet_fused", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="resnet50", help="torchvision ResNet name (default resnet50)")
    p.add_argument("--batch", type=int, default=None, help="eval batch (CUDA 64, CPU 8)")
    p.add_argument("--size", type=int, default=None, help="input height = width (default 224)")
    p.add_argument("--device", default=None, help="cuda / cpu / cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="CUDA fp16, CPU fp32")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    p.add_argument("--backend", choices=backends.BACKENDS, default="auto", help="resnet_fused backend")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (CUDA 50, CPU 5)")
    p.add_argument("--train-batch", type=int, default=None, help="training-step batch (CUDA 32, CPU 4)")
    p.add_argument("--train-size", type=int, default=None, help="training-step size (CUDA 224, CPU min(size, 112))")
    p.add_argument("--no-train", action="store_true", help="skip the training-step comparison")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--json", default=None, help="write the results (benchmark row format) to this file")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device is available", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    reason = backends.unavailable_reason(args.backend, device)
    if reason is not None:
        print(f"--backend {args.backend}: unavailable on {device}: {reason}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (64 if cuda else 8)
    size = args.size or 224
    dtype = args.dtype or ("fp16" if cuda else "fp32")
    iters = max(1, args.iters or (50 if cuda else 5))
    warmup = 10 if cuda else 1
    tbatch = args.train_batch or (32 if cuda else 4)
    tsize = args.train_size or (size if cuda else min(size, 112))
    dt = DTYPES[dtype]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    layout = "channels_last" if args.channels_last else "NCHW"
    t_start = time.perf_counter()

    try:
        stock, source = build_stock(args.model)
    except ValueError as exc:
        print(f"model: {exc}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    calibrate_bn(stock, min(size, 224), gen)
    base = copy.deepcopy(stock)  # fp32 CPU eval copy, for the training comparison
    fused = resnet_fused.convert(copy.deepcopy(stock), backend=args.backend)
    report = fused.resnet_fused_report
    n_blocks = sum(1 for _, _, new in report.converted if new in ("BasicBlock", "Bottleneck"))
    n_stem = len(report.converted) - n_blocks
    print(f"{args.model} from {source}: convert swapped {n_blocks} blocks"
          f"{' + the stem' if n_stem else ''}, left {len(report.skipped)} block-like module(s) alone")
    for name, why in report.skipped[:5]:
        print(f"  skipped {name}: {why}")

    # ---- eval equivalence
    x64 = torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref = copy.deepcopy(stock).to(device).double()(x64.to(device)).cpu()
    stock = stock.to(device, dt).to(memory_format=fmt)
    fused = fused.to(device, dt).to(memory_format=fmt)
    x = x64.to(device, dt).contiguous(memory_format=fmt)
    impl = backends.resolve(args.backend, x, fusable=True)
    with torch.no_grad():
        y_stock, y_fused = stock(x.clone()), fused(x.clone())
    e_stock, e_fused = rel_err(y_stock, ref), rel_err(y_fused, ref)
    ok_eval = judge(e_stock, e_fused, dtype)

    def run_stock():
        with torch.no_grad():
            stock(x)

    def run_fused():
        with torch.no_grad():
            fused(x)

    s_stock, s_fused = time_pair([run_stock, run_fused], device, iters, warmup)
    del y_stock, y_fused, ref

    rows = [_row(args.model, size, batch, dtype, "infer", "eager", s_stock, True),
            _row(args.model, size, batch, dtype, "infer", impl,
                 s_fused, ok_eval)]
    table = [("eval", batch, size, statistics.median(s_stock), statistics.median(s_fused), e_stock, e_fused, ok_eval)]

    # ---- training step
    ok_train = True
    if not args.no_train:
        t_stock = copy.deepcopy(base).to(device).to(memory_format=fmt).train()
        t_fused = resnet_fused.convert(copy.deepcopy(base), backend=args.backend).to(device).to(memory_format=fmt).train()
        t64 = copy.deepcopy(base).to(device).double().train()
        xt64 = torch.randn(tbatch, 3, tsize, tsize, generator=gen, dtype=torch.float64)
        target = torch.randint(0, num_classes(base), (tbatch,), generator=gen).to(device)
        xt = xt64.to(device, torch.float32).contiguous(memory_format=fmt)
        use_amp = dt != torch.float32
        with torch.no_grad():
            r64 = t64(xt64.to(device)).cpu()
            with torch.autocast(device.type, dtype=dt, enabled=use_amp):
                ys, yf = t_stock(xt.clone()), t_fused(xt.clone())
        te_stock, te_fused = rel_err(ys, r64), rel_err(yf, r64)
        ok_train = judge(te_stock, te_fused, dtype)
        del t64, r64, ys, yf
        opts = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (t_stock, t_fused)]

        def make_step(model, opt):
            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dt, enabled=use_amp):
                    loss = F.cross_entropy(model(xt), target)
                loss.backward()
                opt.step()
            return step

        ts_stock, ts_fused = time_pair([make_step(t_stock, opts[0]), make_step(t_fused, opts[1])], device,
                                       iters, warmup)
        rows += [_row(args.model, tsize, tbatch, dtype, "train_step", "eager", ts_stock, True),
                 _row(args.model, tsize, tbatch, dtype, "train_step",
                      backends.resolve(args.backend, xt, fusable=True), ts_fused, ok_train)]
        table.append(("train step", tbatch, tsize, statistics.median(ts_stock), statistics.median(ts_fused),
                      te_stock, te_fused, ok_train))

    # ---- report
    env = env_record(device)
    print(f"device {env['gpu']} | torch {env['torch']} | triton {env['triton']} | backend {args.backend} -> {impl}"
          f" | {torch.get_num_threads()} CPU threads | {iters} iters, medians")
    headers = ["mode", "model", "batch", "size", "dtype", "layout", "stock ms", "fused ms", "speedup",
               "stock err", "fused err", "check"]
    lines = [[mode, args.model, b, f"{s}x{s}", dtype, layout, f"{ms_s:.2f}", f"{ms_f:.2f}", f"{ms_s / ms_f:.2f}x",
              f"{es:.1e}", f"{ef:.1e}", "PASS" if ok else "FAIL"]
             for mode, b, s, ms_s, ms_f, es, ef, ok in table]
    widths = [max(len(str(r[i])) for r in [headers] + lines) for i in range(len(headers))]
    for r in [headers, ["-" * w for w in widths]] + lines:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"err: ||y - y_fp64|| / ||y_fp64||; PASS when fused err <= {FACTOR:g} x stock err + {FLOOR[dtype]:g}")
    if len(table) > 1:
        ratio = table[1][3] / table[1][4]
        print(f"training step: fused/stock speed {ratio:.2f}x (goal >= {TRAIN_GOAL}x) -> "
              f"{'met' if ratio >= TRAIN_GOAL else 'NOT met'}")
    ok = ok_eval and ok_train
    decisions = resnet_fused.dispatch_report()
    if args.backend == "auto":
        print(decisions)
    print(f"equivalence: {'PASS' if ok else 'FAIL'} ({time.perf_counter() - t_start:.1f} s)")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = {"model": args.model, "source": source, "backend": args.backend, "impl": impl, "layout": layout,
                   "converted": len(report.converted), "blocks": n_blocks, "skipped": len(report.skipped),
                   "eval_err": {"stock": e_stock, "fused": e_fused}, "pass": ok}
        if len(table) > 1:
            summary["train_err"] = {"stock": table[1][5], "fused": table[1][6]}
        summary["dispatch"] = decisions.as_dicts()
        with open(path, "w") as f:
            json.dump({"env": env, "rows": rows, "summary": summary}, f, indent=1)
            f.write("\n")
        print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
