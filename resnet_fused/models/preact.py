"""Pre-activation bottleneck ResNet for CIFAR (He et al. 2016, "Identity Mappings"): ResNet-164/1001.

depth = 9n + 2: a 3x3 conv (3 -> 16), three stages of n
:class:`~resnet_fused.modules.PreActBottleneck` units [1x1, c; 3x3, c; 1x1, 4c] with c = 16, 32, 64
(outputs 64, 128, 256; stride 2 on the 3x3 entering stages 2 and 3), a projection shortcut (a plain
1x1 conv on the pre-activated input) on the first unit of each stage, an extra BN-ReLU after the last
unit, global average pooling and a linear classifier. ResNet-164 (n = 18) has 1.7M parameters,
ResNet-1001 (n = 111) 10.2M.

State_dict keys: ``conv1.weight``, ``layer{1,2,3}.{i}.{bn1,conv1,bn2,conv2,bn3,conv3}.*``,
``layer{1,2,3}.0.downsample.weight``, ``bn.*``, ``fc.*`` - the same as
:class:`resnet_fused.models.reference.RefPreActResNet`.

Input: x [N, 3, H, W]; output logits [N, num_classes].
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ..modules import PreActBottleneck, conv1x1
from ._cifar import CifarPreActNet

__all__ = ["PreActResNet", "preact_resnet"]


def preact_units_per_stage(depth: int) -> int:
    """n of the depth-(9n+2) bottleneck pre-activation ResNet; ValueError otherwise."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"depth: expected an int of the form 9n+2 (11, 20, ..., 164, 1001), got {depth!r}")
    if depth < 11 or (depth - 2) % 9 != 0:
        raise ValueError(f"depth: a bottleneck pre-activation ResNet has depth 9n+2 with n >= 1 "
                         f"(e.g. 164 or 1001), got {depth}")
    return (depth - 2) // 9


class PreActResNet(CifarPreActNet):
    """Pre-activation bottleneck ResNet-depth for 32x32 inputs.

    Args:
        depth: 9n + 2 (164: n = 18; 1001: n = 111).
        num_classes: classifier outputs (10 for CIFAR-10).
        norm_layer: BatchNorm2d by default.
        backend: pin the fused blocks to a backend (None follows :func:`resnet_fused.set_backend`).
    """

    def __init__(self, depth: int, num_classes: int = 10, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        n = preact_units_per_stage(depth)
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.depth = depth
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_stage(16, n, 1, norm_layer)
        self.layer2 = self._make_stage(32, n, 2, norm_layer)
        self.layer3 = self._make_stage(64, n, 2, norm_layer)
        self._build_head(self.inplanes, num_classes, norm_layer, backend)

    def _make_stage(self, planes: int, blocks: int, stride: int, norm_layer: Callable[..., nn.Module]
                    ) -> nn.Sequential:
        out = planes * PreActBottleneck.expansion
        # projection on the first unit: channels change in every stage (16 -> 64 in stage 1)
        downsample = conv1x1(self.inplanes, out, stride) if (stride != 1 or self.inplanes != out) else None
        layers = [PreActBottleneck(self.inplanes, planes, stride, downsample, norm_layer)]
        self.inplanes = out
        layers += [PreActBottleneck(out, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return f"depth={self.depth}"


def preact_resnet(depth: int, num_classes: int = 10, backend: Optional[str] = None, **kwargs) -> PreActResNet:
    """Pre-activation bottleneck ResNet-``depth`` (164 or 1001 in the paper). kwargs: ``norm_layer``."""
    return PreActResNet(depth, num_classes=num_classes, backend=backend, **kwargs)
