"""torchvision's ResNet family built from our fused blocks: same constructor, keys and init.

``ResNet`` is torchvision's ``torchvision.models.resnet.ResNet`` module for module (attribute names
*are* the state_dict format), with our :class:`~resnet_fused.modules.BasicBlock` /
:class:`~resnet_fused.modules.Bottleneck` and the stem fused by
:func:`~resnet_fused.modules.fuse_stem`. A state_dict from torchvision (or from
:mod:`resnet_fused.models.reference`) loads with ``strict=True`` and gives the same outputs.

The one behavioural addition is a pre-flight check in ``forward``: the input is validated and, in
training mode, every BatchNorm's batch is sized up front, so a batch some BatchNorm cannot
normalise (e.g. batch 1 at 32x32, which reaches 1x1 in layer4) raises ``ValueError`` before any
running statistic or ``num_batches_tracked`` has changed.

Input: x [N, 3, H, W] (NCHW or channels_last), float; output logits [N, num_classes].
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from .. import _validate, backends
from ..modules import BasicBlock, Bottleneck, conv1x1, fuse_stem
from ..modules._base import FusedBlockMixin, conv_out_hw, fx_tracing
from ..ops._common import conv_output_size

__all__ = ["ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
           "wide_resnet101_2"]

Plan = List[Tuple[str, nn.Module, int, int]]


# ------------------------------------------------------------------ helpers shared by the model zoo
def pool_out_hw(pool: nn.Module, h: int, w: int) -> Tuple[int, int]:
    """Spatial size an ``nn.MaxPool2d`` / ``nn.AvgPool2d`` produces from an h x w input."""
    def one(size, k, s, p, d):
        if not getattr(pool, "ceil_mode", False):
            return conv_output_size(size, k, s, p, d)
        out = -(-(size + 2 * p - d * (k - 1) - 1) // s) + 1
        # PyTorch: the last window must start inside the (left-padded) input
        return out - 1 if (out - 1) * s >= size + p else out

    def two(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    k, s, p = two(pool.kernel_size), two(pool.stride or pool.kernel_size), two(pool.padding)
    d = two(getattr(pool, "dilation", 1))
    return one(h, k[0], s[0], p[0], d[0]), one(w, k[1], s[1], p[1], d[1])


def blocks_norm_plan(named_blocks: Iterable[Tuple[str, nn.Module]], h: int, w: int
                     ) -> Tuple[Plan, Optional[Tuple[int, int]]]:
    """Concatenated ``_norm_plan`` of blocks run one after another, names prefixed.

    Returns (plan, (out_h, out_w)); the size is None when some block cannot say what it produces
    (a user-substituted module without ``_norm_plan``): the plan then stops there.
    """
    plan: Plan = []
    for prefix, block in named_blocks:
        norm_plan = getattr(block, "_norm_plan", None)
        if norm_plan is None:
            return plan, None
        sub, (h, w) = norm_plan(h, w)
        # name each norm by its own attribute path (a block may label it by its conv)
        names = {id(m): n for n, m in block.named_modules() if n}
        plan.extend((f"{prefix}.{names.get(id(norm), name)}", norm, nh, nw) for name, norm, nh, nw in sub)
    return plan, (h, w)


def preflight(owner: str, model: nn.Module, x: Tensor, in_channels: int,
              plan_fn: Callable[[int, int], Plan]) -> None:
    """Validate a model input and, in training mode, every BatchNorm's batch, before anything runs."""
    if fx_tracing():  # a symbolic trace has no concrete shapes to check
        return
    _validate.check_input(owner, x, in_channels, model)
    if model.training:
        _validate.check_norm_batches(owner, x, plan_fn(x.shape[2], x.shape[3]))


def pin_backend(model: nn.Module, backend: Optional[str]) -> None:
    """Pin every fused module of ``model`` to ``backend`` (None: follow the global choice)."""
    if backend is None:
        return
    backends._check_name(backend)
    for m in model.modules():
        if isinstance(m, FusedBlockMixin):
            m.backend = backend


