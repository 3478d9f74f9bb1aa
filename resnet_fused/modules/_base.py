"""What every fused block shares: backend choice, the fold cache, and the fused conv call.

A block runs one of two paths:
- *eager*: the reference forward, module by module (training mode, or anything not foldable). It
  calls the block's own BatchNorm modules, so running-stat updates are exactly ``nn.BatchNorm2d``'s
  (or ``nn.SyncBatchNorm``'s).
- *fused*: eval mode with every BatchNorm foldable: each conv + BN (+ residual) (+ ReLU) is one
  :func:`~resnet_fused.ops.conv_bias_act` call on folded, cached weights.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import backends
from ..ops._common import compute_dtype, conv_output_size, memory_format_of, triton_dtype_ok, weight_memory_format
from ..ops.bn_act import _run as _bn_act_run
from ..ops.conv_bias_act import _run as _conv_run
from ..ops.batch_stats import sync_group, update_running_stats
from ..ops.block_train import BlockSpec, BlockTrainFn, BNSpec, ConvSpec
from ..ops.fold import FoldCache, is_foldable_bn, needs_autograd
from ..dispatch import sites as dispatch_sites
from ..train_options import low_memory

try:  # symbolic tracing only (torch.export / torch.compile trace real shapes through our checks)
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as fx_tracing
except ImportError:  # older torch
    from torch.fx._symbolic_trace import is_fx_tracing as fx_tracing


def conv_out_hw(conv: nn.Conv2d, h: int, w: int) -> Tuple[int, int]:
    """Spatial size a conv module produces from an h x w input."""
    kh, kw = conv.kernel_size
    return (conv_output_size(h, kh, conv.stride[0], conv.padding[0], conv.dilation[0]),
            conv_output_size(w, kw, conv.stride[1], conv.padding[1], conv.dilation[1]))


def zero_padded(conv: nn.Conv2d) -> bool:
    """Zero padding given as numbers (not 'same'/'valid' strings): what the fused conv computes."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def is_plain_conv(m) -> bool:
    """A Conv2d whose forward is Conv2d's own and whose padding the fused conv computes exactly."""
    return isinstance(m, nn.Conv2d) and zero_padded(m) and type(m).forward is nn.Conv2d.forward


def is_plain_relu(m) -> bool:
    return type(m) is nn.ReLU


def conv_bn_pair(m) -> Optional[Tuple[nn.Conv2d, nn.Module]]:
    """(conv, bn) if ``m`` is torchvision's downsample ``Sequential(conv1x1, norm)``, else None."""
    if isinstance(m, nn.Sequential) and len(m) == 2 and is_plain_conv(m[0]):
        return m[0], m[1]
    return None


class SiteMemos(dict):
    """A module's dispatch memos, per conv key. A copy or an unpickled module starts empty: the
    entries hold candidate objects (functions, library handles) that belong to this process."""

    def __deepcopy__(self, memo):
        return SiteMemos()

    def __reduce__(self):
        return (SiteMemos, ())


