"""The three dispatched call sites: build the case, describe a trial, run what was chosen.

Each function is what ``"auto"`` means for one op; the modules and the functional ops call them.
Trials never touch the caller's state: inference trials run without autograd into fresh outputs;
a training trial runs a deep copy of the block on a detached copy of ``x`` with its own random
generator for the upstream gradient, so the block's running statistics, ``num_batches_tracked``
and every parameter's ``.grad`` stay exactly as one eager step leaves them.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ops._common import compute_dtype
from . import candidates as cands
from . import dispatcher, keys
from .dispatcher import decide

Fold = Callable[[torch.memory_format], Tuple[Tensor, Optional[Tensor]]]


def _cast(x: Tensor, w: Tensor, cdt: torch.dtype) -> Tuple[Tensor, Tensor]:
    """What autocast does to a conv: both operands in the compute dtype."""
    return (x if x.dtype == cdt else x.to(cdt)), (w if w.dtype == cdt else w.to(cdt))


def _signature(x: Tensor, residual: Optional[Tensor], w_fmt: torch.memory_format, cdt: torch.dtype, grad: bool,
               autocast: bool) -> tuple:
    """What can change a conv site's case from call to call (its module fixes the rest: weight
    shape, stride, padding, dilation, ReLU), cheap to build: the key of the site's own memo."""
    return (x.shape, x.stride(), x.dtype, x.device, cdt, w_fmt, grad, autocast,
            None if residual is None else (residual.dtype, residual.stride()),
            torch.get_num_threads() if x.device.type == "cpu" else keys._uses_tf32(x, cdt),
            dispatcher.epoch, cands.generation["conv_bias_act"])


def conv_site(x: Tensor, fold: Fold, w_shape: Sequence[int], w_fmt: torch.memory_format,
              residual: Optional[Tensor], stride, padding, dilation, relu: bool,
              out_format: torch.memory_format, grad: bool, site: Optional[str] = None,
              memo: Optional[dict] = None) -> Tensor:
    """``relu?(conv(x, w) + b + residual)`` by the measured choice for this case.

    ``fold(memory_format)`` returns ``(weight, bias)`` with the weight in that layout (each
    candidate reads the layout it is fastest with); ``w_fmt`` is the model's own weight layout;
    ``grad``: whether autograd records this call (a forward-only candidate cannot run then).
    ``memo``: the calling module's dict for this site (its geometry fixed): a settled choice is
    kept there under a cheap signature of the call, so later calls skip building the key (tens of
    microseconds a conv in Python: 1-2% of a batch-1 ResNet-50 forward on CPU).
    """
    cdt = compute_dtype(x)
    autocast = torch.is_autocast_enabled(x.device.type)
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    sig = None
    if memo is not None and not torch.compiler.is_compiling():
        sig = _signature(x, residual, w_fmt, cdt, grad, autocast)
        hit = memo.get(sig)
        if hit is not None:
            return _call(hit[1], hit[0], x, fold, cdt, autocast, residual, stride, padding, dilation, relu,
                         out_format)
    out_dtype = cdt if residual is None else torch.promote_types(cdt, residual.dtype)
    case = keys.conv_case(x, w_shape, w_fmt, stride, padding, dilation, 1, cdt, out_dtype, residual, relu, grad)
    facts = keys.facts(case, x.device)

    def trial(c: cands.Candidate):
        def run() -> List[Tensor]:
            with torch.no_grad():
                return [_call(c, facts, x, fold, cdt, autocast, residual, stride, padding, dilation, relu,
                              out_format)]
        return run

    chosen = cands.get("conv_bias_act", decide(case, x.device, trial, site))
    if sig is not None and dispatcher.is_settled(case, x.device):
        if len(memo) > 64:  # a site fed ever new shapes keeps only recent ones
            memo.clear()
        memo[sig] = (facts, chosen)
    return _call(chosen, facts, x, fold, cdt, autocast, residual, stride, padding, dilation, relu, out_format)


def _call(c: cands.Candidate, facts, x: Tensor, fold: Fold, cdt: torch.dtype, autocast: bool,
          residual: Optional[Tensor], stride, padding, dilation, relu: bool, out_format) -> Tensor:
    """Run candidate ``c`` of a conv site on the call's inputs."""
    w, b = fold(c.weight_format(facts))
    xc, wc = _cast(x, w, cdt)
    if not autocast:  # entering a disabled autocast costs more than a small conv: only when needed
        return c.fn(xc, wc, b, residual, stride, padding, dilation, relu, out_format)
    with torch.autocast(x.device.type, enabled=False):
        return c.fn(xc, wc, b, residual, stride, padding, dilation, relu, out_format)


def bn_act_site(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], relu: bool, grad: bool,
                site: Optional[str] = None) -> Tensor:
    """``relu?(x * scale + shift + residual)`` by the measured choice for this case."""
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    case = keys.bn_act_case(x, out_dtype, residual, relu, grad)

    def trial(c: cands.Candidate):
        def run() -> List[Tensor]:
            with torch.no_grad():
                return [c.fn(x, scale, shift, residual, relu)]
        return run

    chosen = decide(case, x.device, trial, site)
    return cands.get("bn_act", chosen).fn(x, scale, shift, residual, relu)


def block_train_site(block: nn.Module, x: Tensor, convs: Sequence[nn.Conv2d], norms: Sequence[nn.Module],
                     short_conv: Optional[nn.Conv2d], short_norm: Optional[nn.Module], low_memory: bool,
                     site: Optional[str] = None) -> Tensor:
    """A fused-trainable block's training forward by the measured choice for this case (the
    candidates are timed as forward + backward)."""
    all_norms = list(norms) + ([short_norm] if short_norm is not None else [])
    case = keys.block_case(block, x, convs, all_norms, short_conv, compute_dtype(x), low_memory)
    no_measuring = None
    if any(isinstance(n, nn.SyncBatchNorm) for n in all_norms):
        no_measuring = "SyncBatchNorm (a trial would need every rank to measure in step)"
    elif torch.is_inference_mode_enabled():
        no_measuring = "inference mode (no backward to time)"
    chosen = decide(case, x.device, lambda c: _block_trial(block, x, c), site or type(block).__name__,
                    no_measuring)
    return cands.get("block_train", chosen).fn(block, x)


def _block_trial(block: nn.Module, x: Tensor, c: cands.Candidate):
    """One candidate's forward + backward on a copy of the block: returns [out, dx, *param grads]."""
    clone = copy.deepcopy(block)
    xt = x.detach().requires_grad_(True)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(0)
    upstream: List[Tensor] = []

    def run() -> List[Optional[Tensor]]:
        params = list(clone.parameters())
        for p in params:
            p.grad = None
        xt.grad = None
        with torch.enable_grad():
            out = c.fn(clone, xt)
            if not upstream:  # the same upstream gradient for every run and candidate
                g = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32)
                upstream.append(g.to(out.dtype).contiguous(memory_format=_format(out)))
            out.backward(upstream[0])
        return [out.detach(), xt.grad, *[p.grad for p in params]]

    return run


def _format(t: Tensor) -> torch.memory_format:
    from ..ops._common import memory_format_of

    return memory_format_of(t)
