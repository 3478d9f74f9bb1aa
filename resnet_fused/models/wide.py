"""Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016) for CIFAR-sized inputs, from fused blocks.

depth = 6n + 4: a 3x3 conv (3 -> 16), three groups of n :class:`~resnet_fused.modules.WideBasic`
pre-activation blocks with widths 16k, 32k, 64k (stride 2 entering groups 2 and 3), a final
BN-ReLU, global average pooling (8x8 on 32x32 input; adaptive, so other sizes work) and a linear
classifier. No conv biases. Parameters with 10 classes: WRN-40-4 8.95M, WRN-16-8 10.96M,
WRN-16-10 17.12M, WRN-28-10 36.48M.

State_dict keys: ``conv1.weight``, ``layer{1,2,3}.{i}.{bn1,conv1,bn2,conv2,shortcut}.*``,
``bn.*``, ``fc.*`` - the same as :class:`resnet_fused.models.reference.RefWideResNet`.

Input: x [N, 3, H, W]; output logits [N, num_classes].
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ..modules import WideBasic
from ._cifar import CifarPreActNet

__all__ = ["WideResNet", "wrn"]


def wrn_blocks_per_group(depth: int) -> int:
    """n of WRN-depth-k; ValueError unless depth = 6n + 4 with n >= 1."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"depth: expected an int of the form 6n+4 (10, 16, 22, 28, 40, ...), got {depth!r}")
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"depth: a Wide ResNet has depth 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    return (depth - 4) // 6


class WideResNet(CifarPreActNet):
    """WRN-depth-widen_factor.

    Args:
        depth: 6n + 4 (n blocks per group). widen_factor: k, the width multiplier.
        num_classes: classifier outputs (10 for CIFAR-10).
        dropout: dropout probability between the two convs of each block (0.3 in the paper).
        norm_layer: BatchNorm2d by default.
        backend: pin the fused blocks to a backend (None follows :func:`resnet_fused.set_backend`).
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, dropout: float = 0.0,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, backend: Optional[str] = None) -> None:
        super().__init__()
        n = wrn_blocks_per_group(depth)
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"widen_factor: expected a positive int, got {widen_factor!r}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout!r}")
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.depth, self.widen_factor = depth, widen_factor
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_group(widths[0], widths[1], n, 1, dropout, norm_layer)
        self.layer2 = self._make_group(widths[1], widths[2], n, 2, dropout, norm_layer)
        self.layer3 = self._make_group(widths[2], widths[3], n, 2, dropout, norm_layer)
        self._build_head(widths[3], num_classes, norm_layer, backend)

    @staticmethod
    def _make_group(in_planes: int, out_planes: int, blocks: int, stride: int, dropout: float,
                    norm_layer: Callable[..., nn.Module]) -> nn.Sequential:
        layers = [WideBasic(in_planes, out_planes, stride, dropout, norm_layer)]
        layers += [WideBasic(out_planes, out_planes, 1, dropout, norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, widen_factor={self.widen_factor}"


def wrn(depth: int, widen_factor: int, num_classes: int = 10, dropout: float = 0.0,
        backend: Optional[str] = None, **kwargs) -> WideResNet:
    """WRN-``depth``-``widen_factor``, e.g. ``wrn(28, 10, dropout=0.3)``. kwargs: ``norm_layer``."""
    return WideResNet(depth, widen_factor, num_classes=num_classes, dropout=dropout, backend=backend, **kwargs)
