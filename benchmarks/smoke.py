"""The device run's smoke test: every kernel path once, on a representative shape, against float64.

    python -m benchmarks.smoke [--device cuda|cpu] [--out DIR] [--only bf16 ...]

What no CPU run can prove is checked first: bf16 on tensor cores (the interpreter computes bf16
through an fp32 dot) and fp32 through TF32 (the interpreter's fp32 dot is IEEE); then fp16. For each
dtype, in this order:

- inference convs (``ops.conv_bias_act``: conv + folded-BN bias (+ residual) + ReLU) in the
  geometries the Triton kernel treats differently: 3x3 stride 1 with a residual (the flat K loop,
  TMA weights), 1x1 stride 1 (TMA activations), 3x3 stride 2, the 7x7/2 stem (Cin = 3), and an
  NCHW input; backends ``triton``, ``cuda`` (CUTLASS), ``cudnn_fused`` (CUDA only) and ``auto``;
- ``ops.bn_act`` (BN + residual + ReLU) on ``triton``, ``cuda`` and ``auto``;
- a training ``Bottleneck`` with a downsample branch, one forward + backward (fp16/bf16 under
  autocast): output, the input's gradient, every parameter's gradient and every running statistic,
  on ``triton``, ``cuda`` and ``auto``.

Every check is a relative error against a float64 run of the same function, bounded by
``max(floor, 4 x eager PyTorch's error in the same dtype)`` (:func:`benchmarks.common.check_output`).
A backend that cannot run here is recorded as skipped with the reason; one that raises is a
failure. GPU shapes are ResNet-50's (batch 32); ``--device cpu`` runs the same checks at tiny
sizes (Triton through its interpreter: set ``TRITON_INTERPRET=1``). Writes
``<stem>_smoke.json`` (``{"env", "summary": {ran, passed, failed, skipped, failures}, "rows": [{case,
dtype, backend, err, eager_err, bound, ok, seconds, note}]}``), rewritten after every dtype; exit
code 1 if any check failed.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
from resnet_fused.ops.fold import bn_scale_shift

from . import common

DTYPE_ORDER = ("bf16", "fp32", "fp16")  # never-executed tensor-core paths first
CONV_BACKENDS = ("triton", "cuda", "cudnn_fused", "auto")
OTHER_BACKENDS = ("triton", "cuda", "auto")
# name: (N, Cin, H, W, Cout, k, stride, padding, residual, channels_last) -- GPU shapes; CPU shrinks them
CONVS = {
    "3x3s1+res": (32, 64, 56, 56, 64, 3, 1, 1, True, True),
    "1x1s1": (32, 256, 56, 56, 64, 1, 1, 0, False, True),
    "3x3s2": (32, 128, 56, 56, 128, 3, 2, 1, False, True),
    "stem7x7s2": (32, 3, 224, 224, 64, 7, 2, 3, False, True),
    "3x3s1-nchw": (32, 64, 56, 56, 64, 3, 1, 1, True, False),
}


def cpu_shape(spec: tuple) -> tuple:
    n, cin, h, w, cout, k, s, p, res, cl = spec
    small = lambda c: c if c <= 4 else 8  # noqa: E731
    return (2, small(cin), 12 if k == 7 else 6, 12 if k == 7 else 6, small(cout), k, s, p, res, cl)


def unavailable(backend: str, device: torch.device) -> Optional[str]:
    if backend == "cudnn_fused":
        return None if device.type == "cuda" else "CUDA only"
    if backend == "auto":
        return None
    return rf.unavailable_reason(backend, device)


def _time(fn: Callable):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def row(case: str, dtype: str, backend: str, chk: Optional[common.Check], seconds: float, note: str = "") -> dict:
    r = {"case": case, "dtype": dtype, "backend": backend, "err": None, "eager_err": None, "bound": None,
         "ok": None, "seconds": round(seconds, 3), "note": note}
    if chk is not None:
        r.update(err=chk.err, eager_err=chk.eager_err, bound=chk.bound, ok=chk.ok)
    return r


def each_backend(rows: List[dict], case: str, dtype: str, device: torch.device, backends, check: Callable) -> None:
    """One row per backend: skipped with the reason where it cannot run here, else ``check(backend)``
    -> ``(Check, seconds, note)``; a backend that raises is a failure, reported, not fatal."""
    for backend in backends:
        why = unavailable(backend, device)
        if why is not None:
            rows.append(row(case, dtype, backend, None, 0.0, f"skipped: {why}"))
            continue
        try:
            chk, sec, note = check(backend)
            rows.append(row(case, dtype, backend, chk, sec, note))
        except Exception as exc:
            rows.append(row(case, dtype, backend, None, 0.0, f"FAILED: {type(exc).__name__}: {exc}"))


# ------------------------------------------------------------------------------------ the checks
def conv_checks(device: torch.device, dtype: str, gen: torch.Generator) -> List[dict]:
    rows = []
    dt = common.DTYPES[dtype]
    for name, spec in CONVS.items():
        n, cin, h, w, cout, k, s, p, res, cl = spec if device.type == "cuda" else cpu_shape(spec)
        fmt = torch.channels_last if cl else torch.contiguous_format
        x64 = torch.randn(n, cin, h, w, generator=gen, dtype=torch.float64).to(device)
        w64 = torch.randn(cout, cin, k, k, generator=gen, dtype=torch.float64).to(device) / (cin * k * k) ** 0.5
        b64 = torch.randn(cout, generator=gen, dtype=torch.float64).to(device)
        oh = (h + 2 * p - k) // s + 1
        r64 = torch.randn(n, cout, oh, oh, generator=gen, dtype=torch.float64).to(device) if res else None
        ref = torch.relu(F.conv2d(x64, w64, b64, s, p) + (0 if r64 is None else r64))
        x = x64.to(dt).contiguous(memory_format=fmt)
        wt = w64.to(dt).contiguous(memory_format=torch.channels_last)
        r = None if r64 is None else r64.to(dt).contiguous(memory_format=fmt)
        b = b64.float()
        with torch.no_grad():
            eager = torch.relu(F.conv2d(x, wt, b.to(dt), s, p) + (0 if r is None else r))

            def check(backend, x=x, wt=wt, b=b, r=r, s=s, p=p, fmt=fmt, ref=ref, eager=eager):
                if backend == "cudnn_fused":
                    from resnet_fused.dispatch.candidates import _cudnn_fused

                    call = lambda: _cudnn_fused(x, wt, b, r, (s, s), (p, p), (1, 1), True, fmt)  # noqa: E731
                else:
                    call = lambda: rf.ops.conv_bias_act(x, wt, b, r, stride=s, padding=p, backend=backend)  # noqa
                out, sec = _time(lambda: _sync(call(), device))
                return common.check_output(out, ref, eager, dtype), sec, _chosen(backend)

            each_backend(rows, f"conv {name}", dtype, device, CONV_BACKENDS, check)
    return rows


def bn_checks(device: torch.device, dtype: str, gen: torch.Generator) -> List[dict]:
    rows = []
    dt = common.DTYPES[dtype]
    shape = (32, 256, 56, 56) if device.type == "cuda" else (2, 8, 6, 6)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    r64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    sc = (torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5).to(device)
    sh = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(device)
    ref = torch.relu(x64 * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1) + r64)
    x, r = (t.to(dt).contiguous(memory_format=torch.channels_last) for t in (x64, r64))
    with torch.no_grad():
        eager = torch.relu(x * sc.to(dt).view(1, -1, 1, 1) + sh.to(dt).view(1, -1, 1, 1) + r)

        def check(backend):
            out, sec = _time(lambda: _sync(rf.ops.bn_act(x, sc.float(), sh.float(), r, backend=backend), device))
            return common.check_output(out, ref, eager, dtype), sec, _chosen(backend)

        each_backend(rows, "bn_act +res", dtype, device, OTHER_BACKENDS, check)
    return rows


def train_checks(device: torch.device, dtype: str, gen: torch.Generator) -> List[dict]:
    """One training step of a Bottleneck with a downsample branch, every backend against float64."""
    rows = []
    inplanes, planes, n, hw = (256, 128, 32, 28) if device.type == "cuda" else (16, 4, 2, 6)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=2, bias=False), nn.BatchNorm2d(planes * 4))
    base = rf.Bottleneck(inplanes, planes, stride=2, downsample=down)
    for m in base.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    x64 = torch.randn(n, inplanes, hw, hw, generator=gen, dtype=torch.float64)
    g64 = torch.randn(n, planes * 4, hw // 2, hw // 2, generator=gen, dtype=torch.float64)
    ref = _train_step(copy.deepcopy(base).double().to(device), x64.to(device), g64.to(device), "torch", None)
    ref = {k: v for k, v in ref.items() if v.is_floating_point()}
    eager = _train_step(copy.deepcopy(base).to(device), x64.float().to(device), g64.float().to(device), "torch",
                        dtype)

    def check(backend):
        got, sec = _time(lambda: _train_step(copy.deepcopy(base).to(device), x64.float().to(device),
                                             g64.float().to(device), backend, dtype))
        checks = {key: common.check_output(got[key], ref_t, eager[key], dtype) for key, ref_t in ref.items()}
        for key, t in got.items():  # integer buffers (num_batches_tracked): exactly as eager
            if not t.is_floating_point():
                same = torch.equal(t.cpu(), eager[key].cpu())
                checks[key] = common.Check(0.0 if same else float("inf"), 0.0, 0.0, same)
        # the row keeps the failing tensor, else the one closest to its bound
        worst = max(checks.items(), key=lambda kv: (not kv[1].ok, kv[1].err / max(kv[1].bound, 1e-300)))
        return worst[1], sec, f"worst: {worst[0]}" + (f"; {_chosen(backend)}" if _chosen(backend) else "")

    each_backend(rows, "train Bottleneck", dtype, device, OTHER_BACKENDS, check)
    return rows


def _train_step(block: nn.Module, x: torch.Tensor, g: torch.Tensor, backend: str, dtype: Optional[str]) -> dict:
    """Output, dx, every parameter's grad and every BN buffer after one forward + backward."""
    block.backend = backend
    block.train()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    amp = dtype in ("fp16", "bf16")
    with torch.autocast(x.device.type, dtype=common.DTYPES.get(dtype, torch.float32), enabled=amp):
        out = block(x)
    out.backward(g.to(out.dtype))
    got = {"out": out.detach(), "dx": x.grad}
    got.update({f"grad {n}": p.grad for n, p in block.named_parameters()})
    got.update({f"buffer {n}": b for n, b in block.named_buffers()})
    return got


