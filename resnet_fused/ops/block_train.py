"""Fused training of a whole residual block: forward and backward as one ``autograd.Function``.

Post-activation blocks (torchvision ``BasicBlock`` with k = 2 convs, ``Bottleneck`` with k = 3)::

    y1 = conv1(x)                          + statistics of y1  -> bn1 (batch mean, scale, shift)
    yi = convi(relu(bn_{i-1}(y_{i-1})))    BN + ReLU applied while conv i loads; + statistics of yi
    yd = conv_d(x)                         (downsample branch) + statistics of yd
    out = relu(bn_k(y_k) + (x | bn_d(yd)))   one pass ("dual scale-bias-add-ReLU" with downsample)

Pre-activation blocks (``WideBasic``, ``PreActBottleneck``)::

    statistics of x                        -> bn1   (one reduction pass: no conv of ours made x)
    y1 = conv1(relu(bn1(x)))               + statistics -> bn2, and so on
    out = convk(relu(bn_k(y_{k-1}))) + (x | conv_s(relu(bn1(x))))   residual added in the epilogue

Only the raw conv outputs ``y`` (and x) are kept for the backward: each normalised activation is
recomputed in one elementwise pass when its conv's weight gradient needs it, and ReLU masks are
recomputed from ``y`` and the statistics. With ``recompute_last`` (the low-memory mode, see
:mod:`resnet_fused.train_options`) a post-activation block does not keep its last conv's output
either: the backward runs that conv again (a 1x1 in a Bottleneck: about 8% more FLOPs for the
block, and the block keeps 6 instead of 10 width-sized tensors where eager keeps 12). The BatchNorm + ReLU backward is two passes per BN (one
reduction, one apply; :mod:`resnet_fused.ops.bn_train`); convolution dgrad/wgrad call
``aten.convolution_backward`` (cuDNN on GPU, oneDNN on CPU).

The kernels come from the block's backend (``BlockSpec.backend``): ``"triton"`` (the conv with its
BN prologue and statistics epilogue fused, :mod:`.conv_bn_train`) or ``"cuda"``, the compiled
library (:mod:`._ext_ops`: the same passes as separate kernels around a CUTLASS / library conv).

Batch statistics are float32 whatever the activation dtype; under ``torch.autocast`` the convs run
in the autocast dtype and gradients come back in each parameter's dtype, as in eager. With
``nn.SyncBatchNorm`` the per-channel statistics (forward) and the two gradient sums (backward) are
reduced across the process group. The Function returns each BatchNorm's batch ``(count, mean,
var)`` so the caller updates running statistics exactly as ``nn.BatchNorm2d`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ext_ops, batch_stats, bn_train, conv_bn_train
from .batch_stats import StatsPartials, bn_affine, finalize, sync_across_ranks


@dataclass(frozen=True)
class ConvSpec:
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]


@dataclass(frozen=True)
class BNSpec:
    eps: float
    affine: bool
    group: object = None  # a torch.distributed process group for SyncBatchNorm, else None


@dataclass(frozen=True)
class BlockSpec:
    """What one block computes. ``convs``/``bns`` are the main chain in order; ``short_conv`` and
    ``short_bn`` describe the shortcut (both None: identity)."""
    preact: bool
    convs: Tuple[ConvSpec, ...]
    bns: Tuple[BNSpec, ...]
    short_conv: Optional[ConvSpec]
    short_bn: Optional[BNSpec]
    compute_dtype: torch.dtype
    channels_last: bool
    recompute_last: bool = False  # post-activation: keep y_k out of memory, recompute it in the backward
    backend: str = "triton"  # whose kernels: "triton" or "cuda" (the compiled library)


class _Kernels(NamedTuple):
    """One backend's kernels, all with the signatures of the Triton custom ops."""
    conv_train: Callable
    channel_stats: Callable
    bn_relu_apply: Callable
    bn_relu_bwd_reduce: Callable
    bn_relu_bwd_apply: Callable
    bn_finalize: Optional[Callable]  # (count, anchor, mean_off, m2, w, b, eps) -> (mean, var, scale, shift, invstd)


