"""What :mod:`benchmarks.layers` runs: each conv case (fused conv + BN (+ add) + ReLU and its
providers) and the memory-bound BatchNorm / ReLU passes, with the bytes counted and float64 references.

Conv (:func:`make_conv_case`, :func:`conv_fn`): an eval BN after the conv, folded into the weight
and a float32 bias for the fused providers; the reference is float64 from the same low-precision
inputs and the BN's own parameters; least bytes (:func:`conv_bytes`) are input, weight, output,
and for the fused variants the residual and the bias.

Memory ops: each reads one activation y [N, C, H, W] (and perhaps a residual r and a gradient g) with
per-channel float32 vectors; ``cuda`` runs ``torch.ops.resnet_fused_C.*`` (the C++ kernels on CPU),
``triton`` the Triton kernels (none for the two mask ops), ``eager`` the torch op sequence (a bool
mask), ``auto`` ``resnet_fused.ops.bn_act(..., backend="auto")`` (bn_relu and bn_add_relu only).

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

Bytes: every tensor read or written once (activations in the run's dtype, the mask as numel / 8,
plus the float32 [C] vectors): the least any implementation moves, the same denominator for every
provider, so a provider moving more (eager's intermediates) shows as a lower GB/s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import common

FACTOR = 4.0
BN_EPS = 1e-5
PROVIDERS = ("cuda", "triton", "eager")
AUTO_OPS = ("bn_relu", "bn_add_relu")  # what resnet_fused.ops.bn_act computes


@dataclass
class Inputs:
    """Every tensor any op reads, for one (shape, dtype); activations channels_last."""

    y: torch.Tensor
    r: torch.Tensor
    g: torch.Tensor
    relu_out: torch.Tensor      # a ReLU output consistent with ``mask_bool`` (eager's mask backward)
    mask: torch.Tensor          # uint8 [ceil(numel / 8)], bit i of the memory order
    mask_bool: torch.Tensor     # the same bits as a bool tensor shaped like y
    vec: Dict[str, torch.Tensor] = field(default_factory=dict)  # float32 [C]

    @property
    def channels_last(self) -> bool:  # as the kernels see it (C = 1 or H = W = 1 is both)
        return self.y.is_contiguous(memory_format=torch.channels_last) and not self.y.is_contiguous()


def memory_order(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t``'s elements as one vector in the order they lie in memory."""
    return (t.permute(0, 2, 3, 1) if channels_last else t).reshape(-1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool vector -> uint8 [ceil(n / 8)], bit i % 8 of byte i // 8 (the library's mask format)."""
    n = bits.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.to(torch.uint8)
    weights = 2 ** torch.arange(8, device=bits.device, dtype=torch.int32)
    return (padded.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return ((mask.view(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()


def make_inputs(batch: int, c: int, hw: int, dt: torch.dtype, dev: torch.device, gen: torch.Generator) -> Inputs:
    """Activations as a BatchNorm sees them (per-channel centre and spread) and a BN's affines."""
    shape, cl = (batch, c, hw, hw), torch.channels_last

    def rnd(*s):
        return torch.randn(*s, generator=gen, device=dev)

    def pos(*s):
        return torch.rand(*s, generator=gen, device=dev) + 0.5

    def act(center, spread):
        return (rnd(*shape) * spread.view(1, -1, 1, 1) + center.view(1, -1, 1, 1)).to(dt).contiguous(memory_format=cl)

    y_c, y_s, r_c, r_s = rnd(c) * 2, pos(c), rnd(c), pos(c)
    y, r = act(y_c, y_s), act(r_c, r_s)
    g = rnd(*shape).to(dt).contiguous(memory_format=cl)
    mask_bool = (rnd(*shape) > 0).contiguous(memory_format=cl)
    relu_out = torch.where(mask_bool, y.abs() + 0.5, torch.zeros((), dtype=dt, device=dev)).to(dt)
    relu_out = relu_out.contiguous(memory_format=cl)
    d = Inputs(y, r, g, relu_out, torch.empty(0), mask_bool)
    d.mask = pack_bits(memory_order(mask_bool, d.channels_last))
    vec = {"mean": y_c + 0.1 * rnd(c), "scale": pos(c) / y_s, "shift": 0.3 * rnd(c), "r_mean": r_c + 0.1 * rnd(c),
           "r_scale": pos(c) / r_s, "r_shift": 0.3 * rnd(c), "k2": 0.01 * rnd(c), "k3": 0.01 * rnd(c),
           "r_k2": 0.01 * rnd(c), "r_k3": 0.01 * rnd(c)}
    vec["shift_folded"] = vec["shift"] - vec["mean"] * vec["scale"]  # the BN as one affine (bn_act's)
    d.vec = {k: v.float().contiguous() for k, v in vec.items()}
    return d


def rotation(nbytes: int, dev: torch.device) -> int:
    """How many input copies of ``nbytes`` to rotate over (together more than twice the L2)."""
    return common.rotation_copies(nbytes, common.cache_bytes(dev), max_copies=8 if dev.type == "cuda" else 2)


# ------------------------------------------------------------------------------------------ convs
@dataclass
class ConvCase:
    inputs: List[tuple]               # (x, r) copies to rotate over
    w: torch.Tensor                   # the conv's weight
    bn: Tuple[torch.Tensor, ...]      # running_mean, running_var, weight, bias
    w_f: torch.Tensor                 # the BN folded into the weight, and its float32 bias
    b32: torch.Tensor
    conv64: torch.Tensor              # float64 conv, and conv + BN (+ r) + ReLU
    ref64: torch.Tensor
    eager_out: Optional[torch.Tensor] = None


def conv_bytes(job, fused: bool) -> int:
    """Least bytes: input, weight, output in the dtype; fused also the residual and float32 bias."""
    s, esize = job.spec, common.DTYPES[job.dtype].itemsize
    out = job.batch * s.cout * s.out_hw ** 2
    n = (job.batch * s.cin * s.hw ** 2 + s.cout * s.cin * s.k * s.k + out) * esize
    return n + ((out * esize if job.residual else 0) + s.cout * 4 if fused else 0)


def make_conv_case(job, dev: torch.device) -> ConvCase:
    from resnet_fused.ops.fold import bn_scale_shift, fold_conv_bn

    s, dt, cl = job.spec, common.DTYPES[job.dtype], torch.channels_last
    gen = torch.Generator(device=dev).manual_seed(1000 * s.cin + s.cout + 7 * s.k + s.stride + s.hw)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=dev) * scale

    # He-scaled weights keep the output O(1) (variance about 2) whatever the fan-in
    w = rnd(s.cout, s.cin, s.k, s.k, scale=math.sqrt(2.0 / (s.cin * s.k * s.k))).to(dt).contiguous(memory_format=cl)
    out_shape = (job.batch, s.cout, s.out_hw, s.out_hw)
    per = (job.batch * s.cin * s.hw ** 2 + (math.prod(out_shape) if job.residual else 0)) * w.element_size()
    k = rotation(per, dev)
    inputs = [(rnd(job.batch, s.cin, s.hw, s.hw).to(dt).contiguous(memory_format=cl),
               rnd(*out_shape).to(dt).contiguous(memory_format=cl) if job.residual else None) for _ in range(k)]
    bn = nn.BatchNorm2d(s.cout, eps=BN_EPS).to(dev).eval()
    with torch.no_grad():
        bn.running_mean.copy_(0.1 * rnd(s.cout))
        bn.running_var.copy_(2.0 * (0.5 + torch.rand(s.cout, generator=gen, device=dev)))
        bn.weight.copy_(0.5 + torch.rand(s.cout, generator=gen, device=dev))
        bn.bias.copy_(0.3 * rnd(s.cout))
        w_f, b_f = fold_conv_bn(w, *bn_scale_shift(bn), dtype=dt)
        # float64 reference from the BN's parameters (not from the float32 fold) and the dtype's inputs
        x, r = inputs[0]
        conv64 = F.conv2d(x.double().contiguous(), w.double().contiguous(), None, s.stride, s.padding)
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + BN_EPS)
        ref = conv64 * scale.view(1, -1, 1, 1) + (bn.bias.double() - bn.running_mean.double() * scale).view(1, -1, 1, 1)
        ref = torch.relu(ref if r is None else ref + r.double())
    params = tuple(t.detach() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias))
    return ConvCase(inputs, w, params, w_f.contiguous(memory_format=cl), b_f.float(), conv64, ref)


def conv_fn(provider: str, variant: str, job, case: ConvCase, allow_tf32: bool) -> Callable:
    """``fn(x, r)`` of (provider, variant) on one conv case."""
    s = job.spec
    st, pd = [s.stride] * 2, [s.padding] * 2
    w, (rm, rv, g, b), w_f, b32 = case.w, case.bn, case.w_f, case.b32

    def eager(x, r):
        y = F.batch_norm(F.conv2d(x, w, None, st, pd), rm, rv, g, b, False, 0.0, BN_EPS)
        return (y if r is None else y.add_(r)).relu_()

    if variant == "conv_alone":
        return lambda x, r: F.conv2d(x, w, None, st, pd)
    if provider == "eager":
        return eager
    if provider == "cuda":
        op = torch.ops.resnet_fused_C.conv_bias_act
        return lambda x, r: op(x, w_f, b32, r, st, pd, [1, 1], True, allow_tf32)
    if provider in ("triton", "auto"):
        from resnet_fused.ops import conv_bias_act

        return lambda x, r: conv_bias_act(x, w_f, b32, r, stride=s.stride, padding=s.padding, relu=True,
                                          backend=provider)
    if provider == "cudnn_fused":
        from resnet_fused.dispatch.candidates import _cudnn_fused

        return lambda x, r: _cudnn_fused(x, w_f, b32, r, st, pd, (1, 1), True, torch.channels_last)
    if provider == "compile":
        torch._dynamo.reset()  # a fresh compile per case (the recompile limit would fall back to eager)
        return torch.compile(eager, dynamic=False)
    raise ValueError(f"provider: no conv runner for {provider!r}")


# ------------------------------------------------------------------------------------ memory ops
@dataclass(frozen=True)
class Op:
    name: str
    acts: int            # activation-sized tensors read or written, in the run's dtype
    mask: bool           # a packed 1-bit mask is read or written
    vecs: int            # float32 [C] vectors read or written
    res: int             # 0: no r, 1: identity r, 2: r with its own BN
    kind: str            # "fwd" | "reduce" | "apply" | "stats" | "mask_bwd"
    providers: Tuple[str, ...] = PROVIDERS

    def traffic(self, numel: int, c: int, esize: int) -> int:
        return self.acts * numel * esize + (math.ceil(numel / 8) if self.mask else 0) + self.vecs * c * 4


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


def _v(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def preact(d: Inputs, res: int, up: bool = False):
    """(y - mean, r - r_mean or r, z) as eager computes them, or in float64 with ``up``."""
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


def _args(op: Op, d: Inputs):
    """The library's argument list: (g,) y, mean, scale, shift, r, r_mean, r_scale, r_shift."""
    v = d.vec
    r = (None, d.r, d.r)[op.res]
    rv = (v["r_mean"], v["r_scale"], v["r_shift"]) if op.res == 2 else (None, None, None)
    head = (d.y,) if op.kind == "fwd" else (d.g, d.y)
    return head + (v["mean"], v["scale"], v["shift"], r) + rv


def _apply_args(op: Op, d: Inputs):
    """bwd_apply's: g, y, mean, scale, shift, k2, k3, r, r_mean, r_scale, r_shift, r_k2, r_k3, dtype."""
    a, v, dual = _args(op, d), d.vec, op.res == 2
    return a[:5] + (v["k2"], v["k3"]) + a[5:] + (v["r_k2"] if dual else None, v["r_k3"] if dual else None, d.y.dtype)


def stats_as_mean_var(count, anchor, mean_off, m2):
    """The library's statistics format -> (mean, biased var), float32 [C]."""
    return anchor + mean_off, m2 / count


def run_cuda(op: Op, d: Inputs):
    ext = torch.ops.resnet_fused_C
    if op.kind == "fwd":
        out, mask = ext.bn_act(*_args(op, d), True, d.y.dtype, op.mask)
        return (out, mask) if op.mask else (out,)
    if op.kind == "reduce":
        return ext.bn_act_bwd_reduce(*_args(op, d))[:3 if op.res == 2 else 2]
    if op.kind == "apply":
        return ext.bn_act_bwd_apply(*_apply_args(op, d))[:2 if op.res else 1]
    if op.kind == "stats":
        return stats_as_mean_var(*ext.channel_stats(d.y))
    return (ext.relu_mask_backward(d.g, d.mask, d.channels_last),)


def run_triton(op: Op, d: Inputs):
    from resnet_fused.ops import batch_stats, bn_train

    if op.kind == "fwd" and not op.mask:
        return (bn_train.bn_relu_apply(*_args(op, d), d.y.dtype),)
    if op.kind == "reduce":
        return tuple(bn_train.bn_relu_bwd_reduce(*_args(op, d)))[:3 if op.res == 2 else 2]
    if op.kind == "apply":
        return tuple(bn_train.bn_relu_bwd_apply(*_apply_args(op, d)))[:2 if op.res else 1]
    if op.kind == "stats":
        return stats_as_mean_var(*batch_stats.channel_stats(d.y))
    raise ValueError(f"{op.name}: no Triton kernel")


def run_eager(op: Op, d: Inputs, up: bool = False):
    """The torch op sequence (``up``: the float64 reference, same formulas)."""
    dt = torch.float64 if up else d.y.dtype
    v = {k: (t.double() if up else t) for k, t in d.vec.items()}
    if op.kind == "stats":
        var, mean = torch.var_mean(d.y.double() if up else d.y, dim=(0, 2, 3), correction=0)
        return mean, var
    if op.kind == "mask_bwd":
        return (d.g.double() * d.mask_bool,) if up else (torch.ops.aten.threshold_backward(d.g, d.relu_out, 0),)
    yc, rc, z = preact(d, op.res, up)
    if op.kind == "fwd":
        out = torch.relu(z).to(dt)
        return (out, ~(z <= 0)) if op.mask else (out,)
    gz = torch.where(z <= 0, torch.zeros((), dtype=z.dtype, device=z.device), (d.g.double() if up else d.g).to(z.dtype))
    if op.kind == "reduce":
        sums = [gz.sum(dim=(0, 2, 3)), (gz * yc).sum(dim=(0, 2, 3))]
        return tuple(sums + ([(gz * rc).sum(dim=(0, 2, 3))] if op.res == 2 else []))
    dy = (gz * _v(v["scale"]) + yc * _v(v["k2"]) + _v(v["k3"])).to(dt)
    if op.res == 0:
        return (dy,)
    dr = gz if op.res == 1 else gz * _v(v["r_scale"]) + rc * _v(v["r_k2"]) + _v(v["r_k3"])
    return dy, dr.to(dt)


def run_auto(op: Op, d: Inputs):
    """``resnet_fused.ops.bn_act(..., backend="auto")`` on the BN folded to one affine."""
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
    n, cl = d.y.numel(), d.channels_last
    want = memory_order(~(z64 <= 0), cl)
    got = unpack_bits(mask, n) if mask.dtype == torch.uint8 else memory_order(mask, cl)
    if got.numel() != n:
        return common.Check(math.inf, math.nan, 0.0, False)
    near = memory_order(z64.abs(), cl) <= 1e-5 * z64.abs().max().clamp_min(1.0)
    bad = (got != want) & ~near
    return common.Check(float((got != want).sum()) / max(n, 1), math.nan, 0.0, not bool(bad.any()))


def judge(op: Op, outs, ref, eager, dtype: str, d: Inputs) -> common.Check:
    """The worst (err / bound) of the outputs; a mask by :func:`check_mask`. Sums and statistics
    are float32 results: their floor is float32's whatever the input dtype."""
    if len(outs) != len(ref):
        return common.Check(math.inf, math.nan, 0.0, False)
    worst: Optional[common.Check] = None
    for i, (o, r) in enumerate(zip(outs, ref)):
        if op.mask and op.kind == "fwd" and i == 1:
            chk = check_mask(o, d, preact(d, op.res, up=True)[2])
        else:
            floor = "fp32" if op.kind in ("reduce", "stats") else dtype
            chk = common.check_output(o, r, None if eager is None else eager[i], floor, factor=FACTOR)
        if not chk.ok:
            return chk
        if worst is None or _ratio(chk) > _ratio(worst):
            worst = chk
    return worst if worst is not None else common.Check(math.inf, math.nan, 0.0, False)


def _ratio(c: common.Check) -> float:
    return c.err / c.bound if c.bound > 0 else 0.0
