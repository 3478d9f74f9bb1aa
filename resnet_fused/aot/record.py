"""Recording Triton launches instead of running them: which kernel variants a workload compiles.

Inside :func:`recording`, every ``kernel[grid](*args, **meta)`` call of a ``@triton.jit`` kernel
(``JITFunction.run``, or ``InterpretedFunction.run`` under ``TRITON_INTERPRET=1``) is turned into a
:class:`Launch`: the kernel, the argument types, the constexprs and the specialisation attributes
Triton's JIT would compile it with on an NVIDIA GPU, and the launch options (``num_warps``,
``num_stages``...). Nothing is launched and nothing is compiled. An ``@triton.autotune`` kernel
(``Autotuner.run``) records one launch per configuration that survives its pruning: each is one
compilation on a GPU (the autotuner compiles and times every one).

Specialisation is computed by Triton's own binder (``create_function_from_signature`` with
``native_specialize_impl``, as ``JITFunction.run`` does): integers equal to 1 become constexprs,
integers and pointers divisible by 16 get ``tt.divisibility = 16``, ``do_not_specialize`` is
honoured, host-side ``TensorDescriptor`` arguments become ``tensordesc<...>`` types. A tensor's
address on a GPU is not known here (meta tensors have none): it is taken as its
``storage_offset * element_size`` from a base address that is a multiple of 256 bytes, which the
CUDA caching allocator guarantees for the start of every block it hands out (it rounds to 512
bytes). A view that starts mid-storage therefore loses (or keeps) alignment as on the GPU.

While recording (and only then, undone on exit):

- the ``resnet_fused::*`` custom ops run their real bodies on meta tensors (a scoped ``Meta``
  kernel registration), so their Triton launches are seen; outside recording meta and fake
  tensors keep reaching the registered fake implementations;
- the ``"triton"`` backend accepts meta tensors (it refuses them otherwise);
- autocast reads as off for the meta device, and ``torch.autocast("meta", enabled=False)`` (the
  ops' guard around their kernels) is a no-op: torch raises for both, autocast has no meta mode;
- float32 convolutions use TF32, a CUDA build's default (``tf32=False``: IEEE), since that choice
  is part of the conv kernel's constexprs;
- with ``capability=(9, 0)`` (say), ``torch.cuda.get_device_capability()`` answers that, so a
  launcher that picks its path by GPU generation records the target's.

Launch configurations come from the launchers as they would on a GPU: ops pick the interpreter's
small blocks only for CPU tensors (``ops._common.interpreting``), so record on the ``meta`` device.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

# launch options that are not compile options: the grid, and run()'s own flag
_NOT_OPTIONS = ("grid", "warmup")


@dataclass
class Launch:
    """One recorded launch = one compilation request, as Triton's JIT would issue it.

    ``signature``: parameter name -> Triton type (``"*fp16"``, ``"i32"``, ``"constexpr"``,
    ``"tensordesc<fp16[64, 64]>"``...). ``constexprs`` / ``attrs``: keyed by argument path (a tuple:
    ``(3,)`` is the 4th parameter; deeper for tuple arguments), as ``triton.compiler.ASTSource``
    takes them; ``attrs`` values are lists like ``[["tt.divisibility", 16]]``. ``options``: the
    launch's compile options (``num_warps``, ``num_stages``, ``debug``...), target-independent.
    ``variant``: a digest of Triton's own JIT cache key for this launch (same digest = the same
    compiled kernel on a GPU). ``site``: labels of the call site (model, mode, dtype, layout,
    module path, forward/backward), filled by the caller's ``where`` function. ``autotune``: for
    launches made by an ``Autotuner``: its key (the values it tunes per), the number of
    configurations it compiles for that key, and which of them this launch is.
    """
    kernel: str  # "module:qualname" of the @triton.jit function
    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], Any]
    attrs: Dict[Tuple[int, ...], list]
    options: Dict[str, Any]
    variant: str
    device: str
    site: Dict[str, Any] = field(default_factory=dict)
    autotune: Optional[Tuple[tuple, int, int]] = None
    ints: Dict[str, int] = field(default_factory=dict)  # integer arguments' values (not part of the variant)

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[-1].rsplit(".", 1)[-1]

    def constexpr_values(self) -> Dict[str, Any]:
        """Constexprs by parameter name (paths into tuple arguments as ``name[i]``)."""
        return {_path_name(self.signature, p): v for p, v in sorted(self.constexprs.items())}

    def divisible(self) -> List[str]:
        """Names of the arguments that carry ``tt.divisibility = 16``."""
        return [_path_name(self.signature, p) for p, a in sorted(self.attrs.items())
                if any(k == "tt.divisibility" for k, _ in a)]


def _path_name(signature: Dict[str, str], path: Tuple[int, ...]) -> str:
    name = list(signature)[path[0]]
    return name + "".join(f"[{i}]" for i in path[1:])


class _DevicePointer:
    """What Triton's specialisation reads of a tensor argument (``data_ptr()`` and ``dtype``), with
    the address a GPU allocation would give it modulo 256 (see the module docstring)."""

    __slots__ = ("dtype", "_offset")

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype = t.dtype
        self._offset = t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._offset


def _device_view(arg):
    if isinstance(arg, torch.Tensor):
        return _DevicePointer(arg)
    if isinstance(arg, tuple) and not hasattr(arg, "_fields"):
        return tuple(_device_view(a) for a in arg)
    return arg


class Recorder:
    """The launches seen so far; ``where()`` labels each (set by the workload's driver)."""

    def __init__(self, where: Optional[Callable[[], Dict[str, Any]]] = None) -> None:
        self.launches: List[Launch] = []
        self.where = where or (lambda: {})
        self.capability_queries = 0  # calls to torch.cuda.get_device_capability while recording
        self._autotune: Optional[Tuple[tuple, int, int]] = None

    def record(self, kernel, args, kwargs) -> None:
        self.launches.append(specialize(kernel, args, kwargs, site=dict(self.where()), autotune=self._autotune))


# ------------------------------------------------------------------------------- specialisation
_CUDA_BACKEND = None
# keyed by id(); each entry keeps its key object alive, so an id is never reused for another kernel
_JIT_VIEWS: Dict[int, Tuple[Any, Any]] = {}
_BINDERS: Dict[int, Tuple[Any, Callable]] = {}


def _cuda_backend():
    """Triton's NVIDIA backend object (any CUDA target: specialisation does not depend on it)."""
    global _CUDA_BACKEND
    if _CUDA_BACKEND is None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        _CUDA_BACKEND = make_backend(GPUTarget("cuda", 90, 32))
    return _CUDA_BACKEND


def as_jit(kernel):
    """The ``JITFunction`` of a launchable kernel: itself, or, for an ``InterpretedFunction``
    (``TRITON_INTERPRET=1``), a JITFunction built from the same Python function and options."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    fn = getattr(kernel, "fn", None)
    if fn is None or not hasattr(kernel, "rewrite"):  # not an InterpretedFunction either
        raise TypeError(f"kernel: expected a @triton.jit function, got {type(kernel).__name__}")
    view = _JIT_VIEWS.get(id(kernel))
    if view is None:
        view = _JIT_VIEWS[id(kernel)] = (kernel, JITFunction(fn, **kernel.kwargs))
    return view[1]


def specialize(kernel, args, kwargs, site=None, autotune=None) -> Launch:
    """The :class:`Launch` Triton's JIT would compile for ``kernel[grid](*args, **kwargs)`` on an
    NVIDIA GPU (``kwargs`` may include ``grid``/``warmup``, which are dropped)."""
    from triton import knobs
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    jit = as_jit(kernel)
    backend = _cuda_backend()
    kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_OPTIONS}
    # as JITFunction.run: these two always take part in the cache key and the options
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if id(jit) not in _BINDERS:
        _BINDERS[id(jit)] = (jit, create_function_from_signature(jit.signature, jit.params, backend))
    binder = _BINDERS[id(jit)][1]
    bound, specialization, options = binder(*map(_device_view, args), **{k: _device_view(v) for k, v in kwargs.items()})
    key = compute_cache_key({}, specialization, options)
    # _pack_args also rejects unknown keyword arguments, as a launch would
    _, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    name = f"{jit.fn.__module__}:{jit.fn.__qualname__}"
    digest = hashlib.sha256(f"{name}|{key}".encode()).hexdigest()[:16]
    device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "none")
    ints = {k: v for k, v in bound.items() if isinstance(v, int) and not isinstance(v, bool)}
    return Launch(name, dict(signature), dict(constexprs), {k: list(v) for k, v in attrs.items()},
                  dict(options), digest, device, site or {}, autotune, ints)


# ------------------------------------------------------------------------------------ recording
_active: Optional[Recorder] = None


def _jit_run(self, *args, grid, warmup, **kwargs):
    _active.record(self, args, kwargs)
    return None


def _autotuner_run(self, *args, **kwargs):
    """Autotuner.run, recording instead of benchmarking: every configuration it would compile for
    this key (those surviving ``prune_configs``), each through the wrapped kernel's run."""
    self.nargs = dict(zip(self.arg_names, args))
    try:
        configs = self.configs
        tuned = len(configs) > 1  # as Autotuner.run: a single config is run without tuning
        if tuned:
            all_args = {**self.nargs, **kwargs}
            named = {k: v for k, v in all_args.items() if k in self.arg_names}
            key = tuple([named[k] for k in self.keys if k in named]
                        + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])
            configs = self.prune_configs(kwargs)
        for i, config in enumerate(configs):
            _active._autotune = (key, len(configs), i) if tuned else None
            try:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                _active._autotune = None
    finally:
        self.nargs = None


