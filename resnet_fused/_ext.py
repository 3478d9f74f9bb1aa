"""The one place that loads the compiled C++/CUDA library (the ``"cuda"`` backend).

Order of attempts, once per process, on first use (never at import):

1. the ahead-of-time build ``resnet_fused/_C*.so`` (``RESNET_FUSED_BUILD_EXT=1 pip install
   --no-build-isolation .``), if its recorded torch version is the running one;
2. otherwise, unless ``RESNET_FUSED_JIT=0``, a just-in-time build of ``csrc/`` with
   :func:`resnet_fused.build.jit_build` (cached by torch's extension builder).

It remembers *why* the library is unavailable (not built, no compiler, the build failed, built for
another torch, built without CUDA) so that asking for ``backend="cuda"`` says so precisely, while
``"auto"`` falls back with one warning. The ops live under ``torch.ops.resnet_fused_C``; their fake
implementations (for ``torch.compile``) are registered right after loading.
"""
from __future__ import annotations

import glob
import json
import os
import threading
from pathlib import Path
from typing import Optional

import torch

JIT_ENV = "RESNET_FUSED_JIT"
_lock = threading.Lock()
_state: dict = {}


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def _aot_library() -> Optional[Path]:
    hits = sorted(glob.glob(str(_package_dir() / "_C*.so")) + glob.glob(str(_package_dir() / "_C*.pyd")))
    return Path(hits[0]) if hits else None


def _aot_problem(lib: Path) -> Optional[str]:
    """Why the ahead-of-time library must not be loaded into this process, or None."""
    meta = lib.with_name("_C.build.json")
    try:
        recorded = json.loads(meta.read_text())
        built_for = recorded["torch"]
    except (OSError, ValueError, KeyError):
        return f"the ahead-of-time build {lib.name} has no readable {meta.name}; rebuild it"
    _state["cuda_problem"] = recorded.get("cuda_problem")
    if built_for != torch.__version__:
        return (f"the ahead-of-time build {lib.name} was built for torch {built_for}, this is torch "
                f"{torch.__version__}; rebuild it (RESNET_FUSED_BUILD_EXT=1 pip install --no-build-isolation .)")
    return None


def _jit_allowed() -> bool:
    return os.environ.get(JIT_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _load() -> None:
    lib = _aot_library()
    if lib is not None:
        problem = _aot_problem(lib)
        if problem is not None:
            _state["error"] = problem
            return
        path = str(lib)
    elif not _jit_allowed():
        _state["error"] = (f"the C++/CUDA extension is not built: no ahead-of-time build, and {JIT_ENV}=0 "
                           "forbids building it on first use")
        return
    else:
        from . import build

        try:
            path = build.jit_build()
        except Exception as exc:  # no compiler or ninja, a compile error, no sources, a failed load...
            cause = exc.__cause__ or exc
            lines = str(cause).strip().splitlines()
            what = "loading" if isinstance(exc, OSError) else "building"
            _state["error"] = (f"{what} the C++/CUDA extension failed ({type(cause).__name__}: "
                               f"{(lines[0] if lines else '')[:300]}); run `python -m resnet_fused.build "
                               "--verbose` for the log")
            return
        _state["cuda_problem"] = build.cuda_build_problem()
    try:
        if not _registered():  # a reset() after loading keeps the loaded library
            torch.ops.load_library(path)
    except Exception as exc:
        _state["error"] = f"loading the C++/CUDA extension {path} failed ({type(exc).__name__}: {exc})"
        return
    _state["path"] = path
    _state["info"] = json.loads(torch.ops.resnet_fused_C.build_info())
    from .ops import _ext_ops

    _ext_ops.register_fakes()


def _registered() -> bool:
    try:
        torch.ops.resnet_fused_C.build_info  # noqa: B018 - raises when the library is not loaded
        return True
    except (AttributeError, RuntimeError):
        return False


def _ensure() -> dict:
    if "done" not in _state:
        with _lock:
            if "done" not in _state:
                _load()
                _state["done"] = True
    return _state


# Both answers are fixed for the life of the process, and under torch.compile they are computed
# outside the traced code (a build, file reads and a lock are nothing to trace) and taken as
# constants: a first use of the library inside a compiled region works like any other.
@torch.compiler.assume_constant_result
def load_error() -> Optional[str]:
    """None if the library is loaded (building it first if needed), else why it is unavailable."""
    return _ensure().get("error")


@torch.compiler.assume_constant_result
def cuda_error() -> Optional[str]:
    """None if the library runs CUDA tensors, else why not (it may still run CPU tensors)."""
    state = _ensure()
    if state.get("error"):
        return state["error"]
    if not state["info"].get("cuda"):
        why = state.get("cuda_problem") or "it was built without CUDA"
        return f"the C++/CUDA extension has no CUDA kernels in this build: {why}"
    return None


def build_info() -> Optional[dict]:
    """What the loaded library was built with (torch version, CUDA, archs), or None."""
    return _ensure().get("info")


def library_path() -> Optional[str]:
    return _ensure().get("path")


def extension():
    """``torch.ops.resnet_fused_C``; raises RuntimeError with the reason when unavailable."""
    err = load_error()
    if err is not None:
        raise RuntimeError(err)
    return torch.ops.resnet_fused_C


def reset() -> None:
    """Forget the outcome of the last attempt (after building, in tests). A library already loaded
    into the process stays loaded."""
    with _lock:
        _state.clear()
