"""Folding eval-mode BatchNorm into a per-channel scale/shift, or into the preceding conv.

In eval mode ``bn(y) = y * scale + shift`` with ``scale = gamma / sqrt(running_var + eps)`` and
``shift = beta - running_mean * scale``; for ``y = conv(x, w)`` that is ``conv(x, w * scale) +
shift``. Scale and shift are computed in float32 (or float64 for float64 parameters) whatever the
activation dtype, so the fold itself adds no half-precision rounding beyond the final cast of the
folded weight.

:class:`FoldCache` keeps folded weights between eval forwards. It is keyed on the identity and
version counter of every tensor involved, BatchNorm's ``num_batches_tracked`` included (a training
forward updates the running statistics without bumping their versions, but bumps that one's), so
in-place updates (optimizer steps, ``load_state_dict``, training forwards), replaced tensors and
``.to()`` invalidate it, and it is bypassed whenever autograd must see the fold (grad enabled and a
parameter requires grad). In-place writes through ``param.data`` bypass the version counter and
cannot be seen: call :meth:`FoldCache.clear` after them.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn


def is_foldable_bn(norm: nn.Module) -> bool:
    """True if ``norm`` is a BatchNorm whose eval forward is an affine map of running stats.

    Covers ``nn.BatchNorm2d`` / ``nn.SyncBatchNorm`` in eval mode with tracked running stats and
    torchvision-style ``FrozenBatchNorm2d`` (buffers weight/bias/running_mean/running_var/eps).
    A BatchNorm in training mode, or one with ``track_running_stats=False`` (which normalises with
    batch statistics even in eval), is not foldable.
    """
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return (not norm.training) and norm.running_mean is not None and norm.running_var is not None
    # FrozenBatchNorm2d (torchvision.ops.misc) and look-alikes: always eval semantics.
    return (
        type(norm).__name__ == "FrozenBatchNorm2d"
        and all(isinstance(getattr(norm, a, None), Tensor) for a in ("weight", "bias", "running_mean", "running_var"))
    )


def _stat_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def bn_scale_shift(norm: nn.Module) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` of an eval BatchNorm, float32 (float64 for float64 stats).

    Differentiable with respect to the BN weight and bias (running statistics are buffers).
    """
    mean, var = norm.running_mean, norm.running_var
    dt = _stat_dtype(var)
    eps = float(getattr(norm, "eps", 1e-5))
    inv_std = torch.rsqrt(var.to(dt) + eps)
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    scale = inv_std if weight is None else weight.to(dt) * inv_std
    shift = -mean.to(dt) * scale
    if bias is not None:
        shift = shift + bias.to(dt)
    return scale, shift


def fold_conv_bn(conv_weight: Tensor, scale: Tensor, shift: Tensor, conv_bias: Optional[Tensor] = None,
                 dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """``(w', b')`` with ``conv(x, w') + b' == bn(conv(x, w) + conv_bias)``.

    conv_weight: [Cout, Cin/groups, KH, KW]; scale, shift: [Cout]. ``w'`` has ``dtype`` (default:
    the conv weight's) and keeps the conv weight's memory format; ``b'`` stays in the scale's
    (float32/float64) precision: kernels add it to their fp32 accumulator.
    """
    dtype = conv_weight.dtype if dtype is None else dtype
    w = conv_weight.to(scale.dtype) * scale.reshape(-1, 1, 1, 1)
    b = shift if conv_bias is None else shift + conv_bias.to(scale.dtype) * scale
    return w.to(dtype), b


def _sources(conv: Optional[nn.Module], norm: Optional[nn.Module]) -> list:
    """The tensors a fold depends on, read from the modules' own dicts (this is the hot path:
    ``Module.__getattr__`` costs more than the rest of a cache hit)."""
    ts = []
    if norm is not None:
        params, bufs = norm.__dict__.get("_parameters", {}), norm.__dict__.get("_buffers", {})
        for a in ("weight", "bias", "running_mean", "running_var"):
            ts.append(params[a] if a in params else bufs[a] if a in bufs else getattr(norm, a, None))
        # A training-mode BatchNorm forward updates running_mean/var inside the native kernel,
        # which bumps no version counter; it bumps num_batches_tracked (in Python) every time.
        ts.append(bufs.get("num_batches_tracked"))
    if conv is not None:
        ts += [conv._parameters.get("weight"), conv._parameters.get("bias")]
    return ts


def _stamp(ts: list) -> tuple:
    """What identifies the tensors' current contents, identity aside (see :meth:`FoldCache.get`).

    The version counter sees in-place updates; the data pointer sees ``param.data = new`` (which
    keeps the object and its version); the dtype sees ``.half()`` and the like. Raises
    RuntimeError for inference tensors, which keep no version counter.
    """
    return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype) for t in ts)