def _custom_op_bodies(namespace: str = "resnet_fused"):
    """(name, body) of every ``torch.library.custom_op`` in ``namespace`` (their Python bodies)."""
    from torch._library import custom_ops

    for qualname, opdef in list(custom_ops.OPDEFS.items()):
        ns, _, name = qualname.partition("::")
        if ns == namespace:
            yield name, opdef._init_fn


@contextlib.contextmanager
def recording(where: Optional[Callable[[], Dict[str, Any]]] = None, tf32: bool = True,
              capability: Optional[Tuple[int, int]] = None) -> Iterator[Recorder]:
    """``with recording() as rec:`` run a workload on meta tensors; ``rec.launches`` lists what it
    would compile. ``where()`` returns the labels of the current call site. ``capability``: what
    ``torch.cuda.get_device_capability()`` answers meanwhile (e.g. ``(9, 0)``), for launchers that
    choose by GPU generation. Not reentrant, not thread-safe (it patches Triton's classes for the
    whole process while active)."""
    global _active
    if _active is not None:
        raise RuntimeError("recording: already recording (recording() does not nest)")
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 6):
        # specialisation goes through Triton's own binder, whose internals this module calls
        raise RuntimeError(f"recording: needs Triton >= 3.6 (its JIT binder and knobs), found {triton.__version__}")
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit

    from .. import backends, ops  # noqa: F401  (ops: registers the custom ops)

    patches: List[Tuple[object, str, object]] = [(jit.JITFunction, "run", _jit_run),
                                                 (autotuner.Autotuner, "run", _autotuner_run)]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        patches.append((InterpretedFunction, "run", _jit_run))
    except ImportError:  # pragma: no cover - a Triton without the interpreter
        pass
    original_reason = backends.unavailable_reason

    def unavailable_reason(name, device=None):
        if device is not None and device.type == "meta" and backends._check_name(name) == "triton":
            return backends.triton_import_error()
        return original_reason(name, device)

    patches.append((backends, "unavailable_reason", unavailable_reason))
    patches += [(torch, "is_autocast_enabled", _meta_aware_is_autocast_enabled(torch.is_autocast_enabled)),
                (torch, "autocast", _meta_aware_autocast(torch.autocast))]
    if capability is not None:
        cap = (int(capability[0]), int(capability[1]))

        def get_device_capability(device=None):
            _active.capability_queries += 1
            return cap

        patches.append((torch.cuda, "get_device_capability", get_device_capability))
    saved = [(obj, attr, obj.__dict__[attr] if isinstance(obj, type) else getattr(obj, attr))
             for obj, attr, _ in patches]
    lib = None
    precision = _set_conv_tf32(tf32)
    try:
        lib = torch.library.Library("resnet_fused", "IMPL")
        for name, body in _custom_op_bodies():
            lib.impl(name, body, "Meta")
        for obj, attr, new in patches:
            setattr(obj, attr, new)
        _active = Recorder(where)
        yield _active
    finally:
        _active = None
        for obj, attr, old in saved:
            setattr(obj, attr, old)
        if lib is not None:
            lib._destroy()
        _restore_conv_tf32(precision)