class FusedBlockMixin:
    """Mixed into every block (an ``nn.Module``). ``backend=None`` follows the global choice."""

    backend: Optional[str] = None

    def _init_fused(self, backend: Optional[str] = None) -> None:
        if backend is not None:
            backends._check_name(backend)
        self.backend = backend
        self._fold = FoldCache()

    def _impl(self, x: Tensor) -> str:
        """Backend for this forward: "triton", "cuda", "torch", or "auto" (the measured dispatch picks
        per call site); errors if a pinned backend is missing."""
        return backends.resolve(self.backend, x, fusable=triton_dtype_ok(compute_dtype(x)))

    def _conv(self, key: str, impl: str, x: Tensor, conv: nn.Conv2d, norm: Optional[nn.Module] = None,
              residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
        """``relu?(norm(conv(x)) + residual)`` as one fused conv, ``norm`` (eval BN or None) folded."""
        w_fmt = weight_memory_format(conv.weight)
        # PyTorch's rule for a conv's output: channels_last if the input or the weight is
        out_fmt = torch.channels_last if torch.channels_last in (w_fmt, memory_format_of(x)) else torch.contiguous_format
        if impl == "auto" and conv.groups == 1:
            grad = needs_autograd(x, residual, conv.weight, conv.bias, getattr(norm, "weight", None),
                                  getattr(norm, "bias", None))
            return dispatch_sites.conv_site(
                x, lambda fmt: self._fold.get(key, conv, norm, memory_format=fmt), tuple(conv.weight.shape), w_fmt,
                residual, conv.stride, conv.padding, conv.dilation, relu, out_fmt, grad,
                site=f"{type(self).__name__}.{key}", memo=self._site_memo(key))
        impl = "torch" if impl == "auto" else impl  # grouped convs: no fused kernel to measure
        # the Triton and CUTLASS kernels read channels_last weights; grouped convs run on the PyTorch
        # path, where a channels_last weight would only make PyTorch produce (then undo) that layout
        fused_cl = impl == "triton" or (impl == "cuda" and x.is_cuda)
        fmt = torch.channels_last if fused_cl and conv.groups == 1 else w_fmt
        w, b = self._fold.get(key, conv, norm, memory_format=fmt)
        return _conv_run(x, w, b, residual, conv.stride, conv.padding, conv.dilation, conv.groups, relu,
                         backend=impl, out_format=out_fmt)

    def _site_memo(self, key: str) -> dict:
        """This module's memo of settled dispatch choices for conv ``key`` (see
        :func:`resnet_fused.dispatch.sites.conv_site`); not part of any state_dict."""
        memos = self.__dict__.get("_dispatch_memos")
        if memos is None:
            memos = self.__dict__["_dispatch_memos"] = SiteMemos()
        return memos.setdefault(key, {})

    def _bn_relu(self, key: str, impl: str, x: Tensor, norm: nn.Module) -> Tensor:
        """``relu(norm(x))`` for an eval BatchNorm, one pass."""
        scale, shift = self._fold.get(key, None, norm)
        if impl == "auto":
            return dispatch_sites.bn_act_site(x, scale, shift, None, True, needs_autograd(x, scale, shift),
                                              site=f"{type(self).__name__}.{key}")
        return _bn_act_run(x, scale, shift, None, True, backend=impl)

    def _train(self, x: Tensor, impl: str, convs, norms, short_conv=None, short_norm=None) -> Tensor:
        """A fused-trainable training forward: the fused chain on backend ``impl``, or under "auto"
        the measured choice between it and the block's own modules."""
        if impl == "auto":
            return dispatch_sites.block_train_site(self, x, convs, norms, short_conv, short_norm, low_memory())
        if impl in TRAIN_BACKENDS:
            return self._train_fused(x, impl)
        return self._forward_eager(x)


def all_foldable(*norms) -> bool:
    return all(is_foldable_bn(n) for n in norms)


# ------------------------------------------------------------------------------- fused training
def training_bn(m) -> bool:
    """A BatchNorm (or SyncBatchNorm) normalising with batch statistics in this forward."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training


def bias_free_conv(m) -> bool:
    """A plain conv the fused training path computes exactly (no bias, groups = 1)."""
    return is_plain_conv(m) and m.bias is None and m.groups == 1


def _conv_spec(conv: nn.Conv2d) -> ConvSpec:
    return ConvSpec(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))


def _bn_spec(norm: nn.Module) -> BNSpec:
    return BNSpec(float(norm.eps), norm.weight is not None, sync_group(norm))


TRAIN_BACKENDS = ("triton", "cuda")  # backends with a fused training block


def run_block_train(x: Tensor, preact: bool, convs, norms, short_conv: Optional[nn.Conv2d] = None,
                    short_norm: Optional[nn.Module] = None, *, backend: str = "triton") -> Tensor:
    """One fused training forward of a block (:class:`~resnet_fused.ops.block_train.BlockTrainFn`),
    then each BatchNorm's running statistics updated exactly as ``nn.BatchNorm2d`` would.

    ``convs``/``norms``: the main chain in order (post-activation: norm i after conv i;
    pre-activation: norm i before conv i). ``short_conv``/``short_norm``: the projection shortcut.
    ``backend``: whose kernels, ``"triton"`` or ``"cuda"`` (the compiled library).
    """
    # PyTorch's rule, followed through the chain: once a conv's input or weight is channels_last,
    # its output is, and so is every later activation of the block
    cl = torch.channels_last in [memory_format_of(x)] + [weight_memory_format(c.weight) for c in convs]
    # low-memory mode: only where the recomputed conv is a cheap 1x1 (Bottleneck's conv3)
    recompute = (low_memory() and not preact and tuple(convs[-1].kernel_size) == (1, 1))
    spec = BlockSpec(preact, tuple(_conv_spec(c) for c in convs), tuple(_bn_spec(n) for n in norms),
                     None if short_conv is None else _conv_spec(short_conv),
                     None if short_norm is None else _bn_spec(short_norm), compute_dtype(x), cl, recompute,
                     backend)
    params = [c.weight for c in convs] + [p for n in norms for p in (n.weight, n.bias)]
    if short_conv is not None:
        params.append(short_conv.weight)
        if short_norm is not None:
            params += [short_norm.weight, short_norm.bias]
    out, *stats = BlockTrainFn.apply(spec, x, *params)
    all_norms = list(norms) + ([short_norm] if short_norm is not None else [])
    for i, norm in enumerate(all_norms):
        count, mean, var = stats[3 * i:3 * i + 3]
        update_running_stats(norm, mean, var, count)
    return out
