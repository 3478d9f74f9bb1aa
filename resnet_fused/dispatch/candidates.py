"""The candidates of each dispatched op, and :func:`register_candidate` for new ones.

Ops and the signature every candidate of that op has (built-in or registered):

``"conv_bias_act"`` — an inference conv site: conv + folded BatchNorm (+ residual) (+ ReLU)::

    fn(x, weight, bias, residual, stride, padding, dilation, relu, out_format) -> Tensor

    x [N, Cin, H, W] and weight [Cout, Cin, KH, KW] in the compute dtype (autocast already applied;
    autocast is off inside the call); bias [Cout] float32 (the folded BN shift) or None; residual
    [N, Cout, OH, OW] or None, added before the ReLU; stride/padding/dilation pairs; out_format the
    memory format the result must have. Returns relu?(conv2d(x, weight) + bias + residual) with
    dtype promote(x.dtype, residual.dtype). groups is always 1 (grouped convs are not dispatched).
    Built in: ``torch`` (cuDNN/oneDNN conv with the bias inside, then in-place add and ReLU: the
    reference), ``cudnn_fused`` (CUDA: ``aten.cudnn_convolution_relu`` /
    ``cudnn_convolution_add_relu``, one cuDNN call; forward only), ``triton``, ``cuda`` (CUTLASS on
    CUDA tensors, oneDNN + our C++ epilogue on CPU tensors).

``"bn_act"`` — an eval BatchNorm (+ residual) + ReLU pass (the pre-activation blocks' first BN)::

    fn(x, scale, shift, residual, relu) -> Tensor       relu?(x * scale[c] + shift[c] + residual)

``"block_train"`` — a block's training forward (timed as forward + backward)::

    fn(block, x) -> Tensor

    block is a *copy* of the user's block during trials (its running statistics and gradients are
    the copy's) and the block itself afterwards; the function must update its BatchNorms' running
    statistics as ``nn.BatchNorm2d`` does and return an output autograd can differentiate.
    Built in: ``torch`` (the block's own modules), ``triton`` and ``cuda`` (the fused chain).

The Triton interpreter (CPU tensors under ``TRITON_INTERPRET=1``) is a test vehicle, not a
candidate: ``"auto"`` never measures it. Ask for ``backend="triton"`` to run it.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from .. import backends
from ..ops.bn_act import _run as _bn_act_run
from ..ops.conv_bias_act import _run as _conv_bias_act_run
from ..ops._common import triton_dtype_ok
from .keys import Facts

OPS = ("conv_bias_act", "bn_act", "block_train")
BUILTIN = {"conv_bias_act": ("torch", "cudnn_fused", "triton", "cuda"), "bn_act": ("torch", "triton", "cuda"),
           "block_train": ("torch", "triton", "cuda")}


@dataclass(frozen=True)
class Candidate:
    op: str
    name: str
    fn: Callable
    supports: Optional[Callable[[Facts], Optional[str]]] = None  # None if it can run the case, else why not
    weight_format: Optional[Callable[[Facts], torch.memory_format]] = None  # conv: the weight layout it reads
    builtin: bool = False

    def unsupported(self, facts: Facts) -> Optional[str]:
        return None if self.supports is None else self.supports(facts)


# --------------------------------------------------------------------------------- availability
_warned: set = set()
_warn_lock = threading.Lock()


def _backend_missing(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device``; warns once per process when "auto" loses a
    candidate that way (a missing or broken build, not a case the kernel does not cover)."""
    if name == "triton" and device.type != "cuda":
        return "the Triton interpreter is a test vehicle: 'auto' does not measure it"
    reason = backends.unavailable_reason(name, device)
    if reason is not None:
        with _warn_lock:
            if (name, device.type) not in _warned:
                _warned.add((name, device.type))
                warnings.warn(f"resnet_fused: 'auto' runs without its {name!r} candidate on {device.type} "
                              f"tensors: {reason}", RuntimeWarning, stacklevel=6)
    return reason


def _same_dtype_residual(facts: Facts) -> Optional[str]:
    if facts.residual_dtype is not None and facts.residual_dtype != facts.cdt:
        return f"residual dtype {facts.residual_dtype} differs from the compute dtype {facts.cdt}"
    return None


def _kernel_dtypes(facts: Facts) -> Optional[str]:
    if not (triton_dtype_ok(facts.cdt) and triton_dtype_ok(facts.out_dtype)):
        return f"no kernel for {facts.cdt} -> {facts.out_dtype}"
    return None


# ------------------------------------------------------------------------------ built-in: conv
def _conv_run(backend: str) -> Callable:
    def run(x, weight, bias, residual, stride, padding, dilation, relu, out_format):
        return _conv_bias_act_run(x, weight, bias, residual, stride, padding, dilation, 1, relu, backend=backend,
                         out_format=out_format)
    run.__name__ = f"conv_bias_act_{backend}"
    return run


def _cudnn_fused(x, weight, bias, residual, stride, padding, dilation, relu, out_format):
    """cuDNN's own conv + bias (+ z) + ReLU: relu(conv(x, w) + bias + 1.0 * residual). The bias is
    rounded to x's dtype first, as the ``torch`` candidate's conv does."""
    b = None if bias is None else bias.to(x.dtype)
    s, p, d = list(stride), list(padding), list(dilation)
    if residual is None:
        y = torch.ops.aten.cudnn_convolution_relu(x, weight, b, s, p, d, 1)
    else:
        y = torch.ops.aten.cudnn_convolution_add_relu(x, weight, residual, 1.0, b, s, p, d, 1)
    return y if y.is_contiguous(memory_format=out_format) else y.contiguous(memory_format=out_format)


