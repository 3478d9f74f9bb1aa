"""Drop-in fused modules: torchvision's blocks, the pre-activation blocks, the fused stem."""
from .blocks import BasicBlock, Bottleneck, conv1x1, conv3x3
from .preact import PreActBottleneck, WideBasic
from .stem import StemBatchNorm, StemConv, fuse_stem

__all__ = ["BasicBlock", "Bottleneck", "WideBasic", "PreActBottleneck", "StemConv", "StemBatchNorm",
           "fuse_stem", "conv1x1", "conv3x3"]