# ------------------------------------------------------------------------------------------ model
class ResNet(nn.Module):
    """torchvision's ResNet (v1.5) with fused blocks and stem.

    Args: as torchvision's. ``block``: :class:`BasicBlock` or :class:`Bottleneck` (ours; any block
    with torchvision's constructor works). ``layers``: blocks per stage. ``groups`` /
    ``width_per_group``: ResNeXt / wide variants. ``replace_stride_with_dilation``: three bools,
    one per stage 2-4. ``norm_layer``: BatchNorm2d by default. ``backend``: pin the fused modules
    to a backend (None follows :func:`resnet_fused.set_backend`).
    """

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[List[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, backend: Optional[str] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
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
        # Zero the last BN of each residual branch, so each block starts as the identity.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

        fuse_stem(self, backend)
        pin_backend(self, backend)

    def _make_layer(self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
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

    def _norm_plan(self, h: int, w: int) -> Plan:
        """(name, norm, H, W) of every BatchNorm on the path of an h x w input."""
        h, w = conv_out_hw(self.conv1, h, w)
        plan: Plan = [("bn1", self.bn1, h, w)]
        h, w = pool_out_hw(self.maxpool, h, w)
        named = ((f"layer{i}.{j}", b) for i in range(1, 5) for j, b in enumerate(getattr(self, f"layer{i}")))
        plan += blocks_norm_plan(named, h, w)[0]
        return plan

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        preflight(type(self).__name__, self, x, self.conv1.in_channels, self._norm_plan)
        return self._forward_impl(x)


# -------------------------------------------------------------------------------------- factories
_CONFIGS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], {}),
    "resnet34": (BasicBlock, [3, 4, 6, 3], {}),
    "resnet50": (Bottleneck, [3, 4, 6, 3], {}),
    "resnet101": (Bottleneck, [3, 4, 23, 3], {}),
    "resnet152": (Bottleneck, [3, 8, 36, 3], {}),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], {"width_per_group": 64 * 2}),
    "wide_resnet101_2": (Bottleneck, [3, 4, 23, 3], {"width_per_group": 64 * 2}),
}


def _build(name: str, weights=None, pretrained: bool = False, progress: bool = True, **kwargs) -> ResNet:
    # weights=None / pretrained=False are torchvision's defaults; accept them so call sites port as-is.
    if weights is not None or pretrained:
        what = f"weights={weights!r}" if weights is not None else f"pretrained={pretrained!r}"
        raise ValueError(
            f"{name}({what}): resnet_fused cannot download pretrained weights. Build the model without "
            f"them and load a torchvision state_dict instead, e.g. "
            f"model.load_state_dict(torchvision.models.{name}(weights=...).state_dict(), strict=True) "
            f"or model.load_state_dict(torch.load(path), strict=True): the keys are torchvision's.")
    del progress  # torchvision's download progress bar; nothing is downloaded here
    block, layers, defaults = _CONFIGS[name]
    for key, value in defaults.items():  # torchvision refuses to override what defines the variant
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{name}: {key} is fixed to {value} for this model, got {kwargs[key]!r}")
    return ResNet(block, layers, **{**defaults, **kwargs})


def resnet18(*, weights=None, progress: bool = True, backend: Optional[str] = None, **kwargs) -> ResNet:
    """ResNet-18 (11,689,512 parameters with 1000 classes). kwargs: those of :class:`ResNet`."""
    return _build("resnet18", weights=weights, progress=progress, backend=backend, **kwargs)


def resnet34(*, weights=None, progress: bool = True, backend: Optional[str] = None, **kwargs) -> ResNet:
    """ResNet-34 (21,797,672 parameters). kwargs: those of :class:`ResNet`."""
    return _build("resnet34", weights=weights, progress=progress, backend=backend, **kwargs)


def resnet50(*, weights=None, progress: bool = True, backend: Optional[str] = None, **kwargs) -> ResNet:
    """ResNet-50 v1.5 (25,557,032 parameters). kwargs: those of :class:`ResNet`."""
    return _build("resnet50", weights=weights, progress=progress, backend=backend, **kwargs)


def resnet101(*, weights=None, progress: bool = True, backend: Optional[str] = None, **kwargs) -> ResNet:
    """ResNet-101 v1.5 (44,549,160 parameters). kwargs: those of :class:`ResNet`."""
    return _build("resnet101", weights=weights, progress=progress, backend=backend, **kwargs)


def resnet152(*, weights=None, progress: bool = True, backend: Optional[str] = None, **kwargs) -> ResNet:
    """ResNet-152 v1.5 (60,192,808 parameters). kwargs: those of :class:`ResNet`."""
    return _build("resnet152", weights=weights, progress=progress, backend=backend, **kwargs)


def wide_resnet50_2(*, weights=None, progress: bool = True, backend: Optional[str] = None, **kwargs) -> ResNet:
    """Wide ResNet-50-2: bottleneck width doubled (68,883,240 parameters). kwargs: :class:`ResNet`'s."""
    return _build("wide_resnet50_2", weights=weights, progress=progress, backend=backend, **kwargs)


def wide_resnet101_2(*, weights=None, progress: bool = True, backend: Optional[str] = None, **kwargs) -> ResNet:
    """Wide ResNet-101-2 (126,886,696 parameters). kwargs: those of :class:`ResNet`."""
    return _build("wide_resnet101_2", weights=weights, progress=progress, backend=backend, **kwargs)
