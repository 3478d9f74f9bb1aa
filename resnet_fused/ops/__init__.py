"""Functional fused ops. Each takes and returns plain tensors; ``backend=None`` uses the current one.

- :func:`conv_bias_act`: conv + bias (folded BN) (+ residual) (+ ReLU), one pass.
- :func:`conv_bn_act`: the same from an eval BatchNorm's tensors (folds, then fuses).
- :func:`bn_act`: per-channel affine (eval BN) (+ residual) (+ ReLU), one pass.

Training (batch statistics), registered as ``torch.ops.resnet_fused.*`` custom ops:
- :func:`conv_train`: conv (+ batch-BN + ReLU applied as the input loads) (+ residual), with the
  BN statistics of its output from the epilogue.
- :func:`bn_relu_apply`, :func:`bn_relu_bwd_reduce`, :func:`bn_relu_bwd_apply`: batch-BN (+ residual
  (+ its BN)) + ReLU forward, and its two-pass backward.
- :class:`BlockTrainFn` (``ops.block_train``): a whole block's fused training forward and backward.
Each op file also holds its plain-PyTorch ``*_reference`` (tests and benchmarks import those).
"""
from .bn_act import bn_act, bn_act_reference
from .conv_bias_act import conv_bias_act, conv_bias_act_reference
from .conv_bn_act import conv_bn_act, conv_bn_act_reference
from .fold import FoldCache, bn_scale_shift, fold_conv_bn, is_foldable_bn
from .bn_train import bn_relu_apply, bn_relu_bwd_apply, bn_relu_bwd_reduce, bn_train_reference
from .conv_bn_train import conv_train, conv_train_reference
from .block_train import BlockTrainFn

__all__ = [
    "bn_act", "bn_act_reference", "conv_bias_act", "conv_bias_act_reference", "conv_bn_act",
    "conv_bn_act_reference", "FoldCache", "bn_scale_shift", "fold_conv_bn", "is_foldable_bn",
    "conv_train", "conv_train_reference", "bn_relu_apply", "bn_relu_bwd_reduce", "bn_relu_bwd_apply",
    "bn_train_reference", "BlockTrainFn",
]
