"""Model zoo built from the fused blocks.

- torchvision's ResNets (same constructor, state_dict keys and init): :func:`resnet18` ...
  :func:`resnet152`, :func:`wide_resnet50_2`, :func:`wide_resnet101_2`, :class:`ResNet`;
- Wide ResNet WRN-d-k for CIFAR: :func:`wrn`, :class:`WideResNet`;
- pre-activation bottleneck ResNet-164/1001 for CIFAR: :func:`preact_resnet`, :class:`PreActResNet`;
- :mod:`.reference`: the same architectures in plain PyTorch (the stock side of comparisons).
"""
from . import reference
from .preact import PreActResNet, preact_resnet
from .resnet import (ResNet, resnet18, resnet34, resnet50, resnet101, resnet152, wide_resnet50_2,
                     wide_resnet101_2)
from .wide import WideResNet, wrn

__all__ = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
           "ResNet", "wrn", "WideResNet", "preact_resnet", "PreActResNet", "reference"]
