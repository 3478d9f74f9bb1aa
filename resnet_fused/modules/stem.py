"""Fusing a ResNet stem (``conv1 -> bn1 -> relu``) without changing the model's forward or keys.

A model's forward calls ``self.conv1``, ``self.bn1`` and ``self.relu`` one after another, and its
state_dict has ``conv1.weight`` and ``bn1.*``. To fuse them we keep both attributes and both key
sets: ``conv1`` becomes a :class:`StemConv` (a ``Conv2d`` sharing the same weight) that, in eval
mode with a foldable ``bn1``, computes conv + BN + ReLU in one fused conv; ``bn1`` becomes a
:class:`StemBatchNorm` (a ``BatchNorm2d`` sharing the same parameters and buffers) that passes
through exactly the tensor its conv produced fused, and is an ordinary BatchNorm for any other
input (training mode, or a tensor from elsewhere). ReLU is idempotent, so the model's own ReLU
after it changes nothing (it costs one in-place pass).
"""
from __future__ import annotations

import weakref
from typing import Optional

from torch import Tensor, nn

from .. import backends
from ..ops.fold import is_foldable_bn, needs_autograd
from ._base import FusedBlockMixin, fx_tracing, zero_padded


def rebind(cls, old: nn.Module) -> nn.Module:
    """A new ``cls`` instance sharing every Parameter, buffer and submodule object of ``old``."""
    new = cls.__new__(cls)
    new.__dict__ = old.__dict__.copy()
    # Own copies of every registry (parameters, buffers, submodules, hook dicts): the same tensors
    # and hooks, but registering on one module later must not change the other.
    for attr, value in new.__dict__.items():
        if isinstance(value, dict):
            new.__dict__[attr] = type(value)(value)
    return new


class StemBatchNorm(nn.BatchNorm2d):
    """``bn1`` of a fused stem: identity on the tensor its :class:`StemConv` already normalised."""

    def forward(self, x: Tensor) -> Tensor:
        ref = self.__dict__.get("_fused_output")
        if ref is not None and ref() is x:
            return x
        return super().forward(x)

    def __getstate__(self):
        # the weakref to the last fused output cannot be pickled, and means nothing in a copy
        state = super().__getstate__()
        state.pop("_fused_output", None)
        return state

    def _check_input_dim(self, input: Tensor) -> None:
        # Not a torch.nn leaf, so FX traces into BatchNorm's forward; its rank check branches on
        # the input, which a symbolic trace cannot do (the traced call still checks at run time).
        if not fx_tracing():
            super()._check_input_dim(input)


class StemConv(FusedBlockMixin, nn.Conv2d):
    """``conv1`` of a fused stem: conv + BN (+ ReLU) in eval mode, a plain Conv2d otherwise."""

    @classmethod
    def fuse(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, backend: Optional[str] = None):
        """Return ``(StemConv, StemBatchNorm)`` sharing ``conv``'s and ``bn``'s tensors."""
        new_conv = rebind(cls, conv)
        new_bn = bn if isinstance(bn, StemBatchNorm) else rebind(StemBatchNorm, bn)
        new_conv._init_fused(backend)
        # plain attributes, not submodules: bn1 stays registered (and saved) where it was
        new_conv.__dict__["_stem_bn"] = new_bn
        new_conv.__dict__["_stem_relu"] = bool(relu)
        return new_conv, new_bn

    def forward(self, x: Tensor) -> Tensor:
        bn = self.__dict__.get("_stem_bn")
        if fx_tracing() or bn is None or not is_foldable_bn(bn) or not zero_padded(self):
            return super().forward(x)
        # The model applies its own in-place ReLU to this very tensor after bn1. When autograd
        # records, a ReLU fused here would save the tensor for backward and that in-place ReLU
        # would then invalidate it; so fuse conv + BN only and let the model's ReLU do the rest.
        relu = self._stem_relu and not needs_autograd(x, self.weight, self.bias, getattr(bn, "weight", None),
                                                      getattr(bn, "bias", None))
        out = self._conv("stem", self._impl(x), x, self, bn, relu=relu)
        bn.__dict__["_fused_output"] = weakref.ref(out)
        return out


def fuse_stem(parent: nn.Module, backend: Optional[str] = None) -> bool:
    """Fuse ``parent.conv1`` / ``parent.bn1`` (/ ``relu`` or ``act1``) in place; True if done."""
    conv, bn = getattr(parent, "conv1", None), getattr(parent, "bn1", None)
    if isinstance(conv, StemConv):
        if backend is not None:
            backends._check_name(backend)
            conv.backend = backend
        return True
    if type(conv) is not nn.Conv2d or type(bn) not in (nn.BatchNorm2d, StemBatchNorm):
        return False
    if bn.num_features != conv.out_channels:
        return False
    act = getattr(parent, "relu", getattr(parent, "act1", None))
    new_conv, new_bn = StemConv.fuse(conv, bn, relu=type(act) is nn.ReLU, backend=backend)
    parent.conv1 = new_conv
    parent.bn1 = new_bn
    return True
