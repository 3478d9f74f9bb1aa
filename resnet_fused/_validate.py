"""Input checks at the public boundary of the blocks and models.

Every check runs before any module is called, so a bad input never changes a running statistic or
``num_batches_tracked`` (``nn.BatchNorm2d`` itself bumps the counter before it rejects a batch).
Errors name the tensor, say what was expected and what came.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
from torch import Tensor, nn


def _first_param(module: nn.Module):
    for t in module.parameters():
        return t
    for t in module.buffers():
        if t.is_floating_point():
            return t
    return None


def check_input(owner: str, x, in_channels: int, module: nn.Module, name: str = "x") -> None:
    """Type, rank, dtype, channel count and device of a block/model input ``x``."""
    what = f"{owner} input {name}"
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what}: expected a 4-D tensor [N, C, H, W], got {x.dim()}-D with shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor (float32, float16, bfloat16 or float64), "
                        f"got dtype {x.dtype}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{what}: expected {in_channels} channels (shape [N, {in_channels}, H, W]), "
                         f"got shape {list(x.shape)}")
    p = _first_param(module)
    if p is None:
        return
    if x.device != p.device:
        raise ValueError(f"{what}: expected a tensor on {p.device} (where the module's parameters are), "
                         f"got one on {x.device}")
    # autocast reconciles float32/float16/bfloat16 operands, but never casts a float64 one
    autocast_ok = torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, p.dtype)
    if x.dtype != p.dtype and not autocast_ok:
        raise TypeError(f"{what}: expected dtype {p.dtype} (the module's parameter dtype; use torch.autocast "
                        f"for mixed precision, which never casts float64), got {x.dtype}")


def check_norm_batches(owner: str, x: Tensor, plan: Iterable[Tuple[str, nn.Module, int, int]]) -> None:
    """Reject a batch that some BatchNorm of ``plan`` could not normalise.

    ``plan``: (name, norm module, H, W) of the input each norm sees for this ``x``. A BatchNorm that
    uses batch statistics (training mode, or ``track_running_stats=False``) needs more than one
    value per channel (N * H * W > 1); an empty batch is fine, as in PyTorch.
    """
    n = x.shape[0]
    for name, norm, h, w in plan:
        # batch statistics: training mode, or no running stats to use (track_running_stats=False)
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not (norm.training or norm.running_mean is None):
            continue
        if n * h * w == 1:
            kind = "in training mode" if norm.training else "without running statistics"
            raise ValueError(
                f"{owner} input x: {name} (a BatchNorm {kind}) needs more than 1 value per channel, "
                f"but x of shape {list(x.shape)} gives it a batch of {n} at {h}x{w}; use a larger batch or "
                f"input, or eval mode")
        if h <= 0 or w <= 0:
            raise ValueError(f"{owner} input x: spatial size {list(x.shape[2:])} is too small: {name} would see "
                             f"{h}x{w}")
