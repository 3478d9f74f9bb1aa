"""The training conv: conv (+ batch-BN + ReLU applied to its input as it loads) (+ residual), whose
epilogue also produces the BatchNorm statistics of its own output.

    y = conv2d(a, weight) [+ residual],   a = x  or  relu((x - in_mean[c]) * in_scale[c] + in_shift[c])
    stats: per-channel count, mean and M2 of y, merged robustly (:mod:`resnet_fused.ops.batch_stats`)

This is the "stats-apply -> ReLU -> conv -> stats-gen" chain of fused ResNet training: the
normalised activation ``a`` of the previous layer is never written to memory, and this layer's
statistics come out of the conv's registers instead of a second read of ``y``. One implicit-GEMM
kernel (:mod:`resnet_fused.ops.conv_bias_act`) does it; this file is its training entry point,
registered as the custom op ``resnet_fused::conv_train`` so ``torch.compile`` traces it.

Shapes and layouts
    x        [N, Cin, H, W]       float32 / float16 / bfloat16, any strides
    weight   [Cout, Cin, KH, KW]  x's dtype (groups = 1)
    in_*     [Cin] float32 or None (all three, or none)
    residual [N, Cout, OH, OW] or None
    y        [N, Cout, OH, OW]    ``out_dtype``, channels_last if ``channels_last`` else NCHW
Statistics are those of y as stored (rounded to ``out_dtype``), as BatchNorm would see them.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import conv_output_size
from .batch_stats import merge_partials


def conv_train_reference(x: Tensor, weight: Tensor, in_mean: Optional[Tensor] = None,
                         in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None,
                         residual: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                         upcast: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, biased var)`` op by op (float64 with ``upcast``)."""
    if upcast:
        x, weight = x.double(), weight.double()
        residual = None if residual is None else residual.double()
    a = x
    if in_scale is not None:
        view = (1, -1, 1, 1)
        a = torch.relu((x - in_mean.to(x.dtype).view(view)) * in_scale.to(x.dtype).view(view)
                       + in_shift.to(x.dtype).view(view))
    y = F.conv2d(a, weight, None, stride, padding, dilation)
    if residual is not None:
        y = y + residual
    return y, y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)


def _out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> List[int]:
    return [x.shape[0], weight.shape[0],
            conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0]),
            conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])]


@torch.library.custom_op("resnet_fused::conv_train", mutates_args=())
def conv_train(x: Tensor, weight: Tensor, in_mean: Optional[Tensor], in_scale: Optional[Tensor],
               in_shift: Optional[Tensor], residual: Optional[Tensor], stride: List[int], padding: List[int],
               dilation: List[int], channels_last: bool, stats: bool,
               out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, count [1], anchor [Cout], mean offset [Cout], m2 [Cout])``; the last four are empty
    unless ``stats``. Merge them with :func:`resnet_fused.ops.batch_stats.finalize` (or across
    ranks with ``sync_across_ranks``). No argument checks: the modules validate first."""
    from .conv_bias_act import _launch  # the kernel file imports batch_stats; keep imports one-way

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    prologue = None if in_scale is None else (in_mean.float().contiguous(), in_scale.float().contiguous(),
                                              in_shift.float().contiguous())
    res = _launch(x, weight, None, residual, tuple(stride), tuple(padding), tuple(dilation), False,
                  out_dtype, fmt, prologue=prologue, stats=stats)
    if not stats:
        e = x.new_empty((0,), dtype=torch.float32)
        return res, e, e.clone(), e.clone(), e.clone()
    y, parts = res
    merged = merge_partials(parts)
    return y, merged.count, merged.anchor[0], merged.mean[0], merged.m2[0]


@conv_train.register_fake
def _(x, weight, in_mean, in_scale, in_shift, residual, stride, padding, dilation, channels_last, stats, out_dtype):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty(_out_shape(x, weight, stride, padding, dilation), dtype=out_dtype, device=x.device,
                    memory_format=fmt)
    c = weight.shape[0] if stats else 0
    vec = [x.new_empty((c,), dtype=torch.float32) for _ in range(3)]
    return y, x.new_empty((1 if stats else 0,), dtype=torch.float32), *vec
