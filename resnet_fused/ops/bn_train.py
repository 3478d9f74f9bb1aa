"""Training-mode BatchNorm apply (+ residual, + the residual's own BatchNorm) + ReLU: forward and
the two-pass backward.

Forward, one pass (the block tail, or a normalised activation recomputed for a backward)::

    out = relu( (y - mean) * scale + shift  +  R )
    R   = 0 | r | (r - r_mean) * r_scale + r_shift          (RES = 0 | 1 | 2)

with ``scale = gamma * invstd`` and ``shift = beta`` from the batch statistics
(:mod:`resnet_fused.ops.batch_stats`). Centring on the mean first, as BatchNorm does, keeps the
result exact when ``|mean| >> std`` (``y * scale + (shift - mean * scale)`` would not).
RES = 2 is the dual "scale-bias-add-ReLU" of a block whose downsample branch has its own BN.

Backward, given ``g = dL/dout``, the ReLU mask is recomputed from the inputs (no mask or output is
stored) and the BatchNorm backward takes two passes:

1. reduce: per channel ``sum(gz)`` and ``sum(gz * (y - mean))`` (and the same for ``r``), where
   ``gz`` is 0 where ``z <= 0`` and g elsewhere (PyTorch's ReLU backward: a NaN z passes g).
   Per-tile partial rows, summed after (deterministic).
2. apply: ``dy = scale * gz + k2 * (y - mean) + k3`` with ``k2 = -scale * invstd^2 * sum(gz (y -
   mean)) / n`` and ``k3 = -scale * sum(gz) / n``; ``dr = gz`` (RES = 1) or the same formula for
   ``r`` (RES = 2). Then ``dgamma = invstd * sum(gz (y - mean))``, ``dbeta = sum(gz)``.

Tensors y, r, g, out share one dense layout: NCHW or channels_last. Statistics vectors are float32
[C]. Every kernel is registered as a ``torch.library`` custom op with a fake implementation, so
``torch.compile`` traces through the modules that use them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._common import device_guard, interpreting, memory_format_of
from .batch_stats import pixel_channel_tile

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None


# ------------------------------------------------------------------------------------ reference
def bn_train_reference(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
                       residual: Optional[Tensor] = None, upcast: bool = False) -> Tensor:
    """``relu(batch_norm(y, batch statistics) + residual)``, op by op (float64 with ``upcast``)."""
    import torch.nn.functional as F

    if upcast:
        y = y.double()
        weight = None if weight is None else weight.double()
        bias = None if bias is None else bias.double()
        residual = None if residual is None else residual.double()
    out = F.batch_norm(y, None, None, weight, bias, True, 0.0, eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out)


# --------------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _preact(y_ptr, mean_ptr, scale_ptr, shift_ptr, r_ptr, rmean_ptr, rscale_ptr, rshift_ptr,
                off, ok, rc, c_ok, RES: tl.constexpr):
        """(y - mean) [rows, BLOCK_C], r or (r - r_mean), and z (the value the ReLU sees), fp32."""
        mu = tl.load(mean_ptr + rc, mask=c_ok, other=0.0)
        s = tl.load(scale_ptr + rc, mask=c_ok, other=0.0)
        h = tl.load(shift_ptr + rc, mask=c_ok, other=0.0)
        yc = tl.where(ok, tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32) - mu[None, :], 0.0)
        z = yc * s[None, :] + h[None, :]
        rc_ = yc  # unused unless RES
        if RES == 1:
            rc_ = tl.load(r_ptr + off, mask=ok, other=0.0).to(tl.float32)
            z += rc_
        if RES == 2:
            rmu = tl.load(rmean_ptr + rc, mask=c_ok, other=0.0)
            rs = tl.load(rscale_ptr + rc, mask=c_ok, other=0.0)
            rh = tl.load(rshift_ptr + rc, mask=c_ok, other=0.0)
            rc_ = tl.where(ok, tl.load(r_ptr + off, mask=ok, other=0.0).to(tl.float32) - rmu[None, :], 0.0)
            z += rc_ * rs[None, :] + rh[None, :]
        return yc, rc_, z

    @triton.jit
    def _relu_grad(g_ptr, off, ok, z):
        """The gradient at z of relu's output, as PyTorch's threshold_backward: zero where z <= 0,
        so a NaN z passes its gradient."""
        g = tl.load(g_ptr + off, mask=ok, other=0.0).to(tl.float32)
        return tl.where(z <= 0.0, 0.0, g)

    @triton.jit
    def _apply_kernel(y_ptr, mean_ptr, scale_ptr, shift_ptr, r_ptr, rmean_ptr, rscale_ptr, rshift_ptr, out_ptr,
                      P, C, HW,
                      RES: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        rc, c_ok, ok, off = pixel_channel_tile(P, C, HW, CHANNELS_LAST, BLOCK_P, BLOCK_C)
        _, _, z = _preact(y_ptr, mean_ptr, scale_ptr, shift_ptr, r_ptr, rmean_ptr, rscale_ptr, rshift_ptr,
                          off, ok, rc, c_ok, RES)
        z = tl.where(z < 0.0, 0.0, z)  # keeps NaN, as torch.relu does
        tl.store(out_ptr + off, z.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _bwd_reduce_kernel(g_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, r_ptr, rmean_ptr, rscale_ptr, rshift_ptr,
                           sum_g_ptr, sum_gy_ptr, sum_gr_ptr,
                           P, C, HW,
                           RES: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        rc, c_ok, ok, off = pixel_channel_tile(P, C, HW, CHANNELS_LAST, BLOCK_P, BLOCK_C)
        yc, rc_, z = _preact(y_ptr, mean_ptr, scale_ptr, shift_ptr, r_ptr, rmean_ptr, rscale_ptr, rshift_ptr,
                             off, ok, rc, c_ok, RES)
        gz = _relu_grad(g_ptr, off, ok, z)
        row = tl.program_id(0).to(tl.int64) * C + rc
        tl.store(sum_g_ptr + row, tl.sum(gz, axis=0), mask=c_ok)
        tl.store(sum_gy_ptr + row, tl.sum(gz * yc, axis=0), mask=c_ok)
        if RES == 2:
            tl.store(sum_gr_ptr + row, tl.sum(gz * rc_, axis=0), mask=c_ok)

    @triton.jit
    def _bwd_apply_kernel(g_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, r_ptr, rmean_ptr, rscale_ptr, rshift_ptr,
                          k2_ptr, k3_ptr, rk2_ptr, rk3_ptr, dy_ptr, dr_ptr,
                          P, C, HW,
                          RES: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        rc, c_ok, ok, off = pixel_channel_tile(P, C, HW, CHANNELS_LAST, BLOCK_P, BLOCK_C)
        yc, rc_, z = _preact(y_ptr, mean_ptr, scale_ptr, shift_ptr, r_ptr, rmean_ptr, rscale_ptr, rshift_ptr,
                             off, ok, rc, c_ok, RES)
        gz = _relu_grad(g_ptr, off, ok, z)
        s = tl.load(scale_ptr + rc, mask=c_ok, other=0.0)
        k2 = tl.load(k2_ptr + rc, mask=c_ok, other=0.0)
        k3 = tl.load(k3_ptr + rc, mask=c_ok, other=0.0)
        dy = gz * s[None, :] + yc * k2[None, :] + k3[None, :]
        tl.store(dy_ptr + off, dy.to(dy_ptr.dtype.element_ty), mask=ok)
        if RES == 1:
            tl.store(dr_ptr + off, gz.to(dr_ptr.dtype.element_ty), mask=ok)
        if RES == 2:
            rs = tl.load(rscale_ptr + rc, mask=c_ok, other=0.0)
            rk2 = tl.load(rk2_ptr + rc, mask=c_ok, other=0.0)
            rk3 = tl.load(rk3_ptr + rc, mask=c_ok, other=0.0)
            dr = gz * rs[None, :] + rc_ * rk2[None, :] + rk3[None, :]
            tl.store(dr_ptr + off, dr.to(dr_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------- launchers
def _geometry(y: Tensor):
    """(P pixels, C, HW, channels_last, grid, BLOCK_P, BLOCK_C) for a dense y."""
    N, C, H, W = y.shape
    cl = memory_format_of(y) == torch.channels_last
    if interpreting(y):
        bp, bc = 128, 32
    elif cl:  # channels contiguous: wide channel blocks give 16-byte accesses
        bc = min(64, triton.next_power_of_2(max(C, 1)))
        bp = max(16, 4096 // bc)
    else:  # pixels contiguous
        bp, bc = 512, 8
    P = N * H * W
    return P, C, H * W, cl, (triton.cdiv(P, bp), triton.cdiv(C, bc)), bp, bc


def _dense(t: Optional[Tensor], fmt: torch.memory_format) -> Optional[Tensor]:
    return None if t is None else t.contiguous(memory_format=fmt)


def _res_args(r, r_bn, like):
    """Kernel arguments and RES mode for no residual / identity residual / residual with a BN."""
    if r is None:
        return (like, like, like, like), 0
    if r_bn is None:
        return (r, like, like, like), 1
    return (r, *r_bn), 2


@torch.library.custom_op("resnet_fused::bn_relu_apply", mutates_args=())
def bn_relu_apply(y: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, r: Optional[Tensor],
                  r_mean: Optional[Tensor], r_scale: Optional[Tensor], r_shift: Optional[Tensor],
                  out_dtype: torch.dtype) -> Tensor:
    """``relu((y - mean) * scale + shift + R)`` (see module docstring); y [N, C, H, W] dense,
    NCHW or channels_last; r like y; vectors float32 [C]. Output in y's layout, ``out_dtype``."""
    fmt = memory_format_of(y)
    y, r = _dense(y, fmt), _dense(r, fmt)
    out = torch.empty(y.shape, dtype=out_dtype, device=y.device, memory_format=fmt)
    P, C, HW, cl, grid, bp, bc = _geometry(y)
    if P and C:
        rargs, res = _res_args(r, None if r_mean is None else (r_mean, r_scale, r_shift), mean)
        with device_guard(y):
            _apply_kernel[grid](y, mean, scale, shift, *rargs, out, P, C, HW,
                                RES=res, CHANNELS_LAST=cl, BLOCK_P=bp, BLOCK_C=bc)
    return out