_KERNELS = {
    "triton": _Kernels(conv_bn_train.conv_train, batch_stats.channel_stats, bn_train.bn_relu_apply,
                       bn_train.bn_relu_bwd_reduce, bn_train.bn_relu_bwd_apply, None),
    "cuda": _Kernels(_ext_ops.conv_train, _ext_ops.channel_stats, _ext_ops.bn_relu_apply,
                     _ext_ops.bn_relu_bwd_reduce, _ext_ops.bn_relu_bwd_apply, _ext_ops.bn_finalize),
}


class _BN:
    """One BatchNorm's batch state in a forward: statistics and the affine built from them."""

    def __init__(self, spec: BNSpec, count: Tensor, mean: Tensor, var: Tensor, scale: Tensor, shift: Tensor,
                 invstd: Tensor) -> None:
        self.spec, self.count, self.mean, self.var = spec, count, mean, var
        self.scale, self.shift, self.invstd = scale, shift, invstd

    def vecs(self) -> Tuple[Tensor, Tensor, Tensor]:
        return self.mean, self.scale, self.shift


def _stats(kern: _Kernels, spec: BNSpec, count: Tensor, anchor: Tensor, mean: Tensor, m2: Tensor, weight,
           bias) -> _BN:
    if spec.group is None and kern.bn_finalize is not None:  # one kernel for the whole affine
        mu, var, scale, shift, invstd = kern.bn_finalize(count, anchor, mean, m2, weight, bias, spec.eps)
        return _BN(spec, count, mu, var, scale, shift, invstd)
    merged = StatsPartials.row(count, anchor, mean, m2)
    if spec.group is not None:
        c, mu, var = sync_across_ranks(merged, spec.group)
    else:
        c, mu, var = finalize(merged)
    return _BN(spec, c, mu, var, *bn_affine(mu, var, weight, bias, spec.eps))


def _conv(x: Tensor, w: Tensor, cs: ConvSpec, spec: BlockSpec, pro: Optional[_BN] = None,
          residual: Optional[Tensor] = None, stats: bool = False, out_dtype: Optional[torch.dtype] = None):
    pv = pro.vecs() if pro is not None else (None, None, None)
    return _KERNELS[spec.backend].conv_train(x, w, *pv, residual, list(cs.stride), list(cs.padding),
                                             list(cs.dilation), spec.channels_last, stats,
                                             out_dtype or spec.compute_dtype)


def _conv_bn(x, w, cs, spec, bns, pro=None, weight=None, bias=None) -> Tensor:
    """Conv with a statistics epilogue; appends the resulting BN state to ``bns``; returns y."""
    y, count, anchor, mean, m2 = _conv(x, w, cs, spec, pro, stats=True)
    bns.append(_stats(_KERNELS[spec.backend], spec.bns[len(bns)] if len(bns) < len(spec.bns) else spec.short_bn,
                      count, anchor, mean, m2, weight, bias))
    return y


def _bn_backward(kern: _Kernels, g: Tensor, y: Tensor, bn: _BN, r: Optional[Tensor] = None,
                 r_bn: Optional[_BN] = None, r_dtype: Optional[torch.dtype] = None):
    """``(dy, dr, (dgamma, dbeta), (r's dgamma, dbeta))`` of ``relu(bn(y) + R)`` given its output grad."""
    rv = r_bn.vecs() if r_bn is not None else (None, None, None)
    s_g, s_gy, s_gr = kern.bn_relu_bwd_reduce(g, y, *bn.vecs(), r, *rv)
    # gamma/beta gradients are this rank's sums, as nn.SyncBatchNorm gives them (DDP averages them)
    grads = (bn.invstd * s_gy, s_g)
    r_grads = (r_bn.invstd * s_gr, s_g) if r_bn is not None else (None, None)
    if bn.spec.group is not None:  # SyncBatchNorm: dx needs the sums over every rank's batch
        import torch.distributed as dist

        packed = torch.stack([s_g, s_gy, s_gr])
        dist.all_reduce(packed, group=bn.spec.group)
        s_g, s_gy, s_gr = packed.unbind(0)
    n = bn.count
    k2 = -bn.scale * bn.invstd * bn.invstd * s_gy / n
    k3 = -bn.scale * s_g / n
    rk2 = rk3 = None
    if r_bn is not None:
        rk2 = -r_bn.scale * r_bn.invstd * r_bn.invstd * s_gr / n
        rk3 = -r_bn.scale * s_g / n
    dy, dr = kern.bn_relu_bwd_apply(g, y, *bn.vecs(), k2, k3, r, *rv, rk2, rk3, r_dtype or y.dtype)
    return dy, (dr if r is not None else None), grads, r_grads


