"""``convert(model)``: swap a model's ResNet blocks and stem for fused ones, in place.

Blocks are recognised by structure, not class, so torchvision's, timm's and a user's own copy all
convert:

- torchvision style: ``conv1, bn1, conv2, bn2[, conv3, bn3], relu (nn.ReLU), downsample``;
- timm style: the same convs and norms with ``act1, act2[, act3]`` ReLUs and ``drop_block``,
  ``aa``, ``se``, ``drop_path`` absent, None or ``nn.Identity``.

The new block holds the *same* conv, norm and downsample module objects (so the same Parameters and
buffers: an existing optimizer keeps working, state_dict keys do not change). Anything else is left
alone; :attr:`ConversionReport.skipped` says why a block-like module was not converted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import backends
from .modules._base import FusedBlockMixin, is_plain_conv
from .modules.blocks import BasicBlock, Bottleneck
from .modules.stem import fuse_stem

_TIMM_EXTRAS = ("drop_block", "aa", "se", "drop_path")


@dataclass
class ConversionReport:
    """What :func:`convert` did: (qualified name, old class, new class) and (name, reason)."""

    converted: List[Tuple[str, str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} module(s)"]
        lines += [f"  {n or '<root>'}: {a} -> {b}" for n, a, b in self.converted]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} block-like module(s) alone")
            lines += [f"  {n or '<root>'}: {why}" for n, why in self.skipped]
        return "\n".join(lines)


def _is_identity(m) -> bool:
    return m is None or type(m) is nn.Identity


def _norm_channels(norm: nn.Module) -> Optional[int]:
    """Channels a norm layer normalises: ``num_features``, or the running-stat length of a
    ``FrozenBatchNorm2d``-style module (torchvision's keeps no ``num_features``)."""
    n = getattr(norm, "num_features", None)
    if n is None and isinstance(getattr(norm, "running_mean", None), torch.Tensor):
        n = norm.running_mean.shape[0]
    return n


def _match(m: nn.Module) -> Tuple[Optional[type], str]:
    """(our block class, "") if ``m`` is a torchvision/timm-style block, else (None, reason)."""
    names = ["conv1", "bn1", "conv2", "bn2"]
    target = BasicBlock
    if hasattr(m, "conv3") or hasattr(m, "bn3"):
        names += ["conv3", "bn3"]
        target = Bottleneck
    for n in names:
        if not isinstance(getattr(m, n, None), nn.Module):
            return None, f"no submodule {n!r}"
    if not hasattr(m, "downsample"):
        return None, "no 'downsample' attribute"
    if isinstance(getattr(m, "relu", None), nn.Module):
        if type(m.relu) is not nn.ReLU:
            return None, f"relu is {type(m.relu).__name__}, not nn.ReLU"
    else:  # timm style
        acts = ["act1", "act2"] + (["act3"] if target is Bottleneck else [])
        for a in acts:
            if type(getattr(m, a, None)) is not nn.ReLU:
                return None, f"{a} is not nn.ReLU"
    # in either style: an SE module (or drop path, ...) our blocks do not compute
    for extra in _TIMM_EXTRAS:
        if not _is_identity(getattr(m, extra, None)):
            return None, f"{extra} is {type(getattr(m, extra)).__name__} (not fused)"
    convs = [getattr(m, n) for n in names[0::2]]
    norms = [getattr(m, n) for n in names[1::2]]
    for n, c in zip(names[0::2], convs):
        if not is_plain_conv(c):
            return None, f"{n} is not a zero-padded nn.Conv2d"
    for n, c, b in zip(names[1::2], convs, norms):
        if _norm_channels(b) is None:
            return None, f"{n} is {type(b).__name__}, not a BatchNorm"
        if _norm_channels(b) != c.out_channels:
            return None, f"{n} does not normalise {c.out_channels} channels"
    for a, b in zip(convs, convs[1:]):
        if a.out_channels != b.in_channels:
            return None, "conv channels do not chain"
    return target, ""


def _build(target: type, old: nn.Module, backend: Optional[str]) -> nn.Module:
    new = target.__new__(target)
    nn.Module.__init__(new)
    new.training = old.training
    for n in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
        if hasattr(old, n) and (n[-1] != "3" or target is Bottleneck):
            setattr(new, n, getattr(old, n))
    relu = getattr(old, "relu", None)
    new.relu = relu if isinstance(relu, nn.ReLU) else nn.ReLU(inplace=True)
    new.downsample = old.downsample
    new.stride = getattr(old, "stride", new.conv2.stride[0] if target is Bottleneck else new.conv1.stride[0])
    new._init_fused(backend)
    return new


def convert(model: nn.Module, backend: Optional[str] = None, verbose: bool = False) -> nn.Module:
    """Replace, in place, every ResNet block and the stem of ``model`` with fused modules.

    Args:
        model: any ``nn.Module`` (a whole network or a single block).
        backend: pin the converted modules to a backend (``"auto"``, ``"triton"``, ``"cuda"``,
            ``"torch"``); None follows the global choice (:func:`resnet_fused.set_backend`).
        verbose: print the report.
    Returns:
        ``model`` itself (or the new block if ``model`` was a block), with
        ``model.resnet_fused_report`` set to a :class:`ConversionReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        backends._check_name(backend)
    report = ConversionReport()
    root = model
    # Collect first, then swap: named_modules() must not see the tree change under it.
    candidates = []
    for name, m in model.named_modules():
        if isinstance(m, FusedBlockMixin):
            if backend is not None:
                m.backend = backend
            continue
        target, why = _match(m)
        if target is not None:
            candidates.append((name, m, target))
        elif hasattr(m, "conv1") and hasattr(m, "bn1") and hasattr(m, "conv2") and not hasattr(m, "layer1"):
            report.skipped.append((name, why))
    for name, m, target in candidates:
        new = _build(target, m, backend)
        if name == "":
            root = new
        else:
            parent_name, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)
        report.converted.append((name, type(m).__name__, target.__name__))
    for name, m in list(root.named_modules()):
        if hasattr(m, "layer1") and fuse_stem(m, backend):
            report.converted.append((f"{name + '.' if name else ''}conv1+bn1", "Conv2d+BatchNorm2d", "StemConv+StemBatchNorm"))
    root.resnet_fused_report = report
    if verbose:
        print(report)
    return root
