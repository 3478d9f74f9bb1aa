"""Plain PyTorch reference models: torchvision's ResNet structure with no fused code at all.

The "stock" side of every comparison (tests, benchmarks, ``python -m resnet_fused``) when
torchvision is not installed, and a template for what :func:`resnet_fused.convert` must recognise.
Same constructor arguments, attribute names, state_dict keys and initialisation as torchvision's
``torchvision.models.resnet``, so a state_dict moves between this, torchvision and our fused zoo.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Type, Union

import torch
from torch import Tensor, nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
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

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
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

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet: 7x7/2 stem, max-pool, four stages, average pool, fc."""

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[List[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, "
                             f"got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                        norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_CONFIGS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], {}),
    "resnet34": (BasicBlock, [3, 4, 6, 3], {}),
    "resnet50": (Bottleneck, [3, 4, 6, 3], {}),
    "resnet101": (Bottleneck, [3, 4, 23, 3], {}),
    "resnet152": (Bottleneck, [3, 8, 36, 3], {}),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], {"width_per_group": 128}),
    "wide_resnet101_2": (Bottleneck, [3, 4, 23, 3], {"width_per_group": 128}),
}


def build(name: str, **kwargs) -> ResNet:
    """A reference model by torchvision name (``"resnet50"``, ``"wide_resnet50_2"``, ...)."""
    if name not in _CONFIGS:
        raise ValueError(f"name: expected one of {sorted(_CONFIGS)}, got {name!r}")
    block, layers, defaults = _CONFIGS[name]
    return ResNet(block, layers, **{**defaults, **kwargs})


def resnet18(**kw) -> ResNet: return build("resnet18", **kw)  # noqa: E704
def resnet34(**kw) -> ResNet: return build("resnet34", **kw)  # noqa: E704
def resnet50(**kw) -> ResNet: return build("resnet50", **kw)  # noqa: E704
def resnet101(**kw) -> ResNet: return build("resnet101", **kw)  # noqa: E704
def resnet152(**kw) -> ResNet: return build("resnet152", **kw)  # noqa: E704
def wide_resnet50_2(**kw) -> ResNet: return build("wide_resnet50_2", **kw)  # noqa: E704
def wide_resnet101_2(**kw) -> ResNet: return build("wide_resnet101_2", **kw)  # noqa: E704


# ------------------------------------------------------------------------ pre-activation CIFAR nets
# Plain module-by-module versions of models/wide.py and models/preact.py: same attribute names and
# state_dict keys (a state_dict moves between them with strict=True), same initialisation.


def _init_cifar(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 0)


class RefWideBasic(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 + shortcut (1x1 conv of the pre-activated input)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, dropout: float = 0.0,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.bn1 = norm_layer(in_planes)
        self.conv1 = conv3x3(in_planes, out_planes, stride)
        self.bn2 = norm_layer(out_planes)
        self.conv2 = conv3x3(out_planes, out_planes)
        self.dropout = float(dropout)
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = conv1x1(in_planes, out_planes, stride)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        act = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(act)
        out = self.conv1(act)
        out = torch.relu(self.bn2(out))
        if self.dropout > 0:
            out = nn.functional.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + shortcut


class RefWideResNet(nn.Module):
    """WRN-depth-k: conv3x3 3->16, three groups of n = (depth-4)/6 blocks, BN-ReLU, avg pool, fc."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, dropout: float = 0.0,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth: expected 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        k = widen_factor
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = nn.Sequential(*[RefWideBasic(16 if i == 0 else 16 * k, 16 * k, 1, dropout, norm_layer)
                                      for i in range(n)])
        self.layer2 = nn.Sequential(*[RefWideBasic(16 * k if i == 0 else 32 * k, 32 * k, 2 if i == 0 else 1,
                                                   dropout, norm_layer) for i in range(n)])
        self.layer3 = nn.Sequential(*[RefWideBasic(32 * k if i == 0 else 64 * k, 64 * k, 2 if i == 0 else 1,
                                                   dropout, norm_layer) for i in range(n)])
        self.bn = norm_layer(64 * k)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64 * k, num_classes)
        _init_cifar(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def ref_wrn(depth: int, widen_factor: int, num_classes: int = 10, dropout: float = 0.0, **kw) -> RefWideResNet:
    return RefWideResNet(depth, widen_factor, num_classes=num_classes, dropout=dropout, **kw)


class RefPreActBottleneck(nn.Module):
    """[BN-ReLU-1x1 c] [BN-ReLU-3x3 c, stride] [BN-ReLU-1x1 4c] + shortcut (downsample of the pre-activated input)."""

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

    def forward(self, x: Tensor) -> Tensor:
        act = torch.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(act)
        out = self.conv1(act)
        out = self.conv2(torch.relu(self.bn2(out)))
        out = self.conv3(torch.relu(self.bn3(out)))
        return out + shortcut


class RefPreActResNet(nn.Module):
    """Pre-activation bottleneck ResNet-(9n+2): conv3x3 3->16, stages c = 16/32/64, BN-ReLU, avg pool, fc."""

    def __init__(self, depth: int, num_classes: int = 10, norm_layer: Optional[Callable[..., nn.Module]] = None
                 ) -> None:
        super().__init__()
        if (depth - 2) % 9 != 0 or depth < 11:
            raise ValueError(f"depth: expected 9n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 9
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        stages, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            units = [RefPreActBottleneck(inplanes, planes, stride, conv1x1(inplanes, planes * 4, stride), norm_layer)]
            units += [RefPreActBottleneck(planes * 4, planes, norm_layer=norm_layer) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            inplanes = planes * 4
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = norm_layer(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _init_cifar(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def ref_preact_resnet(depth: int, num_classes: int = 10, **kw) -> RefPreActResNet:
    return RefPreActResNet(depth, num_classes=num_classes, **kw)