def _conv_backward(dy: Tensor, a: Tensor, w: Tensor, cs: ConvSpec, need_input: bool):
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dy.to(a.dtype), a, w, None, list(cs.stride), list(cs.padding), list(cs.dilation), False, [0, 0], 1,
        [need_input, True, False])
    return dx, dw


def _param_grad(g: Optional[Tensor], p: Optional[Tensor]) -> Optional[Tensor]:
    return None if g is None or p is None else g.to(p.dtype)


class BlockTrainFn(torch.autograd.Function):
    """``(out, count_1, mean_1, var_1, ..., [shortcut BN's])`` = fused training block.

    Inputs after ``spec``: x, the chain's conv weights, then (gamma, beta) per chain BN, then the
    shortcut's conv weight and (post-activation) its BN's (gamma, beta); None where absent.
    Statistics outputs are not differentiable.
    """

    @staticmethod
    def forward(ctx, spec: BlockSpec, x: Tensor, *params):
        k = len(spec.convs)
        ws_p = params[:k]
        gb = params[k:k + 2 * len(spec.bns)]
        rest = params[k + 2 * len(spec.bns):]
        cdt = spec.compute_dtype
        kern = _KERNELS[spec.backend]
        fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
        ws = [w.to(cdt).contiguous(memory_format=fmt) for w in ws_p]
        xc = x.to(cdt)
        bns: List[_BN] = []
        ys: List[Tensor] = []
        with torch.autocast(x.device.type, enabled=False):
            if spec.preact:
                cnt, anc, mu, m2 = kern.channel_stats(x)
                bns.append(_stats(kern, spec.bns[0], cnt, anc, mu, m2, gb[0], gb[1]))
                short = x
                if spec.short_conv is not None:
                    ws_s = rest[0].to(cdt).contiguous(memory_format=fmt)
                    short = _conv(xc, ws_s, spec.short_conv, spec, pro=bns[0])[0]
                    ws.append(ws_s)
                cur = xc
                for i in range(k - 1):
                    cur = _conv_bn(cur, ws[i], spec.convs[i], spec, bns, pro=bns[i], weight=gb[2 * i + 2],
                                   bias=gb[2 * i + 3])
                    ys.append(cur)
                out = _conv(cur, ws[k - 1], spec.convs[k - 1], spec, pro=bns[k - 1], residual=short,
                            out_dtype=torch.promote_types(cdt, short.dtype))[0]
            else:
                cur = xc
                for i in range(k):
                    cur = _conv_bn(cur, ws[i], spec.convs[i], spec, bns, pro=bns[i - 1] if i else None,
                                   weight=gb[2 * i], bias=gb[2 * i + 1])
                    ys.append(cur)
                r, r_bn = x, None
                if spec.short_conv is not None:
                    ws_s = rest[0].to(cdt).contiguous(memory_format=fmt)
                    ws.append(ws_s)
                    r = _conv_bn(xc, ws_s, spec.short_conv, spec, bns, weight=rest[1], bias=rest[2])
                    ys.append(r)
                    r_bn = bns[-1]
                rv = r_bn.vecs() if r_bn is not None else (None, None, None)
                out = kern.bn_relu_apply(ys[k - 1], *bns[k - 1].vecs(), r, *rv, cdt)
        ctx.spec = spec
        ctx.bns = bns
        ctx.x_dtype = x.dtype
        ctx.param_dtypes = [None if p is None else p.dtype for p in params]
        if spec.recompute_last and not spec.preact:
            ys[k - 1] = torch.empty(0, device=x.device)  # recomputed from y_{k-1} in the backward
        ctx.save_for_backward(x, *ys, *ws)
        stats = [t for bn in bns for t in (bn.count, bn.mean, bn.var)]
        ctx.mark_non_differentiable(*stats)
        return (out, *stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, *_):
        spec: BlockSpec = ctx.spec
        bns: List[_BN] = ctx.bns
        saved = ctx.saved_tensors
        k = len(spec.convs)
        x = saved[0]
        n_ys = (k - 1) if spec.preact else (k + (spec.short_conv is not None))
        ys = saved[1:1 + n_ys]
        ws = saved[1 + n_ys:]
        need_x = ctx.needs_input_grad[1]
        with torch.autocast(x.device.type, enabled=False):
            backward = _preact_backward if spec.preact else _postact_backward
            dx, dws, dbn, d_short = backward(spec, bns, x, ys, ws, g_out, need_x)
        grads = list(dws) + [g for pair in dbn for g in pair] + list(d_short)
        # each gradient in its parameter's dtype (fp32 masters under autocast), None for absent ones
        return (None, None if dx is None else dx.to(ctx.x_dtype)) + tuple(
            None if dt is None or g is None else g.to(dt) for g, dt in zip(grads, ctx.param_dtypes))


