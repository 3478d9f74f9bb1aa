"""Dispatch keys: everything that can change which candidate is fastest, or whether one is right.

A decision is keyed by two parts:

- the **case** — the op and every property of its inputs: shapes, convolution geometry, dtypes
  (after autocast), memory formats, residual and ReLU flags, the TF32 setting, whether autograd
  records. Built on every call, so it is a plain tuple (cheap to build and to hash);
- the **environment** — the device (CUDA: name and compute capability; CPU: model name and the
  intra-op thread count), the versions of resnet_fused (with a hash of its kernel sources, so an
  edited kernel is never judged by an old measurement), torch and triton, and the names of the
  candidates available for the case. Fixed per device in a process, so computed once.

:func:`key_string` joins both into the canonical string the persistent cache is keyed by: a change
of any field is a different key, so a cached decision can never outlive what it was measured on.
"""
from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..ops._common import conv_uses_tf32, memory_format_of, weight_memory_format

# field names of each op's case tuple, in order (the tuple leads with the op's name)
CASE_FIELDS = {
    "conv_bias_act": ("x", "layout", "weight", "w_layout", "stride", "padding", "dilation", "groups",
                      "dtype", "out_dtype", "residual", "relu", "tf32", "grad"),
    "bn_act": ("x", "layout", "dtype", "out_dtype", "residual", "relu", "grad"),
    "block_train": ("block", "x", "layout", "w_layout", "convs", "shortcut", "dtype", "affine", "tf32",
                    "low_memory"),
}


_DTYPE_NAMES = {}


def dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    if dtype is None:
        return None
    name = _DTYPE_NAMES.get(dtype)
    if name is None:  # str(dtype) costs a microsecond: this runs on every dispatched call
        name = _DTYPE_NAMES[dtype] = str(dtype).replace("torch.", "")
    return name


def layout_name(t: Tensor) -> str:
    """"cl" (channels_last) or "nchw", by the rule PyTorch uses for an op's output."""
    return "cl" if memory_format_of(t) == torch.channels_last else "nchw"


def format_name(fmt: torch.memory_format) -> str:
    return "cl" if fmt == torch.channels_last else "nchw"


def residual_field(residual: Optional[Tensor]) -> Optional[Tuple[str, str]]:
    return None if residual is None else (dtype_name(residual.dtype), layout_name(residual))


@torch.compiler.assume_constant_result
def _tf32() -> bool:
    """cuDNN's fp32 setting (a constant to torch.compile: reading torch.backends does not trace)."""
    return conv_uses_tf32()


def _uses_tf32(x: Tensor, cdt: torch.dtype) -> bool:
    """TF32 applies to float32 convolutions on CUDA only (CPU convs are IEEE whatever the setting)."""
    return bool(cdt == torch.float32 and x.device.type == "cuda" and _tf32())


def conv_case(x: Tensor, w_shape: Sequence[int], w_fmt: torch.memory_format, stride, padding, dilation,
              groups: int, cdt: torch.dtype, out_dtype: torch.dtype, residual: Optional[Tensor], relu: bool,
              grad: bool) -> tuple:
    """The case of one fused conv call (``x`` before any autocast cast; ``cdt`` the compute dtype)."""
    return ("conv_bias_act", tuple(x.shape), layout_name(x), tuple(w_shape), format_name(w_fmt),
            tuple(stride), tuple(padding), tuple(dilation), int(groups), dtype_name(cdt), dtype_name(out_dtype),
            residual_field(residual), bool(relu), _uses_tf32(x, cdt), bool(grad))


def bn_act_case(x: Tensor, out_dtype: torch.dtype, residual: Optional[Tensor], relu: bool, grad: bool) -> tuple:
    return ("bn_act", tuple(x.shape), layout_name(x), dtype_name(x.dtype), dtype_name(out_dtype),
            residual_field(residual), bool(relu), bool(grad))


def _conv_geometry(conv) -> tuple:
    return (conv.in_channels, conv.out_channels, *conv.kernel_size, *conv.stride, *conv.padding, *conv.dilation)


