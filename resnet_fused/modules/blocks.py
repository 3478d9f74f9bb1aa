"""Drop-in ``BasicBlock`` and ``Bottleneck``: torchvision's constructor, attributes and state_dict.

Same function as torchvision's blocks in train and eval mode (ResNet v1.5: stride on the 3x3).

- Training (Triton backend): one fused block (:mod:`resnet_fused.ops.block_train`): each conv's
  epilogue produces its BN's batch statistics, each BN + ReLU is applied while the next conv loads
  its input, and the tail is one BN (+ downsample BN) + add + ReLU pass; running statistics,
  ``momentum=None`` and ``num_batches_tracked`` are updated as ``nn.BatchNorm2d`` does. The
  ``"torch"`` backend (the default on CPU) runs the block module by module.
- Eval with foldable BatchNorms: fused convs: conv + BN + ReLU, and conv + BN + residual + ReLU for
  the last conv, with the downsample branch's conv + BN fused the same way.

Input: x [N, inplanes, H, W] (NCHW or channels_last); output [N, planes * expansion, H', W'] in x's
memory format, H' = ceil(H / stride).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from torch import Tensor, nn

from .. import _validate
from . import _base
from ._base import (FusedBlockMixin, all_foldable, bias_free_conv, conv_bn_pair, conv_out_hw, fx_tracing,
                    is_plain_conv, is_plain_relu, training_bn)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (torchvision's factory)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (torchvision's factory)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _TorchvisionBlock(FusedBlockMixin, nn.Module):
    """Shared forward logic of BasicBlock and Bottleneck (convs and norms listed by ``_pairs``)."""

    def _pairs(self) -> List[Tuple[str, nn.Conv2d, nn.Module]]:
        raise NotImplementedError

    def _norm_plan(self, h: int, w: int, pairs=None):
        """(name, norm, H, W) for each norm on x's path, and the block's output size."""
        plan = []
        out_h, out_w = h, w
        for name, conv, norm in (self._pairs() if pairs is None else pairs):
            out_h, out_w = conv_out_hw(conv, out_h, out_w)
            plan.append((name.replace("conv", "bn"), norm, out_h, out_w))  # the norm's own name: bn1, ...
        pair = conv_bn_pair(self.downsample)
        if pair is not None:
            plan.append(("downsample.1", pair[1], *conv_out_hw(pair[0], h, w)))
        return plan, (out_h, out_w)

    def _check(self, x: Tensor, pairs) -> None:
        owner = type(self).__name__
        _validate.check_input(owner, x, self.conv1.in_channels, self)
        # whatever the block's own mode: a BatchNorm left in training mode inside an eval block
        # (or the reverse) is checked by its own flag
        plan, _ = self._norm_plan(x.shape[2], x.shape[3], pairs)
        _validate.check_norm_batches(owner, x, plan)

    def _fusable(self, pairs) -> bool:
        if self.training or not all_foldable(*(n for _, _, n in pairs)):
            return False
        return all(is_plain_conv(c) for _, c, _ in pairs) and is_plain_relu(self.relu)

    def _train_fusable(self, pairs, x: Tensor) -> bool:
        """Training with batch statistics in every BN, plain bias-free convs: the fused training path
        (an empty batch runs eager: nothing to fuse, and BatchNorm's own empty-batch rules apply)."""
        if not self.training or x.shape[0] == 0 or not is_plain_relu(self.relu):
            return False
        if not all(training_bn(n) and bias_free_conv(c) for _, c, n in pairs):
            return False
        if self.downsample is None:
            return True
        pair = conv_bn_pair(self.downsample)
        return pair is not None and bias_free_conv(pair[0]) and training_bn(pair[1])

    def forward(self, x: Tensor) -> Tensor:
        if fx_tracing():  # symbolic tracing sees the module-by-module forward (shape checks can't trace)
            return self._forward_eager(x)
        pairs = self._pairs()
        self._check(x, pairs)
        if self._train_fusable(pairs, x):
            short = conv_bn_pair(self.downsample) or (None, None)
            return self._train(x, self._impl(x), [c for _, c, _ in pairs], [n for _, _, n in pairs], *short)
        if not self._fusable(pairs):
            return self._forward_eager(x)
        impl = self._impl(x)
        pair = conv_bn_pair(self.downsample)
        if self.downsample is None:
            identity = x
        elif pair is not None and all_foldable(pair[1]):
            identity = self._conv("downsample", impl, x, pair[0], pair[1], relu=False)
        else:
            identity = self.downsample(x)
        out = x
        for i, (name, conv, norm) in enumerate(pairs):
            last = i == len(pairs) - 1
            out = self._conv(name, impl, out, conv, norm, residual=identity if last else None, relu=True)
        return out


    def _train_fused(self, x: Tensor, backend: str) -> Tensor:
        """The fused training forward on ``backend`` ("triton" or "cuda")."""
        pairs = self._pairs()
        short = conv_bn_pair(self.downsample) or (None, None)
        return _base.run_block_train(x, False, [c for _, c, _ in pairs], [n for _, _, n in pairs], *short,
                                     backend=backend)


class BasicBlock(_TorchvisionBlock):
    """torchvision's BasicBlock (two 3x3 convs), fused in eval mode. Same constructor and state_dict."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_fused()

    def _pairs(self):
        return [("conv1", self.conv1, self.bn1), ("conv2", self.conv2, self.bn2)]

    def _forward_eager(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(_TorchvisionBlock):
    """torchvision's Bottleneck (1x1, 3x3 with the stride, 1x1 x4), fused in eval mode."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_fused()

    def _pairs(self):
        return [("conv1", self.conv1, self.bn1), ("conv2", self.conv2, self.bn2), ("conv3", self.conv3, self.bn3)]

    def _forward_eager(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out