def _postact_backward(spec, bns, x, ys, ws, g_out, need_x):
    k = len(spec.convs)
    xc = x.to(spec.compute_dtype)
    has_short = spec.short_conv is not None
    if spec.recompute_last:
        # the same kernel variant (statistics epilogue included) as the forward: bit-identical y_k
        ys = list(ys)
        ys[k - 1] = _conv(ys[k - 2] if k > 1 else xc, ws[k - 1], spec.convs[k - 1], spec,
                          pro=bns[k - 2] if k > 1 else None, stats=True)[0]
    kern = _KERNELS[spec.backend]
    r, r_bn = (ys[k], bns[k]) if has_short else (x, None)
    dy, dr, gk, gr = _bn_backward(kern, g_out, ys[k - 1], bns[k - 1], r, r_bn, r_dtype=r.dtype)
    dws: List[Optional[Tensor]] = [None] * k
    dbn = [None] * k
    dbn[k - 1] = gk
    dx = None
    for i in range(k - 1, -1, -1):
        if i > 0:
            a = kern.bn_relu_apply(ys[i - 1], *bns[i - 1].vecs(), None, None, None, None, spec.compute_dtype)
            da, dws[i] = _conv_backward(dy, a, ws[i], spec.convs[i], True)
            del a
            dy, _, dbn[i - 1], _ = _bn_backward(kern, da, ys[i - 1], bns[i - 1])
        else:
            dx, dws[0] = _conv_backward(dy, xc, ws[0], spec.convs[0], need_x)
    if has_short:
        dxs, dws_s = _conv_backward(dr, xc, ws[k], spec.short_conv, need_x)
        if need_x:
            dx = dx + dxs
        d_short = (dws_s, *gr)
    else:
        if need_x:
            dx = dx + dr
        d_short = (None, None, None)
    return dx, dws, dbn, d_short


def _preact_backward(spec, bns, x, ys, ws, g_out, need_x):
    k = len(spec.convs)
    cdt = spec.compute_dtype
    kern = _KERNELS[spec.backend]
    dws: List[Optional[Tensor]] = [None] * k
    dbn = [None] * k
    srcs = [x] + list(ys)  # input of conv i is relu(bn_i(srcs[i]))
    dy = g_out
    dx = None
    d_short_w = None
    for i in range(k - 1, -1, -1):
        a = kern.bn_relu_apply(srcs[i], *bns[i].vecs(), None, None, None, None, cdt)
        da, dws[i] = _conv_backward(dy, a, ws[i], spec.convs[i], True)
        if i == 0 and spec.short_conv is not None:
            da_s, d_short_w = _conv_backward(g_out, a, ws[k], spec.short_conv, True)
            da = da + da_s
        del a
        dy, _, dbn[i], _ = _bn_backward(kern, da, srcs[i], bns[i])
    if need_x:
        dx = dy if spec.short_conv is not None else dy + g_out.to(dy.dtype)
    return dx, dws, dbn, (d_short_w,)
