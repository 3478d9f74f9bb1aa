"""Memory-bound kernels against the device's copy bandwidth: how close to a plain copy do they get?

    python -m benchmarks.bench_bandwidth [--out DIR] [--quick] [--device cuda|cpu]

Question: the BatchNorm-apply / block-tail / backward / statistics passes of a ResNet move every
activation through memory and do almost no arithmetic, so the best they can do is run at the speed
of a device-to-device copy of the same number of bytes. How close do our kernels get (the issue's
goal: at least 85% of the copy bandwidth on an H100), and how do they compare with the Triton
kernels and with the eager PyTorch op sequence doing the same job?

Ops (``torch.ops.resnet_fused_C.*`` for the ``cuda`` provider; see ``csrc/bind.cpp``), on one
activation y [N, C, H, W] with per-channel float32 vectors:

==================  ===========================================  ==================================
op                  computes                                     bytes counted
==================  ===========================================  ==================================
bn_relu             relu((y - mean) * scale + shift)              y, out
bn_add_relu         relu(bn(y) + r)          (identity shortcut)  y, r, out
dual_bn_add_relu    relu(bn(y) + bn_r(r))    (downsample's BN)    y, r, out
bn_relu_mask        bn_relu, plus the packed 1-bit ReLU mask      y, out, mask (numel / 8)
bwd_reduce          sum(gz), sum(gz (y - mean)) per channel       g, y
bwd_reduce_dual     ... and sum(gz (r - r_mean))                  g, y, r
bwd_apply           dy = scale gz + k2 (y - mean) + k3            g, y, dy
bwd_apply_dual      ... and dr for r with its own BN              g, y, r, dy, dr
channel_stats       per-channel count / mean / M2 (Welford)       x
relu_mask_backward  dx = g where the mask bit is set, else 0      g, mask (numel / 8), dx
==================  ===========================================  ==================================

Bytes: every tensor the op reads or writes, counted once at its size (activations in the run's
dtype, the 1-bit mask as numel / 8 bytes, per-channel vectors as float32 [C]); scratch space the
kernel uses internally is not counted. The same count is the denominator for every provider, so
GB/s is *effective* bandwidth: a provider that moves more bytes (eager's intermediates, a mask
stored as bytes or the ReLU output read instead of the bit mask) shows as a lower GB/s.
``frac_of_copy`` = GB/s / ``copy_gbps``, where ``copy_gbps`` is ``dst.copy_(src)`` (a
device-to-device copy) moving the same number of bytes (src holds half of them), timed the same
way (median).

Providers: ``cuda`` (the compiled library: CUDA kernels on a GPU, the C++ kernels on CPU),
``triton`` (``resnet_fused.ops.bn_train.bn_relu_apply`` / ``bn_relu_bwd_reduce`` /
``bn_relu_bwd_apply`` and ``resnet_fused.ops.batch_stats.channel_stats``; there is no Triton
kernel for the two mask ops), ``eager`` (the torch op sequence: broadcast arithmetic, ``torch.where``,
``sum``, ``var_mean``, ``threshold_backward``; a bool mask). A provider that cannot run here is
skipped with its reason (printed, and under ``"skipped"`` in the JSON). Asked for with
``--providers``: ``auto`` (``resnet_fused.ops.bn_act(..., backend="auto")`` on the BN folded to
one affine, for bn_relu and bn_add_relu: the measured dispatch, which checks and times its
candidates in the first, untimed call on the timed shapes; forgotten before each case, no decision
file; ``note`` says what it chose, the JSON's ``"dispatch"`` holds the decisions as
:func:`benchmarks.common.dispatch_entry` gives them, ``model`` empty and ``variant`` the op).

Correctness first: each provider's outputs against float64 computed from the same inputs; error
within max(dtype floor, 4 x eager's error in the same dtype) (:func:`benchmarks.common.check_output`;
for the mask ops, mask bits may differ only where the float64 pre-activation is within rounding of
0). A wrong or failing provider gets ``correct=false`` and no time.

GPU: ResNet-50's block-output activations 256x56x56, 512x28x28, 1024x14x14, 2048x7x7 and the
inner 64x56x56, batch 256, channels_last and NCHW, fp16 / bf16 / fp32. ``--quick``: batch 64, fp16
(about a minute on an H100, Triton compiles excluded). Timing: CUDA-graph replay (``--no-graph``:
plain launches) with rotation over input copies larger than twice the L2, median and p20/p80.

CPU (CI): tiny shapes (channels / 16, spatial / 4), batch 2, fp32, a few repetitions: it proves the
script end to end; its numbers say nothing about a GPU. On CPU ``cuda`` means the C++ kernels and
``triton`` runs through Triton's interpreter, only when ``TRITON_INTERPRET=1`` was set before Python
started (else it is skipped with that reason).

Results: a table on stdout, JSON + CSV + markdown under ``--out`` (default ``benchmarks/results``),
one row per (op, shape, layout, dtype, provider) with the columns of :data:`KEYS`, plus ``copy``
rows (the copy itself).
"""
from __future__ import annotations