def _same_objects(refs: tuple, tensors: list) -> bool:
    return len(refs) == len(tensors) and all(
        (r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, tensors))


def needs_autograd(*tensors: Optional[Tensor]) -> bool:
    """True if autograd would record ops on any of ``tensors`` right now."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class FoldCache:
    """Per-module cache of folded ``(weight, bias)`` pairs for eval forwards.

    ``get(key, conv, norm, dtype, memory_format)`` returns the fold of ``norm`` into ``conv``'s
    weight (or, with ``conv=None``, the BN's own scale and shift), computing it again only when a
    tensor it depends on was replaced or modified in place. Not part of any state_dict.
    """

    def __init__(self) -> None:
        self._entries: Dict[tuple, tuple] = {}

    def clear(self) -> None:
        self._entries.clear()

    def get(self, key: str, conv: Optional[nn.Conv2d], norm: Optional[nn.Module], dtype: Optional[torch.dtype] = None,
            memory_format: torch.memory_format = torch.contiguous_format) -> Tuple[Tensor, Optional[Tensor]]:
        """Folded ``(weight, bias)`` of ``norm`` into ``conv``.

        ``conv=None``: the norm's own ``(scale, shift)``. ``norm=None``: the conv's own weight (in
        ``memory_format``) and bias, cached so a layout change is not paid on every forward.
        """
        tensors = _sources(conv, norm)
        if needs_autograd(*tensors):
            return self._compute(conv, norm, dtype, memory_format)
        if torch.compiler.is_compiling():
            # Inside a traced region the fold becomes part of the graph (a few elementwise ops on
            # the weights; constant-folded with freezing): version counters and data pointers are
            # nothing a compiler can guard on, and a cache entry made outside would be a stale
            # constant inside.
            with torch.no_grad():
                return self._compute(conv, norm, dtype, memory_format)
        try:
            stamp = _stamp(tensors)
        except RuntimeError:
            # Inference tensors keep no version counter: in-place changes would go unseen.
            with torch.no_grad():
                return self._compute(conv, norm, dtype, memory_format)
        meta = (dtype, memory_format, getattr(norm, "eps", None))
        hit = self._entries.get(key)
        # Identity by weak reference, not id(): a replaced tensor's id is reused by a later one.
        if hit is not None and hit[1] == stamp and hit[2] == meta and _same_objects(hit[0], tensors):
            return hit[3], hit[4]
        with torch.no_grad():
            w, b = self._compute(conv, norm, dtype, memory_format)
        refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self._entries[key] = (refs, stamp, meta, w, b)
        return w, b

    @staticmethod
    def _compute(conv, norm, dtype, memory_format):
        if norm is None:
            w = conv.weight if dtype is None else conv.weight.to(dtype)
            return w.contiguous(memory_format=memory_format), conv.bias
        scale, shift = bn_scale_shift(norm)
        if conv is None:
            return scale, shift
        w, b = fold_conv_bn(conv.weight, scale, shift, conv.bias, dtype)
        return w.contiguous(memory_format=memory_format), b

    # deepcopy / pickling of a module must not carry stale device tensors around
    def __deepcopy__(self, memo):
        return FoldCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._entries = {}
