"""Functional fused ops. Each takes and returns plain tensors; ``backend=None`` uses the current one.

- :func:`conv_bias_act`: conv + bias (folded BN) (+ residual) (+ ReLU), one pass.
- :func:`conv_bn_act`: the same from an eval BatchNorm's tensors (folds, then fuses).
- :func:`bn_act`: per-channel affine (eval BN) (+ residual) (+ ReLU), one pass.
Each op file also holds its plain-PyTorch ``*_reference`` (tests and benchmarks import those).
"""
from .bn_act import bn_act, bn_act_reference
from .conv_bias_act import conv_bias_act, conv_bias_act_reference
from .conv_bn_act import conv_bn_act, conv_bn_act_reference
from .fold import FoldCache, bn_scale_shift, fold_conv_bn, is_foldable_bn

__all__ = [
    "bn_act", "bn_act_reference", "conv_bias_act", "conv_bias_act_reference", "conv_bn_act",
    "conv_bn_act_reference", "FoldCache", "bn_scale_shift", "fold_conv_bn", "is_foldable_bn",
]