import math
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import common

BENCH = "bandwidth"
KEYS = ("bench", "op", "shape", "batch", "layout", "dtype", "provider", "bytes", "median_ms", "p20_ms", "p80_ms",
        "gbps", "copy_gbps", "frac_of_copy", "err", "bound", "correct", "note")
PROVIDERS = ("cuda", "triton", "eager")  # the default; "auto" runs where asked for (AUTO_OPS only)
AUTO_OPS = ("bn_relu", "bn_add_relu")  # what resnet_fused.ops.bn_act computes: its "auto" path
GOAL_FRAC = 0.85  # the goal for the cuda provider on an H100
FACTOR = 4.0


@dataclass(frozen=True)
class Act:
    """A ResNet-50 activation: ``name`` says where it appears (224x224 input)."""

    name: str
    c: int
    hw: int


ACTS = (Act("layer1 out", 256, 56), Act("layer2 out", 512, 28), Act("layer3 out", 1024, 14),
        Act("layer4 out", 2048, 7), Act("layer1 inner", 64, 56))


def tiny(a: Act) -> Act:
    """CPU smoke size: channels / 16, spatial / 4 (at least 4)."""
    return Act(a.name, max(1, a.c // 16), max(4, a.hw // 4))


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class Inputs:
    """Every tensor any op reads, for one (shape, layout, dtype); activations dense in ``fmt``."""

    y: torch.Tensor
    r: torch.Tensor
    g: torch.Tensor
    relu_out: torch.Tensor      # a ReLU output consistent with ``mask_bool`` (eager's mask backward)
    mask: torch.Tensor          # uint8 [ceil(numel / 8)], bit i of the memory order
    mask_bool: torch.Tensor     # the same bits as a bool tensor shaped like y
    vec: Dict[str, torch.Tensor] = field(default_factory=dict)  # float32 [C]

    @property
    def channels_last(self) -> bool:
        return self.y.is_contiguous(memory_format=torch.channels_last) and not self.y.is_contiguous()


def memory_order(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t``'s elements as one vector in the order they lie in memory."""
    return (t.permute(0, 2, 3, 1) if channels_last else t).reshape(-1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool vector -> uint8 [ceil(n / 8)], bit i % 8 of byte i // 8 (the library's mask format)."""
    n = bits.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.to(torch.uint8)
    weights = (2 ** torch.arange(8, device=bits.device, dtype=torch.int32))
    return (padded.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return ((mask.view(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()


def make_inputs(batch: int, a: Act, channels_last: bool, dt: torch.dtype, dev: torch.device,
                gen: torch.Generator) -> Inputs:
    """Activations as a BatchNorm sees them (per-channel centre and spread, so the statistics are
    not trivially near zero) and the affines of a BatchNorm of them."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    C = a.c
    shape = (batch, C, a.hw, a.hw)

    def rnd(*s):
        return torch.randn(*s, generator=gen, device=dev)

    def act(center, spread):
        return (rnd(*shape) * spread.view(1, -1, 1, 1) + center.view(1, -1, 1, 1)).to(dt).contiguous(memory_format=fmt)

    y_c, y_s = rnd(C) * 2, torch.rand(C, generator=gen, device=dev) + 0.5
    r_c, r_s = rnd(C), torch.rand(C, generator=gen, device=dev) + 0.5
    y, r = act(y_c, y_s), act(r_c, r_s)
    g = rnd(*shape).to(dt).contiguous(memory_format=fmt)
    mask_bool = (rnd(*shape) > 0).contiguous(memory_format=fmt)
    relu_out = torch.where(mask_bool, y.abs() + 0.5, torch.zeros((), dtype=dt, device=dev)).to(dt)
    relu_out = relu_out.contiguous(memory_format=fmt)
    mask = pack_bits(memory_order(mask_bool, channels_last))
    vec = {
        "mean": y_c + 0.1 * rnd(C), "scale": (torch.rand(C, generator=gen, device=dev) + 0.5) / y_s,
        "shift": 0.3 * rnd(C), "r_mean": r_c + 0.1 * rnd(C),
        "r_scale": (torch.rand(C, generator=gen, device=dev) + 0.5) / r_s, "r_shift": 0.3 * rnd(C),
        "k2": 0.01 * rnd(C), "k3": 0.01 * rnd(C), "r_k2": 0.01 * rnd(C), "r_k3": 0.01 * rnd(C),
    }
    # the same BN as one affine, y * scale + shift_folded: what the inference op bn_act takes
    vec["shift_folded"] = vec["shift"] - vec["mean"] * vec["scale"]
    return Inputs(y, r, g, relu_out, mask, mask_bool, {k: v.float().contiguous() for k, v in vec.items()})


# ------------------------------------------------------------------------------------------- ops
def _v(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def preact(d: Inputs, res: int, up: bool = False):
    """(y - mean, r - r_mean or r, z) as eager PyTorch computes them (float32 from a 16-bit y:
    a float32 [C] vector promotes it), or in float64 with ``up``."""
    f = (lambda t: t.double()) if up else (lambda t: t)
    v = {k: f(t) for k, t in d.vec.items()}
    yc = f(d.y) - _v(v["mean"])
    z = yc * _v(v["scale"]) + _v(v["shift"])
    rc = None
    if res == 1:
        rc = f(d.r)
        z = z + rc
    elif res == 2:
        rc = f(d.r) - _v(v["r_mean"])
        z = z + rc * _v(v["r_scale"]) + _v(v["r_shift"])
    return yc, rc, z


def _gz(d: Inputs, z: torch.Tensor, up: bool = False) -> torch.Tensor:
    g = d.g.double() if up else d.g
    return torch.where(z <= 0, torch.zeros((), dtype=z.dtype, device=z.device), g.to(z.dtype))


def _rvecs(d: Inputs, res: int):
    if res == 0:
        return None, None, None, None
    if res == 1:
        return d.r, None, None, None
    return d.r, d.vec["r_mean"], d.vec["r_scale"], d.vec["r_shift"]


@dataclass(frozen=True)
class Op:
    """One memory-bound op: what it reads/writes (for the byte count) and how each provider runs
    it. ``run(provider, d)`` returns the outputs compared with ``ref(d)`` (float64)."""

    name: str
    acts: int            # activation-sized tensors read or written, in the run's dtype
    mask: bool           # a packed 1-bit mask is read or written
    vecs: int            # float32 [C] vectors read or written
    res: int             # 0: no r, 1: identity r, 2: r with its own BN
    kind: str            # "fwd" | "reduce" | "apply" | "stats" | "mask_bwd"
    providers: Tuple[str, ...] = PROVIDERS

    def traffic(self, numel: int, C: int, esize: int) -> int:
        return self.acts * numel * esize + (math.ceil(numel / 8) if self.mask else 0) + self.vecs * C * 4


OPS = (
    Op("bn_relu", 2, False, 3, 0, "fwd", PROVIDERS + ("auto",)),
    Op("bn_add_relu", 3, False, 3, 1, "fwd", PROVIDERS + ("auto",)),
    Op("dual_bn_add_relu", 3, False, 6, 2, "fwd"),
    Op("bn_relu_mask", 2, True, 3, 0, "fwd", ("cuda", "eager")),
    Op("bwd_reduce", 2, False, 3 + 2, 0, "reduce"),
    Op("bwd_reduce_dual", 3, False, 6 + 3, 2, "reduce"),
    Op("bwd_apply", 3, False, 3 + 2, 0, "apply"),
    Op("bwd_apply_dual", 5, False, 6 + 4, 2, "apply"),
    Op("channel_stats", 1, False, 3, 0, "stats"),  # writes anchor, mean offset, m2 (and a count)
    Op("relu_mask_backward", 2, True, 0, 0, "mask_bwd", ("cuda", "eager")),
)
OP_NAMES = tuple(o.name for o in OPS)


def _ext():
    return torch.ops.resnet_fused_C


def run_cuda(op: Op, d: Inputs):
    v, dt = d.vec, d.y.dtype
    r, rm, rs, rh = _rvecs(d, op.res)
    if op.kind == "fwd":
        out, mask = _ext().bn_act(d.y, v["mean"], v["scale"], v["shift"], r, rm, rs, rh, True, dt, op.mask)
        return (out, mask) if op.mask else (out,)
    if op.kind == "reduce":
        s = _ext().bn_act_bwd_reduce(d.g, d.y, v["mean"], v["scale"], v["shift"], r, rm, rs, rh)
        return s if op.res == 2 else s[:2]
    if op.kind == "apply":
        dy, dr = _ext().bn_act_bwd_apply(d.g, d.y, v["mean"], v["scale"], v["shift"], v["k2"], v["k3"], r, rm, rs,
                                         rh, v["r_k2"] if op.res == 2 else None, v["r_k3"] if op.res == 2 else None,
                                         dt)
        return (dy, dr) if op.res else (dy,)
    if op.kind == "stats":
        return stats_as_mean_var(*_ext().channel_stats(d.y))
    return (_ext().relu_mask_backward(d.g, d.mask, d.channels_last),)


def run_triton(op: Op, d: Inputs):
    from resnet_fused.ops import batch_stats, bn_train

    v, dt = d.vec, d.y.dtype
    r, rm, rs, rh = _rvecs(d, op.res)
    if op.kind == "fwd":
        return (bn_train.bn_relu_apply(d.y, v["mean"], v["scale"], v["shift"], r, rm, rs, rh, dt),)
    if op.kind == "reduce":
        s = bn_train.bn_relu_bwd_reduce(d.g, d.y, v["mean"], v["scale"], v["shift"], r, rm, rs, rh)
        return s if op.res == 2 else s[:2]
    if op.kind == "apply":
        dy, dr = bn_train.bn_relu_bwd_apply(d.g, d.y, v["mean"], v["scale"], v["shift"], v["k2"], v["k3"], r, rm,
                                            rs, rh, v["r_k2"] if op.res == 2 else None,
                                            v["r_k3"] if op.res == 2 else None, dt)
        return (dy, dr) if op.res else (dy,)
    if op.kind == "stats":
        return stats_as_mean_var(*batch_stats.channel_stats(d.y))
    raise ValueError(f"{op.name}: no Triton kernel")


def stats_as_mean_var(count, anchor, mean_off, m2):
    """The library's statistics format -> (mean, biased var), float32 [C]."""
    return anchor + mean_off, m2 / count


def run_eager(op: Op, d: Inputs, up: bool = False):
    """The torch op sequence (``up``: the float64 reference, same formulas)."""
    dt = torch.float64 if up else d.y.dtype
    v = {k: (t.double() if up else t) for k, t in d.vec.items()}
    if op.kind == "stats":
        y = d.y.double() if up else d.y
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        return mean, var
    if op.kind == "mask_bwd":
        if up:
            return (d.g.double() * d.mask_bool,)
        return (torch.ops.aten.threshold_backward(d.g, d.relu_out, 0),)
    yc, rc, z = preact(d, op.res, up)
    if op.kind == "fwd":
        out = torch.relu(z).to(dt)
        return (out, ~(z <= 0)) if op.mask else (out,)
    gz = _gz(d, z, up)
    if op.kind == "reduce":
        sums = [gz.sum(dim=(0, 2, 3)), (gz * yc).sum(dim=(0, 2, 3))]
        if op.res == 2:
            sums.append((gz * rc).sum(dim=(0, 2, 3)))
        return tuple(sums)
    dy = (gz * _v(v["scale"]) + yc * _v(v["k2"]) + _v(v["k3"])).to(dt)
    if op.res == 0:
        return (dy,)
    dr = gz if op.res == 1 else gz * _v(v["r_scale"]) + rc * _v(v["r_k2"]) + _v(v["r_k3"])
    return dy, dr.to(dt)


def run_auto(op: Op, d: Inputs):
    """``resnet_fused.ops.bn_act(..., backend="auto")`` (the measured dispatch) on the folded BN:
    bn_relu and bn_add_relu only (:data:`AUTO_OPS`)."""
    from resnet_fused.ops import bn_act

    if op.name not in AUTO_OPS:
        raise ValueError(f"{op.name}: no auto path (resnet_fused.ops.bn_act covers {AUTO_OPS})")
    return (bn_act(d.y, d.vec["scale"], d.vec["shift_folded"], d.r if op.res == 1 else None, relu=True,
                   backend="auto"),)


RUNNERS: Dict[str, Callable] = {"cuda": run_cuda, "triton": run_triton, "eager": run_eager, "auto": run_auto}


# ----------------------------------------------------------------------------------- correctness
def check_mask(mask, d: Inputs, z64: torch.Tensor) -> common.Check:
    """A packed (uint8) or bool mask against ``!(z <= 0)`` in float64: a bit may differ only where
    |z| is within float32 rounding of the terms that make it (1e-5 of the largest |z|)."""
    n = d.y.numel()
    want = memory_order(~(z64 <= 0), d.channels_last)
    got = unpack_bits(mask, n) if mask.dtype == torch.uint8 else memory_order(mask, d.channels_last)
    if got.numel() != n:
        return common.Check(math.inf, math.nan, 0.0, False)
    near = memory_order(z64.abs(), d.channels_last) <= 1e-5 * z64.abs().max().clamp_min(1.0)
    bad = (got != want) & ~near
    frac = float((got != want).sum()) / max(n, 1)
    return common.Check(frac, math.nan, 0.0, not bool(bad.any()))


def judge(op: Op, outs, ref, eager, dtype: str, d: Inputs) -> common.Check:
    """The worst (err / bound) of the outputs; a mask output by :func:`check_mask`. Statistics
    and sums are float32 results: their floor is float32's whatever the input dtype."""
    worst: Optional[common.Check] = None
    for i, (o, r) in enumerate(zip(outs, ref)):
        if op.mask and op.kind == "fwd" and i == 1:
            chk = check_mask(o, d, preact(d, op.res, up=True)[2])
        else:
            e = eager[i] if eager is not None else None
            floor = "fp32" if op.kind in ("reduce", "stats") else dtype
            chk = common.check_output(o, r, e, floor, factor=FACTOR)
        if not chk.ok:
            return chk
        if worst is None or _ratio(chk) > _ratio(worst):
            worst = chk
    if len(outs) != len(ref) or worst is None:
        return common.Check(math.inf, math.nan, 0.0, False)
    return worst


def _ratio(c: common.Check) -> float:
    return c.err / c.bound if c.bound > 0 else 0.0


# ------------------------------------------------------------------------------------------ runs
@dataclass
class Config:
    device: torch.device
    batch: int
    acts: Sequence[Act]
    layouts: Sequence[str]
    dtypes: Sequence[str]
    ops: Sequence[Op]
    providers: Sequence[str]
    cuda_graph: bool
    timing: dict
    skipped: Dict[str, str] = field(default_factory=dict)
    # auto: (op, shape, layout, dtype) -> common.dispatch_record() after its run
    dispatch: Dict[tuple, dict] = field(default_factory=dict)



def copy_gbps(nbytes: int, cfg: Config, cache: Dict[int, Tuple[float, common.Timing]]) -> Tuple[float, common.Timing]:
    """GB/s of ``dst.copy_(src)`` moving ``nbytes`` (src of nbytes / 2), cached per size."""
    if nbytes not in cache:
        half = max(1, nbytes // 2)
        dev = cfg.device
        k = common.rotation_copies(nbytes, common.cache_bytes(dev), max_copies=8 if dev.type == "cuda" else 2)
        pairs = [(torch.empty(half, dtype=torch.uint8, device=dev).random_(0, 256),
                  torch.empty(half, dtype=torch.uint8, device=dev)) for _ in range(k)]
        pairs[0][1].copy_(pairs[0][0])
        assert torch.equal(pairs[0][1], pairs[0][0]), "copy_ is wrong"

        def fn(src, dst):
            dst.copy_(src)

        t, _ = common.benchmark_graph_or_plain(fn, [(s, dd) for s, dd in pairs], dev, cfg.cuda_graph,
                                               f"copy {nbytes} B", **cfg.timing)
        cache[nbytes] = (2 * half / (t.median_ms * 1e-3) / 1e9, t)
        del pairs
    return cache[nbytes]


def make_row(op: str, a: Act, batch: int, layout: str, dtype: str, provider: str, nbytes: int,
             t: Optional[common.Timing], copy: Optional[float], chk: Optional[common.Check], ok: bool,
             note: str = "") -> dict:
    gbps = None if t is None else nbytes / (t.median_ms * 1e-3) / 1e9
    sig = common.sig
    return dict(zip(KEYS, (
        BENCH, op, f"{a.c}x{a.hw}x{a.hw}", batch, layout, dtype, provider, nbytes,
        None if t is None else sig(t.median_ms), None if t is None else sig(t.p20_ms),
        None if t is None else sig(t.p80_ms), sig(gbps), sig(copy),
        None if gbps is None or not copy else sig(gbps / copy),
        None if chk is None else sig(chk.err), None if chk is None else sig(chk.bound), bool(ok), note)))


def run_case(a: Act, layout: str, dtype: str, cfg: Config, rows: List[dict],
             copies: Dict[int, Tuple[float, common.Timing]]) -> None:
    dev, dt = cfg.device, common.DTYPES[dtype]
    cl = layout == "cl"
    seed = a.c * 1000 + a.hw * 10 + (1 if cl else 0) + 100000 * list(common.DTYPES).index(dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    base = make_inputs(cfg.batch, a, cl, dt, dev, gen)
    numel, esize = base.y.numel(), base.y.element_size()
    # input copies to rotate over, so the timed passes are not served from the L2 cache (sized for
    # the op that reads least: channel_stats, one activation)
    k = common.rotation_copies(numel * esize, common.cache_bytes(dev), max_copies=8 if dev.type == "cuda" else 2)
    sets = [base] + [make_inputs(cfg.batch, a, cl, dt, dev, gen) for _ in range(k - 1)]
    label = f"{a.c}x{a.hw}x{a.hw} b{cfg.batch} {layout} {dtype}"
    copy_rows: Dict[int, dict] = {}
    for op in cfg.ops:
        nbytes = op.traffic(numel, a.c, esize)
        copy, copy_t = copy_gbps(nbytes, cfg, copies)
        if nbytes not in copy_rows:  # the copy itself, once per byte count of this case
            copy_rows[nbytes] = make_row("copy", a, cfg.batch, layout, dtype, "copy", nbytes, copy_t, copy, None,
                                         True, f"for {op.name}")
            rows.append(copy_rows[nbytes])
        else:
            copy_rows[nbytes]["note"] += f", {op.name}"
        ref = [t for t in run_eager(op, base, up=True)]
        eager = None
        try:
            eager = run_eager(op, base)
        except Exception as exc:  # eager is the yardstick of the bounds; without it the floors alone bound
            print(f"  FAILED {op.name} {label} eager: {type(exc).__name__}: {exc}", file=sys.stderr)
        for prov in cfg.providers:
            if prov not in op.providers:
                continue
            t, chk, ok, note = None, None, False, ""
            try:
                if prov == "auto":
                    common.dispatch_fresh()  # the checked call below (the timed shapes) measures
                outs = RUNNERS[prov](op, base)
                chk = judge(op, outs, ref, eager, dtype, base)
                ok = chk.ok
                if ok:
                    fn = (lambda dd, _op=op, _p=prov: RUNNERS[_p](_op, dd))
                    t, graph = common.benchmark_graph_or_plain(fn, [(s,) for s in sets], dev, cfg.cuda_graph,
                                                               f"{op.name} {label} {prov}",
                                                               **common.provider_timing(cfg.device, prov, cfg.timing))
                    note = "" if graph or dev.type != "cuda" else "plain launches (graph capture failed)"
                else:
                    note = "wrong: not timed"
                    print(f"  WRONG {op.name} {label} {prov}: err {chk.err:.3e} > bound {chk.bound:.3e}; not timed",
                          file=sys.stderr)
            except Exception as exc:
                ok, t, note = False, None, f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                print(f"  FAILED {op.name} {label} {prov}: {type(exc).__name__}: {exc}", file=sys.stderr)
                traceback.print_exc(limit=3)
            if prov == "auto":  # its decisions, also when it was wrong or failed
                record = common.dispatch_record()
                cfg.dispatch[(op.name, f"{a.c}x{a.hw}x{a.hw}", layout, dtype)] = record
                note = "; ".join(x for x in (note, common.auto_note(record["decisions"])) if x)
            rows.append(make_row(op.name, a, cfg.batch, layout, dtype, prov, nbytes, t, copy, chk, ok, note))
            r = rows[-1]
            if r["gbps"] is not None:
                print(f"  {op.name:<19} {label} {prov:<6} {r['median_ms']:.4f} ms  {r['gbps']:8.1f} GB/s  "
                      f"{r['frac_of_copy']:.2f} of copy ({copy:.1f} GB/s)", flush=True)
    del sets, base
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ table
def summary_table(rows: List[dict], providers: Sequence[str]) -> Tuple[List[str], List[list]]:
    """(headers, lines): one line per (op, shape, layout, dtype); GB/s and fraction of copy."""
    headers = ["op", "shape", "batch", "layout", "dtype", "MB", "copy GB/s"]
    for p in providers:
        headers += [f"{p} GB/s", f"{p}/copy"]
    by_key: Dict[tuple, Dict[str, dict]] = {}
    copy_of: Dict[tuple, float] = {}
    for r in rows:
        if r["provider"] == "copy":
            continue
        key = (r["op"], r["shape"], r["batch"], r["layout"], r["dtype"])
        by_key.setdefault(key, {})[r["provider"]] = r
        copy_of[key] = r["copy_gbps"]
    lines = []
    for key, prov in by_key.items():
        any_row = next(iter(prov.values()))
        line = [*key, f"{any_row['bytes'] / 1e6:.4g}", _f(copy_of[key], 1)]
        for p in providers:
            r = prov.get(p)
            if r is None:
                line += ["n/a", ""]
            elif not r["correct"]:
                line += ["WRONG" if r["note"].startswith("wrong") else "FAILED", ""]
            else:
                line += [_f(r["gbps"], 1), _f(r["frac_of_copy"], 2)]
        lines.append(line)
    return headers, lines


def _f(v: Optional[float], digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def goal_line(rows: List[dict], device: torch.device) -> str:
    timed = [r for r in rows if r["provider"] == "cuda" and r["frac_of_copy"] is not None]
    if not timed:
        return "goal (cuda >= 85% of copy bandwidth): no cuda rows timed"
    met = [r for r in timed if r["frac_of_copy"] >= GOAL_FRAC]
    worst = min(timed, key=lambda r: r["frac_of_copy"])
    where = "" if device.type == "cuda" else " (CPU run: says nothing about the GPU goal)"
    return (f"goal (cuda >= {GOAL_FRAC:.0%} of copy bandwidth): met in {len(met)} of {len(timed)} cases; worst "
            f"{worst['frac_of_copy']:.2f} ({worst['op']} {worst['shape']} {worst['layout']} {worst['dtype']}){where}")


# -------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None):
    p = common.base_parser("python -m benchmarks.bench_bandwidth", __doc__, providers=PROVIDERS + ("auto",),
                           quick_help="GPU: batch 64, fp16 only (about a minute on an H100)")
    p.add_argument("--batch", type=int, default=None, help="override the batch size")
    p.add_argument("--layouts", nargs="+", choices=("cl", "nchw"), default=None, help="default: both")
    p.add_argument("--ops", nargs="+", choices=OP_NAMES, default=None, help="default: all")
    p.add_argument("--shapes", nargs="+", choices=[f"{a.c}x{a.hw}" for a in ACTS], default=None,
                   help="only these activations (full-size names, also in the CPU mode)")
    p.add_argument("--no-graph", action="store_true", help="GPU: time plain launches, not CUDA-graph replays")
    return p.parse_args(argv)


def make_config(args) -> Config:
    dev = common.pick_device(args.device)
    acts = [a for a in ACTS if args.shapes is None or f"{a.c}x{a.hw}" in args.shapes]
    if dev.type == "cuda":
        batch = 64 if args.quick else 256
        dtypes = ["fp16"] if args.quick else ["fp16", "bf16", "fp32"]
    else:
        batch, dtypes = 2, ["fp32"]
        acts = [tiny(a) for a in acts]
    skipped: Dict[str, str] = {}
    providers = common.drop_unavailable(list(dict.fromkeys(args.providers or PROVIDERS)), dev, skipped)
    ops = [o for o in OPS if args.ops is None or o.name in args.ops]
    return Config(dev, args.batch or batch, acts, args.layouts or ["cl", "nchw"], args.dtypes or dtypes, ops,
                  providers, cuda_graph=dev.type == "cuda" and not args.no_graph,
                  timing=common.op_timing(dev, args.quick), skipped=skipped)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    env = common.env_info(cfg.device)
    print(common.banner("bench_bandwidth", env))
    print(f"batch {cfg.batch}; activations {[f'{a.c}x{a.hw}x{a.hw}' for a in cfg.acts]}; layouts {list(cfg.layouts)}; "
          f"dtypes {list(cfg.dtypes)}; providers {list(cfg.providers)}; "
          f"{'CUDA graphs' if cfg.cuda_graph else 'no graphs'}", flush=True)
    common.print_skipped(cfg.skipped)
    rows: List[dict] = []
    copies: Dict[int, Tuple[float, common.Timing]] = {}
    with common.dispatch_isolated():
        for dtype in cfg.dtypes:
            for a in cfg.acts:
                for layout in cfg.layouts:
                    run_case(a, layout, dtype, cfg, rows, copies)
    headers, lines = summary_table(rows, cfg.providers)
    print(common.format_table(headers, lines))
    goal = goal_line(rows, cfg.device)
    print(goal)
    common.print_skipped(cfg.skipped)
    extra = {"goal": goal, "timing": "CUDA-graph replay" if cfg.cuda_graph else
             ("CUDA events, plain launches" if cfg.device.type == "cuda" else "perf_counter (CPU)")}
    if cfg.dispatch:
        extra["dispatch"] = [common.dispatch_entry({"shape": shape, "batch": cfg.batch, "dtype": dtype,
                                                    "mode": "infer", "layout": layout, "variant": op}, record)
                             for (op, shape, layout, dtype), record in cfg.dispatch.items()]
    return common.finish(rows, args.out, BENCH, env, write=not args.no_write, keys=KEYS, skipped=cfg.skipped,
                         extra=extra, markdown=(f"bench_bandwidth: memory-bound kernels vs copy, {env['gpu']}",
                                                headers, lines), notes=[goal])


if __name__ == "__main__":
    sys.exit(main())
