"""Small helpers shared by the fused ops: argument checks, geometry, layouts."""
from __future__ import annotations

import functools

import contextlib

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_dtype_ok(dtype: torch.dtype) -> bool:
    """Dtypes our Triton kernels compute in (float64 stays on the PyTorch path)."""
    return dtype in TRITON_DTYPES


def autocast_applies(x: Tensor) -> bool:
    """Autocast is on for x's device and would cast a conv of x (it never casts float64)."""
    return x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a conv of ``x`` computes in: the autocast dtype when autocast applies."""
    return torch.get_autocast_dtype(x.device.type) if autocast_applies(x) else x.dtype


def check_float_tensor(name: str, t, dims: Optional[int] = None, device: Optional[torch.device] = None) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a floating tensor as expected."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float32, float16, bfloat16 or float64), "
                        f"got dtype {t.dtype}")
    if dims is not None and t.dim() != dims:
        layout = {4: " [N, C, H, W]", 1: " [C]"}.get(dims, "")
        raise ValueError(f"{name}: expected a {dims}-D tensor{layout}, got {t.dim()}-D with shape {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where the input is), got one on {t.device}")


def pair(v: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise ValueError(f"{name}: expected an int or a pair of ints, got {v}")
    return v  # type: ignore[return-value]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one spatial axis (floor mode, as PyTorch)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The memory format PyTorch would give an output computed from ``x``.

    channels_last when ``x`` is channels_last-contiguous and not also plain-contiguous (for C == 1
    or H == W == 1 both hold, and PyTorch then keeps the contiguous format).
    """
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def weight_memory_format(w: Tensor) -> torch.memory_format:
    """The memory format PyTorch reads a conv weight as: by its strides, as ATen's
    ``suggest_memory_format`` does. Unlike :func:`memory_format_of`, a 1x1 weight converted with
    ``.to(memory_format=torch.channels_last)`` counts as channels_last (it is both), and makes the
    conv's output channels_last, as in eager."""
    if w.dim() != 4:
        return torch.contiguous_format
    # the dense cases first (suggest_memory_format costs microseconds on every fused conv call)
    dense, dense_cl = w.is_contiguous(), w.is_contiguous(memory_format=torch.channels_last)
    if dense != dense_cl:
        return torch.channels_last if dense_cl else torch.contiguous_format
    # dense in both layouts (1x1 kernels, one channel), or neither: ATen decides by the strides
    # alone (remembered: ResNet-50 asks this for every 1x1 conv of every forward)
    return _format_by_strides(tuple(w.shape), w.stride())


@functools.lru_cache(maxsize=4096)
def _format_by_strides(shape: tuple, strides: tuple) -> torch.memory_format:
    try:
        from torch._prims_common import suggest_memory_format
    except ImportError:  # pragma: no cover - older torch
        return memory_format_of(torch.empty_strided(shape, strides, device="meta"))
    return suggest_memory_format(torch.empty_strided(shape, strides, device="meta"))


def conv_uses_tf32() -> bool:
    """Whether PyTorch runs float32 convolutions on TF32 tensor cores (cuDNN's setting).

    Reads the per-operator API first (``torch.backends.cudnn.conv.fp32_precision``, then its
    parents; the first that is not ``"none"`` decides, all ``"none"`` means IEEE). Reading the
    legacy ``cudnn.allow_tf32`` raises once conv and RNN were set differently through that API,
    so it is only the fallback for a torch that predates it.
    """
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        return bool(cudnn.allow_tf32)
    for prec in (conv.fp32_precision, getattr(cudnn, "fp32_precision", "none"),
                 getattr(torch.backends, "fp32_precision", "none")):
        if prec != "none":
            return prec == "tf32"
    return False


def interpreting(t: Tensor) -> bool:
    """Whether a Triton kernel on ``t`` runs through Triton's CPU interpreter (CPU tensors only
    reach Triton that way): small fixed blocks there, no autotuning."""
    return t.device.type == "cpu"


def device_guard(t: Tensor):
    """Make ``t``'s CUDA device current while a Triton kernel is launched (Triton launches on the
    current device and stream); a no-op context for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