def _meta_aware_is_autocast_enabled(original):
    def is_autocast_enabled(*args, **kwargs):
        device_type = args[0] if args else kwargs.get("device_type")
        return False if device_type == "meta" else original(*args, **kwargs)
    return is_autocast_enabled


def _meta_aware_autocast(original):
    def autocast(device_type, *args, **kwargs):
        if device_type != "meta":
            return original(device_type, *args, **kwargs)
        enabled = kwargs.get("enabled", args[1] if len(args) > 1 else True)
        if enabled:
            raise ValueError("recording: torch.autocast cannot be enabled for the meta device; record "
                             "with the model and input in the compute dtype instead")
        return contextlib.nullcontext()
    return autocast


def _set_conv_tf32(on: bool):
    """Set cuDNN's float32 conv precision (read by ``ops._common.conv_uses_tf32``); returns what
    to restore."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        old = ("conv", conv.fp32_precision)
        conv.fp32_precision = "tf32" if on else "ieee"
    else:  # pragma: no cover - a torch before the per-operator precision API
        old = ("legacy", torch.backends.cudnn.allow_tf32)
        torch.backends.cudnn.allow_tf32 = on
    return old


def _restore_conv_tf32(old) -> None:
    kind, value = old
    if kind == "conv":
        torch.backends.cudnn.conv.fp32_precision = value
    else:  # pragma: no cover
        torch.backends.cudnn.allow_tf32 = value
