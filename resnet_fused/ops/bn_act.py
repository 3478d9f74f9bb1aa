"""Fused per-channel affine (eval BatchNorm) + optional residual add + optional ReLU.

    out = relu?( x * scale[c] + shift[c] + residual )

The memory-bound half of an inference block wherever a BatchNorm cannot be folded into a
neighbouring conv: the pre-activation ``BN -> ReLU`` of Wide ResNet / pre-act blocks, and
``BN + add + ReLU`` block tails. One read of each input, one write, computed in fp32.

Shapes and layouts
    x         [N, C, H, W]  float32 / float16 / bfloat16, NCHW or channels_last
    scale     [C]           float (usually float32, from :func:`resnet_fused.ops.fold.bn_scale_shift`)
    shift     [C]           float
    residual  [N, C, H, W] or None
    out       [N, C, H, W]  x's dtype promoted with residual's, in x's memory format
NaN and Inf propagate as ``torch.relu`` propagates them. float64 runs on the PyTorch path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ._common import check_float_tensor, device_guard, memory_format_of, triton_dtype_ok

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None


# ------------------------------------------------------------------------------------ reference
def bn_act_reference(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None,
                     relu: bool = True, upcast: bool = False) -> Tensor:
    """Plain PyTorch. ``upcast=True`` computes (and returns) in float64."""
    if upcast:
        x, scale, shift = x.double(), scale.double(), shift.double()
        residual = None if residual is None else residual.double()
    y = x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


# ---------------------------------------------------------------------------------- Triton kernel
if triton is not None:

    @triton.jit
    def _bn_act_kernel(x_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
                       numel, C, HW,
                       HAS_RES: tl.constexpr, RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                       BLOCK: tl.constexpr):
        # x, residual and out share one dense layout, so a flat index addresses all three.
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = off < numel
        if CHANNELS_LAST:
            c = off % C
        else:
            c = (off // HW) % C
        y = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
        y = y * tl.load(scale_ptr + c, mask=ok, other=0.0).to(tl.float32) + tl.load(shift_ptr + c, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            y += tl.load(res_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, unlike maximum
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], relu: bool,
            out_dtype: torch.dtype) -> Tensor:
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device, memory_format=fmt)
    numel = x.numel()
    if numel == 0:
        return out
    N, C, H, W = x.shape
    block = 1024 if x.device.type == "cuda" else 256
    grid = (triton.cdiv(numel, block),)
    with device_guard(x):
        _bn_act_kernel[grid](x, scale.contiguous(), shift.contiguous(), residual if residual is not None else x, out,
                             numel, C, H * W,
                             HAS_RES=residual is not None, RELU=relu, CHANNELS_LAST=fmt == torch.channels_last,
                             BLOCK=block, num_warps=4)
    return out


class _BnActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, shift, residual, relu, out_dtype):
        out = _launch(x, scale, shift, residual, relu, out_dtype)
        ctx.relu, ctx.has_res = relu, residual is not None
        ctx.dtypes = (x.dtype, scale.dtype, shift.dtype, None if residual is None else residual.dtype)
        ctx.save_for_backward(x, scale, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, out = ctx.saved_tensors
        g = grad_out.float()
        if ctx.relu:
            g = torch.where(out <= 0, torch.zeros((), dtype=g.dtype, device=g.device), g)  # as threshold_backward: NaN passes
        return _affine_grads(ctx, g, x, scale) + (None, None)


def _affine_grads(ctx, g: Tensor, x: Tensor, scale: Tensor):
    """Gradients of x, scale, shift, residual given g = dL/d(pre-ReLU sum) in float32."""
    xdt, sdt, hdt, rdt = ctx.dtypes
    need_x, need_s, need_h, need_r = ctx.needs_input_grad[:4]
    grad_x = (g * scale.float().view(1, -1, 1, 1)).to(xdt) if need_x else None
    grad_s = (g * x.float()).sum(dim=(0, 2, 3)).to(sdt) if need_s else None
    grad_h = g.sum(dim=(0, 2, 3)).to(hdt) if need_h else None
    grad_r = g.to(rdt) if (need_r and ctx.has_res) else None
    return grad_x, grad_s, grad_h, grad_r


class _ExtBnActFn(torch.autograd.Function):
    """The compiled library's kernel (C++ on CPU, CUDA on GPU). For the backward it keeps a 1-bit
    ReLU mask written by the forward pass instead of the output: 1/8 of a byte per element."""

    @staticmethod
    def forward(ctx, x, scale, shift, residual, relu, out_dtype):
        from .. import _ext

        want_mask = relu and any(ctx.needs_input_grad[:4])  # a backward will follow
        out, mask = _ext.extension().bn_act(x, None, scale.float(), shift.float(), residual, None, None, None,
                                            relu, out_dtype, want_mask)
        ctx.relu, ctx.has_res = relu, residual is not None
        ctx.channels_last = memory_format_of(out) == torch.channels_last
        ctx.dtypes = (x.dtype, scale.dtype, shift.dtype, None if residual is None else residual.dtype)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, scale, mask if want_mask else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .. import _ext

        x, scale, mask = ctx.saved_tensors
        g = grad_out
        if ctx.relu:
            g = _ext.extension().relu_mask_backward(g, mask, ctx.channels_last)
        return _affine_grads(ctx, g.float(), x, scale) + (None, None)


# --------------------------------------------------------------------------------- functional API
def bn_act(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None, *, relu: bool = True,
           backend: Optional[str] = None) -> Tensor:
    """``relu?(x * scale[c] + shift[c] + residual)`` in one pass (see module docstring).

    Args:
        x: [N, C, H, W] float tensor, NCHW or channels_last.
        scale, shift: [C] per-channel affine, e.g. an eval BatchNorm's folded statistics.
        residual: [N, C, H, W] or None.
        relu: apply ReLU last.
        backend: ``"auto"``/``"triton"``/``"cuda"``/``"torch"``, or None for the current one.
    Returns:
        [N, C, H, W] in x's memory format.
    """
    check_float_tensor("x", x, dims=4)
    C = x.shape[1]
    for name, t in (("scale", scale), ("shift", shift)):
        check_float_tensor(name, t, dims=1, device=x.device)
        if t.shape[0] != C:
            raise ValueError(f"{name}: expected shape [{C}] (x's channels), got {list(t.shape)}")
    if residual is not None:
        check_float_tensor("residual", residual, dims=4, device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected shape {list(x.shape)} (x's), got {list(residual.shape)}")
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    impl = backends.resolve(backend, x, fusable=triton_dtype_ok(x.dtype) and triton_dtype_ok(out_dtype))
    if impl == "auto":  # measured per case (resnet_fused.dispatch)
        from ..dispatch.sites import bn_act_site

        return bn_act_site(x, scale, shift, residual, relu,
                           torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                           for t in (x, scale, shift, residual)),
                           site="ops.bn_act")
    return _run(x, scale, shift, residual, relu, backend=impl)


def _run(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], relu: bool, *,
         backend: str) -> Tensor:
    """The op without argument checks, for callers that already validated (the modules).

    ``backend`` is a resolved backend ("triton", "cuda" or "torch"); float64 runs on the PyTorch path.
    """
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if backend == "triton" and triton_dtype_ok(x.dtype) and triton_dtype_ok(out_dtype):
        return _BnActFn.apply(x, scale, shift, residual, relu, out_dtype)
    if backend == "cuda" and triton_dtype_ok(x.dtype) and triton_dtype_ok(out_dtype):
        return _ExtBnActFn.apply(x, scale, shift, residual, relu, out_dtype)
    y = torch.addcmul(shift.to(x.dtype).view(1, -1, 1, 1), x, scale.to(x.dtype).view(1, -1, 1, 1))
    if residual is not None:
        y = y.add_(residual) if residual.dtype == y.dtype else y + residual
    return y.relu_() if relu else y