def _sync(t, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return t


def _chosen(backend: str) -> str:
    if backend != "auto":
        return ""
    rows = rf.dispatch_report()
    return f"auto chose {rows[-1].chosen} ({rows[-1].source})" if rows else ""


# ------------------------------------------------------------------------------------------- main
def run(device: torch.device, dtypes=DTYPE_ORDER, seed: int = 0) -> List[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for dtype in dtypes:
        for checks in (conv_checks, bn_checks, train_checks):
            for r in checks(device, dtype, gen):
                rows.append(r)
                status = "skip" if r["ok"] is None and r["note"].startswith("skipped") else (
                    "PASS" if r["ok"] else "FAIL")
                err = "" if r["err"] is None else f"err {r['err']:.2e} <= {r['bound']:.2e}" if r["ok"] else \
                    f"err {r['err']:.2e} > {r['bound']:.2e}"
                print(f"{status:4s} {r['dtype']:4s} {r['case']:18s} {r['backend']:11s} {r['seconds']:7.2f} s "
                      f"{err} {r['note']}", flush=True)
    return rows


def summarize(rows) -> dict:
    """Counts of the checks (``ran`` = passed + failed; a backend that raised counts as failed) and
    the failures by name."""
    raised = [r for r in rows if r["ok"] is None and r["note"].startswith("FAILED")]
    wrong = [r for r in rows if r["ok"] is False]
    ran = [r for r in rows if r["ok"] is not None]
    return {"ran": len(ran) + len(raised), "passed": len(ran) - len(wrong), "failed": len(wrong) + len(raised),
            "skipped": len(rows) - len(ran) - len(raised),
            "failures": [f"{r['dtype']} {r['case']} {r['backend']}: {r['note'] or 'err %.3g > %.3g' % (r['err'], r['bound'])}"
                         for r in wrong + raised]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.smoke", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--out", default=None, help="write <stem>_smoke.json here")
    p.add_argument("--only", nargs="+", choices=DTYPE_ORDER, default=DTYPE_ORDER, help="dtypes, in this order")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    env = common.env_info(device)
    print(common.banner("smoke", env), flush=True)
    rf.dispatch.forget()
    path = None
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{common.result_stem(env, 'smoke')}.json"
    rows: list = []
    for dt in (d for d in DTYPE_ORDER if d in args.only):
        rows += run(device, (dt,))
        if path is not None:  # after every dtype: a run stopped at its time limit keeps what it checked
            path.write_text(json.dumps({"env": env, "summary": summarize(rows), "rows": rows}, indent=1) + "\n")
    summary = summarize(rows)
    print(f"smoke: {summary['passed']} of {summary['ran']} checks passed, {summary['failed']} failed, "
          f"{summary['skipped']} skipped")
    if path is not None:
        print(f"wrote {path}")
    failed = summary["failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