def block_case(block, x: Tensor, convs, norms, short_conv, cdt: torch.dtype, low_memory: bool) -> tuple:
    """The case of one training forward + backward of a fused-trainable block: its class, every
    conv's (Cin, Cout, KH, KW, stride, padding, dilation), the shortcut conv, the input and the
    modes that change which kernels run."""
    w_cl = any(weight_memory_format(c.weight) == torch.channels_last for c in convs)
    return ("block_train", type(block).__name__, tuple(x.shape), layout_name(x), "cl" if w_cl else "nchw",
            tuple(_conv_geometry(c) for c in convs), None if short_conv is None else _conv_geometry(short_conv),
            dtype_name(cdt), tuple(n.weight is not None for n in norms),
            _uses_tf32(x, cdt), bool(low_memory))


class Facts(NamedTuple):
    """What a candidate needs to know to say whether it can run a case (no tensors: the same
    answer comes from a live call, from a cached key, or inside a traced region)."""
    op: str
    device: torch.device
    cdt: torch.dtype
    out_dtype: torch.dtype
    residual_dtype: Optional[torch.dtype]
    relu: bool
    grad: bool
    w_fmt: torch.memory_format


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else getattr(torch, name)


@functools.lru_cache(maxsize=4096)
def facts(case: tuple, device: torch.device) -> Facts:
    f = dict(zip(CASE_FIELDS[case[0]], case[1:]))
    res = f.get("residual")
    return Facts(case[0], device, _dtype(f["dtype"]), _dtype(f.get("out_dtype", f["dtype"])),
                 None if res is None else _dtype(res[0]), bool(f.get("relu", True)), bool(f.get("grad", True)),
                 torch.channels_last if f.get("w_layout") == "cl" else torch.contiguous_format)


def case_fields(case: tuple) -> dict:
    """The case tuple as a {field: value} dict (for the cache file and the report)."""
    names = CASE_FIELDS[case[0]]
    return {"op": case[0], **{n: _jsonable(v) for n, v in zip(names, case[1:])}}


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(i) for i in v]
    return v


# ---------------------------------------------------------------------------------- environment
@functools.lru_cache(maxsize=None)
def library_version() -> str:
    """``__version__`` plus a hash of the kernel sources (ops/*.py and csrc/): a changed kernel
    changes every key, so nothing measured on the old one is reused."""
    from .. import __version__

    root = Path(__file__).resolve().parent.parent
    files = sorted((root / "ops").glob("*.py"))
    try:
        from ..build import csrc_dir

        src = csrc_dir()
        files += sorted(p for p in src.rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu"))
    except (FileNotFoundError, ImportError):
        pass
    h = hashlib.sha1()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return f"{__version__}+{h.hexdigest()[:10]}"


@functools.lru_cache(maxsize=None)
def _versions() -> Tuple[str, str, Optional[str]]:
    try:
        import triton

        tv = triton.__version__
    except Exception:  # no (or a broken) triton: part of the key all the same
        tv = None
    return library_version(), torch.__version__, tv


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _gpu(index: int) -> Tuple[str, str]:
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def device_fields(device: torch.device) -> dict:
    """What the device contributes to a key: its name and capability (CUDA) or model and thread
    count (CPU: PyTorch's kernels and ours both scale with it)."""
    if device.type == "cuda":
        name, cap = _gpu(device.index if device.index is not None else torch.cuda.current_device())
        return {"device": name, "capability": cap}
    if device.type == "cpu":
        return {"device": "cpu: " + _cpu_name(), "threads": torch.get_num_threads()}
    return {"device": str(device)}


def env_fields(device: torch.device, candidates: Sequence[str]) -> dict:
    lib, tv, trv = _versions()
    return {**device_fields(device), "resnet_fused": lib, "torch": tv, "triton": trv,
            "candidates": list(candidates)}


def key_string(case: tuple, device: torch.device, candidates: Sequence[str]) -> str:
    """The canonical, human-readable key of a decision (what the cache file is keyed by)."""
    fields = {**case_fields(case), **env_fields(device, candidates)}
    return "|".join(f"{k}={_short(v)}" for k, v in fields.items())


def _short(v) -> str:
    if isinstance(v, list):
        return "x".join(_short(i) for i in v) if all(isinstance(i, int) for i in v) else \
            "(" + ",".join(_short(i) for i in v) + ")"
    return str(v)
