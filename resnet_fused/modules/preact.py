"""Pre-activation blocks: ``WideBasic`` (Wide ResNet) and ``PreActBottleneck`` (ResNet-164/1001).

Pre-activation order (He et al. 2016, Zagoruyko & Komodakis 2016): BN -> ReLU -> conv, and the
residual is added after the last conv with no activation. When the shape changes, the shortcut is
a 1x1 (strided) conv applied to the *pre-activated* input; otherwise it is the raw input.

Training, fused (Triton backend; :mod:`resnet_fused.ops.block_train`): batch statistics of x in one
pass, then each conv applies its BN + ReLU while loading and produces the next BN's statistics in
its epilogue; the last conv adds the shortcut. Active dropout (WideBasic, p > 0) runs eager.

Eval mode, fused: the first BN + ReLU is one elementwise pass (:func:`~resnet_fused.ops.bn_act`);
every later BN is folded into the conv before it (BN2 into conv1, ...), with its ReLU in that conv's
epilogue; the last conv adds the shortcut in its epilogue. Dropout is the identity in eval.

Input x [N, C_in, H, W]; output [N, C_out, H', W'] in x's memory format.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate
from . import _base
from ._base import (FusedBlockMixin, all_foldable, bias_free_conv, conv_out_hw, fx_tracing, is_plain_conv,
                    training_bn)
from .blocks import conv1x1, conv3x3


class _PreActBlock(FusedBlockMixin, nn.Module):
    """Shared logic. Subclasses define ``_chain`` (bn_i, conv_i) in order and ``_shortcut_conv``."""

    def _chain(self) -> List[Tuple[str, nn.Module, nn.Conv2d]]:
        raise NotImplementedError

    def _shortcut_module(self) -> Optional[nn.Module]:
        raise NotImplementedError

    def _dropout_between(self, i: int, out: Tensor) -> Tensor:
        return out

    def _has_dropout(self) -> bool:
        return False

    def _norm_plan(self, h: int, w: int):
        plan, cur = [], (h, w)
        for name, norm, conv in self._chain():
            plan.append((name, norm, *cur))
            cur = conv_out_hw(conv, *cur)
        return plan, cur

    def _check(self, x: Tensor) -> None:
        owner = type(self).__name__
        _validate.check_input(owner, x, self._chain()[0][2].in_channels, self)
        # by each BatchNorm's own training flag, whatever the block's (see blocks.py)
        _validate.check_norm_batches(owner, x, self._norm_plan(x.shape[2], x.shape[3])[0])

    def _forward_eager(self, x: Tensor) -> Tensor:
        chain = self._chain()
        act = F.relu(chain[0][1](x))
        sc = self._shortcut_module()
        shortcut = x if sc is None else sc(act)
        out = chain[0][2](act)
        for i, (_, norm, conv) in enumerate(chain[1:], start=1):
            out = self._dropout_between(i, F.relu(norm(out)))
            out = conv(out)
        return out + shortcut

    def _fusable(self) -> bool:
        chain = self._chain()
        sc = self._shortcut_module()
        return (not self.training and all_foldable(*(n for _, n, _ in chain))
                and all(is_plain_conv(c) for _, _, c in chain) and (sc is None or is_plain_conv(sc)))

    def _train_fusable(self, x: Tensor) -> bool:
        """Training, every BN on batch statistics, plain bias-free convs, no active dropout (the
        fused chain applies BN + ReLU inside the next conv, where dropout has no place)."""
        if not self.training or x.shape[0] == 0 or self._has_dropout():
            return False
        sc = self._shortcut_module()
        return (all(training_bn(n) and bias_free_conv(c) for _, n, c in self._chain())
                and (sc is None or bias_free_conv(sc)))

    def _train_fused(self, x: Tensor, backend: str) -> Tensor:
        """The fused training forward on ``backend`` ("triton" or "cuda")."""
        chain = self._chain()
        return _base.run_block_train(x, True, [c for _, _, c in chain], [n for _, n, _ in chain],
                                     self._shortcut_module(), backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        if fx_tracing():  # symbolic tracing sees the module-by-module forward (shape checks can't trace)
            return self._forward_eager(x)
        self._check(x)
        if self._train_fusable(x):
            chain = self._chain()
            return self._train(x, self._impl(x), [c for _, _, c in chain], [n for _, n, _ in chain],
                               self._shortcut_module())
        if not self._fusable():
            return self._forward_eager(x)
        impl = self._impl(x)
        chain = self._chain()
        act = self._bn_relu("bn0", impl, x, chain[0][1])
        sc = self._shortcut_module()
        shortcut = x if sc is None else self._conv("shortcut", impl, act, sc, None, relu=False)
        out = act
        for i, (_, _, conv) in enumerate(chain):
            nxt = chain[i + 1][1] if i + 1 < len(chain) else None
            # the next BN (+ its ReLU) folds into this conv; the last conv adds the shortcut
            out = self._conv(f"conv{i}", impl, out, conv, nxt, residual=None if nxt is not None else shortcut,
                             relu=nxt is not None)
        return out


class WideBasic(_PreActBlock):
    """Wide ResNet block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus the shortcut.

    Dropout sits between the two convs, after the second ReLU, as in the authors' code (the paper's
    figure omits BN-ReLU and writes conv3x3-dropout-conv3x3).

    Args:
        in_planes, out_planes: channels in and out.
        stride: of the first 3x3 conv (and of the 1x1 projection shortcut).
        dropout: dropout probability between the two convs (0.3 on CIFAR in the paper).
        norm_layer: BatchNorm2d by default.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, dropout: float = 0.0,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.bn1 = norm_layer(in_planes)
        self.conv1 = conv3x3(in_planes, out_planes, stride)
        self.bn2 = norm_layer(out_planes)
        self.conv2 = conv3x3(out_planes, out_planes)
        self.dropout = float(dropout)
        self.shortcut = None if (in_planes == out_planes and stride == 1) else conv1x1(in_planes, out_planes, stride)
        self.stride = stride
        self._init_fused()

    def _chain(self):
        return [("bn1", self.bn1, self.conv1), ("bn2", self.bn2, self.conv2)]

    def _shortcut_module(self):
        return self.shortcut

    def _dropout_between(self, i: int, out: Tensor) -> Tensor:
        return F.dropout(out, p=self.dropout, training=self.training) if self.dropout > 0 else out

    def _has_dropout(self) -> bool:
        return self.training and self.dropout > 0

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, stride={self.stride}"


class PreActBottleneck(_PreActBlock):
    """Pre-activation bottleneck: [BN-ReLU-1x1 c] [BN-ReLU-3x3 c, stride] [BN-ReLU-1x1 4c] + shortcut.

    Args:
        inplanes: channels in. planes: bottleneck width c; output has ``planes * 4`` channels.
        stride: of the 3x3 conv. downsample: module applied to the pre-activated input (a 1x1 conv),
        or None for the identity shortcut.
    """

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.bn1 = norm_layer(inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.downsample = downsample
        self.stride = stride
        self._init_fused()

    def _chain(self):
        return [("bn1", self.bn1, self.conv1), ("bn2", self.bn2, self.conv2), ("bn3", self.bn3, self.conv3)]

    def _shortcut_module(self):
        return self.downsample
