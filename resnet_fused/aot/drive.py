"""The workloads the codegen report covers: model zoo networks run on the meta device, in eval and
through a training step, with every Triton launch recorded (:mod:`.record`).

For each model, dtype (fp16, bf16, fp32 with TF32) and layout (channels_last, NCHW):

- ``eval``: the model in that dtype and layout, ``model.eval()``, one forward under ``no_grad``
  (BatchNorm folded: the fused conv at every conv site);
- ``train``: ``model.train()``, one forward and the backward of ``out.float().sum()`` (the fused
  training blocks: conv + statistics, BN + ReLU apply, the two-pass BN backward).

fp16/bf16 training is recorded with the model and its input in that dtype, not under
``torch.autocast`` (autocast does not run on the meta device). The fused blocks see the same
kernel arguments either way: they cast convolution weights to the compute dtype themselves and
build every BatchNorm vector in float32 from ``weight.float()``; the eager stem and head hand the
first block and the last block's gradient over in the compute dtype in both cases.
``tests/test_aot.py`` checks this by recording a small network both ways on CPU.

Inputs: 3 x 224 x 224 at batch 256 for the ImageNet ResNets, 3 x 32 x 32 at batch 128 for the
CIFAR networks (the benchmarks' headline batches); ``batches`` overrides them. The batch changes
the compiled variants through specialisation (``M = N * OH * OW`` divisible by 16 or not) and
config pruning (no tile taller than the problem): ResNet-50's fp16 channels_last eval forward
compiles the same 52 variants at batch 32 as at 256, and 40 others at batch 1.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .record import Launch, recording

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
MODES = ("eval", "train")


@dataclass(frozen=True)
class ModelSpec:
    """A named network: how to build it and the input it is reported at."""
    name: str
    build: Callable[..., nn.Module]
    size: int  # input H = W
    batch: int


def model_spec(name: str) -> ModelSpec:
    """``resnet18`` ... ``resnet152``, ``wide_resnet50_2``, ``wide_resnet101_2`` (224 x 224, batch
    256); ``wrn<depth>_<k>`` (e.g. ``wrn28_10``) and ``preact_resnet<depth>`` (32 x 32, batch 128)."""
    from .. import models
    from ..models.preact import preact_units_per_stage
    from ..models.wide import wrn_blocks_per_group

    if not isinstance(name, str):
        raise TypeError(f"model: expected a name like 'resnet50' or 'wrn28_10', got {type(name).__name__}")
    if name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2"):
        return ModelSpec(name, getattr(models, name), 224, 256)
    m = re.fullmatch(r"wrn(\d+)_(\d+)", name)
    if m:
        depth, k = int(m.group(1)), int(m.group(2))
        wrn_blocks_per_group(depth)  # ValueError naming the valid depths
        return ModelSpec(name, lambda **kw: models.wrn(depth, k, **kw), 32, 128)
    m = re.fullmatch(r"preact_resnet(\d+)", name)
    if m:
        depth = int(m.group(1))
        preact_units_per_stage(depth)
        return ModelSpec(name, lambda **kw: models.preact_resnet(depth, **kw), 32, 128)
    raise ValueError(f"model: unknown name {name!r}; expected resnet18/34/50/101/152, wide_resnet50_2, "
                     f"wide_resnet101_2, wrn<depth>_<k> (e.g. wrn28_10) or preact_resnet<depth>")


class Sites:
    """Labels for each launch: the fixed ones (model, mode, dtype, layout) plus the module running
    it. In a forward, the innermost module whose forward is running; in a backward, the module
    whose forward made the autograd node being run (mapped from the nodes its outputs carry)."""

    def __init__(self) -> None:
        self.labels: Dict[str, object] = {}
        self._stack: List[str] = []
        self._nodes: Dict[object, str] = {}
        self._handles = []

    def attach(self, model: nn.Module, prefix: str = "") -> None:
        for name, mod in model.named_modules():
            path = f"{prefix}{name}" if name else (prefix.rstrip(".") or "<model>")
            self._handles.append(mod.register_forward_pre_hook(self._enter(path)))
            self._handles.append(mod.register_forward_hook(self._leave(path)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        self._nodes.clear()

    def _enter(self, path):
        def hook(mod, args):
            self._stack.append(path)
        return hook

    def _leave(self, path):
        def hook(mod, args, out):
            self._stack.pop()
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                node = getattr(t, "grad_fn", None)
                if node is not None:
                    self._nodes.setdefault(node, path)  # inner modules finish first: keep theirs
        return hook

    def where(self) -> Dict[str, object]:
        node = torch._C._current_autograd_node()
        if node is not None:
            return {**self.labels, "phase": "backward", "module": self._nodes.get(node, "?")}
        return {**self.labels, "phase": "forward", "module": self._stack[-1] if self._stack else "?"}


def _run_one(model: nn.Module, spec: ModelSpec, mode: str, dtype: torch.dtype, fmt: torch.memory_format,
             batch: int) -> None:
    model.to(dtype=dtype, memory_format=fmt)
    x = torch.empty((batch, 3, spec.size, spec.size), device="meta", dtype=dtype).contiguous(memory_format=fmt)
    if mode == "eval":
        model.eval()
        with torch.no_grad():
            model(x)
    else:
        model.train()
        model(x).float().sum().backward()


def record_models(models: Sequence[str], dtypes: Iterable[str] = tuple(DTYPES), layouts: Iterable[str] = tuple(LAYOUTS),
                  modes: Iterable[str] = MODES, batches: Optional[Sequence[int]] = None, tf32: bool = True,
                  archs: Sequence[str] = ("sm_90a",)) -> List[Launch]:
    """Every Triton launch of each target x model x mode x dtype x layout, in order, labelled (see
    :class:`Sites`; ``site["arch"]`` is the target it was recorded for: launchers that ask for
    the GPU's compute capability get that target's; when the first target's run never asked, the
    others reuse its launches). ``batches``: run each at these batches instead of the model's own."""
    from .compile import target

    specs = [model_spec(m) for m in models]
    caps = {a: divmod(target(a).capability, 10) for a in archs}
    dtypes, layouts, modes = list(dtypes), list(layouts), list(modes)
    for what, got, allowed in (("dtype", dtypes, DTYPES), ("layout", layouts, LAYOUTS), ("mode", modes, MODES)):
        bad = [g for g in got if g not in allowed]
        if bad:
            raise ValueError(f"{what}: unknown {bad}; expected some of {list(allowed)}")
    sites = Sites()
    launches: List[Launch] = []
    for arch, cap in caps.items():
        if launches and not asked:  # nothing asked which GPU: every target records the same launches
            first = launches[0].site["arch"]
            launches += [replace(ln, site={**ln.site, "arch": arch}) for ln in launches if ln.site["arch"] == first]
            continue
        with recording(where=sites.where, tf32=tf32, capability=cap) as rec:
            for spec in specs:
                with torch.device("meta"):  # no memory, no init cost
                    model = spec.build(backend="triton")
                sites.attach(model)
                try:
                    for mode, dt, lay, n in itertools.product(modes, dtypes, layouts, batches or [spec.batch]):
                        sites.labels = {"arch": arch, "model": spec.name, "mode": mode, "dtype": dt,
                                        "layout": lay, "batch": n, "size": spec.size}
                        _run_one(model, spec, mode, DTYPES[dt], LAYOUTS[lay], n)
                finally:
                    sites.detach()
            launches += rec.launches
            asked = rec.capability_queries > 0
    return launches


def calls(launches: Sequence[Launch]) -> List[Launch]:
    """One launch per kernel call: an autotuned call recorded one launch per configuration."""
    return [ln for ln in launches if ln.autotune is None or ln.autotune[2] == 0]
