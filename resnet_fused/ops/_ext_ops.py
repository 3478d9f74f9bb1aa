"""The compiled library's ops (``torch.ops.resnet_fused_C``, built from ``csrc/``) as the rest of
the package uses them: fake implementations for ``torch.compile``, and the training kernels of the
``"cuda"`` backend behind the same signatures as the Triton ones (:mod:`.bn_train`,
:mod:`.batch_stats`, :mod:`.conv_bn_train`), so :class:`~.block_train.BlockTrainFn` runs either.

Ops (all take/return dense NCHW or channels_last [N, C, H, W] activations and float32 [C] vectors)::

    bn_act(y, mean?, scale, shift, r?, r_mean?, r_scale?, r_shift?, relu, out_dtype, want_mask)
        -> (out, mask)            out = relu?((y - mean) * scale + shift + R); mask: packed ReLU bits
    relu_mask_backward(g, mask, channels_last) -> dx
    bn_act_bwd_reduce(g, y, mean, scale, shift, r?, r_mean?, r_scale?, r_shift?) -> 3 x [C]
    bn_act_bwd_apply(g, y, mean, scale, shift, k2, k3, r?, ..., r_k2?, r_k3?, r_dtype) -> (dy, dr)
    channel_stats(x) -> (count [1], anchor, mean offset, m2)
    bn_finalize(count, anchor, mean_off, m2, weight?, bias?, eps) -> (mean, var, scale, shift, invstd)
    conv_bias_act(x, w, bias?, r?, stride, padding, dilation, relu, allow_tf32) -> y (x's layout)
    conv_bias_act_stats(same) -> (y, count, anchor, mean offset, m2)   + y's channel statistics

On the CPU the convolution itself is PyTorch's (oneDNN) and the memory-bound work is ours; on CUDA
a CUTLASS kernel with our epilogue runs the conv where a configuration fits.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._common import conv_uses_tf32, memory_format_of

_fakes_registered = False


def ops():
    return torch.ops.resnet_fused_C


def _like(y: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty(y.shape, dtype=dtype, device=y.device, memory_format=memory_format_of(y))


def _conv_out_shape(x: Tensor, w: Tensor, stride, padding, dilation) -> List[int]:
    def size(i, k, s, p, d):
        return (i + 2 * p - d * (k - 1) - 1) // s + 1

    return [x.shape[0], w.shape[0], size(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0]),
            size(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])]


def register_fakes() -> None:
    """Fake (meta) implementations of every op, once per process (after the library loads)."""
    global _fakes_registered
    if _fakes_registered:
        return
    reg = torch.library.register_fake

    @reg("resnet_fused_C::bn_act")
    def _(y, mean, scale, shift, r, r_mean, r_scale, r_shift, relu, out_dtype, want_mask):
        n = (y.numel() + 7) // 8 if (relu and want_mask) else 0
        return _like(y, out_dtype), y.new_empty((n,), dtype=torch.uint8)

    @reg("resnet_fused_C::relu_mask_backward")
    def _(g, mask, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(g.shape, dtype=g.dtype, device=g.device, memory_format=fmt)

    @reg("resnet_fused_C::bn_act_bwd_reduce")
    def _(g, y, mean, scale, shift, r, r_mean, r_scale, r_shift):
        return tuple(y.new_empty((y.shape[1],), dtype=torch.float32) for _ in range(3))

    @reg("resnet_fused_C::bn_act_bwd_apply")
    def _(g, y, mean, scale, shift, k2, k3, r, r_mean, r_scale, r_shift, r_k2, r_k3, r_dtype):
        return _like(y, y.dtype), (_like(y, r_dtype) if r is not None else y.new_empty((0,)))

    @reg("resnet_fused_C::channel_stats")
    def _(x):
        C = x.shape[1]
        return (x.new_empty((1,), dtype=torch.float32), *(x.new_empty((C,), dtype=torch.float32) for _ in range(3)))

    @reg("resnet_fused_C::bn_finalize")
    def _(count, anchor, mean_off, m2, weight, bias, eps):
        return tuple(torch.empty_like(anchor, dtype=torch.float32) for _ in range(5))

    @reg("resnet_fused_C::conv_bias_act")
    def _(x, w, bias, r, stride, padding, dilation, relu, allow_tf32):
        return torch.empty(_conv_out_shape(x, w, stride, padding, dilation), dtype=x.dtype, device=x.device,
                           memory_format=memory_format_of(x))

    @reg("resnet_fused_C::conv_bias_act_stats")
    def _(x, w, bias, r, stride, padding, dilation, relu, allow_tf32):
        y = torch.empty(_conv_out_shape(x, w, stride, padding, dilation), dtype=x.dtype, device=x.device,
                        memory_format=memory_format_of(x))
        K = w.shape[0]
        return (y, x.new_empty((1,), dtype=torch.float32), *(x.new_empty((K,), dtype=torch.float32) for _ in range(3)))

    _fakes_registered = True


# ----------------------------------------------------------- the training kernels, Triton's signatures
def bn_relu_apply(y: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, r: Optional[Tensor],
                  r_mean: Optional[Tensor], r_scale: Optional[Tensor], r_shift: Optional[Tensor],
                  out_dtype: torch.dtype) -> Tensor:
    return ops().bn_act(y, mean, scale, shift, r, r_mean, r_scale, r_shift, True, out_dtype, False)[0]


def bn_relu_bwd_reduce(g, y, mean, scale, shift, r, r_mean, r_scale, r_shift) -> Tuple[Tensor, Tensor, Tensor]:
    return ops().bn_act_bwd_reduce(g, y, mean, scale, shift, r, r_mean, r_scale, r_shift)


def bn_relu_bwd_apply(g, y, mean, scale, shift, k2, k3, r, r_mean, r_scale, r_shift, r_k2, r_k3,
                      r_dtype) -> Tuple[Tensor, Tensor]:
    return ops().bn_act_bwd_apply(g, y, mean, scale, shift, k2, k3, r, r_mean, r_scale, r_shift, r_k2, r_k3,
                                  r_dtype)


def channel_stats(x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return ops().channel_stats(x)


def bn_finalize(count, anchor, mean_off, m2, weight, bias, eps) -> Tuple[Tensor, ...]:
    return ops().bn_finalize(count, anchor, mean_off, m2, weight, bias, eps)


def conv_train(x: Tensor, weight: Tensor, in_mean: Optional[Tensor], in_scale: Optional[Tensor],
               in_shift: Optional[Tensor], residual: Optional[Tensor], stride: List[int], padding: List[int],
               dilation: List[int], channels_last: bool, stats: bool,
               out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`resnet_fused.ops.conv_bn_train.conv_train` on the compiled library: the input's
    BN + ReLU as one pass, then the conv with the residual in its epilogue and the statistics of
    its output (CUTLASS writes them per tile as it stores y; the fallback conv takes one more pass)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if in_scale is not None:
        x = ops().bn_act(x.contiguous(memory_format=fmt), in_mean, in_scale, in_shift, None, None, None, None,
                         True, x.dtype, False)[0]
    else:
        x = x.contiguous(memory_format=fmt)
    fused_res = residual if (residual is not None and residual.dtype == x.dtype == out_dtype) else None
    tf32 = x.is_cuda and conv_uses_tf32()
    args = (x, weight, None, fused_res, stride, padding, dilation, False, tf32)
    if stats and x.dtype == out_dtype and (residual is None or fused_res is not None):
        # the statistics come with the conv (from CUTLASS's own tiles where it runs)
        y, *st = ops().conv_bias_act_stats(*args)
        return (y.contiguous(memory_format=fmt), *st)
    y = ops().conv_bias_act(*args)
    if residual is not None and fused_res is None:  # mixed dtypes (autocast): add in the result dtype
        y = y.to(out_dtype) + residual.to(out_dtype)
    elif y.dtype != out_dtype:
        y = y.to(out_dtype)
    y = y.contiguous(memory_format=fmt)
    if not stats:
        e = x.new_empty((0,), dtype=torch.float32)
        return y, e, e.clone(), e.clone(), e.clone()
    return (y, *channel_stats(y))
