"""The one place that loads the compiled C++/CUDA extension (the ``"cuda"`` backend).

It remembers *why* the extension is unavailable so that asking for ``backend="cuda"`` can say so
precisely, while ``"auto"`` silently keeps to the other backends. This release ships no compiled
extension: the sources and their build arrive with the C++/CUDA backend.
"""
from __future__ import annotations

import functools
from typing import Optional


@functools.lru_cache(maxsize=None)
def _try_load():
    try:
        from . import _C  # type: ignore[attr-defined]  # built by the (future) opt-in build
    except ImportError as exc:
        return None, (
            "the C++/CUDA extension resnet_fused._C is not built in this release "
            f"(import failed: {exc}); use backend 'triton' or 'torch'"
        )
    return _C, None


def load_error() -> Optional[str]:
    """None if the extension imported, else the reason it is unavailable."""
    return _try_load()[1]


def extension():
    """The loaded extension module; raises RuntimeError with the reason when unavailable."""
    mod, err = _try_load()
    if mod is None:
        raise RuntimeError(err)
    return mod
