"""resnet_fused: fused GPU kernels for ResNets and Wide ResNets, as drop-in PyTorch modules.

    import resnet_fused as rf
    model = rf.models.resnet50()            # torchvision's structure and state_dict keys
    model = rf.convert(torchvision_model)   # or convert an existing model in place
    with rf.use_backend("triton"): ...

Public API: BasicBlock, Bottleneck, WideBasic, PreActBottleneck, convert, models, ops, the
backend controls use_backend / set_backend / get_backend / available_backends, the measured
dispatch of ``"auto"`` (dispatch_report, register_candidate; :mod:`resnet_fused.dispatch`), and the
training memory switch set_low_memory / use_low_memory / low_memory.
"""
from . import ops
from .backends import (BackendUnavailableError, available_backends, get_backend, set_backend,
                       unavailable_reason, use_backend)
from .convert import ConversionReport, convert
from .dispatch import DispatchReport, dispatch_report, register_candidate, unregister_candidate
from .modules import BasicBlock, Bottleneck, PreActBottleneck, WideBasic
from .train_options import low_memory, set_low_memory, use_low_memory
from . import models  # noqa: E402  (models import the modules above)

__version__ = "0.1.0"

__all__ = [
    "BasicBlock", "Bottleneck", "WideBasic", "PreActBottleneck", "convert", "ConversionReport", "models",
    "ops", "use_backend", "set_backend", "get_backend", "available_backends", "unavailable_reason",
    "BackendUnavailableError", "low_memory", "set_low_memory", "use_low_memory", "__version__",
    "dispatch_report", "DispatchReport", "register_candidate", "unregister_candidate",
]