@bn_relu_apply.register_fake
def _(y, mean, scale, shift, r, r_mean, r_scale, r_shift, out_dtype):
    return torch.empty(y.shape, dtype=out_dtype, device=y.device, memory_format=memory_format_of(y))


@torch.library.custom_op("resnet_fused::bn_relu_bwd_reduce", mutates_args=())
def bn_relu_bwd_reduce(g: Tensor, y: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, r: Optional[Tensor],
                       r_mean: Optional[Tensor], r_scale: Optional[Tensor],
                       r_shift: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Pass 1 of the backward: ``(sum(gz), sum(gz (y - mean)), sum(gz (r - r_mean)))`` per
    channel, float32 [C] (the last is zeros unless r has a BN)."""
    fmt = memory_format_of(y)
    y, g, r = _dense(y, fmt), _dense(g, fmt), _dense(r, fmt)
    P, C, HW, cl, grid, bp, bc = _geometry(y)
    parts = torch.zeros((3, max(grid[0], 1), C), dtype=torch.float32, device=y.device)
    if P and C:
        rargs, res = _res_args(r, None if r_mean is None else (r_mean, r_scale, r_shift), mean)
        with device_guard(y):
            _bwd_reduce_kernel[grid](g, y, mean, scale, shift, *rargs, parts[0], parts[1], parts[2], P, C, HW,
                                     RES=res, CHANNELS_LAST=cl, BLOCK_P=bp, BLOCK_C=bc)
    return parts[0].sum(dim=0), parts[1].sum(dim=0), parts[2].sum(dim=0)  # three tensors: outputs may not alias


@bn_relu_bwd_reduce.register_fake
def _(g, y, mean, scale, shift, r, r_mean, r_scale, r_shift):
    C = y.shape[1]
    return tuple(y.new_empty((C,), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("resnet_fused::bn_relu_bwd_apply", mutates_args=())
def bn_relu_bwd_apply(g: Tensor, y: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, k2: Tensor, k3: Tensor,
                      r: Optional[Tensor], r_mean: Optional[Tensor], r_scale: Optional[Tensor],
                      r_shift: Optional[Tensor], r_k2: Optional[Tensor], r_k3: Optional[Tensor],
                      r_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Pass 2 of the backward: ``(dy, dr)`` in y's layout; dy in y's dtype, dr in ``r_dtype``
    (an empty tensor without a residual)."""
    fmt = memory_format_of(y)
    y, g, r = _dense(y, fmt), _dense(g, fmt), _dense(r, fmt)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=fmt)
    dr = (torch.empty(y.shape, dtype=r_dtype, device=y.device, memory_format=fmt) if r is not None
          else y.new_empty((0,)))
    P, C, HW, cl, grid, bp, bc = _geometry(y)
    if P and C:
        rargs, res = _res_args(r, None if r_mean is None else (r_mean, r_scale, r_shift), mean)
        rk2, rk3 = (r_k2, r_k3) if res == 2 else (k2, k3)
        with device_guard(y):
            _bwd_apply_kernel[grid](g, y, mean, scale, shift, *rargs, k2, k3, rk2, rk3, dy,
                                    dr if r is not None else dy, P, C, HW,
                                    RES=res, CHANNELS_LAST=cl, BLOCK_P=bp, BLOCK_C=bc)
    return dy, dr


@bn_relu_bwd_apply.register_fake
def _(g, y, mean, scale, shift, k2, k3, r, r_mean, r_scale, r_shift, r_k2, r_k3, r_dtype):
    fmt = memory_format_of(y)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=fmt)
    dr = (torch.empty(y.shape, dtype=r_dtype, device=y.device, memory_format=fmt) if r is not None
          else y.new_empty((0,)))
    return dy, dr
