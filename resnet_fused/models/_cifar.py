"""The skeleton both CIFAR pre-activation networks share (Wide ResNet and pre-act ResNet-164/1001).

conv1 (3x3, 3 -> 16) -> layer1, layer2, layer3 (pre-activation blocks) -> bn -> ReLU -> global
average pool -> fc. Subclasses build the three layers; this class owns the head, the weight
initialisation, the pre-flight input check and the forward.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..modules._base import conv_out_hw
from .resnet import Plan, blocks_norm_plan, pin_backend, preflight


class CifarPreActNet(nn.Module):
    """Base of :class:`~resnet_fused.models.WideResNet` and :class:`~resnet_fused.models.PreActResNet`."""

    def _build_head(self, channels: int, num_classes: int, norm_layer: Callable[..., nn.Module],
                    backend: Optional[str]) -> None:
        """Final BN-ReLU, pool and classifier; then initialise every layer and pin the backend."""
        self.bn = norm_layer(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)
        pin_backend(self, backend)

    def _norm_plan(self, h: int, w: int) -> Plan:
        """(name, norm, H, W) of every BatchNorm on the path of an h x w input."""
        h, w = conv_out_hw(self.conv1, h, w)
        named = ((f"layer{i}.{j}", b) for i in range(1, 4) for j, b in enumerate(getattr(self, f"layer{i}")))
        plan, out = blocks_norm_plan(named, h, w)
        if out is not None:
            plan.append(("bn", self.bn, *out))
        return plan

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        preflight(type(self).__name__, self, x, self.conv1.in_channels, self._norm_plan)
        return self._forward_impl(x)