def _cudnn_supports(facts: Facts) -> Optional[str]:
    if facts.device.type != "cuda":
        return "CUDA only"
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available"
    if not facts.relu:
        return "no ReLU: cuDNN's fused op always applies one"
    if facts.grad:
        return "forward only (no backward formula)"
    return _kernel_dtypes(facts) or _same_dtype_residual(facts)


def _triton_supports(facts: Facts) -> Optional[str]:
    return _backend_missing("triton", facts.device) or _kernel_dtypes(facts)


def _cuda_supports(facts: Facts) -> Optional[str]:
    missing = _backend_missing("cuda", facts.device)
    if missing is not None:
        return missing
    if facts.out_dtype != facts.cdt:
        return f"output dtype {facts.out_dtype} differs from the compute dtype {facts.cdt}"
    return _kernel_dtypes(facts) or _same_dtype_residual(facts)


def _model_layout(facts: Facts) -> torch.memory_format:
    return facts.w_fmt


def _channels_last(facts: Facts) -> torch.memory_format:
    return torch.channels_last


def _cuda_layout(facts: Facts) -> torch.memory_format:
    # CUTLASS reads NHWC weights; on CPU the conv is oneDNN's, which keeps the model's layout
    return torch.channels_last if facts.device.type == "cuda" else facts.w_fmt


# ---------------------------------------------------------------------------- built-in: bn_act
def _bn_run(backend: str) -> Callable:
    def run(x, scale, shift, residual, relu):
        return _bn_act_run(x, scale, shift, residual, relu, backend=backend)
    run.__name__ = f"bn_act_{backend}"
    return run


def _bn_triton_supports(facts: Facts) -> Optional[str]:
    return _backend_missing("triton", facts.device) or _kernel_dtypes(facts)


def _bn_cuda_supports(facts: Facts) -> Optional[str]:
    return _backend_missing("cuda", facts.device) or _kernel_dtypes(facts)


# ------------------------------------------------------------------------------- built-in: block
def _block_eager(block, x):
    return block._forward_eager(x)


def _block_fused(backend: str) -> Callable:
    def run(block, x):
        return block._train_fused(x, backend)
    run.__name__ = f"block_train_{backend}"
    return run


def _block_triton_supports(facts: Facts) -> Optional[str]:
    return _backend_missing("triton", facts.device)


def _block_cuda_supports(facts: Facts) -> Optional[str]:
    return _backend_missing("cuda", facts.device)


# ------------------------------------------------------------------------------------- registry
_lock = threading.Lock()
_registry: Dict[str, Dict[str, Candidate]] = {
    "conv_bias_act": {
        "torch": Candidate("conv_bias_act", "torch", _conv_run("torch"), None, _model_layout, True),
        "cudnn_fused": Candidate("conv_bias_act", "cudnn_fused", _cudnn_fused, _cudnn_supports, _model_layout, True),
        "triton": Candidate("conv_bias_act", "triton", _conv_run("triton"), _triton_supports, _channels_last, True),
        "cuda": Candidate("conv_bias_act", "cuda", _conv_run("cuda"), _cuda_supports, _cuda_layout, True),
    },
    "bn_act": {
        "torch": Candidate("bn_act", "torch", _bn_run("torch"), None, None, True),
        "triton": Candidate("bn_act", "triton", _bn_run("triton"), _bn_triton_supports, None, True),
        "cuda": Candidate("bn_act", "cuda", _bn_run("cuda"), _bn_cuda_supports, None, True),
    },
    "block_train": {
        "torch": Candidate("block_train", "torch", _block_eager, None, None, True),
        "triton": Candidate("block_train", "triton", _block_fused("triton"), _block_triton_supports, None, True),
        "cuda": Candidate("block_train", "cuda", _block_fused("cuda"), _block_cuda_supports, None, True),
    },
}
generation = {op: 0 for op in OPS}  # bumped on every (un)registration: in-memory decisions start over


def candidates(op: str) -> List[Candidate]:
    """The op's candidates in trial order: ``torch`` (the reference) first, built-ins, then registered."""
    return list(_registry[op].values())


def get(op: str, name: str) -> Candidate:
    return _registry[op][name]


def _check_op(op) -> str:
    if not isinstance(op, str) or op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    return op


def register_candidate(op: str, name: str, fn: Callable) -> None:
    """Add ``fn`` as candidate ``name`` of ``op`` (signatures in this module's docstring).

    From the next call on, ``"auto"`` measures it on every new key of ``op`` exactly like the
    built-in candidates: checked against the ``torch`` candidate's output, timed, excluded with one
    warning if it raises or is wrong, chosen only if it beats ``torch`` by more than the noise.
    Decisions made before are forgotten in this process (a registered candidate is part of the key,
    so cached decisions from other processes do not apply either).
    """
    _check_op(op)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name: expected a non-empty str, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    with _lock:
        if name in BUILTIN[op]:
            raise ValueError(f"name: {name!r} is a built-in candidate of {op!r}; choose another name")
        _registry[op][name] = Candidate(op, name, fn, None, _model_layout if op == "conv_bias_act" else None, False)
        generation[op] += 1


def unregister_candidate(op: str, name: str) -> None:
    """Remove a candidate added by :func:`register_candidate` (built-ins cannot be removed)."""
    _check_op(op)
    with _lock:
        if name in BUILTIN[op]:
            raise ValueError(f"name: {name!r} is a built-in candidate of {op!r} and cannot be removed")
        if name not in _registry[op]:
            raise ValueError(f"name: no registered candidate {name!r} for {op!r}")
        del _registry[op][name]
        generation[op] += 1
