"""Conv + eval BatchNorm (+ residual) (+ ReLU), given the BatchNorm's tensors: folds, then fuses.

A convenience layer over :func:`resnet_fused.ops.conv_bias_act`: ``bn(conv(x))`` with running
statistics is ``conv(x, w * scale) + shift``, so the whole thing is one fused conv. Use it when
you hold the raw tensors; the modules use a cached fold instead (:class:`~resnet_fused.ops.fold.FoldCache`).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .conv_bias_act import IntPair, conv_bias_act
from .fold import fold_conv_bn


def conv_bn_act(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                running_mean: Tensor, running_var: Tensor, eps: float = 1e-5,
                residual: Optional[Tensor] = None, *, stride: IntPair = 1, padding: IntPair = 0,
                dilation: IntPair = 1, groups: int = 1, relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """``relu?(batch_norm_eval(conv2d(x, weight)) + residual)`` as one fused conv.

    x: [N, Cin, H, W]; weight: [Cout, Cin/groups, KH, KW]; bn_weight, bn_bias, running_mean,
    running_var: [Cout]; residual: [N, Cout, OH, OW] or None. Output in x's memory format.
    Differentiable with respect to x, weight, bn_weight, bn_bias and residual.
    """
    w, b = _fold(weight, bn_weight, bn_bias, running_mean, running_var, eps)
    return conv_bias_act(x, w, b, residual, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, relu=relu, backend=backend)


def conv_bn_act_reference(x, weight, bn_weight, bn_bias, running_mean, running_var, eps=1e-5, residual=None,
                          stride=1, padding=0, dilation=1, groups=1, relu=True, upcast=False):
    """Unfused conv, then eval BatchNorm, add, ReLU (float64 with ``upcast``)."""
    import torch.nn.functional as F

    if upcast:
        x, weight = x.double(), weight.double()
        bn_weight = None if bn_weight is None else bn_weight.double()
        bn_bias = None if bn_bias is None else bn_bias.double()
        running_mean, running_var = running_mean.double(), running_var.double()
        residual = None if residual is None else residual.double()
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
    return _tail(y, residual, relu)


def _tail(y, residual, relu):
    import torch

    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _fold(weight, bn_weight, bn_bias, running_mean, running_var, eps):
    import torch

    dt = torch.float64 if running_var.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(running_var.to(dt) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(dt)
    shift = -running_mean.to(dt) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(dt)
    return fold_conv_bn(weight, scale, shift)
