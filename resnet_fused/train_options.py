"""Training options of the fused blocks.

Low-memory mode (``RESNET_FUSED_LOW_MEMORY=1``, :func:`set_low_memory`, :func:`use_low_memory`):
a post-activation block whose last conv is 1x1 (torchvision's ``Bottleneck``) does not keep that
conv's output for the backward but computes it again there. Per Bottleneck, in units of the
bottleneck width, eager PyTorch keeps 12 activation tensors' worth (y1, relu1, y2, relu2, y3 and
the output at 4 units each for the last two), the fused block 10 (x, y1, y2, y3), low-memory 6 (x,
y1, y2); the price is one more 1x1 conv per block in the backward (about 8% of the block's
FLOPs). Off by default: the default is the faster path.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

ENV_VAR = "RESNET_FUSED_LOW_MEMORY"


def _parse(value: str) -> bool:
    v = value.strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"environment variable {ENV_VAR}={value!r}: expected 0/1, true/false, yes/no or on/off")


_low_memory = _parse(os.environ.get(ENV_VAR, ""))


def low_memory() -> bool:
    """Whether fused training blocks recompute their last 1x1 conv instead of keeping its output."""
    return _low_memory


def set_low_memory(enabled: bool) -> None:
    """Switch the low-memory mode for the whole process (see the module docstring)."""
    global _low_memory
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    _low_memory = enabled


@contextlib.contextmanager
def use_low_memory(enabled: bool = True) -> Iterator[None]:
    """``with use_low_memory():`` the low-memory mode inside the block, the previous one after."""
    before = _low_memory
    set_low_memory(enabled)
    try:
        yield
    finally:
        set_low_memory(before)
