"""Backend selection: which implementation runs a fused op.

Names
-----
``"auto"``   the default: measured per call site (:mod:`resnet_fused.dispatch`): at the first call
             with a new key every available candidate (PyTorch, cuDNN's fused ops, Triton, the
             compiled library) is checked against PyTorch and timed on the real inputs, and the
             fastest correct one runs if it beats PyTorch by more than the noise; decisions are
             cached on disk. ``RESNET_FUSED_TUNE=0``: PyTorch's path unless a decision is cached.
``"triton"`` our Triton kernels. CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set
             before Triton was imported (how CI proves the kernels).
``"cuda"``   the compiled C++/CUDA library (``csrc/``, loaded by :mod:`resnet_fused._ext`, built on
             first use): CUTLASS convolutions with our epilogues and CUDA kernels for CUDA
             tensors, C++ kernels for CPU tensors. Asking for it where it is unavailable raises
             :class:`BackendUnavailableError` with the reason (not built, build failed, built for
             another torch, built without CUDA).
``"torch"``  plain PyTorch (cuDNN / oneDNN convolutions), BatchNorm folded in eval mode.

The process-wide choice starts from the ``RESNET_FUSED_BACKEND`` environment variable (default
``"auto"``); :func:`set_backend` changes it, :func:`use_backend` changes it for a ``with`` block.
A module converted with ``convert(model, backend=...)`` pins its own choice.

Cases a backend has no kernel for (``groups > 1``, float64) run on the PyTorch path, also when
that backend was asked for explicitly: the backend is available, the case is simply not fused.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
ENV_VAR = "RESNET_FUSED_BACKEND"


class BackendUnavailableError(RuntimeError):
    """Raised when a backend that cannot run here is requested explicitly."""


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected one of {BACKENDS} as a str, got {type(name).__name__}")
    lowered = name.strip().lower()
    if lowered not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return lowered


def _initial_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto") or "auto"
    try:
        return _check_name(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {ENV_VAR}={value!r}: {exc}") from None


_state = threading.local()
_default = _initial_backend()


def get_backend() -> str:
    """The backend name in force for this thread (``"auto"`` unless changed)."""
    return getattr(_state, "name", _default)


def set_backend(name: str) -> None:
    """Set the process-wide backend. An explicit unavailable backend fails here, not later."""
    global _default
    name = _check_name(name)
    if name not in ("auto", "torch"):
        reason = unavailable_reason(name)
        # Triton may still be usable for CUDA tensors later even if it is not for CPU ones,
        # so only a backend that can never run in this process is refused up front.
        if reason is not None and not _usable_on_some_device(name):
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    _default = name
    if hasattr(_state, "name"):
        _state.name = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: run the enclosed code with backend ``name`` (this thread only)."""
    name = _check_name(name)
    if name not in ("auto", "torch") and not _usable_on_some_device(name):
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {unavailable_reason(name)}")
    had = hasattr(_state, "name")
    previous = getattr(_state, "name", None)
    _state.name = name
    try:
        yield name
    finally:
        if had:
            _state.name = previous
        else:
            del _state.name


# ----------------------------------------------------------------------------------- availability
def triton_import_error() -> Optional[str]:
    """Why ``import triton`` fails here, or None when it works."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"import triton failed ({type(exc).__name__}: {exc})"
    return None


def _triton_interpret_flag() -> bool:
    """TRITON_INTERPRET as Triton itself reads it ("1", "true", "on", "yes"; "0", "false", "2" are off)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # no triton, or an older one without knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Triton chooses interpreter or compiler once per kernel, at ``@triton.jit`` time, i.e. when
# resnet_fused.ops is imported together with this module. Reading the variable later (or parsing it
# differently from Triton) would promise CPU kernels that were in fact compiled for a GPU.
_TRITON_INTERPRETING = _triton_interpret_flag()


def triton_interpreting() -> bool:
    """True when our Triton kernels run on the CPU through Triton's interpreter.

    Fixed when resnet_fused is imported (``TRITON_INTERPRET=1`` must be set before that, and before
    Triton's own import); changing the variable afterwards changes nothing, here or in Triton.
    """
    return _TRITON_INTERPRETING


def cuda_extension_error(device: Optional[torch.device] = None) -> Optional[str]:
    """Why the compiled library cannot run (on ``device``'s type, if given), or None."""
    from . import _ext

    if device is not None and device.type == "cuda":
        return _ext.cuda_error()
    return _ext.load_error()


def _usable_on_some_device(name: str) -> bool:
    if name == "triton":
        return triton_import_error() is None and (torch.cuda.is_available() or triton_interpreting())
    if name == "cuda":
        return cuda_extension_error() is None
    return True


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    """None if backend ``name`` can run on ``device`` (any device if None), else the reason."""
    name = _check_name(name)
    if name in ("auto", "torch"):
        return None
    if name == "cuda":
        if device is not None and device.type not in ("cuda", "cpu"):
            return f"the C++/CUDA extension runs CPU and CUDA tensors, got a tensor on {device}"
        return cuda_extension_error(device)
    # triton
    err = triton_import_error()
    if err is not None:
        return err
    if device is None:
        if torch.cuda.is_available() or triton_interpreting():
            return None
        return "no CUDA device, and TRITON_INTERPRET=1 was not set for CPU tensors"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    return (
        f"Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, set "
        f"before triton is imported); got a tensor on {device}"
    )


def available_backends(device: Optional[torch.device] = None) -> list:
    """Backend names usable here (on ``device`` if given), ``"auto"`` and ``"torch"`` always."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


# ---------------------------------------------------------------------------------- resolution
def resolve(requested: Optional[str], x: torch.Tensor, *, fusable: bool = True) -> str:
    """The backend that runs an op on ``x``: ``"triton"``, ``"cuda"``, ``"torch"``, or ``"auto"``.

    ``requested``: a backend name, or None for the thread's current choice.
    ``fusable``: False when the case has no fused kernel (groups > 1, float64): then the PyTorch
    path runs whatever was requested, since the requested backend itself is available.
    ``"auto"`` comes back for a fusable case under ``"auto"``: the caller hands it to the measured
    dispatch (:mod:`resnet_fused.dispatch`), which picks per call site.
    Raises :class:`BackendUnavailableError` when an explicitly requested backend cannot run on
    ``x``'s device.
    """
    name = get_backend() if requested is None else _check_name(requested)
    if name == "torch":
        return "torch"
    if name != "auto":
        reason = unavailable_reason(name, x.device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} requested but unavailable: {reason}")
        return name if fusable else "torch"
    return "auto" if fusable else "torch"
